"""``python -m bench [--quick]``: dbrouter against the pools people use today.

Starts its own PostgreSQL and MariaDB clusters (primary + 2 replicas each),
runs every contender side by side, interleaved, and writes bench/RESULTS.md
and bench/results.json. The clusters are destroyed at the end, even on error.
"""

from __future__ import annotations

import dbrouter  # noqa: F401 - first: loads mysql-connector's C extension before ssl/hashlib

import argparse
import json
import logging
import os
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dbrouter.cluster import make_cluster

from . import adversity, aio, bulk, measure, memory, report
from .contenders import CHECKOUT_HOW, CONTENDERS, Contender, Opened, Targets, by_engine

log = logging.getLogger("bench")

SQL = {
    "postgres": {"select1": "SELECT 1", "sleep": "SELECT pg_sleep(0.005)"},
    "mysql": {"select1": "SELECT 1", "sleep": "SELECT SLEEP(0.005)"},
}
SERVICE_S = 0.005  # the sleep query's wait: the I/O ceiling is connections / SERVICE_S
POOL_SIZE = 10
ENGINES = ("postgres", "mysql")


@dataclass(frozen=True, kw_only=True)
class Settings:
    mode: str
    single_rounds: int
    single_batch_s: float
    single_time_limit_s: float
    single_epochs: int  # the rounds are split into epochs; each epoch reopens every contender
    round_trip_ops: int
    matrix_rounds: int
    window_s: float
    threads: tuple[int, ...]
    scale_rounds: int
    scale_window_s: float
    scale_threads: int
    memory_conns: int
    memory_runs: int
    bulk_rows: int  # rows each bulk-write contender loads (the slow ones a share of them)
    bulk_rounds: int
    stream_rows: int
    stream_rounds: int
    stream_batch: int  # router.stream's batch_size = the named cursor's itersize
    quiet_budget_s: float  # total seconds the run may wait for other work on the box to finish
    aio_rounds: int  # async, one task: interleaved rounds (split into epochs, as single_*)
    aio_batch_s: float
    aio_epochs: int
    aio_time_limit_s: float
    aio_trip_ops: int
    aio_fair_tasks: int  # async, many tasks: tasks on each pool of 10
    aio_fair_rounds: int
    aio_fair_window_s: float
    aio_service_window_s: float  # the 5 ms query on one raw connection, each round: the ceiling's service time
    adv_reads: int  # adversity, slow replicas: point reads per setup (and for the healthy baseline)
    adv_threads: int  # adversity, slow replicas: closed-loop threads
    adv_pool: int  # adversity, slow replicas: connections per node
    adv_time_limit_s: float  # adversity: bound on each closed-loop run
    adv_overload_pool: int  # adversity, overload: connections per replica (capacity = 2 x this / 10 ms)
    adv_capacity_window_s: float
    adv_overload_window_s: float  # adversity, overload: how long 3x the capacity is offered, per setup
    adv_deadline_calls: int  # adversity, deadline: calls with timeout=0.2
    adv_deadline_threads: int
    adv_naive_limit_s: float  # adversity, deadline: how long the naive setup (no deadline) is given


QUICK = Settings(
    mode="quick", single_rounds=60, single_batch_s=0.004, single_time_limit_s=30, single_epochs=2, round_trip_ops=30,
    matrix_rounds=2, window_s=0.5, threads=(1, 4, 16, 64), scale_rounds=2, scale_window_s=0.5, scale_threads=32,
    memory_conns=50, memory_runs=1, bulk_rows=200_000, bulk_rounds=2, stream_rows=1_000_000, stream_rounds=2,
    stream_batch=2000, quiet_budget_s=10, aio_rounds=60, aio_batch_s=0.004, aio_epochs=2, aio_time_limit_s=30,
    aio_trip_ops=30, aio_fair_tasks=1000, aio_fair_rounds=1, aio_fair_window_s=3.0, aio_service_window_s=0.5,
    adv_reads=3000, adv_threads=4, adv_pool=4, adv_time_limit_s=30, adv_overload_pool=2, adv_capacity_window_s=1.5,
    adv_overload_window_s=2.0, adv_deadline_calls=2000, adv_deadline_threads=32, adv_naive_limit_s=5.0,
)
FULL = Settings(
    mode="full", single_rounds=400, single_batch_s=0.004, single_time_limit_s=100, single_epochs=5, round_trip_ops=100,
    matrix_rounds=4, window_s=1.5, threads=(1, 4, 16, 64), scale_rounds=5, scale_window_s=2.0, scale_threads=32,
    memory_conns=50, memory_runs=3, bulk_rows=1_000_000, bulk_rounds=3, stream_rows=5_000_000, stream_rounds=3,
    stream_batch=2000, quiet_budget_s=120, aio_rounds=400, aio_batch_s=0.004, aio_epochs=4, aio_time_limit_s=40,
    aio_trip_ops=100, aio_fair_tasks=1000, aio_fair_rounds=2, aio_fair_window_s=10.0, aio_service_window_s=1.0,
    adv_reads=20_000, adv_threads=4, adv_pool=4, adv_time_limit_s=90, adv_overload_pool=2, adv_capacity_window_s=3.0,
    adv_overload_window_s=6.0, adv_deadline_calls=10_000, adv_deadline_threads=32, adv_naive_limit_s=10.0,
)

PHASES = ("single", "trips", "matrix", "scale", "memory", "bulk", "stream", "async", "adversity")
# The results each phase writes, and the settings it reads (for a run of some phases only,
# the other phases' results and settings are carried over from the previous results.json).
PHASE_KEYS = {
    "single": ("single_thread", "checkout_only"), "trips": ("round_trips",), "matrix": ("matrix",),
    "scale": ("scale_out",), "memory": ("memory",), "bulk": ("bulk",), "stream": ("stream",), "async": ("async",),
    "adversity": ("adversity",),
}
PHASE_SETTINGS = {
    "single": ("single_rounds", "single_batch_s", "single_time_limit_s", "single_epochs", "single_pinned"),
    "trips": ("round_trip_ops",), "matrix": ("matrix_rounds", "window_s", "threads"),
    "scale": ("scale_rounds", "scale_window_s", "scale_threads"), "memory": ("memory_conns", "memory_runs"),
    "bulk": ("bulk_rows", "bulk_rounds"), "stream": ("stream_rows", "stream_rounds", "stream_batch"),
    "async": ("aio_rounds", "aio_batch_s", "aio_epochs", "aio_time_limit_s", "aio_trip_ops", "aio_fair_tasks",
              "aio_fair_rounds", "aio_fair_window_s", "aio_service_window_s"),
    "adversity": ("adv_reads", "adv_threads", "adv_pool", "adv_time_limit_s", "adv_overload_pool",
                  "adv_capacity_window_s", "adv_overload_window_s", "adv_deadline_calls", "adv_deadline_threads",
                  "adv_naive_limit_s"),
}


def _open_all(contenders: list[Contender], targets: Targets, size: int) -> dict[str, Opened]:
    """Open every contender, proving the MySQL ones run on the C extension; close all on failure."""
    opened: dict[str, Opened] = {}
    try:
        for c in contenders:
            o = c.open(targets, size)
            opened[c.key] = o
            if c.engine == "mysql" and o.conn_class != "CMySQLConnection":
                raise SystemExit(
                    f"{c.key} runs on {o.conn_class}, not the C extension: run the bench with "
                    ".venv/bin/python -m bench (dbrouter must be imported before ssl/hashlib)"
                )
            o.run("SELECT 1")
    except BaseException:
        _close_all(opened)
        raise
    return opened


def _close_all(opened: dict[str, Opened]) -> None:
    for key, o in opened.items():
        try:
            o.close()
        except Exception as exc:  # noqa: BLE001 - closing must not hide results
            log.warning("closing %s failed: %s", key, exc)


# -- phases -------------------------------------------------------------------------


def _server_tasks(pids: list[int]) -> list[int]:
    """Every thread of the server processes and of their children (PostgreSQL's backends)."""
    roots = set(pids)
    procs = set(roots)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid in roots:
                procs.add(int(entry))
    tasks = []
    for pid in procs:
        try:
            tasks += [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except OSError:
            pass
    return tasks


class PinnedApart:
    """The bench client on the first CPU, the servers on the others, for the one-thread phase.

    With client and servers free to move, the scheduler gives each connection its own
    placement (same core as the client, or a core woken from idle), which costs tens of
    microseconds per round trip and sticks to a connection: the per-op differences then
    measure placement, not the client's code. Pinned apart, every contender's round trip
    crosses cores the same way. New server processes and threads inherit the pinning.
    """

    def __init__(self, server_pids: list[int]) -> None:
        self.server_pids = server_pids
        self.cpus = sorted(os.sched_getaffinity(0))
        self.active = len(self.cpus) >= 2

    def _apply(self, client: set[int], server: set[int]) -> None:
        for tid in _server_tasks(self.server_pids):
            try:
                os.sched_setaffinity(tid, server)
            except OSError:
                pass  # a thread that ended meanwhile
        os.sched_setaffinity(0, client)

    def __enter__(self) -> "PinnedApart":
        if self.active:
            self._apply({self.cpus[0]}, set(self.cpus[1:]))
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.active:
            self._apply(set(self.cpus), set(self.cpus))


def phase_single(
    s: Settings, targets: dict[str, Targets], seed: int, gate: measure.QuietGate
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Per-op SELECT 1 for every contender, then checkout + return alone for the pools.

    The rounds are split into epochs, and every epoch opens every contender
    anew: each connection gets a new server process, and with it a new place
    in the scheduler's view, so no contender keeps a lucky (or unlucky)
    client/server placement for the whole phase.
    """
    out: dict[str, Any] = {}
    checkout: dict[str, Any] = {}
    per_epoch = max(1, s.single_rounds // s.single_epochs)
    for engine in ENGINES:
        log.info("1. one thread, SELECT 1, %s: %d contenders x %d rounds in %d epochs",
                 engine, len(by_engine(engine)), per_epoch * s.single_epochs, s.single_epochs)
        merged: dict[str, dict[str, Any]] = {}
        for epoch in range(s.single_epochs):
            opened = _open_all(by_engine(engine), targets[engine], POOL_SIZE)
            try:
                gate.wait(f"one thread, {engine}, epoch {epoch + 1}")
                part = measure.single_thread(
                    opened, "SELECT 1", rounds=per_epoch, batch_seconds=s.single_batch_s, seed=seed + epoch,
                    time_limit=s.single_time_limit_s / s.single_epochs,
                )
                for key, res in part.items():
                    into = merged.setdefault(key, {"ops_per_batch": [], "mean_us": [], "p50_us": [], "cpu_us": [], "rounds": 0})
                    into["ops_per_batch"].append(res["ops_per_batch"])
                    into["rounds"] += res["rounds"]
                    for name in ("mean_us", "p50_us", "cpu_us"):
                        into[name] += res[name]
                if epoch == s.single_epochs - 1:
                    pools = {
                        key: Opened(lambda _sql, f=o.checkout: f(), o.close, o.conn_class)
                        for key, o in opened.items()
                        if o.checkout is not None and key.split(".", 1)[1] in CHECKOUT_HOW
                    }
                    log.info("1b. one thread, checkout + return alone, %s", engine)
                    checkout[engine] = measure.single_thread(
                        pools, "", rounds=max(20, s.single_rounds // 4), batch_seconds=s.single_batch_s / 2,
                        seed=seed, time_limit=s.single_time_limit_s / 4,
                    )
            finally:
                _close_all(opened)
        out[engine] = merged
    return out, checkout


def phase_round_trips(s: Settings, targets: dict[str, Targets], ports: dict[str, tuple[int, int]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for engine in ENGINES:
        log.info("2. round trips on the wire, %s", engine)
        out[engine] = {}
        for c in by_engine(engine):
            read_port, write_port = ports[engine]
            ops = s.round_trip_ops if "connect" not in c.key else max(10, s.round_trip_ops // 5)
            out[engine][c.key] = measure.count_round_trips(c, targets[engine], read_port, write_port, ops)
    return out


def phase_matrix(s: Settings, targets: dict[str, Targets], seed: int, gate: measure.QuietGate) -> dict[str, Any]:
    out: dict[str, Any] = {}
    rng = random.Random(seed + 1)
    for engine in ENGINES:
        contenders = by_engine(engine, matrix=True)
        floor = next(c for c in CONTENDERS if c.engine == engine and c.floor)
        opened = _open_all(contenders, targets[engine], POOL_SIZE)
        raw_conns: list[Opened] = []
        try:
            raw_conns = [floor.open(targets[engine], 1) for _ in range(POOL_SIZE)]
            runners = {c.key: measure.matrix_runner(c, opened[c.key], POOL_SIZE) for c in contenders}
            sql = SQL[engine]
            for key, run in runners.items():  # fill every pool to its 10 connections first
                measure.run_cell(run, sql["sleep"], 16, 0.3)
            cells = [(q, t) for q in ("sleep", "select1") for t in s.threads]
            raw: dict[tuple[str, str, int], list[measure.CellResult]] = {}
            reference: dict[str, list[measure.CellResult]] = {"sleep": [], "select1": []}
            service: list[float] = []
            total = s.matrix_rounds * len(cells) * len(runners)
            done = 0
            for r in range(s.matrix_rounds):
                gate.wait(f"many threads, {engine}, round {r + 1}")
                # The references, every round: one raw connection (the query's service time) and
                # ten threads on ten raw connections (what a pool of ten could reach at best).
                one = measure.run_cell(raw_conns[0].run, sql["sleep"], 1, s.window_s)
                service.append(1e3 / one.throughput if one.throughput else float("nan"))  # mean ms per query
                for query in ("sleep", "select1"):
                    reference[query].append(
                        measure.run_cell(measure.per_thread_runner(raw_conns), sql[query], POOL_SIZE, s.window_s)
                    )
                for query, threads in cells:
                    order = list(runners)
                    rng.shuffle(order)
                    for key in order:
                        cell = measure.run_cell(runners[key], sql[query], threads, s.window_s)
                        raw.setdefault((query, key, threads), []).append(cell)
                        done += 1
                        if cell.hung:
                            log.error("%s: %d threads still running after the window, giving up on them", key, cell.hung)
                log.info("3. many threads, %s: round %d/%d (%d/%d cells)", engine, r + 1, s.matrix_rounds, done, total)
            service_s = statistics.median(service) / 1e3
            result: dict[str, Any] = {
                "sql": sql,
                "service_time_ms": service_s * 1e3,
                "reference": {},
                "sleep": {},
                "select1": {},
            }
            for query, runs in reference.items():
                summary = measure.summarize_cells(runs)
                summary["little_wait_ms"] = POOL_SIZE / summary["throughput"] * 1e3 if summary["throughput"] else float("nan")
                result["reference"][query] = summary
            for (query, key, threads), runs in raw.items():
                summary = measure.summarize_cells(runs)
                # The I/O ceiling: connections / service time. The nominal one takes the
                # server's 5 ms alone; the measured one the whole query on one raw connection.
                summary["ceiling_nominal"] = min(threads, POOL_SIZE) / SERVICE_S
                summary["ceiling"] = min(threads, POOL_SIZE) / service_s if query == "sleep" else float("nan")
                summary["little_wait_ms"] = threads / summary["throughput"] * 1e3 if summary["throughput"] else float("nan")
                summary["rounds_detail"] = [asdict(c) for c in runs]
                result[query].setdefault(key, {})[str(threads)] = summary
            out[engine] = result
        finally:
            _close_all(opened)
            _close_all({f"raw{i}": o for i, o in enumerate(raw_conns)})
    return out


def phase_scale_out(s: Settings, clusters: dict[str, Any], gate: measure.QuietGate) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for engine in ENGINES:
        log.info("4. read scale-out, %s", engine)
        cluster = clusters[engine]
        primary = cluster.primary.url
        replicas = [n.url for n in cluster.replicas]
        routers = {
            "single": dbrouter.Router(primary, [], max_size=POOL_SIZE),
            "replicas": dbrouter.Router(primary, replicas, max_size=POOL_SIZE),
        }
        try:
            sql = SQL[engine]["sleep"]
            for router in routers.values():
                measure.run_cell(router.read, sql, s.scale_threads, 0.3)
            runs: dict[str, list[measure.CellResult]] = {"single": [], "replicas": []}
            for r in range(s.scale_rounds):
                gate.wait(f"scale-out, {engine}, round {r + 1}")
                order = ["single", "replicas"] if r % 2 == 0 else ["replicas", "single"]
                for name in order:
                    runs[name].append(measure.run_cell(routers[name].read, sql, s.scale_threads, s.scale_window_s))
            single = measure.summarize_cells(runs["single"])
            many = measure.summarize_cells(runs["replicas"])
            spread = _reads_per_node(routers["replicas"])
        finally:
            for router in routers.values():
                router.close()
        out[engine] = {
            "threads": s.scale_threads,
            "single_throughput": single["throughput"],
            "single_p99_ms": single["p99_ms"],
            "replicas_throughput": many["throughput"],
            "replicas_p99_ms": many["p99_ms"],
            "ratio": many["throughput"] / single["throughput"],
            "single_rounds": single["throughput_rounds"],
            "replicas_rounds": many["throughput_rounds"],
            "errors": single["errors"] + many["errors"],
            "starved_worst": max(single["starved_worst"], many["starved_worst"]),
            "checkouts_per_node": spread,
        }
    return out


def _reads_per_node(router: Any) -> dict[str, Any]:
    """How the reads spread over the nodes, from the pools' own counters (best effort)."""
    try:
        return {name: node["pool"]["acquired"] for name, node in router.stats()["nodes"].items()}
    except Exception:  # noqa: BLE001 - informational; the stats layout may change
        return {}


def phase_memory(s: Settings, targets: dict[str, Targets]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, (label, engines, _) in memory.HOLDERS.items():
        row: dict[str, Any] = {"label": label}
        for engine in engines:
            log.info("5. memory, %s, %s", key, engine)
            rss = [memory.measure(key, targets[engine], s.memory_conns, "rss") for _ in range(s.memory_runs)]
            traced = memory.measure(key, targets[engine], s.memory_conns, "tracemalloc")
            row[engine] = {
                "n": rss[0]["n"],
                "rss_per_conn": statistics.median(x["rss_per_conn"] for x in rss),
                "rss_runs": [x["rss_per_conn"] for x in rss],
                "py_per_conn": traced["py_per_conn"],
                "conn_class": rss[0]["conn_class"],
            }
        out[key] = row
    return out


def phase_async(s: Settings, targets: dict[str, Targets], ports: dict[str, tuple[int, int]], server_pids: list[int],
                seed: int, gate: measure.QuietGate) -> dict[str, Any]:
    """AsyncRouter against the asyncio pools: one task (pinned apart, as the one-thread phase),
    round trips on the wire, and 1,000 tasks on pools of 10 (unpinned, as the many-thread phase)."""
    started = time.perf_counter()
    failed: dict[str, str] = {}  # contenders that could not run, and why
    out: dict[str, Any] = {
        "loop": aio.loop_info(),
        "contenders": {c.key: {"label": c.label, "engine": c.engine, "note": c.note, "floor": c.floor,
                               "fair": c.fair, "gate": c.gate} for c in aio.AIO_CONTENDERS},
    }
    with PinnedApart(server_pids) as pinned:
        out["single"] = aio.single_phase(
            targets, ENGINES, rounds=s.aio_rounds, batch_seconds=s.aio_batch_s, epochs=s.aio_epochs,
            time_limit=s.aio_time_limit_s, seed=seed, gate=gate, size=POOL_SIZE, failed=failed)
    out["single_pinned"] = pinned.active
    out["trips"] = aio.trips_phase(targets, ports, ENGINES, ops=s.aio_trip_ops, failed=failed)
    out["fair"] = aio.fair_phase(
        targets, ENGINES, {e: SQL[e]["sleep"] for e in ENGINES}, size=POOL_SIZE, tasks=s.aio_fair_tasks,
        rounds=s.aio_fair_rounds, window=s.aio_fair_window_s, service_window=s.aio_service_window_s, seed=seed,
        gate=gate, failed=failed)
    out["failed"] = failed
    out["duration_s"] = time.perf_counter() - started
    return out


# -- main --------------------------------------------------------------------------


def _server_versions(clusters: dict[str, Any]) -> dict[str, str]:
    import mysql.connector
    import psycopg2

    from .contenders import _mysql_kwargs

    versions = {}
    conn = psycopg2.connect(clusters["postgres"].primary.url)
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW server_version")
            versions["PostgreSQL"] = cur.fetchone()[0]
    finally:
        conn.close()
    conn = mysql.connector.connect(**_mysql_kwargs(clusters["mysql"].primary.url))
    try:
        cur = conn.cursor()
        cur.execute("SELECT VERSION()")
        versions["MariaDB"] = cur.fetchone()[0]
    finally:
        conn.close()
    return versions


def _cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few rounds, short windows (under 3 minutes)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="where RESULTS.md and results.json go")
    parser.add_argument("--seed", type=int, default=20240601, help="seed of the interleaving order")
    parser.add_argument("--only", default=",".join(PHASES),
                        help=f"comma-separated phases to run (default: all of {','.join(PHASES)}); the others' "
                             "results are carried over from the previous results.json in --out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    logging.getLogger("dbrouter").setLevel(logging.WARNING)
    logging.getLogger("mysql.connector").setLevel(logging.WARNING)  # mysql.connector.aio logs each login at INFO
    logging.getLogger("psycopg").setLevel(logging.ERROR)  # e.g. 'rolling back returned connection' (reported by the relay instead)
    s = QUICK if args.quick else FULL
    phases = set(args.only.split(","))
    unknown = phases - set(PHASES)
    if unknown:
        parser.error(f"unknown phase(s) {', '.join(sorted(unknown))}; choose from {', '.join(PHASES)}")
    started = time.perf_counter()
    busy0, total0 = _cpu_ticks()
    own0 = time.process_time()
    results: dict[str, Any] = {
        "started_at": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "config": {
            **asdict(s),
            "command": ".venv/bin/python -m bench" + (" --quick" if args.quick else "")
                       + (f" --only {args.only}" if phases != set(PHASES) else ""),
            "seed": args.seed,
            "pool_size": POOL_SIZE,
            "phases": sorted(phases),
        },
        "contenders": {c.key: {"label": c.label, "engine": c.engine, "note": c.note, "gate": c.gate,
                               "matrix": c.matrix} for c in CONTENDERS},
    }
    clusters: dict[str, Any] = {}
    gate = measure.QuietGate(s.quiet_budget_s)
    try:
        for engine in ENGINES:
            clusters[engine] = make_cluster(engine, replicas=2)
            clusters[engine].start()
            log.info("%s cluster up: %s", engine, ", ".join(f"{n.name}:{n.port}" for n in clusters[engine].nodes))
        results["machine"] = report.machine_info(_server_versions(clusters))
        # Every contender reads from the same replica; dbrouter writes go to the primary.
        targets = {e: Targets(e, clusters[e].replicas[0].url, clusters[e].primary.url) for e in ENGINES}
        ports = {e: (clusters[e].replicas[0].port, clusters[e].primary.port) for e in ENGINES}
        if "single" in phases:
            pids = [n.pid for c in clusters.values() for n in c.nodes if n.pid]
            with PinnedApart(pids) as pinned:
                results["single_thread"], results["checkout_only"] = phase_single(s, targets, args.seed, gate)
            results["config"]["single_pinned"] = pinned.active
        if "trips" in phases:
            results["round_trips"] = phase_round_trips(s, targets, ports)
        if "matrix" in phases:
            results["matrix"] = phase_matrix(s, targets, args.seed, gate)
        if "scale" in phases:
            results["scale_out"] = phase_scale_out(s, clusters, gate)
        if "memory" in phases:
            results["memory"] = phase_memory(s, targets)
        if "bulk" in phases:
            log.info("6. bulk writes: %d rows per contender, %d rounds", s.bulk_rows, s.bulk_rounds)
            results["bulk"] = bulk.run_bulk(s.bulk_rows, s.bulk_rounds, args.seed, gate)
        if "stream" in phases:
            log.info("7. streamed reads: %d rows, batches of %d, %d rounds", s.stream_rows, s.stream_batch,
                     s.stream_rounds)
            results["stream"] = bulk.run_streams(clusters, s.stream_rows, s.stream_rounds, s.stream_batch,
                                                 args.seed, gate)
        if "async" in phases:
            log.info("8. asyncio: AsyncRouter against the async pools")
            pids = [n.pid for c in clusters.values() for n in c.nodes if n.pid]
            results["async"] = phase_async(s, targets, ports, pids, args.seed, gate)
        if "adversity" in phases:
            log.info("9. adversity: slow replicas, overload, hung nodes; dbrouter with its features on, off, and naive")
            results["adversity"] = adversity.run_adversity(clusters, s, args.seed, gate)
    finally:
        for cluster in clusters.values():
            cluster.destroy()
    results["duration_s"] = time.perf_counter() - started
    results["quiet_gate"] = {"budget_s": gate.budget_s, "threshold": gate.threshold, "waited_s": gate.waited_s,
                             "checks": gate.log}
    busy1, total1 = _cpu_ticks()
    if "machine" in results:
        results["machine"]["load_average_at_end"] = os.getloadavg()
        results["machine"]["machine_cpu_busy_during_run"] = (busy1 - busy0) / max(1, total1 - total0)
        results["machine"]["bench_client_cpu_s"] = time.process_time() - own0
    _carry_over(results, phases, args.out / "results.json")
    results["targets"] = report.evaluate_targets(results)
    results["notes"] = list(NOTES)
    load = results.get("machine", {}).get("load_average_at_start", (0.0,))[0]
    if load > 1.5:
        results["notes"].insert(0, (
            f"The box was not idle: the 1-minute load average was {load:.1f} when the run started (other work on "
            "the machine, such as test suites with their own database servers). Interleaving and medians spread "
            "that noise evenly over the contenders, but absolute numbers are slower and noisier than on a quiet box."
        ))
    args.out.mkdir(parents=True, exist_ok=True)
    report.write_json(results, args.out / "results.json")
    report.write_markdown(results, args.out / "RESULTS.md")
    log.info("done in %.1f min: %s", results["duration_s"] / 60, args.out / "RESULTS.md")
    for t in results["targets"]:
        print(f"{t['verdict']}  {t['target']}: {t['numbers']}")
    return 0


def _carry_over(results: dict[str, Any], phases: set[str], previous_path: Path) -> None:
    """For a run of some phases only: the other phases' results (and the settings they ran
    with) from the previous results.json, so that RESULTS.md stays whole; recorded in
    ``carried_over`` with the date of the run they come from."""
    missing = [p for p in PHASES if p not in phases]
    if not missing or not previous_path.exists():
        return
    previous = json.loads(previous_path.read_text())
    carried = {}
    for phase in missing:
        keys = [k for k in PHASE_KEYS[phase] if k in previous]
        if not keys:
            continue
        for key in keys:
            results[key] = previous[key]
        for name in PHASE_SETTINGS[phase]:
            if name in previous.get("config", {}):
                results["config"][name] = previous["config"][name]
        carried[phase] = previous.get("carried_over", {}).get(phase, previous.get("started_at"))
    if carried:
        results["carried_over"] = carried
        results["config"]["phases"] = sorted(set(results["config"]["phases"]) | set(carried))


NOTES = [
    "Every contender reads from the same replica (replica 1). dbrouter runs as Router(primary, [replica 1], "
    "max_size=10), so its reads go to that replica through a pool of 10 like everyone else's; "
    "router.write('SELECT 1') runs on the primary: the write path without the cost of a real write.",
    "dbrouter's health monitor runs as configured by default (a probe per node per second) during the timings; "
    "for counting round trips it is slowed to one probe an hour so that only the contender's traffic is counted.",
    "psycopg2's ThreadedConnectionPool and mysql.connector.pooling raise at once when exhausted instead of "
    "waiting; with more threads than connections they are gated by a threading.BoundedSemaphore(10), the usual "
    "recipe. One-thread timings are taken without the semaphore.",
    "psycopg2's ThreadedConnectionPool closes every connection returned beyond minconn, so it runs with "
    "minconn = maxconn = 10. DBUtils needs blocking=True to wait rather than raise.",
    "psycopg 3 prepares a statement after 5 executions on a connection; the round-trip count is taken after "
    "that warm-up, so it shows the steady state (Bind/Describe/Execute/Sync = one round trip).",
    "Round trips = the number of times the client starts sending after the server has answered, counted by "
    "a relay in bench/relay.py that also parses the client's protocol messages (PostgreSQL: type byte + "
    "length; MySQL: 3-byte length + sequence, a command is a packet with sequence 0).",
    "mysql-connector's cursor() pings the server (a round trip) on the C extension; that is why "
    "router.connection('read') + conn.cursor() costs two round trips on MariaDB while router.read costs one.",
    "A loopback round trip on this VM is bimodal (about 30 us or about 65-80 us, depending on where the scheduler "
    "places the connection's server process relative to the client), and the mode sticks to a connection: "
    "unpinned, a contender with one connection (the floor) came out 20-30 us slower than the pools in every "
    "epoch of a full run, which made 'over the floor' negative. So during the one-thread phase the bench client "
    "is pinned to the first CPU and the servers (and the backends they fork) to the other: every round trip "
    "crosses cores the same way. Absolute times are higher than unpinned; the differences are what the "
    "contenders' code costs. The phase also reopens every contender in each epoch, runs hundreds of short "
    "interleaved rounds and compares within a round; the client-CPU column does not depend on placement.",
    "Outside the one-thread phase nothing is pinned; the GIL switch interval is Python's default. The servers "
    "share the two cores with the client, so many-thread SELECT 1 numbers are CPU-bound and measure Python "
    "overhead as much as I/O.",
    "Bulk writes: every contender's time includes opening its connection (write_many: a Router with its pool, "
    "which also starts its health monitor); the rows are built before the clock. psycopg2 COPY uses dbrouter's "
    "own encoder (dbrouter.adapters._copy.encode_batch) in batches of 10,000 rows on one connection in one "
    "transaction: the same Python-side work, without the pool, the transactions per batch and the threads. "
    "The loads go to a PostgreSQL and a MariaDB server of their own, without replicas (replay would compete for "
    "the 2 cores).",
    "Streamed reads consume the rows with collections.deque(zip(rows, counter), maxlen=0): C code takes each row, "
    "so the figures show the libraries' per-row cost, not a loop's. Each contender runs in a fresh interpreter; "
    "connecting (and the Router's start) happens before the clock.",
    "Both floors make the same driver calls as dbrouter, with no pool: psycopg2 with one cursor kept per "
    "connection, mysql-connector's cmd_query + get_rows for statements without parameters. They are the least "
    "work a statement takes with each driver, so 'over the floor' is what pooling and routing add.",
]


if __name__ == "__main__":
    sys.exit(main())
