"""Phase ``async``: `dbrouter.AsyncRouter` against the asyncio pools people use today.

Three measurements, every contender opened in the same event loop and measured
under the same loop conditions: plain ``asyncio.run(..., debug=False)``, the
default selector loop (uvloop is never used, even when it is installed; the
report says which loop ran).

1. One task, ``SELECT 1`` on the replica: per call, over many short interleaved
   rounds (as the sync one-thread phase, `bench.measure.single_thread`), against
   the floor (one open autocommit connection of the same driver, making the same
   calls as dbrouter) and the async pools (psycopg_pool's AsyncConnectionPool,
   SQLAlchemy's ``create_async_engine`` on asyncpg and on psycopg 3,
   ``mysql.connector.aio.pooling``).
2. Round trips per call, counted on the wire by `bench.relay.CountingRelay`.
3. 1,000 tasks on a pool of 10, each running a query that waits 5 ms in the
   server back to back for a fixed window: throughput against the I/O ceiling
   (10 connections / the query's service time on one raw connection, measured in
   the same rounds, as the sync many-thread phase does), the tasks that completed
   nothing, and the longest any task waited between two of its queries.

Each contender opens its pool the way its documentation suggests. A contender
that cannot run at all is reported with the reason, never dropped silently.
"""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import logging
import random
import statistics
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any, Awaitable, Callable

from .contenders import Targets, _mysql_kwargs
from .measure import QuietGate
from .relay import CountingRelay

__all__ = ["AIO_CONTENDERS", "AioContender", "AioOpened", "by_engine", "fair_phase", "loop_info", "single_phase",
           "trips_phase"]

log = logging.getLogger("bench")

Run = Callable[[str], Awaitable[Any]]

_MAX_BATCH = 2_000  # ops per batch, whatever the calibration says
_ERROR_PAUSE = 0.001  # after a failed op, so that a broken contender cannot spin
_GRACE = 15.0  # seconds past a window (and past draining the queue) that a cell's tasks may take to finish
_MAX_DRAIN = 120.0  # at most this long for a queue of tasks to drain after a window
_names = itertools.count(1)


@dataclass
class AioOpened:
    run: Run
    close: Callable[[], Awaitable[None]]
    conn_class: str  # the driver connection class actually used
    stats: Callable[[], dict[str, Any]] | None = None  # the pool's own size, for the record


@dataclass(frozen=True)
class AioContender:
    key: str
    label: str
    engine: str
    open: Callable[[Targets, int], Awaitable[AioOpened]]
    floor: bool = False
    fair: bool = False  # takes part in the 1,000-task phase
    gate: bool = False  # raises when exhausted: an asyncio.Semaphore(size) in front of it for many tasks
    optional: bool = False  # may fail to open (a missing package, a library bug): reported, not fatal
    note: str = ""


def _mysql_aio_kwargs(url: str) -> dict[str, Any]:
    # ssl_disabled: the bench's MariaDB servers have no TLS, and mysql.connector.aio (9.x and
    # 26.x) then fails at the end of connect() unpacking the cipher of a plain socket (TypeError:
    # cannot unpack non-iterable NoneType) unless TLS is turned off. dbrouter works around it in
    # its adapter (dbrouter/adapters/mysql_aio.py, _Connection._post_connection).
    return {**_mysql_kwargs(url), "ssl_disabled": True}


# -- PostgreSQL -------------------------------------------------------------------


async def pg_raw(t: Targets, size: int, *, prepare_threshold: int | None = 5) -> AioOpened:
    import psycopg

    conn = await psycopg.AsyncConnection.connect(t.read_url, autocommit=True, prepare_threshold=prepare_threshold)
    cur = conn.cursor()  # kept, as dbrouter keeps one per connection: the least work a statement takes

    async def run(sql: str) -> Any:
        await cur.execute(sql)
        return await cur.fetchall()

    return AioOpened(run, conn.close, type(conn).__name__)


async def pg_raw_unprepared(t: Targets, size: int) -> AioOpened:
    return await pg_raw(t, size, prepare_threshold=None)


async def _pg_pool(t: Targets, size: int, autocommit: bool) -> AioOpened:
    from psycopg_pool import AsyncConnectionPool

    pool: Any = AsyncConnectionPool(
        t.read_url, min_size=size, max_size=size, kwargs={"autocommit": True} if autocommit else None,
        open=False, name=f"bench-aio-{next(_names)}",
    )
    await pool.open(wait=True, timeout=30.0)

    async def run(sql: str) -> Any:
        async with pool.connection() as conn:
            cur = await conn.execute(sql)
            return await cur.fetchall()

    async with pool.connection() as conn:
        cls = type(conn).__name__
    return AioOpened(run, pool.close, cls, lambda: {"size": pool.get_stats().get("pool_size")})


async def pg_pool_ac(t: Targets, size: int) -> AioOpened:
    return await _pg_pool(t, size, True)


async def pg_pool(t: Targets, size: int) -> AioOpened:
    return await _pg_pool(t, size, False)


async def _sa_async(t: Targets, size: int, dialect: str) -> AioOpened:
    from sqlalchemy.ext.asyncio import create_async_engine

    rest = t.read_url.split("://", 1)[1]
    engine = create_async_engine(f"postgresql+{dialect}://{rest}", pool_size=size, max_overflow=0,
                                 isolation_level="AUTOCOMMIT")

    async def run(sql: str) -> Any:
        async with engine.connect() as conn:
            result = await conn.exec_driver_sql(sql)
            return result.fetchall()

    async with engine.connect() as conn:
        raw = await conn.get_raw_connection()
        cls = type(raw.driver_connection).__name__
    return AioOpened(run, engine.dispose, cls, lambda: {"size": engine.sync_engine.pool.checkedin()})


async def pg_sa_asyncpg(t: Targets, size: int) -> AioOpened:
    return await _sa_async(t, size, "asyncpg")


async def pg_sa_psycopg(t: Targets, size: int) -> AioOpened:
    return await _sa_async(t, size, "psycopg")


# -- MySQL / MariaDB ------------------------------------------------------------------


async def my_raw(t: Targets, size: int) -> AioOpened:
    import mysql.connector.aio

    conn: Any = await mysql.connector.aio.connect(autocommit=True, **_mysql_aio_kwargs(t.read_url))

    async def run(sql: str) -> Any:
        # The connector's own query calls, as dbrouter makes them for statements without
        # parameters: the least work a statement takes with this driver.
        result = await conn.cmd_query(sql)
        if "columns" in result:
            rows, _ = await conn.get_rows()
            return rows
        return None

    return AioOpened(run, conn.close, type(conn).__name__)


async def my_aio_pool(t: Targets, size: int) -> AioOpened:
    from mysql.connector.aio.pooling import MySQLConnectionPool

    pool = MySQLConnectionPool(pool_name=f"bench-aio-{next(_names)}", pool_size=size,
                               **_mysql_aio_kwargs(t.read_url))
    await pool.initialize_pool()

    async def run(sql: str) -> Any:
        # As its documentation writes it: get_connection() (pings), a cursor, close() (resets the
        # session and puts the connection back).
        async with await pool.get_connection() as cnx, await cnx.cursor() as cur:
            await cur.execute(sql)
            return await cur.fetchall()

    async with await pool.get_connection() as cnx:
        cls = type(cnx._cnx).__name__

    async def close() -> None:
        await pool.close_pool()

    return AioOpened(run, close, cls)


# -- dbrouter -----------------------------------------------------------------------


async def dbrouter_read(t: Targets, size: int) -> AioOpened:
    import dbrouter

    options: dict[str, Any] = {"max_size": size}
    if t.quiet_monitor:
        options["health_interval"] = 3600.0
    router = dbrouter.AsyncRouter(t.write_url, [t.read_url], **options)
    await router.open()
    if t.quiet_monitor:
        await router.wait_for_probes(1)  # the first probe round done before anything is counted
    async with router.connection("read") as conn:
        cls = type(conn).__name__

    def stats() -> dict[str, Any]:
        nodes = router.stats()["nodes"]
        where = t.read_url.rsplit("@", 1)[1]
        return {name: node["pool"]["size"] for name, node in nodes.items() if where.startswith(name + "/")}

    return AioOpened(router.read, router.close, cls, stats)


PG = "postgres"
MY = "mysql"

AIO_CONTENDERS: list[AioContender] = [
    AioContender("pg.aio_raw", "psycopg AsyncConnection, one open connection (floor)", PG, pg_raw, floor=True,
                 note="autocommit=True, one cursor kept; psycopg's default prepare_threshold=5"),
    AioContender("pg.aio_raw_unprepared", "psycopg AsyncConnection, prepare_threshold=None", PG, pg_raw_unprepared,
                 note="the floor with dbrouter's setting: psycopg never prepares (a statement without parameters goes as "
                      "one simple Query message)"),
    AioContender("pg.aio_psycopg_pool_ac", "psycopg_pool AsyncConnectionPool (autocommit)", PG, pg_pool_ac,
                 fair=True, note="min_size=max_size=10, kwargs autocommit=True, await pool.open(wait=True); "
                                 "async with pool.connection(): await conn.execute()"),
    AioContender("pg.aio_psycopg_pool", "psycopg_pool AsyncConnectionPool (default)", PG, pg_pool,
                 note="as above without autocommit: BEGIN before the statement, COMMIT on leaving the block"),
    AioContender("pg.aio_sa_asyncpg", "SQLAlchemy create_async_engine, asyncpg (AUTOCOMMIT)", PG, pg_sa_asyncpg,
                 optional=True, note="postgresql+asyncpg, pool_size=10 max_overflow=0, isolation_level=AUTOCOMMIT, "
                                     "async with engine.connect(): exec_driver_sql"),
    AioContender("pg.aio_sa_psycopg", "SQLAlchemy create_async_engine, psycopg (AUTOCOMMIT)", PG, pg_sa_psycopg,
                 optional=True, note="postgresql+psycopg (its async flavour), as above"),
    AioContender("pg.aio_router", "dbrouter AsyncRouter.read()", PG, dbrouter_read, fair=True,
                 note="AsyncRouter(primary, [replica], max_size=10): reads on the replica"),
    AioContender("my.aio_raw", "mysql.connector.aio, one open connection (floor)", MY, my_raw, floor=True,
                 note="autocommit=True, ssl_disabled=True, cmd_query + get_rows (no cursor), pure Python"),
    AioContender("my.aio_connector_pool", "mysql.connector.aio.pooling (defaults)", MY, my_aio_pool, fair=True,
                 gate=True, optional=True,
                 note="MySQLConnectionPool(pool_size=10) + await initialize_pool(); get_connection() pings, "
                      "close() resets the session; ssl_disabled=True"),
    AioContender("my.aio_router", "dbrouter AsyncRouter.read()", MY, dbrouter_read, fair=True,
                 note="AsyncRouter(primary, [replica], max_size=10): reads on the replica"),
]


def by_engine(engine: str) -> list[AioContender]:
    return [c for c in AIO_CONTENDERS if c.engine == engine]


def loop_info() -> dict[str, Any]:
    """Which event loop the phase runs on (asked inside a loop made as the phase makes them)."""

    async def ask() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        return {"loop": f"{type(loop).__module__}.{type(loop).__name__}", "debug": loop.get_debug()}

    info = asyncio.run(ask(), debug=False)
    info["policy"] = type(asyncio.get_event_loop_policy()).__name__
    info["uvloop_installed"] = importlib.util.find_spec("uvloop") is not None
    return info


async def _open_all(contenders: list[AioContender], targets: Targets, size: int,
                    failed: dict[str, str]) -> dict[str, AioOpened]:
    """Open every contender and run one SELECT 1 on it. An optional contender that fails is
    recorded in ``failed`` with the reason (and skipped); any other failure closes all and raises."""
    opened: dict[str, AioOpened] = {}
    try:
        for c in contenders:
            if c.key in failed:
                continue
            try:
                o = await asyncio.wait_for(c.open(targets, size), 60.0)
                try:
                    await asyncio.wait_for(o.run("SELECT 1"), 30.0)
                except BaseException:
                    await o.close()
                    raise
            except Exception as exc:
                if not c.optional:
                    raise
                where = traceback.extract_tb(exc.__traceback__)[-1]
                failed[c.key] = (f"{type(exc).__name__}: {exc} (at {where.filename.rsplit('site-packages/', 1)[-1]}:"
                                 f"{where.lineno})")
                log.warning("  %s cannot run: %s", c.key, failed[c.key])
                continue
            opened[c.key] = o
    except BaseException:
        await _close_all(opened)
        raise
    return opened


async def _close_all(opened: dict[str, AioOpened]) -> None:
    for key, o in opened.items():
        try:
            await asyncio.wait_for(o.close(), 30.0)
        except Exception as exc:  # noqa: BLE001 - closing must not hide results
            log.warning("closing %s failed: %s", key, exc)


def _quantile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * (len(sorted_values) - 1) + 0.5))]


# -- 1. one task ----------------------------------------------------------------------------


async def _calibrate(run: Run, sql: str, seconds: float, batch_seconds: float) -> int:
    """Warm up for ``seconds`` and return how many calls fill ``batch_seconds`` (at least 1)."""
    n = 0
    start = time.perf_counter()
    deadline = start + seconds
    while n < 100_000:
        await run(sql)
        n += 1
        if time.perf_counter() >= deadline:
            break
    per_op = (time.perf_counter() - start) / n
    return max(1, min(_MAX_BATCH, round(batch_seconds / per_op)))


async def _timed_batch(run: Run, sql: str, n: int) -> tuple[list[float], float, float]:
    """(each call's seconds, total seconds, client CPU seconds) over ``n`` calls."""
    lat = [0.0] * n
    clock = time.perf_counter
    cpu0 = time.process_time()
    start = clock()
    for i in range(n):
        t0 = clock()
        await run(sql)
        lat[i] = clock() - t0
    return lat, clock() - start, time.process_time() - cpu0


async def _single_epoch(contenders: list[AioContender], targets: Targets, size: int, sql: str, *, rounds: int,
                        batch_seconds: float, seed: int, time_limit: float,
                        failed: dict[str, str]) -> dict[str, dict[str, Any]]:
    opened = await _open_all(contenders, targets, size, failed)
    try:
        sizes = {key: await _calibrate(o.run, sql, 0.1, batch_seconds) for key, o in opened.items()}
        out: dict[str, dict[str, Any]] = {
            key: {"ops_per_batch": n, "mean_us": [], "p50_us": [], "cpu_us": [], "all_us": []}
            for key, n in sizes.items()
        }
        rng = random.Random(seed)
        deadline = time.perf_counter() + time_limit
        done = 0
        for _ in range(rounds):
            order = list(opened)
            rng.shuffle(order)
            for key in order:
                lat, total, cpu = await _timed_batch(opened[key].run, sql, sizes[key])
                n = len(lat)
                res = out[key]
                res["mean_us"].append(total / n * 1e6)
                res["p50_us"].append(statistics.median(lat) * 1e6)
                res["cpu_us"].append(cpu / n * 1e6)
                res["all_us"] += [x * 1e6 for x in lat]
            done += 1
            if time.perf_counter() > deadline:
                log.warning("  async one task: time limit reached after %d of %d rounds", done, rounds)
                break
        for res in out.values():
            res["rounds"] = done
        return out
    finally:
        await _close_all(opened)


def single_phase(targets: dict[str, Targets], engines: tuple[str, ...], *, rounds: int, batch_seconds: float,
                 epochs: int, time_limit: float, seed: int, gate: QuietGate, size: int,
                 failed: dict[str, str]) -> dict[str, Any]:
    """Per-call ``SELECT 1`` of every contender, one task, in short interleaved rounds.

    The rounds are split into epochs; each epoch is a new ``asyncio.run`` that opens every
    contender anew (new connections, new server processes), as the sync one-thread phase
    does, so that no contender keeps a lucky or unlucky client/server placement. Per
    contender: per round the batch's mean and median call and the client CPU per call
    (microseconds), and the median and p99 over every call of every round.
    """
    out: dict[str, Any] = {}
    per_epoch = max(1, rounds // epochs)
    for engine in engines:
        contenders = by_engine(engine)
        log.info("8a. async, one task, SELECT 1, %s: %d contenders x %d rounds in %d epochs",
                 engine, len(contenders), per_epoch * epochs, epochs)
        merged: dict[str, dict[str, Any]] = {}
        for epoch in range(epochs):
            gate.wait(f"async one task, {engine}, epoch {epoch + 1}")
            part = asyncio.run(_single_epoch(
                contenders, targets[engine], size, "SELECT 1", rounds=per_epoch, batch_seconds=batch_seconds,
                seed=seed + epoch, time_limit=time_limit / epochs, failed=failed), debug=False)
            for key, res in part.items():
                into = merged.setdefault(key, {"ops_per_batch": [], "mean_us": [], "p50_us": [], "cpu_us": [],
                                               "all_us": [], "rounds": 0})
                into["ops_per_batch"].append(res["ops_per_batch"])
                into["rounds"] += res["rounds"]
                for name in ("mean_us", "p50_us", "cpu_us", "all_us"):
                    into[name] += res[name]
        for res in merged.values():
            calls = sorted(res.pop("all_us"))
            res["calls"] = len(calls)
            res["median_us"] = _quantile(calls, 0.50)
            res["p99_us"] = _quantile(calls, 0.99)
        out[engine] = merged
    return out


# -- 2. round trips --------------------------------------------------------------------------


async def _count(contender: AioContender, targets: Targets, relays: list[CountingRelay], ops: int,
                 failed: dict[str, str]) -> dict[str, Any] | None:
    opened = await _open_all([contender], targets, 10, failed)
    if not opened:
        return None
    o = opened[contender.key]
    try:
        for _ in range(10 * 10 + 20):  # > 5 uses of each of 10 pooled connections (psycopg prepares after 5)
            await o.run("SELECT 1")
        await asyncio.sleep(0.05)
        for relay in relays:
            relay.reset()
        for _ in range(ops):
            await o.run("SELECT 1")
        await asyncio.sleep(0.05)  # let the relay threads account for the last bytes
        turns = 0
        messages: dict[str, int] = {}
        for relay in relays:
            t, m = relay.snapshot()
            turns += t
            for label, count in m.items():
                messages[label] = messages.get(label, 0) + count
    finally:
        await _close_all(opened)
    return {
        "ops": ops,
        "round_trips": turns / ops,
        "messages": {label: count / ops for label, count in sorted(messages.items(), key=lambda kv: -kv[1])},
    }


def trips_phase(targets: dict[str, Targets], ports: dict[str, tuple[int, int]], engines: tuple[str, ...], *,
                ops: int, failed: dict[str, str]) -> dict[str, Any]:
    """Client turns (round trips) and labelled messages per call, each contender through
    counting relays in front of the replica and the primary, after a warm-up."""
    out: dict[str, Any] = {}
    for engine in engines:
        log.info("8b. async, round trips on the wire, %s", engine)
        out[engine] = {}
        for c in by_engine(engine):
            if c.key in failed:
                continue
            read_port, write_port = ports[engine]
            relays = [CountingRelay(read_port, engine), CountingRelay(write_port, engine)]
            try:
                t = targets[engine]
                relay_targets = Targets(engine, relays[0].url_for(t.read_url), relays[1].url_for(t.write_url),
                                        quiet_monitor=True)
                counted = asyncio.run(_count(c, relay_targets, relays, ops, failed), debug=False)
            finally:
                for relay in relays:
                    relay.stop()
            if counted is not None:
                out[engine][c.key] = counted
    return out


# -- 3. many tasks on a pool of 10 ---------------------------------------------------------------


@dataclass
class FairCell:
    tasks: int
    window: float
    ops: int  # completed inside the window
    throughput: float  # ops per second
    p50_ms: float
    p99_ms: float
    max_ms: float  # the longest call, the wait for a connection included
    max_gap_ms: float  # the longest any task went without completing a query (from the window's start)
    starved: int  # tasks that completed nothing inside the window
    errors: int
    hung: int  # tasks still running after the grace period (cancelled)
    client_cpu: float  # the bench process's CPU time over the window / the window (1.0 = one core)
    per_task_min: int = 0
    per_task_max: int = 0
    first_error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


async def fair_cell(run_for: Callable[[int], Run], sql: str, tasks: int, window: float) -> FairCell:
    """``tasks`` tasks run ``sql`` back to back for ``window`` seconds (task ``i`` calls ``run_for(i)``).

    Every task is started and waiting before the window opens; a task stops starting
    calls at the window's end and finishes the call under way. A call counts toward
    throughput if it completed inside the window; every call's time is kept (so a task
    stuck waiting shows in ``max``), and each task's longest time without a completed
    query, counted from the window's start, is ``max_gap``. After the window every task
    still waiting in the pool's queue finishes its call: the cell waits for the queue to
    drain at the window's rate (times 1.5, at most ``_MAX_DRAIN`` seconds) plus ``_GRACE``;
    tasks still running then are cancelled and reported as ``hung``.
    """
    clock = time.perf_counter
    go = asyncio.Event()
    box = {"start": 0.0, "end": 0.0}
    counts = [0] * tasks
    gaps = [0.0] * tasks
    errors = [0] * tasks
    lats: list[list[float]] = []
    first_error: list[str] = []
    completed = [0]  # calls completed inside the window, so far

    async def worker(i: int) -> None:
        run = run_for(i)
        lat: list[float] = []
        lats.append(lat)
        await go.wait()
        end = box["end"]
        prev = box["start"]
        worst = 0.0
        done = 0
        while True:
            t0 = clock()
            if t0 >= end:
                break
            try:
                await run(sql)
            except Exception as exc:  # noqa: BLE001 - counted and reported, never fatal
                errors[i] += 1
                if not first_error:
                    first_error.append(f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(_ERROR_PAUSE)
                continue
            t1 = clock()
            lat.append(t1 - t0)
            if t1 - prev > worst:
                worst = t1 - prev
            prev = t1
            if t1 <= end:
                done += 1
                completed[0] += 1
        counts[i] = done
        gaps[i] = worst

    workers = [asyncio.ensure_future(worker(i)) for i in range(tasks)]
    await asyncio.sleep(0)  # every task started and waiting on the event
    await asyncio.sleep(0)
    cpu0 = time.process_time()
    box["start"] = start = clock()
    box["end"] = start + window
    go.set()
    await asyncio.sleep(window)
    cpu = time.process_time() - cpu0
    rate = completed[0] / window
    drain = min(_MAX_DRAIN, 1.5 * tasks / rate) if rate else _MAX_DRAIN
    _, pending = await asyncio.wait(workers, timeout=max(0.0, box["end"] + drain + _GRACE - clock()))
    for w in pending:
        w.cancel()
    if pending:
        await asyncio.wait(pending, timeout=5.0)
    for w in workers:
        if w.done() and not w.cancelled() and w.exception() is not None:
            exc = w.exception()
            first_error.append(f"{type(exc).__name__}: {exc}")
    merged = sorted(x for lat in lats for x in lat)
    total = sum(counts)
    return FairCell(
        tasks=tasks,
        window=window,
        ops=total,
        throughput=total / window,
        p50_ms=_quantile(merged, 0.50) * 1e3,
        p99_ms=_quantile(merged, 0.99) * 1e3,
        max_ms=merged[-1] * 1e3 if merged else float("nan"),
        max_gap_ms=max(gaps) * 1e3,
        starved=sum(1 for c in counts if c == 0),
        errors=sum(errors),
        hung=len(pending),
        client_cpu=cpu / window,
        per_task_min=min(counts),
        per_task_max=max(counts),
        first_error=first_error[0] if first_error else None,
    )


def _gated(run: Run, size: int) -> Run:
    """A pool that raises when exhausted (mysql.connector.aio.pooling) behind the usual recipe:
    an ``asyncio.Semaphore`` of the pool's size, so that callers wait instead of failing."""
    gate = asyncio.Semaphore(size)

    async def run_gated(sql: str) -> Any:
        async with gate:
            return await run(sql)

    return run_gated


def summarize(cells: list[FairCell]) -> dict[str, Any]:
    """Medians over rounds (the worst round for starvation, gaps and max)."""

    def med(name: str) -> float:
        return statistics.median(getattr(c, name) for c in cells)

    return {
        "tasks": cells[0].tasks,
        "rounds": len(cells),
        "throughput": med("throughput"),
        "throughput_rounds": [c.throughput for c in cells],
        "p50_ms": med("p50_ms"),
        "p99_ms": med("p99_ms"),
        "max_ms": max(c.max_ms for c in cells),
        "max_gap_ms": max(c.max_gap_ms for c in cells),
        "starved_worst": max(c.starved for c in cells),
        "errors": sum(c.errors for c in cells),
        "hung": max(c.hung for c in cells),
        "client_cpu": med("client_cpu"),
        "per_task_min": min(c.per_task_min for c in cells),
        "per_task_max": max(c.per_task_max for c in cells),
        "first_error": next((c.first_error for c in cells if c.first_error), None),
        "rounds_detail": [asdict(c) for c in cells],
    }


async def _fair_engine(engine: str, targets: Targets, sql: str, *, size: int, tasks: int, rounds: int,
                       window: float, service_window: float, seed: int, gate: QuietGate,
                       failed: dict[str, str]) -> dict[str, Any]:
    contenders = [c for c in by_engine(engine) if c.fair]
    floor = next(c for c in by_engine(engine) if c.floor)
    opened = await _open_all(contenders, targets, size, failed)
    raw: dict[str, AioOpened] = {}
    try:
        for i in range(size):
            raw[str(i)] = await floor.open(targets, 1)
        runners: dict[str, Run] = {}
        for c in contenders:
            if c.key in opened:
                runners[c.key] = _gated(opened[c.key].run, size) if c.gate else opened[c.key].run
        for run in runners.values():  # fill every pool to its 10 connections first
            await fair_cell(lambda _i, r=run: r, sql, 50, 0.3)
        sizes = {key: o.stats() for key, o in opened.items() if o.stats is not None}
        rng = random.Random(seed)
        cells: dict[str, list[FairCell]] = {key: [] for key in runners}
        reference: list[FairCell] = []
        service: list[float] = []
        for r in range(rounds):
            await asyncio.to_thread(gate.wait, f"async many tasks, {engine}, round {r + 1}")
            order = [*runners, "reference"]
            rng.shuffle(order)
            for key in order:
                # The query's service time on one raw connection, one task, right before each
                # cell: the I/O ceiling is 10 connections / the median of these (on a busy box
                # the time drifts, so it is sampled as often as the cells are).
                one = await fair_cell(lambda _i: raw["0"].run, sql, 1, service_window)
                service.append(service_window / one.ops if one.ops else float("nan"))
                if key == "reference":
                    # 10 tasks on 10 raw connections, no pool: what a pool of 10 could reach at best here.
                    reference.append(await fair_cell(lambda i: raw[str(i)].run, sql, size, window))
                    continue
                cell = await fair_cell(lambda _i, r=runners[key]: r, sql, tasks, window)
                cells[key].append(cell)
                if cell.hung:
                    log.error("%s: %d tasks still running after the window, cancelled", key, cell.hung)
            log.info("8c. async, %d tasks, %s: round %d/%d", tasks, engine, r + 1, rounds)
    finally:
        await _close_all(opened)
        await _close_all(raw)
    service_s = statistics.median(service)
    out: dict[str, Any] = {
        "sql": sql,
        "tasks": tasks,
        "size": size,
        "window_s": window,
        "service_time_ms": service_s * 1e3,
        "service_rounds_ms": [x * 1e3 for x in service],
        "ceiling": size / service_s,
        "ceiling_nominal": size / 0.005,
        "pool_sizes_after_warmup": sizes,
        "reference": summarize(reference),
        "cells": {key: summarize(runs) for key, runs in cells.items()},
    }
    return out


def fair_phase(targets: dict[str, Targets], engines: tuple[str, ...], sql: dict[str, str], *, size: int, tasks: int,
               rounds: int, window: float, service_window: float, seed: int, gate: QuietGate,
               failed: dict[str, str]) -> dict[str, Any]:
    """``tasks`` tasks on pools of ``size`` running the 5 ms query, per engine, in one loop:
    AsyncRouter and the async pools that take part, plus the raw reference, interleaved."""
    out: dict[str, Any] = {}
    for engine in engines:
        log.info("8c. async, %d tasks on pools of %d, %s, %d rounds of %.1f s", tasks, size, engine, rounds, window)
        out[engine] = asyncio.run(_fair_engine(
            engine, targets[engine], sql[engine], size=size, tasks=tasks, rounds=rounds, window=window,
            service_window=service_window, seed=seed, gate=gate, failed=failed), debug=False)
    return out
