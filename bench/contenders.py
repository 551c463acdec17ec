"""The contenders: one way each to run "check out, run a statement, give back".

Every contender is a factory that opens its pool (or connection) against a
`Targets` and returns an `Opened`: ``run(sql)`` does one complete operation as
an application would write it, ``close()`` releases everything. Each is set up
the way its documentation suggests, and variants show what a setting costs
(autocommit vs the driver's default). Where a library needs a setting to be
usable at all under concurrency, the setting is named in ``note``.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import unquote, urlsplit

__all__ = ["CONTENDERS", "Contender", "Opened", "Targets", "by_engine", "gated"]

MYSQL_COLLATION = "utf8mb4_general_ci"  # MariaDB does not know MySQL 8's default utf8mb4_0900_ai_ci


@dataclass(frozen=True)
class Targets:
    """Where a contender connects: reads go to ``read_url`` (a replica), dbrouter writes to ``write_url``."""

    engine: str  # "postgres" or "mysql"
    read_url: str
    write_url: str
    quiet_monitor: bool = False  # dbrouter: no health probes (for counting round trips on the wire)


@dataclass
class Opened:
    run: Callable[[str], Any]
    close: Callable[[], None]
    conn_class: str  # the driver connection class actually used (CMySQLConnection proves the C extension)
    checkout: Callable[[], None] | None = None  # check out and give back, no statement (pools only)


@dataclass(frozen=True)
class Contender:
    key: str
    label: str
    engine: str
    open: Callable[[Targets, int], Opened]
    matrix: bool = False  # takes part in the many-thread matrix
    gate: bool = False  # raises when exhausted instead of waiting: wrapped in a semaphore for many threads
    floor: bool = False
    note: str = ""


def gated(run: Callable[[str], Any], size: int) -> Callable[[str], Any]:
    """Wrap a pool that raises when exhausted (psycopg2, mysql.connector) in the usual recipe:
    a ``BoundedSemaphore`` of the pool's size, so that callers wait instead of failing."""
    gate = threading.BoundedSemaphore(size)

    def run_gated(sql: str) -> Any:
        with gate:
            return run(sql)

    return run_gated


def _mysql_kwargs(url: str) -> dict[str, Any]:
    parts = urlsplit(url)
    return {
        "host": parts.hostname,
        "port": parts.port,
        "user": unquote(parts.username or ""),
        "password": unquote(parts.password or ""),
        "database": parts.path.lstrip("/"),
        "collation": MYSQL_COLLATION,
    }


def _sqlalchemy_url(url: str, engine: str) -> str:
    rest = url.split("://", 1)[1]
    if engine == "postgres":
        return f"postgresql+psycopg2://{rest}"
    return f"mysql+mysqlconnector://{rest}?collation={MYSQL_COLLATION}"


def _cursor_run(get: Callable[[], Any], put: Callable[[Any], None]) -> Callable[[str], Any]:
    """The DB-API way: check out, cursor, execute, fetch, close the cursor, give back."""

    def run(sql: str) -> Any:
        conn = get()
        try:
            cur = conn.cursor()
            cur.execute(sql)
            rows = cur.fetchall()
            cur.close()
            return rows
        finally:
            put(conn)

    return run


# -- PostgreSQL ---------------------------------------------------------------


def _pg_autocommit_factory() -> Any:
    import psycopg2.extensions

    class AutocommitConnection(psycopg2.extensions.connection):
        """A psycopg2 connection that is in autocommit from birth (for pools that create them)."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.autocommit = True

    return AutocommitConnection


def pg_raw(t: Targets, size: int) -> Opened:
    import psycopg2

    conn = psycopg2.connect(t.read_url)
    conn.autocommit = True
    cur = conn.cursor()  # kept, as dbrouter keeps one per connection: the least work a statement takes

    def run(sql: str) -> Any:
        cur.execute(sql)
        return cur.fetchall()

    return Opened(run, conn.close, type(conn).__name__)


def pg_connect_per_query(t: Targets, size: int) -> Opened:
    import psycopg2

    def run(sql: str) -> Any:
        conn = psycopg2.connect(t.read_url)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(sql)
                return cur.fetchall()
        finally:
            conn.close()

    return Opened(run, lambda: None, "connection")


def _pg_threaded(t: Targets, size: int, autocommit: bool) -> Opened:
    from psycopg2.pool import ThreadedConnectionPool

    kwargs = {"connection_factory": _pg_autocommit_factory()} if autocommit else {}
    # minconn = maxconn: connections beyond minconn are closed on putconn, i.e. reconnects.
    pool = ThreadedConnectionPool(size, size, t.read_url, **kwargs)
    probe = pool.getconn()
    pool.putconn(probe)
    def checkout() -> None:
        pool.putconn(pool.getconn())

    return Opened(_cursor_run(pool.getconn, pool.putconn), pool.closeall, type(probe).__name__, checkout)


def pg_psycopg2_pool_ac(t: Targets, size: int) -> Opened:
    return _pg_threaded(t, size, True)


def pg_psycopg2_pool(t: Targets, size: int) -> Opened:
    return _pg_threaded(t, size, False)


def _pg_psycopg3(t: Targets, size: int, autocommit: bool) -> Opened:
    from psycopg_pool import ConnectionPool

    pool = ConnectionPool(
        t.read_url, min_size=size, max_size=size, kwargs={"autocommit": True} if autocommit else None,
        open=True, name=f"bench-{next(_names)}",
    )
    pool.wait(timeout=30.0)

    def run(sql: str) -> Any:
        with pool.connection() as conn:
            return conn.execute(sql).fetchall()

    def checkout() -> None:
        with pool.connection():
            pass

    with pool.connection() as conn:
        cls = type(conn).__name__
    return Opened(run, pool.close, cls, checkout)


def pg_psycopg_pool_ac(t: Targets, size: int) -> Opened:
    return _pg_psycopg3(t, size, True)


def pg_psycopg_pool(t: Targets, size: int) -> Opened:
    return _pg_psycopg3(t, size, False)


# -- SQLAlchemy and DBUtils (both engines) ----------------------------------------


def _engine_run(engine: Any) -> Callable[[str], Any]:
    def run(sql: str) -> Any:
        with engine.connect() as conn:
            return conn.exec_driver_sql(sql).fetchall()

    return run


def _sa_engine(t: Targets, size: int, autocommit: bool) -> Opened:
    import sqlalchemy

    extra = {"isolation_level": "AUTOCOMMIT"} if autocommit else {}
    engine = sqlalchemy.create_engine(_sqlalchemy_url(t.read_url, t.engine), pool_size=size, max_overflow=0, **extra)
    def checkout() -> None:
        with engine.connect():
            pass

    with engine.connect() as conn:
        cls = type(conn.connection.dbapi_connection).__name__
    return Opened(_engine_run(engine), engine.dispose, cls, checkout)


def sa_engine(t: Targets, size: int) -> Opened:
    return _sa_engine(t, size, False)


def sa_engine_ac(t: Targets, size: int) -> Opened:
    return _sa_engine(t, size, True)


def _autocommit_creator(t: Targets) -> Callable[[], Any]:
    if t.engine == "postgres":
        import psycopg2

        factory = _pg_autocommit_factory()
        return lambda: psycopg2.connect(t.read_url, connection_factory=factory)
    import mysql.connector

    kwargs = _mysql_kwargs(t.read_url)
    return lambda: mysql.connector.connect(autocommit=True, **kwargs)


def sa_queuepool(t: Targets, size: int) -> Opened:
    from sqlalchemy.pool import QueuePool

    pool = QueuePool(_autocommit_creator(t), pool_size=size, max_overflow=0)
    conn = pool.connect()
    cls = type(conn.dbapi_connection).__name__
    conn.close()
    return Opened(_cursor_run(pool.connect, lambda c: c.close()), pool.dispose, cls, lambda: pool.connect().close())


def _dbutils(t: Targets, size: int, autocommit: bool) -> Opened:
    from dbutils.pooled_db import PooledDB

    if t.engine == "postgres":
        import psycopg2 as creator

        kwargs: dict[str, Any] = {"dsn": t.read_url}
        if autocommit:
            kwargs["connection_factory"] = _pg_autocommit_factory()
    else:
        import mysql.connector as creator  # type: ignore[no-redef]

        kwargs = _mysql_kwargs(t.read_url)
        if autocommit:
            kwargs["autocommit"] = True
    # blocking=True: the default (False) raises TooManyConnections instead of waiting.
    pool = PooledDB(creator, mincached=size, maxcached=size, maxconnections=size, blocking=True, **kwargs)
    probe = pool.connection()
    cls = type(probe._con._con).__name__
    probe.close()
    return Opened(_cursor_run(pool.connection, lambda c: c.close()), pool.close, cls, lambda: pool.connection().close())


def dbutils_default(t: Targets, size: int) -> Opened:
    return _dbutils(t, size, False)


def dbutils_ac(t: Targets, size: int) -> Opened:
    return _dbutils(t, size, True)


# -- MySQL / MariaDB -----------------------------------------------------------

_names = itertools.count(1)


def my_raw(t: Targets, size: int) -> Opened:
    import mysql.connector

    conn = mysql.connector.connect(autocommit=True, **_mysql_kwargs(t.read_url))

    def run(sql: str) -> Any:
        # The connector's own query call, as dbrouter makes for statements without
        # parameters: the least work a statement takes with this driver.
        if "columns" in conn.cmd_query(sql):
            return conn.get_rows()[0]
        return None

    return Opened(run, conn.close, type(conn).__name__)


def my_connect_per_query(t: Targets, size: int) -> Opened:
    import mysql.connector

    kwargs = _mysql_kwargs(t.read_url)
    probe = mysql.connector.connect(autocommit=True, **kwargs)
    cls = type(probe).__name__
    probe.close()

    def run(sql: str) -> Any:
        conn = mysql.connector.connect(autocommit=True, **kwargs)
        try:
            cur = conn.cursor()
            cur.execute(sql)
            return cur.fetchall()
        finally:
            conn.close()

    return Opened(run, lambda: None, cls)


def my_connector_pool(t: Targets, size: int) -> Opened:
    from mysql.connector import pooling

    pool = pooling.MySQLConnectionPool(pool_name=f"bench{next(_names)}", pool_size=size, **_mysql_kwargs(t.read_url))
    probe = pool.get_connection()
    cls = type(probe._cnx).__name__
    probe.close()

    def close() -> None:
        # MySQLConnectionPool has no close(); drain and close what is idle.
        pool._remove_connections()

    return Opened(_cursor_run(pool.get_connection, lambda c: c.close()), close, cls, lambda: pool.get_connection().close())


# -- dbrouter ------------------------------------------------------------------


def _router(t: Targets, size: int) -> Any:
    import dbrouter

    options: dict[str, Any] = {"max_size": size}
    if t.quiet_monitor:
        options["health_interval"] = 3600.0
    return dbrouter.Router(t.write_url, [t.read_url], **options)


def _router_class(router: Any) -> str:
    with router.connection("read") as conn:
        return type(conn).__name__


def _router_checkout(router: Any) -> Callable[[], None]:
    def checkout() -> None:
        with router.connection("read"):
            pass

    return checkout


def dbrouter_read(t: Targets, size: int) -> Opened:
    router = _router(t, size)
    return Opened(router.read, router.close, _router_class(router))


def dbrouter_write(t: Targets, size: int) -> Opened:
    router = _router(t, size)
    return Opened(router.write, router.close, _router_class(router))


def dbrouter_connection(t: Targets, size: int) -> Opened:
    router = _router(t, size)

    def run(sql: str) -> Any:
        with router.connection("read") as conn:
            cur = conn.cursor()
            cur.execute(sql)
            rows = cur.fetchall()
            cur.close()
            return rows

    return Opened(run, router.close, _router_class(router), _router_checkout(router))


PG = "postgres"
MY = "mysql"

CONTENDERS: list[Contender] = [
    Contender("pg.raw", "psycopg2, one open connection (floor)", PG, pg_raw, floor=True,
              note="autocommit, one cursor kept (as dbrouter keeps one per connection)"),
    Contender("pg.connect", "psycopg2 connect per query", PG, pg_connect_per_query,
              note="connect, autocommit, SELECT, close"),
    Contender("pg.psycopg2_pool_ac", "psycopg2 ThreadedConnectionPool (autocommit)", PG, pg_psycopg2_pool_ac,
              matrix=True, gate=True, note="minconn=maxconn=10; connection_factory sets autocommit"),
    Contender("pg.psycopg2_pool", "psycopg2 ThreadedConnectionPool (default)", PG, pg_psycopg2_pool,
              gate=True, note="minconn=maxconn=10; driver default autocommit=False"),
    Contender("pg.psycopg_pool_ac", "psycopg_pool ConnectionPool (autocommit)", PG, pg_psycopg_pool_ac,
              matrix=True, note="psycopg 3, min_size=max_size=10, kwargs autocommit=True, pool.connection()"),
    Contender("pg.psycopg_pool", "psycopg_pool ConnectionPool (default)", PG, pg_psycopg_pool,
              note="psycopg 3, min_size=max_size=10, pool.connection() commits on exit"),
    Contender("pg.sa_engine", "SQLAlchemy engine.connect() (default)", PG, sa_engine,
              note="QueuePool pool_size=10 max_overflow=0, exec_driver_sql"),
    Contender("pg.sa_engine_ac", "SQLAlchemy engine.connect() (AUTOCOMMIT)", PG, sa_engine_ac,
              matrix=True, note="as above with isolation_level=AUTOCOMMIT"),
    Contender("pg.sa_queuepool", "SQLAlchemy QueuePool, raw (autocommit)", PG, sa_queuepool,
              matrix=True, note="QueuePool(creator) pool_size=10 max_overflow=0, DB-API cursor"),
    Contender("pg.dbutils", "DBUtils PooledDB (default)", PG, dbutils_default,
              note="mincached=maxcached=maxconnections=10, blocking=True, reset=True"),
    Contender("pg.dbutils_ac", "DBUtils PooledDB (autocommit)", PG, dbutils_ac,
              matrix=True, note="as above, connection_factory sets autocommit"),
    Contender("pg.dbrouter_read", "dbrouter router.read()", PG, dbrouter_read, matrix=True,
              note="Router(primary, [replica], max_size=10): read on the replica"),
    Contender("pg.dbrouter_write", "dbrouter router.write() (SELECT 1 on the primary)", PG, dbrouter_write,
              note="the write path with SELECT 1, so it is comparable: runs on the primary"),
    Contender("pg.dbrouter_conn", "dbrouter router.connection('read') + cursor", PG, dbrouter_connection,
              note="checkout, conn.cursor(), execute, fetchall"),
    Contender("my.raw", "mysql-connector, one open connection (floor)", MY, my_raw, floor=True,
              note="C extension, autocommit, cmd_query + get_rows (no cursor)"),
    Contender("my.connect", "mysql-connector connect per query", MY, my_connect_per_query,
              note="connect, cursor, SELECT, close"),
    Contender("my.connector_pool", "mysql.connector.pooling (defaults)", MY, my_connector_pool,
              matrix=True, gate=True, note="MySQLConnectionPool(pool_size=10), collation set; defaults otherwise"),
    Contender("my.sa_engine", "SQLAlchemy engine.connect() (default)", MY, sa_engine,
              note="mysql+mysqlconnector, QueuePool pool_size=10 max_overflow=0"),
    Contender("my.sa_engine_ac", "SQLAlchemy engine.connect() (AUTOCOMMIT)", MY, sa_engine_ac,
              matrix=True, note="as above with isolation_level=AUTOCOMMIT"),
    Contender("my.sa_queuepool", "SQLAlchemy QueuePool, raw (autocommit)", MY, sa_queuepool,
              matrix=True, note="QueuePool(creator) pool_size=10 max_overflow=0, DB-API cursor"),
    Contender("my.dbutils", "DBUtils PooledDB (default)", MY, dbutils_default,
              note="mincached=maxcached=maxconnections=10, blocking=True, ping=1, reset=True"),
    Contender("my.dbutils_ac", "DBUtils PooledDB (autocommit)", MY, dbutils_ac,
              matrix=True, note="as above with autocommit=True"),
    Contender("my.dbrouter_read", "dbrouter router.read()", MY, dbrouter_read, matrix=True,
              note="Router(primary, [replica], max_size=10): read on the replica"),
    Contender("my.dbrouter_write", "dbrouter router.write() (SELECT 1 on the primary)", MY, dbrouter_write,
              note="the write path with SELECT 1, so it is comparable: runs on the primary"),
    Contender("my.dbrouter_conn", "dbrouter router.connection('read') + cursor", MY, dbrouter_connection,
              note="checkout, conn.cursor() (pings), execute, fetchall"),
]


# What "check out and give back, no statement" means for each pool (for the report).
CHECKOUT_HOW = {
    "psycopg2_pool_ac": "getconn() + putconn()",
    "psycopg_pool_ac": "with pool.connection(): pass",
    "sa_engine_ac": "with engine.connect(): pass",
    "sa_queuepool": "pool.connect().close()",
    "dbutils_ac": "pool.connection().close()",
    "connector_pool": "pool.get_connection().close()",
    "dbrouter_conn": "with router.connection('read'): pass",
}


def by_engine(engine: str, *, matrix: bool = False) -> list[Contender]:
    return [c for c in CONTENDERS if c.engine == engine and (c.matrix or not matrix)]
