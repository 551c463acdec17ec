"""Big data in and out: bulk writes and streamed reads, side by side (issue 18).

Bulk writes load the same rows of mixed types (an id, a text, a float, a timestamp, a
decimal, a bool: the rows are built once, before any timing) into an emptied table on the
primary, every contender in each round, in a fresh random order:

* PostgreSQL: ``router.write_many`` (COPY) at several batch sizes and worker counts;
  psycopg2 ``COPY FROM STDIN`` on one connection with the same Python-side encoding
  (dbrouter's own encoder, batch by batch, in one transaction); ``execute_values``;
  ``executemany``; SQLAlchemy Core ``insert()`` with a list of dicts.
* MariaDB: ``router.write_many`` (multi-row INSERTs); one connection sending multi-row
  INSERTs of 1,000, 10,000 and 50,000 rows escaped by the connector's C extension (the
  best of them is the baseline); the connector's ``executemany`` in chunks of 1,000 (which
  the connector itself rewrites into one multi-row INSERT per call); ``cursor.execute`` per row.

The slow contenders load fewer rows (``executemany``, SQLAlchemy): rows per second is the
figure compared. The loads go to a server of their own per engine, without replicas: replay
on two replicas would take the CPU the load needs on a 2-core box (and pausing it would leave
gigabytes of WAL to replay afterwards).

Streamed reads run each contender in a fresh interpreter (``python -m bench.bulk stream
...``), which streams a warm-up of 10,000 rows, reads its RSS, then reads N rows
(``generate_series`` / ``seq_1_to_N`` on a replica: nothing stored) into a
``deque(maxlen=0)``, so that the loop costs nothing per row beyond the library's work, and
reports rows per second, the client's CPU time per row (all its threads: the rows/s of a
stream is mostly the server's time, so this is where a client library's own cost shows) and
the growth of its peak RSS over the baseline (the kernel's peak, VmHWM, reset after the
warm-up).
"""

from __future__ import annotations

import dbrouter  # noqa: F401 - first: loads mysql-connector's C extension before ssl/hashlib

import collections
import datetime
import decimal
import io
import itertools
import json
import logging
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from itertools import chain, islice
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from .contenders import _mysql_kwargs, _sqlalchemy_url

__all__ = ["BULK", "STREAMS", "run_bulk", "run_streams"]

log = logging.getLogger("bench")

TABLE = "bench_bulk"
COLUMNS = ("id", "name", "score", "created", "amount", "flag")
DDL = {
    "postgres": f"CREATE TABLE {TABLE} (id bigint PRIMARY KEY, name text, score float8, created timestamptz, "
                "amount numeric(12,2), flag bool)",
    "mysql": f"CREATE TABLE {TABLE} (id bigint PRIMARY KEY, name varchar(64), score double, created datetime(6), "
             "amount decimal(12,2), flag bool)",
}
INSERT = f"INSERT INTO {TABLE} ({', '.join(COLUMNS)}) VALUES ({', '.join(['%s'] * len(COLUMNS))})"


def make_rows(engine: str, n: int) -> list[tuple[Any, ...]]:
    """``n`` rows of mixed types. Texts, timestamps and decimals cycle through 1,000 values
    each (shared objects: the list stays small), one text in ten needs escaping for COPY."""
    rng = random.Random(18)
    tz = datetime.timezone.utc if engine == "postgres" else None
    start = datetime.datetime(2024, 1, 1, tzinfo=tz)
    names = [f"name {i}\twith a tab" if i % 10 == 0 else f"name {i} é" for i in range(1000)]
    times = [start + datetime.timedelta(seconds=i * 7919, microseconds=i) for i in range(1000)]
    amounts = [decimal.Decimal(f"{i * 37 % 100000}.{i % 100:02d}") for i in range(1000)]
    return [(i, names[i % 1000], rng.random() * 1000, times[i % 997], amounts[i % 991], i % 3 == 0) for i in range(n)]


def _chunks(rows: Sequence[Any], size: int) -> Iterator[list[Any]]:
    it = iter(rows)
    while True:
        chunk = list(islice(it, size))
        if not chunk:
            return
        yield chunk


# -- PostgreSQL contenders ------------------------------------------------------------------------
# Each: (url, rows) -> rows written; the caller times it. The table is empty at the start.


def pg_copy_raw(url: str, rows: Sequence[Any], batch: int = 10_000) -> int:
    """psycopg2 COPY on one connection, one transaction, with dbrouter's encoder batch by batch."""
    import psycopg2

    from dbrouter.adapters import _copy
    from dbrouter.adapters.postgres import COPY_RULES

    conn = psycopg2.connect(url)
    try:
        cur = conn.cursor()
        cur.execute(_copy.CATALOG_SQL, (TABLE,))
        plan = _copy.make_plan(INSERT, cur.fetchall(), COPY_RULES)
        assert plan is not None
        for chunk in _chunks(rows, batch):
            text = _copy.encode_batch(plan, chunk)
            assert text is not None
            cur.copy_expert(plan.statement, io.BytesIO(text.encode()), size=256 * 1024)
        conn.commit()
    finally:
        conn.close()
    return len(rows)


def pg_execute_values(url: str, rows: Sequence[Any]) -> int:
    import psycopg2
    from psycopg2.extras import execute_values

    conn = psycopg2.connect(url)
    try:
        cur = conn.cursor()
        execute_values(cur, f"INSERT INTO {TABLE} ({', '.join(COLUMNS)}) VALUES %s", rows, page_size=1000)
        conn.commit()
    finally:
        conn.close()
    return len(rows)


def pg_executemany(url: str, rows: Sequence[Any]) -> int:
    import psycopg2

    conn = psycopg2.connect(url)
    try:
        cur = conn.cursor()
        cur.executemany(INSERT, rows)
        conn.commit()
    finally:
        conn.close()
    return len(rows)


SA_MYSQL_CHUNK = 10_000


def sa_core(engine: str) -> Callable[[str, Sequence[Any]], int]:
    def run(url: str, rows: Sequence[Any]) -> int:
        import sqlalchemy as sa

        eng = sa.create_engine(_sqlalchemy_url(url, engine))
        table = sa.Table(TABLE, sa.MetaData(), *(sa.Column(c) for c in COLUMNS))
        dicts = [dict(zip(COLUMNS, row, strict=True)) for row in rows]  # what Core takes; built before the clock
        # mysql-connector sends a list as one multi-row INSERT, which past max_allowed_packet
        # the server refuses: lists of 10,000, as an application learns to do.
        step = len(dicts) if engine == "postgres" else SA_MYSQL_CHUNK
        try:
            start = time.perf_counter()
            with eng.begin() as conn:
                for first in range(0, len(dicts), step):
                    conn.execute(table.insert(), dicts[first:first + step])
            run.seconds = time.perf_counter() - start  # type: ignore[attr-defined]
        finally:
            eng.dispose()
        return len(rows)

    return run


def write_many(batch_size: int, workers: int) -> Callable[[str, Sequence[Any]], int]:
    def run(url: str, rows: Sequence[Any]) -> int:
        with dbrouter.Router(url, max_size=max(workers, 2), min_size=workers, health_interval=5) as router:
            router.primary.pool.wait_ready(10)
            return router.write_many(INSERT, iter(rows), batch_size=batch_size, workers=workers)

    return run


# -- MariaDB contenders ----------------------------------------------------------------------------


def my_multirow(size: int) -> Callable[[str, Sequence[Any]], int]:
    """One connection, one transaction, multi-row INSERTs of ``size`` rows escaped in C."""

    def run(url: str, rows: Sequence[Any]) -> int:
        from mysql.connector.connection_cext import CMySQLConnection

        conn = CMySQLConnection(**_mysql_kwargs(url))
        try:
            cur = conn.cursor()
            head = f"INSERT INTO {TABLE} ({', '.join(COLUMNS)}) VALUES ".encode()
            width = len(COLUMNS)
            conn.start_transaction()
            for chunk in _chunks(rows, size):
                escaped = conn.prepare_for_mysql(list(chain.from_iterable(chunk)))
                cur.execute(head + b",".join(b"(" + b",".join(escaped[i:i + width]) + b")"
                                             for i in range(0, len(escaped), width)))
            conn.commit()
        finally:
            conn.close()
        return len(rows)

    return run


def my_executemany(url: str, rows: Sequence[Any]) -> int:
    """The connector's executemany (it rewrites an INSERT into one multi-row INSERT), 1,000 rows a call."""
    from mysql.connector.connection_cext import CMySQLConnection

    conn = CMySQLConnection(**_mysql_kwargs(url))
    try:
        cur = conn.cursor()
        conn.start_transaction()
        for chunk in _chunks(rows, 1000):
            cur.executemany(INSERT, chunk)
        conn.commit()
    finally:
        conn.close()
    return len(rows)


def my_execute_loop(url: str, rows: Sequence[Any]) -> int:
    """One cursor.execute per row in one transaction: what code without executemany does."""
    from mysql.connector.connection_cext import CMySQLConnection

    conn = CMySQLConnection(**_mysql_kwargs(url))
    try:
        cur = conn.cursor()
        conn.start_transaction()
        for row in rows:
            cur.execute(INSERT, row)
        conn.commit()
    finally:
        conn.close()
    return len(rows)


# key -> (label, engine, function, share of the rows it loads)
BULK: dict[str, tuple[str, str, Callable[[str, Sequence[Any]], int], float]] = {
    "pg.write_many_w2": ("router.write_many(batch_size=10000, workers=2)", "postgres", write_many(10_000, 2), 1.0),
    "pg.write_many_w1": ("router.write_many(batch_size=10000, workers=1)", "postgres", write_many(10_000, 1), 1.0),
    "pg.write_many_w4": ("router.write_many(batch_size=5000, workers=4)", "postgres", write_many(5_000, 4), 1.0),
    "pg.copy": ("psycopg2 COPY FROM STDIN, one connection, same encoding (dbrouter's encoder)", "postgres",
                pg_copy_raw, 1.0),
    "pg.execute_values": ("psycopg2 execute_values, page 1000, one connection", "postgres", pg_execute_values, 1.0),
    "pg.sa_core": ("SQLAlchemy Core insert() with a list of dicts (insertmanyvalues)", "postgres", sa_core("postgres"),
                   0.2),
    "pg.executemany": ("psycopg2 executemany", "postgres", pg_executemany, 0.02),
    "my.write_many_w2": ("router.write_many(batch_size=10000, workers=2)", "mysql", write_many(10_000, 2), 1.0),
    "my.write_many_w1": ("router.write_many(batch_size=10000, workers=1)", "mysql", write_many(10_000, 1), 1.0),
    "my.write_many_w4": ("router.write_many(batch_size=5000, workers=4)", "mysql", write_many(5_000, 4), 1.0),
    "my.multirow_1000": ("one connection, multi-row INSERTs of 1,000 rows (C escaping)", "mysql", my_multirow(1000), 1.0),
    "my.multirow_10000": ("one connection, multi-row INSERTs of 10,000 rows (C escaping)", "mysql", my_multirow(10_000),
                          1.0),
    "my.multirow_50000": ("one connection, multi-row INSERTs of 50,000 rows (C escaping)", "mysql", my_multirow(50_000),
                          1.0),
    "my.sa_core": ("SQLAlchemy Core insert() with lists of 10,000 dicts", "mysql", sa_core("mysql"), 0.2),
    "my.executemany": ("mysql-connector executemany, 1,000 rows a call, one connection (the connector rewrites it "
                       "into one multi-row INSERT)", "mysql", my_executemany, 0.2),
    "my.execute_loop": ("mysql-connector cursor.execute per row, one connection", "mysql", my_execute_loop, 0.02),
}


def _admin(cluster: Any, sql: str) -> None:
    cluster.primary.query(sql, timeout=120)


def run_bulk(rows_total: int, rounds: int, seed: int, gate: Any) -> dict[str, Any]:
    """Every bulk contender of each engine, ``rounds`` interleaved rounds; rows/s per round.
    Each engine's loads go to a primary of their own, started here, without replicas."""
    from dbrouter.cluster import make_cluster

    out: dict[str, Any] = {}
    rng = random.Random(seed + 18)
    for engine in ("postgres", "mysql"):
        cluster = make_cluster("postgres" if engine == "postgres" else "mariadb", replicas=0).start()
        url = cluster.primary.url
        rows = make_rows(engine, rows_total)
        keys = [k for k, v in BULK.items() if v[1] == engine]
        per: dict[str, list[float]] = {k: [] for k in keys}
        try:
            _admin(cluster, DDL[engine])
            for r in range(rounds):
                gate.wait(f"bulk writes, {engine}, round {r + 1}")
                order = list(keys)
                rng.shuffle(order)
                for key in order:
                    label, _, fn, share = BULK[key]
                    part = rows if share >= 1.0 else rows[:max(1000, int(rows_total * share))]
                    _admin(cluster, f"TRUNCATE TABLE {TABLE}")
                    start = time.perf_counter()
                    written = fn(url, part)
                    seconds = getattr(fn, "seconds", None) or time.perf_counter() - start
                    stored = cluster.primary.query(f"SELECT count(*) FROM {TABLE}", timeout=120)[0][0]
                    if written != len(part) or stored != len(part):
                        raise RuntimeError(f"{key}: wrote {written}, table holds {stored}, expected {len(part)}")
                    per[key].append(len(part) / seconds)
                    log.info("6. bulk, %s, round %d: %-20s %9.0f rows/s (%d rows)", engine, r + 1, key,
                             len(part) / seconds, len(part))
        finally:
            cluster.destroy()
        out[engine] = {
            key: {"label": BULK[key][0], "rows": len(rows) if BULK[key][3] >= 1.0 else max(1000, int(rows_total * BULK[key][3])),
                  "rows_per_s": per[key], "median": statistics.median(per[key]), "best": max(per[key])}
            for key in keys
        }
        del rows
    return out


# -- streamed reads --------------------------------------------------------------------------------

SOURCES = {
    "postgres": "SELECT g, md5(g::text), g * 0.5::float8 FROM generate_series(1, {n}) AS g",
    "mysql": "SELECT seq, MD5(seq), seq * 0.5e0 FROM seq_1_to_{n}",
}
# key -> (label, engine)
STREAMS: dict[str, tuple[str, str]] = {
    "pg.stream": ("router.stream(batch_size=N)", "postgres"),
    "pg.named": ("psycopg2 named cursor, itersize N", "postgres"),
    "pg.fetchall": ("psycopg2 cursor.fetchall()", "postgres"),
    "my.stream": ("router.stream(batch_size=N)", "mysql"),
    "my.unbuffered": ("mysql-connector unbuffered cursor, fetchmany(N)", "mysql"),
    "my.fetchall": ("mysql-connector cursor.fetchall() (buffered)", "mysql"),
}


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> bool:
    """Reset the kernel's peak RSS of this process (VmHWM; Linux 4.0+): the peak then covers
    the measured run only, not the imports and warm-up before it."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak() -> int:
    """Peak RSS since the last `_reset_peak` (VmHWM), else since the process started (ru_maxrss)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _stream_child(key: str, primary: str, replica: str, n: int, size: int) -> dict[str, Any]:
    """One contender in this (fresh) process: set up, read 10,000 rows, then time ``n`` rows.
    Connecting (and the Router's start) happen before the clock, for every contender."""
    engine = STREAMS[key][1]

    def consume(rows: Any) -> int:
        """Take every row, doing nothing with it, in C: the count comes from a zipped counter."""
        counter = itertools.count()
        collections.deque(zip(rows, counter, strict=False), maxlen=0)
        return next(counter)

    closers: list[Callable[[], Any]] = []
    run: Callable[[str], int]
    if key.endswith(".stream"):
        router = dbrouter.Router(primary, [replica], health_interval=60)
        closers.append(router.close)

        def run(sql: str) -> int:
            with router.stream(sql, batch_size=size) as rows:
                return consume(rows)
    elif engine == "postgres":
        import psycopg2

        conn = psycopg2.connect(replica)
        closers.append(conn.close)
        names = itertools.count()

        def run(sql: str) -> int:
            if key == "pg.named":
                with conn.cursor(name=f"bench{next(names)}") as cur:
                    cur.itersize = size
                    cur.execute(sql)
                    count = consume(cur)
                conn.rollback()
                return count
            with conn.cursor() as cur:
                cur.execute(sql)
                count = consume(cur.fetchall())
            conn.rollback()
            return count
    else:
        from mysql.connector.connection_cext import CMySQLConnection

        my = CMySQLConnection(**_mysql_kwargs(replica))
        closers.append(my.close)

        def run(sql: str) -> int:
            if key == "my.unbuffered":
                cur = my.cursor()
                cur.execute(sql)
                return consume(chain.from_iterable(iter(lambda: cur.fetchmany(size), [])))
            cur = my.cursor(buffered=True)
            cur.execute(sql)
            return consume(cur.fetchall())

    try:
        run(SOURCES[engine].format(n=10_000))  # imports, buffers, the first batch: paid before the baseline
        reset = _reset_peak()
        before = _rss()
        cpu_start = time.process_time()
        start = time.perf_counter()
        count = run(SOURCES[engine].format(n=n))
        seconds = time.perf_counter() - start
        cpu = time.process_time() - cpu_start
        peak = _peak()
    finally:
        for close in closers:
            close()
    if count != n:
        raise RuntimeError(f"{key}: {count} rows, expected {n}")
    return {"rows": count, "seconds": seconds, "rows_per_s": count / seconds, "peak_growth": peak - before,
            "peak_reset": reset, "cpu_s": cpu}


def _stream_once(key: str, primary: str, replica: str, n: int, size: int, timeout: float = 900.0) -> dict[str, Any]:
    root = Path(__file__).resolve().parent.parent
    argv = [sys.executable, "-m", "bench.bulk", "stream", key, primary, replica, str(n), str(size)]
    proc = subprocess.run(argv, cwd=root, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"stream child {key} failed: {proc.stderr.strip()[-2000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def run_streams(clusters: dict[str, Any], rows_total: int, rounds: int, size: int, seed: int, gate: Any) -> dict[str, Any]:
    """Each stream contender in a fresh interpreter: ``rounds`` interleaved rounds (fetchall: one)."""
    out: dict[str, Any] = {}
    rng = random.Random(seed + 19)
    for engine in ("postgres", "mysql"):
        cluster = clusters[engine]
        primary, replica = cluster.primary.url, cluster.replicas[0].url
        keys = [k for k, v in STREAMS.items() if v[1] == engine]
        runs: dict[str, list[dict[str, Any]]] = {k: [] for k in keys}
        for r in range(rounds):
            gate.wait(f"streamed reads, {engine}, round {r + 1}")
            order = [k for k in keys if r == 0 or not k.endswith(".fetchall")]
            rng.shuffle(order)
            for key in order:
                res = _stream_once(key, primary, replica, rows_total, size)
                runs[key].append(res)
                log.info("7. stream, %s, round %d: %-14s %9.0f rows/s, client CPU %5.0f ns/row, peak RSS +%.1f MiB",
                         engine, r + 1, key, res["rows_per_s"], 1e9 * res["cpu_s"] / rows_total,
                         res["peak_growth"] / 2**20)
        out[engine] = {
            key: {"label": STREAMS[key][0].replace("N", f"{size:,}"), "rows": rows_total, "batch_size": size,
                  "rows_per_s": [x["rows_per_s"] for x in runs[key]],
                  "median": statistics.median(x["rows_per_s"] for x in runs[key]),
                  "cpu_ns_per_row": [1e9 * x["cpu_s"] / rows_total for x in runs[key]],
                  "cpu_ns_per_row_median": statistics.median(1e9 * x["cpu_s"] / rows_total for x in runs[key]),
                  "peak_growth": [x["peak_growth"] for x in runs[key]],
                  "peak_growth_max": max(x["peak_growth"] for x in runs[key])}
            for key in keys
        }
    return out


if __name__ == "__main__":
    if sys.argv[1] == "stream":
        _key, _primary, _replica, _n, _size = sys.argv[2:7]
        print(json.dumps(_stream_child(_key, _primary, _replica, int(_n), int(_size))))
