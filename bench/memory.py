"""Client memory per pooled connection, each contender in a fresh interpreter.

A fresh process per measurement, so that one library's allocations (and the
allocator's free lists they leave behind) cannot flatter or hurt the next.
In the child: run the same code once with a pool of one and close it (imports,
dialect setup and other one-off costs paid), read the RSS, open a pool of
``n``, check out all ``n`` connections and run a statement on each, read the
RSS again. The difference divided by ``n`` is what a pooled connection costs
the client: the driver's connection and buffers, the pool's bookkeeping and
its share of the pool's fixed cost (threads, locks).
A second child does the same under ``tracemalloc`` for the Python-heap share
(tracemalloc's own tables would inflate RSS, hence two runs).

Run as ``python -m bench.memory KEY ENGINE READ_URL WRITE_URL N MODE``; prints JSON.
"""

from __future__ import annotations

import dbrouter  # noqa: F401 - first: loads mysql-connector's C extension before ssl/hashlib

import contextlib
import gc
import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path
from typing import Any, Callable

from .contenders import MYSQL_COLLATION, Targets, _autocommit_creator, _mysql_kwargs, _sqlalchemy_url

__all__ = ["HOLDERS", "measure"]

MYSQL_POOL_LIMIT = 32  # mysql.connector.pooling refuses pool_size > 32


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _query(conn: Any) -> None:
    cur = conn.cursor()
    cur.execute("SELECT 1")
    cur.fetchall()
    cur.close()


# Each holder: (targets, n, stack) -> a function that checks out one more
# connection, keeps it (the ExitStack releases everything at the end) and runs
# a statement on it.


def _hold_raw(t: Targets, n: int, stack: contextlib.ExitStack) -> Callable[[], Any]:
    connect = _autocommit_creator(t)

    def take() -> Any:
        conn = connect()
        stack.callback(conn.close)
        return conn

    return take


def _hold_psycopg2_pool(t: Targets, n: int, stack: contextlib.ExitStack) -> Callable[[], Any]:
    from psycopg2.pool import ThreadedConnectionPool

    from .contenders import _pg_autocommit_factory

    pool = ThreadedConnectionPool(1, n, t.read_url, connection_factory=_pg_autocommit_factory())
    stack.callback(pool.closeall)
    return pool.getconn


def _hold_psycopg_pool(t: Targets, n: int, stack: contextlib.ExitStack) -> Callable[[], Any]:
    from psycopg_pool import ConnectionPool

    pool = ConnectionPool(t.read_url, min_size=1, max_size=n, kwargs={"autocommit": True}, open=True)
    stack.callback(pool.close)
    return lambda: pool.getconn(timeout=30.0)


def _hold_sa_queuepool(t: Targets, n: int, stack: contextlib.ExitStack) -> Callable[[], Any]:
    from sqlalchemy.pool import QueuePool

    pool = QueuePool(_autocommit_creator(t), pool_size=n, max_overflow=0)
    stack.callback(pool.dispose)

    def take() -> Any:
        conn = pool.connect()
        stack.callback(conn.close)
        return conn

    return take


class _EngineConn:
    """A SQLAlchemy Connection with the cursor() interface the holder loop uses."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def cursor(self) -> Any:
        return self

    def execute(self, sql: str) -> None:
        self.result = self.conn.exec_driver_sql(sql)

    def fetchall(self) -> Any:
        return self.result.fetchall()

    def close(self) -> None:
        pass


def _hold_sa_engine(t: Targets, n: int, stack: contextlib.ExitStack) -> Callable[[], Any]:
    import sqlalchemy

    engine = sqlalchemy.create_engine(
        _sqlalchemy_url(t.read_url, t.engine), pool_size=n, max_overflow=0, isolation_level="AUTOCOMMIT"
    )
    stack.callback(engine.dispose)

    def take() -> Any:
        return _EngineConn(stack.enter_context(engine.connect()))

    return take


def _hold_dbutils(t: Targets, n: int, stack: contextlib.ExitStack) -> Callable[[], Any]:
    from dbutils.pooled_db import PooledDB

    from .contenders import _pg_autocommit_factory

    if t.engine == "postgres":
        import psycopg2 as creator

        kwargs: dict[str, Any] = {"dsn": t.read_url, "connection_factory": _pg_autocommit_factory()}
    else:
        import mysql.connector as creator  # type: ignore[no-redef]

        kwargs = {**_mysql_kwargs(t.read_url), "autocommit": True}
    pool = PooledDB(creator, maxconnections=n, blocking=True, **kwargs)
    stack.callback(pool.close)

    def take() -> Any:
        conn = pool.connection()
        stack.callback(conn.close)
        return conn

    return take


def _hold_connector_pool(t: Targets, n: int, stack: contextlib.ExitStack) -> Callable[[], Any]:
    from mysql.connector import pooling

    pool = pooling.MySQLConnectionPool(pool_name=f"benchmem{n}", pool_size=n, **_mysql_kwargs(t.read_url))

    def take() -> Any:
        conn = pool.get_connection()
        stack.callback(conn.close)
        return conn

    return take


def _hold_dbrouter_pool(t: Targets, n: int, stack: contextlib.ExitStack) -> Callable[[], Any]:
    pool = dbrouter.connect_pool(t.read_url, pool=dbrouter.PoolConfig(min_size=1, max_size=n))
    stack.callback(pool.close)
    return lambda: stack.enter_context(pool.connection())


def _hold_dbrouter(t: Targets, n: int, stack: contextlib.ExitStack) -> Callable[[], Any]:
    router = dbrouter.Router(t.write_url, [t.read_url], max_size=n)
    stack.callback(router.close)
    return lambda: stack.enter_context(router.connection("read"))


# key -> (label, engines, holder)
HOLDERS: dict[str, tuple[str, tuple[str, ...], Callable[..., Callable[[], Any]]]] = {
    "raw": ("driver connections, no pool (reference)", ("postgres", "mysql"), _hold_raw),
    "psycopg2_pool": ("psycopg2 ThreadedConnectionPool", ("postgres",), _hold_psycopg2_pool),
    "psycopg_pool": ("psycopg_pool ConnectionPool (psycopg 3)", ("postgres",), _hold_psycopg_pool),
    "connector_pool": ("mysql.connector.pooling", ("mysql",), _hold_connector_pool),
    "sa_queuepool": ("SQLAlchemy QueuePool, raw", ("postgres", "mysql"), _hold_sa_queuepool),
    "sa_engine": ("SQLAlchemy engine.connect()", ("postgres", "mysql"), _hold_sa_engine),
    "dbutils": ("DBUtils PooledDB", ("postgres", "mysql"), _hold_dbutils),
    "dbrouter_pool": ("dbrouter Pool (connect_pool)", ("postgres", "mysql"), _hold_dbrouter_pool),
    "dbrouter": ("dbrouter Router.connection('read') (also a primary pool + monitor)", ("postgres", "mysql"), _hold_dbrouter),
}


def _driver_class(obj: Any) -> str:
    """The driver connection's class under the pools' wrappers (CMySQLConnection proves the C extension)."""
    for _ in range(6):
        inner = next((getattr(obj, a) for a in ("dbapi_connection", "_cnx", "_con", "conn", "connection")
                      if getattr(obj, a, None) is not None), None)
        if inner is None or inner is obj:
            break
        obj = inner
    return type(obj).__name__


def _child(key: str, t: Targets, n: int, mode: str) -> dict[str, Any]:
    holder = HOLDERS[key][2]
    if key == "connector_pool":
        n = min(n, MYSQL_POOL_LIMIT)
    # Warm-up: the same code with a pool of one, then closed, so that lazy imports,
    # SQLAlchemy's dialect setup and the like are paid before the baseline.
    with contextlib.ExitStack() as warm:
        _query(holder(t, 1, warm)())
    gc.collect()
    if mode == "tracemalloc":
        tracemalloc.start()
    before = _rss()
    with contextlib.ExitStack() as stack:
        take = holder(t, n, stack)
        held = [take() for _ in range(n)]
        for conn in held:
            _query(conn)
        gc.collect()
        after = _rss()
        traced = tracemalloc.get_traced_memory()[0] if mode == "tracemalloc" else 0
        tracemalloc.stop()
        conn_class = _driver_class(held[0])
    return {"n": n, "rss_per_conn": (after - before) / n, "py_per_conn": traced / n, "conn_class": conn_class}


def measure(key: str, t: Targets, n: int, mode: str, timeout: float = 120.0) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter; raise on failure."""
    root = Path(__file__).resolve().parent.parent
    argv = [sys.executable, "-m", "bench.memory", key, t.engine, t.read_url, t.write_url, str(n), mode]
    proc = subprocess.run(argv, cwd=root, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"memory child {key}/{t.engine} failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    _key, _engine, _read, _write, _n, _mode = sys.argv[1:7]
    _result = _child(_key, Targets(_engine, _read, _write), int(_n), _mode)
    print(json.dumps(_result))
