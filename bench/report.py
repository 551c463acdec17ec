"""The machine, the verdicts on the issue's targets, and RESULTS.md / results.json.

Every verdict states the number it rests on and the rule used to decide it,
so a reader can disagree with the rule without re-running anything.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["evaluate_targets", "machine_info", "write_json", "write_markdown"]

# Rules for the verdicts (see RESULTS.md "How verdicts are decided").
CLEARLY_US = 2.0  # "clearly less": at least this much less (median of per-round differences),
# with a 95% confidence interval that excludes zero
CEILING_SHARE = 0.95
SCALE_TARGET = 1.8
MYSQL_SPEEDUP = 3.0
SERVICE_S = 0.005
COPY_SHARE = 0.8  # write_many >= 0.8x psycopg2 COPY (same encoding, one connection)
EXECUTE_VALUES_SPEEDUP = 1.5
MULTIROW_SHARE = 1.0
EXECUTEMANY_SPEEDUP = 20.0
STREAM_RSS_LIMIT = 64 * 2**20
STREAM_SHARE = 0.9
BULK_TARGET = "write_many_w2"  # the setting the targets are judged on: batch_size=10000, workers=2
# asyncio (phase async): the contenders the targets are judged on, per engine.
AIO_ROUTER = {"postgres": "pg.aio_router", "mysql": "my.aio_router"}
AIO_FLOOR = {"postgres": "pg.aio_raw", "mysql": "my.aio_raw"}
AIO_POOL = {"postgres": "pg.aio_psycopg_pool_ac", "mysql": "my.aio_connector_pool"}  # beside the router
ENGINE_LABELS = {"postgres": "PostgreSQL", "mysql": "MySQL/MariaDB"}
# adversity (phase adversity, issue 15): the lines the issue draws.
TAIL_P99_RATIO = 1.5  # slow replica: read p99 <= 1.5x the healthy p99
EXTRA_QUERIES = 0.05  # ... with at most 5% extra queries (hedges + retries) / reads
AMPLIFICATION = 1.2  # overload: queries reaching the servers / requests offered
GOODPUT_SHARE = 0.9  # overload: successful requests/s >= 90% of the measured capacity
DEADLINE_SHARE = 0.999  # deadline: 99.9% of the calls return within the target
DEFAULTS_SLACK_S = 0.05  # defaults: the bound leaves out the cut itself and the woken thread (milliseconds)
ADVERSITY_RULES = [
    "*adversity, slow replica*: the read p99 (every read of the measured run, failures included at the time they "
    "failed) of dbrouter with the features on ≤ 1.5 × the p99 of the healthy baseline (the same reads through "
    "dbrouter with its defaults, on the same driver, while the proxy passes through), and (hedges + retries) / "
    "reads ≤ 5% over the same run (from `stats()`). With spikes, the baseline and the setups alternate in rounds "
    "whose reads are pooled; the scenario runs on each engine's default driver and again on the driver whose hedge "
    "losers are drained rather than cut (psycopg 3, the pure-Python connector), each with its own verdict.",
    "*adversity, overload, amplification*: queries counted on the servers (PostgreSQL: xact_commit + "
    "xact_rollback of the database on every node; MariaDB: Com_select on every node; the bench's own counting "
    "subtracted) / requests issued ≤ 1.2.",
    "*adversity, overload, queue wait*: the largest `acquire_wait_p99` of any node's pool (`stats()`, interpolated "
    "in its histogram bucket) ≤ the cap every request had (its deadline).",
    "*adversity, overload, goodput*: successful requests / the window ≥ 0.9 × the capacity measured right before "
    "(the 10 ms query, closed loop, 3 threads per connection, healthy proxy).",
    "*adversity, deadline*: calls that returned (rows or an error) within 250 ms / all calls ≥ 99.9%, and no leak: "
    "after the calls, within 11 s (2 × connect_timeout + 1: a server-side cancel sent to the blackholed node "
    "before the probes saw it down waits up to connect_timeout to connect), the thread count back to what it was "
    "before them and no thread started during them still alive except the hedge executor's fixed pool of workers "
    "(started at the first hedge, kept until close); no connection in use in any pool; and after close the "
    "process's thread count back to what it was before the router opened. The time it took is shown.",
    "*adversity, defaults*: the time from the write's start to its return or error ≤ max(1, connect_timeout) + "
    "health_interval = 6 s, plus 50 ms: the write starts right after a probe round (`wait_for_probes`), the worst "
    "phase, where the documented bound is met exactly by the probe's interval and timeout and leaves out the few "
    "milliseconds the cut and the woken caller take.",
]

DISTRIBUTIONS = [
    "dbrouter", "psycopg2-binary", "psycopg", "psycopg-binary", "psycopg-pool", "SQLAlchemy", "DBUtils",
    "mysql-connector-python", "asyncpg", "greenlet", "uvloop",
]


# -- the machine ------------------------------------------------------------------


def machine_info(server_versions: dict[str, str]) -> dict[str, Any]:
    """CPU, memory, OS, Python and library versions: what the numbers were measured on."""
    cpu = "unknown"
    flags_mhz = None
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name") and cpu == "unknown":
                    cpu = line.split(":", 1)[1].strip()
                if line.startswith("cpu MHz") and flags_mhz is None:
                    flags_mhz = line.split(":", 1)[1].strip()
    except OSError:
        pass
    mem_kib = 0
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    mem_kib = int(line.split()[1])
    except OSError:
        pass
    versions = {}
    for dist in DISTRIBUTIONS:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    libpq = {}
    try:
        import psycopg2.extensions

        libpq["psycopg2"] = psycopg2.extensions.libpq_version()
        import psycopg

        libpq["psycopg"] = psycopg.pq.version()
        libpq["psycopg_impl"] = psycopg.pq.__impl__
    except Exception:  # noqa: BLE001 - informational only
        pass
    return {
        "cpu_model": cpu,
        "cpu_mhz": flags_mhz,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "os": _os_name(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "gil_switch_interval_s": sys.getswitchinterval(),
        "load_average_at_start": os.getloadavg(),
        "servers": server_versions,
        "libraries": versions,
        "libpq": libpq,
    }


def _os_name() -> str:
    try:
        with open("/etc/os-release") as fh:
            for line in fh:
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return platform.platform()


# -- verdicts -----------------------------------------------------------------------


def center(values: list[float]) -> float:
    """10%-trimmed mean over rounds: the per-round figures are bimodal on this box (see the notes),
    and a median would land in one mode or the other by chance; outliers from other work are cut."""
    v = sorted(values)
    cut = len(v) // 10
    kept = v[cut:len(v) - cut] or v
    return sum(kept) / len(kept)


def _paired(a: list[float], b: list[float]) -> list[float]:
    """Per-round differences a - b (both measured in the same round)."""
    return [x - y for x, y in zip(a, b)]


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def _diff(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Median of per-round differences a - b with its 95% bootstrap interval."""
    from .measure import median_ci

    return median_ci(_paired(a, b))


def evaluate_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One entry per target of the issue: target, verdict, the numbers and the rule."""
    out: list[dict[str, Any]] = []
    st = results.get("single_thread", {})
    rt = results.get("round_trips", {})
    mx = results.get("matrix", {})
    so = results.get("scale_out", {})

    pg = st.get("postgres")
    if pg and "pg.dbrouter_read" in pg and "pg.raw" in pg:
        router = pg["pg.dbrouter_read"]["p50_us"]
        over, lo, hi = _diff(router, pg["pg.raw"]["p50_us"])
        out.append({
            "target": "PostgreSQL, 1 thread: router.read('SELECT 1') adds at most 10 us (p50) over raw psycopg2",
            "verdict": _verdict(over <= 10.0),
            "numbers": f"{over:+.1f} us [95% CI {lo:+.1f} to {hi:+.1f}] over a floor p50 of "
                       f"{center(pg['pg.raw']['p50_us']):.1f} us",
        })
        if "pg.psycopg2_pool_ac" in pg:
            d, lo, hi = _diff(router, pg["pg.psycopg2_pool_ac"]["p50_us"])
            cpu, clo, chi = _diff(pg["pg.dbrouter_read"]["cpu_us"], pg["pg.psycopg2_pool_ac"]["cpu_us"])
            out.append({
                "target": "PostgreSQL, 1 thread: router.read adds no more than psycopg2 ThreadedConnectionPool (autocommit)",
                "verdict": _verdict(d <= 0.0),
                "numbers": f"router.read - psycopg2 pool = {d:+.1f} us p50 [95% CI {lo:+.1f} to {hi:+.1f}]; "
                           f"client CPU {cpu:+.1f} us/op [{clo:+.1f} to {chi:+.1f}]",
            })
        for key, name in (("pg.psycopg_pool_ac", "psycopg_pool (autocommit)"),
                          ("pg.sa_engine_ac", "SQLAlchemy engine (AUTOCOMMIT)"),
                          ("pg.sa_queuepool", "SQLAlchemy raw QueuePool (autocommit)"),
                          ("pg.dbutils_ac", "DBUtils PooledDB (autocommit)"),
                          ("pg.psycopg_pool", "psycopg_pool (default)"),
                          ("pg.sa_engine", "SQLAlchemy engine (default)"),
                          ("pg.dbutils", "DBUtils PooledDB (default)")):
            if key not in pg:
                continue
            d, lo, hi = _diff(pg[key]["p50_us"], router)
            cpu, _, _ = _diff(pg[key]["cpu_us"], pg["pg.dbrouter_read"]["cpu_us"])
            out.append({
                "target": f"PostgreSQL, 1 thread: router.read clearly less overhead than {name}",
                "verdict": _verdict(d >= CLEARLY_US and lo > 0),
                "numbers": f"{name} - router.read = {d:+.1f} us p50 [95% CI {lo:+.1f} to {hi:+.1f}]; "
                           f"client CPU {cpu:+.1f} us/op",
            })

    my = st.get("mysql")
    my_rt = rt.get("mysql", {})
    if "my.dbrouter_read" in my_rt:
        trips = my_rt["my.dbrouter_read"]["round_trips"]
        out.append({
            "target": "MySQL/MariaDB, 1 thread: one round trip per routed read",
            "verdict": _verdict(trips <= 1.0 + 1e-9),
            "numbers": f"{trips:.2f} round trips per router.read (counted on the wire)",
        })
    if my and "my.dbrouter_read" in my and "my.connector_pool" in my:
        ratio = center(my["my.connector_pool"]["mean_us"]) / center(my["my.dbrouter_read"]["mean_us"])
        ratio_p50 = center(my["my.connector_pool"]["p50_us"]) / center(my["my.dbrouter_read"]["p50_us"])
        out.append({
            "target": "MySQL/MariaDB, 1 thread: at least 3x faster per op than mysql.connector.pooling (defaults)",
            "verdict": _verdict(ratio >= MYSQL_SPEEDUP),
            "numbers": f"{ratio:.2f}x per op (mean), {ratio_p50:.2f}x at p50",
        })

    for engine, label in (("postgres", "PostgreSQL"), ("mysql", "MySQL/MariaDB")):
        cells = mx.get(engine, {})
        key = "pg.dbrouter_read" if engine == "postgres" else "my.dbrouter_read"
        ref = cells.get("reference", {}).get("sleep")
        service = cells.get("service_time_ms")
        for threads in (16, 64):
            c = cells.get("sleep", {}).get(key, {}).get(str(threads))
            if not c:
                continue
            share = c["throughput"] / c["ceiling"]
            fair = c["starved_worst"] == 0 and c["errors"] == 0
            extra = f"; 10 raw connections without a pool: {ref['throughput']:,.0f}" if ref else ""
            out.append({
                "target": f"{label}, {threads} threads, pool of 10, 5 ms server wait: >= 95% of the I/O ceiling "
                          "(10 connections / service time), no starved thread",
                "verdict": _verdict(share >= CEILING_SHARE and fair),
                "numbers": f"{c['throughput']:.0f} ops/s = {share:.1%} of 10 / {service:.2f} ms = {c['ceiling']:,.0f} "
                           f"({c['throughput'] / c['ceiling_nominal']:.1%} of the nominal 10 / 5 ms = 2,000{extra}); "
                           f"starved threads (worst round) {c['starved_worst']}; errors {c['errors']}",
            })
        mine = cells.get("select1", {}).get(key, {}).get("64")
        sa_key = "pg.sa_queuepool" if engine == "postgres" else "my.sa_queuepool"
        theirs = cells.get("select1", {}).get(sa_key, {}).get("64")
        if mine and theirs:
            wait = mine["little_wait_ms"]
            ok = mine["throughput"] >= theirs["throughput"] and mine["p99_ms"] <= 2 * wait
            out.append({
                "target": f"{label}, 64 threads, SELECT 1: throughput >= SQLAlchemy raw QueuePool, p99 within 2x the queueing wait",
                "verdict": _verdict(ok),
                "numbers": f"dbrouter {mine['throughput']:.0f} ops/s vs QueuePool {theirs['throughput']:.0f} ops/s "
                           f"({mine['throughput'] / theirs['throughput']:.2f}x); p99 {mine['p99_ms']:.1f} ms vs "
                           f"queueing wait {wait:.1f} ms (64 threads / throughput) = {mine['p99_ms'] / wait:.2f}x",
            })

    for engine, label in (("postgres", "PostgreSQL"), ("mysql", "MySQL/MariaDB")):
        s = so.get(engine)
        if s:
            out.append({
                "target": f"{label}: reads over 2 replicas >= 1.8x one node (5 ms query, 32 threads, pools of 10 per node)",
                "verdict": _verdict(s["ratio"] >= SCALE_TARGET),
                "numbers": f"{s['replicas_throughput']:.0f} vs {s['single_throughput']:.0f} ops/s = {s['ratio']:.2f}x",
            })
    out += _bulk_targets(results.get("bulk", {}), results.get("config", {}))
    out += _stream_targets(results.get("stream", {}), results.get("config", {}))
    out += _async_targets(results.get("async", {}))
    out += adversity_targets(results.get("adversity", {}))
    return out


def added_over_floor(values: list[float], floor: list[float]) -> tuple[float, float, float]:
    """What a contender adds to the floor: the median of per-round differences of the batch
    medians (both measured in the same round), with its 95% bootstrap interval."""
    return _diff(values, floor)


def _async_targets(aio: dict[str, Any]) -> list[dict[str, Any]]:
    """The asyncio targets: one task against psycopg_pool (PostgreSQL), one round trip per read,
    and 1,000 tasks on a pool of 10 (both engines)."""
    out: list[dict[str, Any]] = []
    pg = aio.get("single", {}).get("postgres", {})
    mine, floor, pool = (pg.get(AIO_ROUTER["postgres"]), pg.get(AIO_FLOOR["postgres"]),
                         pg.get(AIO_POOL["postgres"]))
    if mine and floor and pool:
        added, lo, hi = added_over_floor(mine["p50_us"], floor["p50_us"])
        theirs, tlo, thi = added_over_floor(pool["p50_us"], floor["p50_us"])
        paired, plo, phi = _diff(mine["p50_us"], pool["p50_us"])
        out.append({
            "target": "PostgreSQL, asyncio, one task: AsyncRouter.read('SELECT 1') adds no more over a raw "
                      "psycopg AsyncConnection than psycopg_pool's AsyncConnectionPool (autocommit) does",
            "verdict": _verdict(added - theirs <= 0.0),
            "numbers": f"AsyncRouter - raw {added:+.1f} us [95% CI {lo:+.1f} to {hi:+.1f}], AsyncConnectionPool - raw "
                       f"{theirs:+.1f} us [{tlo:+.1f} to {thi:+.1f}]: difference {added - theirs:+.1f} us (paired "
                       f"per round, AsyncRouter - pool = {paired:+.1f} us [{plo:+.1f} to {phi:+.1f}]); "
                       f"floor median {center(floor['p50_us']):.1f} us",
        })
    for engine, label in ENGINE_LABELS.items():
        counted = aio.get("trips", {}).get(engine, {}).get(AIO_ROUTER[engine])
        if counted:
            trips = counted["round_trips"]
            out.append({
                "target": f"{label}, asyncio: exactly one round trip per AsyncRouter.read on a warm connection",
                "verdict": _verdict(abs(trips - 1.0) < 1e-9),
                "numbers": f"{trips:.2f} round trips per read over {counted['ops']} reads (counted on the wire)",
            })
    for engine, label in ENGINE_LABELS.items():
        fair = aio.get("fair", {}).get(engine)
        c = fair and fair["cells"].get(AIO_ROUTER[engine])
        if not fair or not c:
            continue
        share = c["throughput"] / fair["ceiling"]
        ok = share >= CEILING_SHARE and c["starved_worst"] == 0 and c["errors"] == 0 and c["hung"] == 0
        other = fair["cells"].get(AIO_POOL[engine])
        beside = (f"; beside it, {AIO_POOL[engine].split('.', 1)[1]}: {other['throughput'] / fair['ceiling']:.1%}, "
                  f"starved {other['starved_worst']}" if other else "")
        ref = fair.get("reference")
        if ref:
            beside += (f"; {fair['size']} raw connections without a pool: {ref['throughput']:,.0f} ops/s "
                       f"({ref['throughput'] / fair['ceiling']:.1%})")
        out.append({
            "target": f"{label}, asyncio, {fair['tasks']:,} tasks on a pool of {fair['size']}, 5 ms server wait: "
                      f">= 95% of the I/O ceiling ({fair['size']} connections / service time), no starved task",
            "verdict": _verdict(ok),
            "numbers": f"{c['throughput']:,.0f} ops/s = {share:.1%} of {fair['size']} / {fair['service_time_ms']:.2f} ms "
                       f"= {fair['ceiling']:,.0f}; starved tasks (worst round) {c['starved_worst']} (a fair queue's "
                       f"wait W = {fair['tasks'] / c['throughput'] if c['throughput'] else float('inf'):.2f} s, "
                       f"window {fair.get('window_s', float('nan')):.0f} s); longest wait "
                       f"between two queries of a task {c['max_gap_ms']:,.0f} ms; errors {c['errors']}; "
                       f"hung {c['hung']}{beside}",
        })
    return out


def _engine_label(engine: str) -> str:
    return "PostgreSQL" if engine == "postgres" else "MariaDB"


def _beside(cells: dict[str, Any], keys: tuple[str, ...], fmt: Any) -> str:
    names = {"off": "defaults", "naive": "naive", "hedge_only": "hedge_after alone", "eject_only": "ejection alone"}
    return ", ".join(f"{names.get(k, k)} {fmt(cells[k])}" for k in keys if k in cells)


def tail_target(engine: str, kind: str, res: dict[str, Any]) -> dict[str, Any] | None:
    """Scenarios 1 and 2: the features-on read p99 against the healthy p99, and the extra queries."""
    on = res.get("setups", {}).get("on")
    healthy = res.get("healthy")
    if not on or not healthy:
        return None
    base = healthy["p99_ms"]
    ratio = on["p99_ms"] / base
    extra = on["extra_share"]
    counted = on.get("counters", {})
    what = ("one replica with latency spikes (1% of its replies 200 ms late)" if kind.startswith("spikes")
            else "one replica 10x slower throughout")
    engine_label = _engine_label(engine) + (f" on {res['driver']}" if res.get("driver") else "")
    cells = res["setups"]
    others = _beside(cells, ("hedge_only", "eject_only", "off", "naive"),
                     lambda c: f"{c['p99_ms'] / base:.2f}x ({c['p99_ms']:.2f} ms)")
    tails = _beside(cells, ("on", "hedge_only", "eject_only", "off", "naive"), lambda c: f"{c['p999_ms']:.1f}")
    ejected = ""
    if kind == "slow":
        warm = on.get("warmup", {})
        ejected = (f"; ejected after {warm.get('seconds_to_steady', float('nan')):.1f} s under the fault (p99 "
                   f"{warm.get('p99_ms', float('nan')):.1f} ms until then)" if warm.get("ejected")
                   else "; NOT ejected within 15 s of the fault")
    return {
        "target": f"{engine_label}, adversity, {what}: read p99 with the features on <= "
                  f"{TAIL_P99_RATIO}x the healthy p99, <= {EXTRA_QUERIES:.0%} extra queries",
        "verdict": _verdict(ratio <= TAIL_P99_RATIO and extra <= EXTRA_QUERIES),
        "numbers": f"p99 {on['p99_ms']:.2f} ms = {ratio:.2f}x the healthy {base:.2f} ms; extra queries {extra:.1%} "
                   f"(hedges {counted.get('hedges', 0)}, retries {counted.get('retries', 0)} over "
                   f"{counted.get('reads', 0)} reads; hedges refused by the budget {counted.get('hedges_refused', 0)})"
                   f"{ejected}; beside it: {others}; p99.9 (ms): {tails}",
    }


def overload_targets(engine: str, res: dict[str, Any]) -> list[dict[str, Any]]:
    """Scenario 3: amplification, queue wait and goodput of the features-on setup under 3x load."""
    on = res.get("setups", {}).get("on")
    if not on:
        return []
    cells = res["setups"]
    label = _engine_label(engine)
    load = (f"{res['overload']:g}x the measured capacity ({res['capacity']:,.0f}/s) offered open loop, one replica "
            f"resetting {res['flaky']:.0%} of its requests")
    cap_ms = res["cap_s"] * 1e3
    return [{
        "target": f"{label}, adversity, overload ({load}): queries reaching the servers <= {AMPLIFICATION}x the "
                  "requests (features on)",
        "verdict": _verdict(on["amplification"] <= AMPLIFICATION),
        "numbers": f"{on['server_queries']:,.0f} server queries / {on['issued']:,} requests = "
                   f"{on['amplification']:.2f}x; beside it: "
                   + _beside(cells, ("off", "naive"), lambda c: f"{c['amplification']:.2f}x"),
    }, {
        "target": f"{label}, adversity, overload: pool queue wait p99 <= the cap ({cap_ms:.0f} ms, features on)",
        "verdict": _verdict(on["wait_p99_s"] <= res["cap_s"]),
        "numbers": f"{on['wait_p99_s'] * 1e3:.0f} ms (largest of the pools' acquire_wait_p99); beside it: "
                   + _beside(cells, ("off", "naive"), lambda c: f"{c['wait_p99_s'] * 1e3:.0f} ms")
                   + " (naive: the wait for its gate, measured by the client)",
    }, {
        "target": f"{label}, adversity, overload: goodput >= {GOODPUT_SHARE:.0%} of the capacity (features on)",
        "verdict": _verdict(on["goodput_share"] >= GOODPUT_SHARE),
        "numbers": f"{on['goodput']:,.0f} successful requests/s = {on['goodput_share']:.0%} of {res['capacity']:,.0f}; "
                   "beside it: " + _beside(cells, ("off", "naive"),
                                           lambda c: f"{c['goodput']:,.0f}/s ({c['goodput_share']:.0%})"),
    }]


def deadline_target(engine: str, res: dict[str, Any]) -> dict[str, Any] | None:
    """Scenario 4: calls with timeout=0.2 while a replica is blackholed return within 250 ms; nothing leaks."""
    on = res.get("on")
    if not on:
        return None
    share = on["share_within_target"]
    leaked = [name for name in on.get("new_threads", []) if not name.startswith("dbrouter-hedge")]
    workers = len(on.get("new_threads", [])) - len(leaked)
    leak_free = (on["in_use_after"] == 0 and not leaked and on["threads_after"] - workers <= on["threads_before"]
                 and on.get("threads_after_close", 0) <= on.get("threads_baseline", 0))
    naive = res.get("naive")
    beside = (f"; naive (no deadline): {naive['n']:,} of {res['calls']:,} calls finished in {naive['seconds']:.0f} s "
              f"({naive['share_within_target']:.1%} within 250 ms), {naive['blocked_at_end']} of {res['threads']} "
              f"threads still blocked in a call at the cut-off" if naive else "")
    return {
        "target": f"{_engine_label(engine)}, adversity, a replica blackholed mid-run: {DEADLINE_SHARE:.1%} of "
                  f"{res['calls']:,} calls with timeout=0.2 return within 250 ms, no thread or connection leak",
        "verdict": _verdict(share >= DEADLINE_SHARE and leak_free),
        "numbers": f"{share:.2%} within 250 ms (p99.9 {on['p999_ms']:.0f} ms, max {on['max_ms']:.0f} ms; "
                   f"{on['errors']:,} DeadlineExceeded or other errors); threads {on['threads_before']} before the "
                   f"calls, {on['threads_after']} after (settled in {on.get('threads_settled_s', float('nan')):.1f} s; "
                   f"still there: {', '.join(on.get('new_threads', [])) or 'none'}), "
                   f"{on.get('threads_after_close', '?')} after close against {on.get('threads_baseline', '?')} before "
                   f"open; connections in use after: {on['in_use_after']}{beside}",
    }


def defaults_target(engine: str, res: dict[str, Any]) -> dict[str, Any] | None:
    """Scenario 5: with no timeout option, a write to a blackholed primary returns within the documented bound."""
    if not res:
        return None
    return {
        "target": f"{_engine_label(engine)}, adversity, Router defaults (no timeout option): a write to a blackholed "
                  f"primary returns within {res['bound_s']:g} s",
        "verdict": _verdict(res["seconds"] <= res["bound_s"] + DEFAULTS_SLACK_S),
        "numbers": f"{res['seconds']:.3f} s (the write starts right after a probe round: the worst phase), "
                   f"{res['outcome']}",
    }


def adversity_targets(adv: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for engine in ("postgres", "mysql"):
        res = adv.get(engine)
        if not res:
            continue
        for kind in ("spikes", "spikes_draining", "slow"):
            t = tail_target(engine, kind, res.get(kind, {}))
            if t:
                out.append(t)
        out += overload_targets(engine, res.get("overload", {}))
        for t in (deadline_target(engine, res.get("deadline", {})), defaults_target(engine, res.get("defaults", {}))):
            if t:
                out.append(t)
    return out


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median over rounds of a / b, both measured in the same round."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def best_per_round(cells: dict[str, Any], keys: list[str]) -> list[float]:
    """Per round, the best of several contenders (the best single-connection multi-row INSERT)."""
    return [max(values) for values in zip(*(cells[k]["rows_per_s"] for k in keys), strict=True)]


def _bulk_targets(bulk: dict[str, Any], cfg: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    rows = cfg.get("bulk_rows", 0)
    pg = bulk.get("postgres", {})
    mine = pg.get(f"pg.{BULK_TARGET}")
    if mine and "pg.copy" in pg:
        ratio = paired_ratio(mine["rows_per_s"], pg["pg.copy"]["rows_per_s"])
        out.append({
            "target": f"PostgreSQL: write_many of {rows:,} rows of mixed types >= {COPY_SHARE}x psycopg2 COPY on one "
                      "connection with the same encoding (batch_size=10000, workers=2)",
            "verdict": _verdict(ratio >= COPY_SHARE),
            "numbers": f"{mine['median']:,.0f} vs {pg['pg.copy']['median']:,.0f} rows/s (medians); {ratio:.2f}x "
                       "(median of per-round ratios)",
        })
    if mine and "pg.execute_values" in pg:
        ratio = paired_ratio(mine["rows_per_s"], pg["pg.execute_values"]["rows_per_s"])
        out.append({
            "target": f"PostgreSQL: write_many >= {EXECUTE_VALUES_SPEEDUP}x psycopg2 execute_values",
            "verdict": _verdict(ratio >= EXECUTE_VALUES_SPEEDUP),
            "numbers": f"{mine['median']:,.0f} vs {pg['pg.execute_values']['median']:,.0f} rows/s; {ratio:.2f}x",
        })
    my = bulk.get("mysql", {})
    mine = my.get(f"my.{BULK_TARGET}")
    multirow = sorted(k for k in my if k.startswith("my.multirow_"))
    if mine and multirow:
        best = best_per_round(my, multirow)
        ratio = paired_ratio(mine["rows_per_s"], best)
        out.append({
            "target": f"MariaDB: write_many >= {MULTIROW_SHARE}x the best single-connection multi-row INSERT",
            "verdict": _verdict(ratio >= MULTIROW_SHARE),
            "numbers": f"{mine['median']:,.0f} vs {statistics.median(best):,.0f} rows/s (best of 1,000 / 10,000 / "
                       f"50,000 rows per INSERT, each round); {ratio:.2f}x",
        })
    if mine and "my.executemany" in my:
        ratio = paired_ratio(mine["rows_per_s"], my["my.executemany"]["rows_per_s"])
        loop = my.get("my.execute_loop")
        extra = (f" (the connector rewrites executemany into one multi-row INSERT per call; against "
                 f"cursor.execute per row, {loop['median']:,.0f} rows/s: "
                 f"{paired_ratio(mine['rows_per_s'], loop['rows_per_s']):.1f}x)") if loop else ""
        out.append({
            "target": f"MariaDB: write_many >= {EXECUTEMANY_SPEEDUP:.0f}x mysql-connector executemany",
            "verdict": _verdict(ratio >= EXECUTEMANY_SPEEDUP),
            "numbers": f"{mine['median']:,.0f} vs {my['my.executemany']['median']:,.0f} rows/s; {ratio:.2f}x{extra}",
        })
    return out


def _stream_targets(stream: dict[str, Any], cfg: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for engine, label, prefix, raw, raw_name in (
            ("postgres", "PostgreSQL", "pg", "pg.named", "a psycopg2 named cursor with the same itersize"),
            ("mysql", "MariaDB", "my", "my.unbuffered", "an unbuffered mysql-connector cursor with the same fetchmany")):
        cells = stream.get(engine, {})
        mine = cells.get(f"{prefix}.stream")
        if not mine or raw not in cells:
            continue
        rows = mine["rows"]
        growth = mine["peak_growth_max"]
        out.append({
            "target": f"{label}: router.stream of {rows:,} rows: peak RSS growth < {STREAM_RSS_LIMIT // 2**20} MiB",
            "verdict": _verdict(growth < STREAM_RSS_LIMIT),
            "numbers": f"{growth / 2**20:.1f} MiB at most over {len(mine['peak_growth'])} runs (fetchall: "
                       f"{cells.get(f'{prefix}.fetchall', {}).get('peak_growth_max', float('nan')) / 2**20:,.0f} MiB)",
        })
        ratio = paired_ratio(mine["rows_per_s"], cells[raw]["rows_per_s"])
        out.append({
            "target": f"{label}: router.stream rows/s >= {STREAM_SHARE}x {raw_name}",
            "verdict": _verdict(ratio >= STREAM_SHARE),
            "numbers": f"{mine['median']:,.0f} vs {cells[raw]['median']:,.0f} rows/s; {ratio:.2f}x (batch_size = "
                       f"{mine['batch_size']:,})",
        })
    return out


# -- writing ------------------------------------------------------------------------


def _rounded(value: Any) -> Any:
    """Floats to 4 significant digits (far below this box's noise), so the file stays small."""
    if isinstance(value, float):
        return float(f"{value:.4g}") if value == value else None
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    return value


def write_json(results: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(_rounded(results), separators=(",", ":"), default=str) + "\n")


def _sends(messages: dict[str, float]) -> str:
    parts = []
    for label, count in messages.items():
        name = label.split(":", 1)[1] if label.startswith(("Q:", "QUERY:")) else label
        parts.append(name if abs(count - 1.0) < 0.005 else f"{name}×{count:.2g}")
    return ", ".join(parts)


def _fmt(x: float, digits: int = 1) -> str:
    return "–" if x is None or x != x else f"{x:,.{digits}f}"


def _bulk_sections(r: dict[str, Any], add: Any) -> None:
    cfg = r["config"]
    bulk = r.get("bulk", {})
    if bulk:
        add("## 6. Bulk writes")
        add("")
        add(f"{cfg.get('bulk_rows', 0):,} rows of mixed types (bigint id, text, float, timestamp, decimal, bool; one text "
            "in ten holds a tab) into an emptied table with a primary key, on a server of its own without replicas; "
            f"{cfg.get('bulk_rounds')} interleaved rounds, every contender in each round in a fresh random "
            "order. The slowest contenders load a share of the rows (the *rows* column); rows/s is what is compared. "
            "The rows are built once before the rounds; each contender's time includes opening its connection "
            "(write_many: a Router with its pool).")
        add("")
        for engine, title, base, base_label in (("postgres", "PostgreSQL", "pg.copy", "x COPY"),
                                                ("mysql", "MariaDB", None, "x best multi-row INSERT")):
            cells = bulk.get(engine)
            if not cells:
                continue
            if base is None:
                multirow = sorted(k for k in cells if k.startswith("my.multirow_"))
                ref = best_per_round(cells, multirow) if multirow else None
            else:
                ref = cells[base]["rows_per_s"] if base in cells else None
            add(f"**{title}**")
            add("")
            add(f"| Contender | rows | rows/s (median) | best | {base_label} | per round (rows/s) |")
            add("| --- | ---: | ---: | ---: | ---: | --- |")
            for c in sorted(cells.values(), key=lambda c: -c["median"]):
                ratio = f"{paired_ratio(c['rows_per_s'], ref):.2f}" if ref else "–"
                add(f"| {c['label']} | {c['rows']:,} | {c['median']:,.0f} | {c['best']:,.0f} | {ratio} | "
                    f"{', '.join(f'{x:,.0f}' for x in c['rows_per_s'])} |")
            add("")
    stream = r.get("stream", {})
    if stream:
        add("## 7. Streamed reads")
        add("")
        add(f"{cfg.get('stream_rows', 0):,} rows (an int, a 32-character text, a float: `generate_series` on PostgreSQL, "
            "`seq_1_to_N` on MariaDB, so nothing is stored) read from a replica into `deque(maxlen=0)`, so that the "
            "loop adds no work per row; each run in a fresh interpreter, which first reads 10,000 rows the same way; "
            "peak RSS growth = the kernel's peak RSS (VmHWM, reset after the warm-up) minus the RSS before the "
            "run; client CPU = the child's CPU time (all its threads) over the run, per row: the rows/s of a stream "
            "is mostly the server's time, so this is where a library's own cost shows. "
            f"{cfg.get('stream_rounds')} "
            "interleaved rounds (fetchall: one).")
        add("")
        for engine, title, base in (("postgres", "PostgreSQL", "pg.named"), ("mysql", "MariaDB", "my.unbuffered")):
            cells = stream.get(engine)
            if not cells:
                continue
            add(f"**{title}**")
            add("")
            add("| Contender | rows/s (median) | x the raw streaming cursor | client CPU (ns/row, median) "
                "| peak RSS growth (MiB, max) | per round (rows/s) |")
            add("| --- | ---: | ---: | ---: | ---: | --- |")
            for c in cells.values():
                ratio = (f"{paired_ratio(c['rows_per_s'], cells[base]['rows_per_s']):.2f}"
                         if base in cells and len(c["rows_per_s"]) == len(cells[base]["rows_per_s"]) else "–")
                cpu = c.get("cpu_ns_per_row_median")  # absent in results from before it was measured
                add(f"| {c['label']} | {c['median']:,.0f} | {ratio} | {'–' if cpu is None else f'{cpu:,.0f}'} | "
                    f"{c['peak_growth_max'] / 2**20:,.1f} | {', '.join(f'{x:,.0f}' for x in c['rows_per_s'])} |")
            add("")


def write_markdown(results: dict[str, Any], path: Path) -> None:
    r = results
    cfg = r["config"]
    m = r["machine"]
    lines: list[str] = []
    add = lines.append
    add("# dbrouter against the pools people use today")
    add("")
    add(f"Generated by `{cfg['command']}` ({cfg['mode']} mode) on {r['started_at']}; "
        f"the run took {r['duration_s'] / 60:.1f} min. Raw numbers: `bench/results.json`.")
    carried = r.get("carried_over")
    if carried:
        add("")
        add(f"This run measured {', '.join(p for p in cfg['phases'] if p not in carried)} only; the results of "
            + "; ".join(f"{phase} come from the run of {when}" for phase, when in carried.items())
            + " (carried over from the previous results.json, with the settings they ran with).")
    add("")
    add("## Machine")
    add("")
    add("| | |")
    add("| --- | --- |")
    add(f"| CPU | {m['cpu_model']} ({m['cpu_mhz']} MHz), {m['logical_cpus']} logical cores ({m['usable_cpus']} usable) |")
    add(f"| Memory | {m['memory_gib']} GiB |")
    add(f"| OS | {m['os']}, kernel {m['kernel']} |")
    add(f"| Python | {m['python']} (GIL switch interval {m['gil_switch_interval_s'] * 1000:.0f} ms) |")
    for name, version in m["servers"].items():
        add(f"| {name} | {version} |")
    add(f"| Libraries | {', '.join(f'{k} {v}' for k, v in m['libraries'].items())} |")
    if m.get("libpq"):
        add(f"| libpq | psycopg2 built with {m['libpq'].get('psycopg2')}, psycopg {m['libpq'].get('psycopg')} ({m['libpq'].get('psycopg_impl')}) |")
    add(f"| Load average at start / end | {', '.join(f'{x:.2f}' for x in m['load_average_at_start'])} / "
        f"{', '.join(f'{x:.2f}' for x in m.get('load_average_at_end', ()))} |")
    if "machine_cpu_busy_during_run" in m:
        add(f"| CPU busy during the run | {m['machine_cpu_busy_during_run']:.0%} of both cores (servers, the bench client "
            f"and anything else on the box); the bench's own process used {m['bench_client_cpu_s']:.0f} s of CPU |")
    add("")
    qg = r.get("quiet_gate")
    if qg:
        busy = [c["busy"] for c in qg["checks"]]
        add(f"Before each measured phase or round the bench waits, within a budget of {qg['budget_s']:.0f} s for the "
            f"whole run, until the machine is under {qg['threshold']:.0%} busy (other work on the box would be "
            f"measured as ours). It waited {qg['waited_s']:.0f} s in all; the machine was "
            f"{min(busy):.0%}–{max(busy):.0%} busy at those checks (median {statistics.median(busy):.0%})." if busy else "")
        add("")
    add("The servers (a PostgreSQL primary + 2 streaming replicas, a MariaDB primary + 2 GTID replicas, "
        "started by `dbrouter.cluster` for this run) share the 2 cores with the client: absolute "
        "numbers are this box's; the ratios are the point.")
    add("")

    targets = r.get("targets", [])
    passed = sum(t["verdict"] == "PASS" for t in targets)
    add("## Summary")
    add("")
    add(f"{passed} of {len(targets)} checks pass.")
    st0 = r.get("single_thread", {})
    for engine, floor_key, key, other in (("postgres", "pg.raw", "pg.dbrouter_read", "pg.psycopg2_pool_ac"),
                                          ("mysql", "my.raw", "my.dbrouter_read", "my.connector_pool")):
        d = st0.get(engine, {})
        if key in d and floor_key in d and other in d:
            over = statistics.median(_paired(d[key]["p50_us"], d[floor_key]["p50_us"]))
            over_other = statistics.median(_paired(d[other]["p50_us"], d[floor_key]["p50_us"]))
            ratio = center(d[other]["mean_us"]) / center(d[key]["mean_us"])
            add(f"* {engine}, one thread: `router.read('SELECT 1')` costs {over:+.1f} µs (p50) over the raw driver on "
                f"one open connection, {r['contenders'][other]['label']} {over_other:+.1f} µs; per op it takes "
                f"{ratio:.2f}x dbrouter's time.")
    aio_pg = r.get("async", {}).get("single", {}).get("postgres", {})
    if all(k in aio_pg for k in (AIO_ROUTER["postgres"], AIO_FLOOR["postgres"], AIO_POOL["postgres"])):
        floor = aio_pg[AIO_FLOOR["postgres"]]["p50_us"]
        mine = added_over_floor(aio_pg[AIO_ROUTER["postgres"]]["p50_us"], floor)[0]
        theirs = added_over_floor(aio_pg[AIO_POOL["postgres"]]["p50_us"], floor)[0]
        add(f"* postgres, asyncio, one task: `await router.read('SELECT 1')` adds {mine:+.1f} µs (median call) over a "
            f"raw psycopg AsyncConnection, psycopg_pool's AsyncConnectionPool (autocommit) {theirs:+.1f} µs.")
    add("")
    add("## Targets from the issue")
    add("")
    add("| Target | Verdict | Numbers |")
    add("| --- | --- | --- |")
    for t in r.get("targets", []):
        add(f"| {t['target']} | **{t['verdict']}** | {t['numbers']} |")
    add("")

    st = r.get("single_thread", {})
    rt = r.get("round_trips", {})
    labels = r["contenders"]
    for engine, title in (("postgres", "PostgreSQL"), ("mysql", "MySQL / MariaDB")):
        if engine not in st:
            continue
        data = st[engine]
        floor_key = "pg.raw" if engine == "postgres" else "my.raw"
        add(f"## 1–2. One thread, `SELECT 1`, {title}")
        add("")
        rounds = next(iter(data.values()))["rounds"]
        add(f"{rounds} interleaved rounds in {cfg['single_epochs']} epochs (every contender is reopened, with new "
            "connections, for each epoch); in each round every contender, in a fresh random order, runs one short "
            f"batch (about {cfg['single_batch_s'] * 1000:.0f} ms of back-to-back ops, each op timed). Per op = batch "
            "time / ops; p50 = the batch's median op; client CPU = process CPU time per op (Python and driver work, "
            "without the wait for the server); each a 10%-trimmed mean over rounds. Differences to the floor are "
            "medians of per-round differences, with a 95% bootstrap interval: the robust figures here. Round trips "
            "are counted on the wire."
            + (" The client ran pinned to one CPU and the servers to the other (see Notes)."
               if cfg.get("single_pinned") else ""))
        add("")
        add("| Contender | per op (µs) | p50 (µs) | p50 over floor (µs) [95% CI] | × floor | client CPU (µs/op) | CPU over floor | round trips | client sends per op |")
        add("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
        floor = data.get(floor_key)
        for key, res in data.items():
            mean = center(res["mean_us"])
            p50 = center(res["p50_us"])
            cpu = center(res["cpu_us"])
            ratio = mean / center(floor["mean_us"]) if floor else float("nan")
            if floor and key != floor_key:
                over, lo, hi = _diff(res["p50_us"], floor["p50_us"])
                cpu_over, _, _ = _diff(res["cpu_us"], floor["cpu_us"])
                over_text = f"{over:+.1f} [{lo:+.1f}, {hi:+.1f}]"
                cpu_text = f"{cpu_over:+.1f}"
            else:
                over_text = cpu_text = ""
            trips = rt.get(engine, {}).get(key)
            add(f"| {labels[key]['label']} | {_fmt(mean)} | {_fmt(p50)} | {over_text} | {ratio:.2f} | {_fmt(cpu)} | "
                f"{cpu_text} | {_fmt(trips['round_trips'], 2) if trips else '–'} | "
                f"{_sends(trips['messages']) if trips else ''} |")
        add("")

    co = r.get("checkout_only", {})
    if co:
        from .contenders import CHECKOUT_HOW

        add("## 1b. Checkout + return alone, one thread")
        add("")
        add("The pool's own cost, without a statement: the same interleaved rounds, each op a checkout and a "
            "return. With no I/O this is far less noisy than the per-query figures. Some pools talk to the "
            "server even here (mysql.connector.pooling pings and resets the session, DBUtils pings on MySQL, "
            "SQLAlchemy rolls back on return), which the times show.")
        add("")
        add("| Engine | Pool | operation | µs per checkout + return | client CPU (µs) |")
        add("| --- | --- | --- | ---: | ---: |")
        for engine, data in co.items():
            for key, res in data.items():
                how = CHECKOUT_HOW.get(key.split(".", 1)[1], "")
                add(f"| {engine} | {labels[key]['label']} | `{how}` | {_fmt(center(res['mean_us']), 2)} | "
                    f"{_fmt(center(res['cpu_us']), 2)} |")
        add("")

    mx = r.get("matrix", {})
    for engine, title in (("postgres", "PostgreSQL"), ("mysql", "MySQL / MariaDB")):
        if engine not in mx:
            continue
        for query, qtitle in (("sleep", "5 ms in the server"), ("select1", "SELECT 1")):
            cells = mx[engine].get(query)
            if not cells:
                continue
            sql = mx[engine]["sql"][query]
            add(f"## 3. Many threads, pool of 10, {qtitle} (`{sql}`), {title}")
            add("")
            add(f"{cfg['matrix_rounds']} interleaved rounds of {cfg['window_s']} s windows per cell; medians over "
                "rounds (max: worst round). W = threads / throughput is the mean wait a fair queue gives "
                "(Little's law); p99 / W far above 1 means some threads wait much longer than others. "
                "Starved = threads that completed nothing in a window (worst round).")
            ref = mx[engine].get("reference", {}).get(query)
            if query == "sleep":
                service = mx[engine].get("service_time_ms")
                add(f"I/O ceiling = min(threads, 10) connections / service time. The service time is measured in "
                    f"the same rounds, one thread on one raw connection: {_fmt(service, 2)} ms per query (mean; "
                    "the server's 5 ms plus the round trip, the client's own work and the timer's slack), so the ceiling is "
                    f"{_fmt(10 / service * 1e3, 0)} ops/s from 10 threads up; '% of 2,000' is against the nominal "
                    f"10 / 5 ms. 10 threads on 10 raw connections without a pool reach "
                    f"{_fmt(ref['throughput'], 0) if ref else '–'} ops/s (first row; '% of reference' from 10 threads up).")
            elif ref:
                add("First row: 10 threads on 10 raw connections without a pool, the reference.")
            add("")
            if query == "sleep":
                add("| Contender | threads | ops/s | % of ceiling | % of 2,000 | % of reference | p50 (ms) | p99 (ms) | max (ms) | W (ms) | p99 / W | starved | errors |")
                add("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
            else:
                add("| Contender | threads | ops/s | p50 (ms) | p99 (ms) | max (ms) | W (ms) | p99 / W | starved | errors |")
                add("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
            rows = [("reference", "10", ref)] if ref else []
            rows += [(key, t, c) for key, by_threads in cells.items() for t, c in by_threads.items()]
            for key, threads, c in rows:
                name = "*10 raw connections, one per thread, no pool (reference)*" if key == "reference" else labels[key]["label"]
                tail = (f"{_fmt(c['p50_ms'], 2)} | {_fmt(c['p99_ms'], 2)} | {_fmt(c['max_ms'], 1)} | "
                        f"{_fmt(c['little_wait_ms'], 2)} | {_fmt(c['p99_ms'] / c['little_wait_ms'], 2)} | "
                        f"{c['starved_worst']} | {c['errors']} |")
                if query == "sleep":
                    nominal = min(int(threads), 10) / SERVICE_S
                    ceiling = min(int(threads), 10) / (service / 1e3)
                    of_ref = f"{c['throughput'] / ref['throughput']:.1%}" if ref and int(threads) >= 10 else ""
                    add(f"| {name} | {threads} | {_fmt(c['throughput'], 0)} | {c['throughput'] / ceiling:.1%} | "
                        f"{c['throughput'] / nominal:.1%} | {of_ref} | {tail}")
                else:
                    add(f"| {name} | {threads} | {_fmt(c['throughput'], 0)} | {tail}")
            add("")

    so = r.get("scale_out", {})
    if so:
        add("## 4. Read scale-out: 2 replicas against one node")
        add("")
        add(f"`router.read(<5 ms query>)` from {cfg['scale_threads']} threads, pools of 10 per node, "
            f"{cfg['scale_rounds']} interleaved rounds of {cfg['scale_window_s']} s. One node = a Router with no "
            "replicas (reads go to the primary).")
        add("")
        add("| Engine | one node (ops/s) | p99 (ms) | 2 replicas (ops/s) | p99 (ms) | ratio | ceilings |")
        add("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
        for engine, s in so.items():
            add(f"| {engine} | {_fmt(s['single_throughput'], 0)} | {_fmt(s['single_p99_ms'], 2)} | "
                f"{_fmt(s['replicas_throughput'], 0)} | {_fmt(s['replicas_p99_ms'], 2)} | {s['ratio']:.2f}x | "
                f"2,000 / 4,000 ops/s |")
        add("")

    mem = r.get("memory", {})
    if mem:
        add("## 5. Client memory per pooled connection")
        add("")
        add(f"Each figure from a fresh interpreter: the same code is run once with a pool of 1 and closed "
            f"(imports and one-off setup paid), then RSS (`/proc/self/statm`) is read, a pool of "
            f"{cfg['memory_conns']} is opened, all {cfg['memory_conns']} connections are checked out and run "
            f"`SELECT 1`, and RSS is read again: delta / connections, median of {cfg['memory_runs']} runs. "
            "Python heap = the same under `tracemalloc` (one run). mysql.connector.pooling stops at 32 connections.")
        add("")
        add("| Contender | PostgreSQL RSS (KiB/conn) | Python heap (KiB/conn) | MariaDB RSS (KiB/conn) | Python heap (KiB/conn) |")
        add("| --- | ---: | ---: | ---: | ---: |")
        for key, row in mem.items():
            cells = []
            for engine in ("postgres", "mysql"):
                e = row.get(engine)
                cells += [_fmt(e["rss_per_conn"] / 1024) if e else "–", _fmt(e["py_per_conn"] / 1024) if e else "–"]
            add(f"| {row['label']} | {' | '.join(cells)} |")
        add("")

    _bulk_sections(r, add)
    _async_sections(r, add)
    _adversity_sections(r, add)

    add("## Contenders and how each is set up")
    add("")
    add("| Contender | engine | setup |")
    add("| --- | --- | --- |")
    for key, info in labels.items():
        add(f"| {info['label']} | {info['engine']} | {info['note']}{'; gated by a BoundedSemaphore(10) in the many-thread runs' if info['gate'] else ''} |")
    add("")
    add("## How verdicts are decided")
    add("")
    add("* *adds at most 10 us*: median over rounds of (router p50 − floor p50), both measured in the same round.")
    add("* *no more than X*: median of per-round p50 differences ≤ 0 (the 95% interval is shown).")
    add(f"* *clearly less than X*: X is slower by ≥ {CLEARLY_US:.0f} µs (median of per-round p50 differences) "
        "and the 95% bootstrap interval of that median excludes zero. Checked against each library's autocommit "
        "variant (the fair fight: one round trip each) and, for the record, its default.")
    add("* *3x faster per op*: ratio of per-op times (10%-trimmed means over rounds of batch time / ops), p50 ratio shown too.")
    add("* *95% of the I/O ceiling*: median throughput / (10 connections / service time), the service time being "
        "one query's time on one raw connection measured in the same rounds (the nominal 10 / 5 ms is shown too); "
        "no starved thread in any round; no errors.")
    add("* *p99 within 2x of the queueing wait*: p99 ≤ 2 × W, W = threads / throughput (Little's law).")
    add("* *1.8x*: ratio of median throughputs, 2 replicas vs one node.")
    add("* *bulk writes, `x COPY`, `x execute_values`, `x executemany`, `x the best multi-row INSERT`*: the median over "
        "rounds of the per-round ratio of rows/s (every contender loads in every round, in a fresh random order); "
        "judged on `write_many(batch_size=10000, workers=2)`. The best multi-row INSERT is the best of the three "
        "statement sizes in each round.")
    if r.get("async"):
        add("* *asyncio, adds no more than psycopg_pool*: added = the median over rounds of (contender's median call "
            "− the raw AsyncConnection's median call), both measured in the same round; PASS when AsyncRouter's "
            "added ≤ AsyncConnectionPool (autocommit)'s added (difference ≤ 0). The paired per-round "
            "AsyncRouter − pool median is shown too, with its 95% bootstrap interval.")
        add("* *asyncio, exactly one round trip*: client turns counted by the relay / reads, after a warm-up; PASS "
            "only at exactly 1.")
        add("* *asyncio, 95% of the I/O ceiling, no starved task*: median throughput over rounds / (10 connections "
            "/ the median of the 5 ms query's times on one raw connection, one task, measured right before each "
            "cell) ≥ 0.95; no task "
            "that completed nothing in the window in any round; no errors; no task still running 15 s after the "
            "queue it left at the window's end had time to drain (1.5 × tasks / throughput, at most 120 s).")
    add("* *streams*: rows/s as the median of per-round ratios; peak RSS growth = the child process's peak RSS "
        "(VmHWM, reset after a 10,000-row warm-up) minus its RSS before the stream, the largest over the rounds.")
    if r.get("adversity"):
        for rule in ADVERSITY_RULES:
            add(f"* {rule}")
    add("")
    add("## Notes")
    add("")
    for note in r.get("notes", []):
        add(f"* {note}")
    add("")
    path.write_text("\n".join(lines))


def _async_sections(r: dict[str, Any], add: Any) -> None:
    aio = r.get("async")
    if not aio:
        return
    cfg = r["config"]
    labels = {key: info["label"] for key, info in aio["contenders"].items()}
    loop = aio.get("loop", {})
    add("## 8. asyncio: AsyncRouter against the async pools")
    add("")
    add(f"Every contender runs in the same event loop conditions: `asyncio.run(..., debug=False)` on "
        f"`{loop.get('loop')}` (policy {loop.get('policy')}, debug {loop.get('debug')}). uvloop is "
        + ("installed but not used" if loop.get("uvloop_installed") else "not installed (and would not be used)")
        + f". The phase took {aio.get('duration_s', float('nan')) / 60:.1f} min.")
    add("")
    failed = aio.get("failed", {})
    if failed:
        add("Contenders that could not run (they are not dropped silently: this is why):")
        add("")
        for key, why in failed.items():
            add(f"* {labels.get(key, key)}: `{why}`")
        add("")
    single = aio.get("single", {})
    trips = aio.get("trips", {})
    for engine, title in (("postgres", "PostgreSQL"), ("mysql", "MySQL / MariaDB")):
        data = single.get(engine)
        if not data:
            continue
        floor_key = AIO_FLOOR[engine]
        floor = data.get(floor_key)
        rounds = next(iter(data.values()))["rounds"]
        add(f"### 8a. One task, `SELECT 1`, {title}")
        add("")
        if engine != "postgres" and "postgres" in single:
            add(f"{rounds} interleaved rounds, measured as above.")
        else:
            add(f"{rounds} interleaved rounds in {cfg.get('aio_epochs')} epochs (each epoch a new `asyncio.run` that "
                "opens every contender anew); in each round every contender, in a fresh random order, runs one "
                f"short batch (about {cfg.get('aio_batch_s', 0) * 1000:.0f} ms of back-to-back awaited calls, each "
                "timed). Median and p99 are over every call of every round; *added* is the median over rounds of "
                "(the contender's median call − the floor's median call in the same round), with a 95% bootstrap "
                "interval; client CPU = process CPU time per call, a 10%-trimmed mean over rounds."
                + (" The client ran pinned to one CPU and the servers to the other, as in the one-thread phase."
                   if aio.get("single_pinned") else ""))
        add("")
        add("| Contender | median per call (µs) | p99 per call (µs) | added over the floor (µs) [95% CI] | "
            "client CPU (µs/call) | round trips | client sends per call |")
        add("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
        for key, res in data.items():
            if floor and key != floor_key:
                over, lo, hi = added_over_floor(res["p50_us"], floor["p50_us"])
                over_text = f"{over:+.1f} [{lo:+.1f}, {hi:+.1f}]"
            else:
                over_text = "(floor)" if key == floor_key else ""
            counted = trips.get(engine, {}).get(key)
            add(f"| {labels[key]} | {_fmt(res['median_us'])} | {_fmt(res['p99_us'])} | {over_text} | "
                f"{_fmt(center(res['cpu_us']))} | {_fmt(counted['round_trips'], 2) if counted else '–'} | "
                f"{_sends(counted['messages']) if counted else ''} |")
        add("")
    fair = aio.get("fair", {})
    for engine, title in (("postgres", "PostgreSQL"), ("mysql", "MySQL / MariaDB")):
        f = fair.get(engine)
        if not f:
            continue
        add(f"### 8c. {f['tasks']:,} tasks on a pool of {f['size']}, 5 ms in the server (`{f['sql']}`), {title}")
        add("")
        add(f"{cfg.get('aio_fair_rounds')} interleaved round(s) of {f['window_s']:.1f} s windows per contender, all "
            f"in one event loop; every task runs the query back to back. The I/O ceiling is {f['size']} connections / "
            f"the query's time on one raw connection, one task, measured right before each cell (median of "
            f"{len(f.get('service_rounds_ms', []))}: {', '.join(f'{x:.2f}' for x in f.get('service_rounds_ms', []))} "
            f"ms): {f['service_time_ms']:.2f} ms, so {f['ceiling']:,.0f} ops/s ('% of 2,000' is against the nominal "
            f"{f['size']} / 5 ms). First row: {f['size']} tasks on {f['size']} raw connections, no pool. Starved = "
            "tasks that completed nothing in the window (worst round); longest wait = the longest any task went "
            "between two completed queries (from the window's start; the wait for a connection included); "
            "W = tasks / throughput, the wait a fair queue gives (Little's law); client CPU = the bench process's "
            "CPU over the window (1.0 = one core). Pools that raise when exhausted are behind an "
            "`asyncio.Semaphore(10)`.")
        add("")
        add("| Contender | ops/s | % of ceiling | % of 2,000 | % of reference | p50 (ms) | p99 (ms) | longest wait "
            "(ms) | W (ms) | queries per task (min–max) | starved | errors | client CPU |")
        add("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |")
        ref = f["reference"]
        rows = [("*10 raw connections, one task each, no pool (reference)*", ref)]
        rows += [(labels[key] + (" (semaphore-gated)" if aio["contenders"][key]["gate"] else ""), c)
                 for key, c in f["cells"].items()]
        for name, c in rows:
            wait = c["tasks"] / c["throughput"] * 1e3 if c["throughput"] else float("nan")
            of_ref = f"{c['throughput'] / ref['throughput']:.1%}" if c is not ref and ref["throughput"] else ""
            add(f"| {name} | {_fmt(c['throughput'], 0)} | {c['throughput'] / f['ceiling']:.1%} | "
                f"{c['throughput'] / f['ceiling_nominal']:.1%} | {of_ref} | {_fmt(c['p50_ms'], 1)} | "
                f"{_fmt(c['p99_ms'], 1)} | {_fmt(c['max_gap_ms'], 0)} | {_fmt(wait, 0)} | "
                f"{c['per_task_min']}–{c['per_task_max']} | {c['starved_worst']} | {c['errors']} | "
                f"{c['client_cpu']:.2f} |")
        add("")
    add("**How each async contender is set up**")
    add("")
    add("| Contender | engine | setup |")
    add("| --- | --- | --- |")
    for info in aio["contenders"].values():
        add(f"| {info['label']} | {info['engine']} | {info['note']} |")
    add("")
    for note in AIO_NOTES:
        add(f"* {note}")
    add("")


AIO_NOTES = [
    "The floors make the calls dbrouter makes, with no pool: psycopg's AsyncConnection with one cursor kept "
    "(`await cur.execute(sql)`, `await cur.fetchall()`), mysql.connector.aio's `cmd_query` + `get_rows`. "
    "psycopg prepares a statement after 5 executions (prepare_threshold=5, its default, which the floor, "
    "psycopg_pool and SQLAlchemy keep); dbrouter sets prepare_threshold=None (never prepare: a query without "
    "parameters goes as one simple Query message), so the floor with that setting is shown too.",
    "mysql.connector.aio has no C extension: the raw connection, its pool and AsyncRouter's MySQL adapter all run "
    "the connector's pure-Python protocol. Against the bench's servers (no TLS) it needs ssl_disabled=True to "
    "connect at all: otherwise connect() ends in `TypeError: cannot unpack non-iterable NoneType object` (it "
    "unpacks the cipher of a plain socket); dbrouter's adapter works around that itself.",
    "AsyncRouter runs as AsyncRouter(primary, [replica 1], max_size=10): its reads go to the same replica as "
    "everyone else's, its health monitor probes once a second from a thread (once an hour while round trips are "
    "counted). In the 1,000-task cells every pool is first filled to its 10 connections.",
]


ADV_LABELS = {"on": "dbrouter, features on", "hedge_only": "dbrouter, hedge_after='auto' alone",
              "eject_only": "dbrouter, slow_replica_ratio=3 alone", "off": "dbrouter, defaults (features off)",
              "naive": "naive (driver pool per node, round-robin, tenacity)"}


def _adversity_sections(r: dict[str, Any], add: Any) -> None:
    adv = r.get("adversity")
    if not adv:
        return
    cfg = r["config"]
    k = adv.get("constants", {})
    add("## 9. Adversity: slow replicas, overload, hung nodes")
    add("")
    add("Each engine's cluster (primary + 2 replicas) with a `dbrouter.faultproxy.FaultProxy` in front of the second "
        "replica (the primary in the last scenario), run in a child process of its own so that the delays it adds do "
        "not wait for the bench's GIL. Setups, side by side in one run:")
    add("")
    for key, label in adv.get("setups", {}).items():
        add(f"* **{key}**: {label}")
    add(f"* **hedge_only** / **eject_only** (scenarios 1 / 2): the defaults plus that one option (ejection with "
        f"`slow_replica_margin={k.get('slow_margin_s', 0.001)}`: the default 5 ms margin is more than a 10x-slow point "
        "read takes here, so it would never eject).")
    add("")
    add("The features-on setup: `Router(primary, [replica1, replica2 via the proxy], hedge_after='auto', "
        f"slow_replica_ratio=3, slow_replica_margin={k.get('slow_margin_s', 0.001)}, retry_budget=0.2, "
        "max_waiting=2 x pool size)`; every dbrouter setup has `min_size = max_size` = the pool size given below. "
        "The naive setup wraps each driver pool in a `BoundedSemaphore` of its size (both raise when exhausted), sends "
        "each attempt to the next replica and retries with tenacity (`stop_after_attempt(3)`, "
        "`retry_if_exception_type((OperationalError, InterfaceError))`, `wait_exponential(multiplier=0.02, max=1)`); "
        "psycopg2 connections in autocommit, mysql.connector.pooling with its defaults (it pings at checkout and "
        f"resets the session on return). The phase took {adv.get('duration_s', float('nan')) / 60:.1f} min.")
    add("")
    for engine in ("postgres", "mysql"):
        res = adv.get(engine)
        if not res:
            continue
        title = _engine_label(engine)
        for kind, number, head in (("spikes", "9a", "one replica with latency spikes"),
                                   ("spikes_draining", "9a'", "one replica with latency spikes"),
                                   ("slow", "9b", "one replica 10x slower")):
            t = res.get(kind)
            if not t:
                continue
            on_driver = f" on {t['driver']}" if t.get("driver") else ""
            add(f"### {number}. {title}{on_driver}: {head} (`{t['fault']}`)")
            add("")
            healthy = t["healthy"]
            text = f"Point reads (`{t.get('sql', '')}`) from {t['threads']} threads back to back, {t['reads']:,} per setup, "
            if t.get("driver"):
                text = (f"The same as 9a with every dbrouter setup on {t['driver']}, whose reads a hedge that won "
                        "ends without cutting their connection: the loser's connection is drained and pooled again "
                        "(README, \"Hedged reads\"); the naive setup is 9a's. " + text)
            text += f"pools of {t['pool_size']} per node. "
            if t.get("rounds"):
                text += (f"In {t['rounds']} rounds, each of a {t['rounds']}th of the reads: the healthy baseline "
                         "(dbrouter defaults, proxy passing through), then every setup under the fault in a random "
                         f"order (first round: {', '.join(t.get('order', []))}; each warmed up under the fault in "
                         "the first round, a fifth of the reads); the rounds' reads pooled, so that the machine's "
                         "drift over the scenario reaches the baseline and the setups alike. Healthy baseline: "
                         f"p50 {healthy['p50_ms']:.2f} ms, p99 {healthy['p99_ms']:.2f} ms")
            else:
                text += (f"Healthy baseline first (dbrouter defaults, proxy passing through): p50 "
                         f"{healthy['p50_ms']:.2f} ms, p99 {healthy['p99_ms']:.2f} ms. Then every setup under the "
                         f"fault, in a random order ({', '.join(t.get('order', []))}), each after a warm-up under it "
                         "(a fifth of the reads")
                if kind == "slow":
                    text += ("; for the setups that eject, until the replica was ejected, at most 15 s). The proxy "
                             f"adds {t.get('added_ms_each_way', float('nan')):.2f} ms each way: 10x the healthy p50 "
                             "per read")
                text += ")"
            add(text + ". Errors count as reads, at the time they failed. Extra = (hedges + retries) / reads. "
                "Connections opened = by all the setup's pools during the measured run (a hedge's losing read is "
                + ("drained: its connection pooled again, unless it did not end within 1 s)." if t.get("driver") else
                   "cut: its connection is discarded, not pooled again)."))
            add("")
            add("| Setup | p50 (ms) | p99 (ms) | p99 / healthy p99 | p99.9 (ms) | max (ms) | errors | extra queries | "
                "hedges won / sent / refused | connections opened | read time direct / proxied (ms) | warm-up |")
            add("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | --- | --- |")
            add(f"| *healthy baseline* | {_fmt(healthy['p50_ms'], 2)} | {_fmt(healthy['p99_ms'], 2)} | 1.00 | "
                f"{_fmt(healthy['p999_ms'], 1)} | {_fmt(healthy['max_ms'], 0)} | {healthy['errors']} | | | "
                f"{healthy.get('counters', {}).get('opened', '–')} | | |")
            for key in ("on", "hedge_only", "eject_only", "off", "naive"):
                c = t["setups"].get(key)
                if not c:
                    continue
                n = c.get("counters")
                lat = c.get("node_latency_ms")
                warm = c.get("warmup", {})
                warm_text = f"{warm.get('n', 0):,} reads, {warm.get('seconds_to_steady', float('nan')):.1f} s"
                if "ejected" in warm:
                    warm_text += ", ejected" if warm["ejected"] else ", not ejected"
                extra = f"{c['extra_share']:.1%}" if n else "–"
                hedges = f"{n['hedges_won']} / {n['hedges']} / {n['hedges_refused']}" if n else "–"
                times = f"{lat['direct']:.2f} / {lat['proxied']:.2f}" if lat else "–"
                add(f"| {ADV_LABELS.get(key, key)} | {_fmt(c['p50_ms'], 2)} | {_fmt(c['p99_ms'], 2)} | "
                    f"{c['p99_ms'] / healthy['p99_ms']:.2f} | {_fmt(c['p999_ms'], 1)} | {_fmt(c['max_ms'], 0)} | "
                    f"{c['errors']} | {extra} | {hedges} | {n.get('opened', '–') if n else '–'} | {times} | "
                    f"{warm_text} |")
            add("")
        o = res.get("overload")
        if o:
            add(f"### 9c. {title}: overload, {o['overload']:g}x the capacity, one replica `flaky({o['flaky']})`")
            add("")
            add(f"Capacity measured first: `{o['sql']}` on pools of {o['pool_size']} per replica ({o['connections']} "
                f"connections; nominal {o['nominal_capacity']:,.0f}/s), closed loop, 3 threads per connection, proxy "
                f"passing through: **{o['capacity']:,.0f} requests/s**. Then {o['rate']:,.0f} requests/s offered open "
                f"loop for {o['window_s']:g} s per setup (request i due at start + i / rate, issued by "
                f"{o['workers']} threads; its time counts from when it was due), one setup at a time in a random order "
                f"({', '.join(o.get('order', []))}), with the proxied replica resetting {o['flaky']:.0%} of its "
                f"requests. Every request is capped at {o['cap_s'] * 1e3:.0f} ms: features on by `timeout=` (and "
                "`acquire_timeout`), defaults by `acquire_timeout` per attempt, naive by its gate's wait per attempt. "
                "Server queries = the servers' counters before the load and after the setup closed (PostgreSQL: "
                "xact_commit + xact_rollback of the database; MariaDB: Com_select; every node, primary included, "
                "minus the bench's own counting), so they include reconnections' transactions and dbrouter's probes.")
            add("")
            add("| Setup | requests | ok | goodput (/s) | % of capacity | server queries (primary, replica 1, "
                "replica 2) | amplification | queue wait p99 (ms) | ok p50 / p99 (ms) | late start p99 (ms) | errors |")
            add("| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | --- | ---: | --- |")
            for key in ("on", "off", "naive"):
                c = o["setups"].get(key)
                if not c:
                    continue
                by_node = ", ".join(f"{v:,.0f}" for v in c["server_queries_by_node"].values())
                errors = ", ".join(f"{name} {count:,}" for name, count in c["errors"].items()) or "–"
                add(f"| {ADV_LABELS.get(key, key)} | {c['issued']:,} | {c['ok']:,} | {_fmt(c['goodput'], 0)} | "
                    f"{c['goodput_share']:.0%} | {c['server_queries']:,.0f} ({by_node}) | {c['amplification']:.2f}x | "
                    f"{_fmt(c['wait_p99_s'] * 1e3, 0)} | {_fmt(c['ok_p50_ms'], 0)} / {_fmt(c['ok_p99_ms'], 0)} | "
                    f"{_fmt(c['late_p99_ms'], 0)} | {errors} |")
            add("")
            samples = [(key, name, text) for key in ("on", "off", "naive") if key in o["setups"]
                       for name, text in o["setups"][key].get("error_samples", {}).items()]
            if samples:
                add("The first error of each kind, per setup:")
                add("")
                for key, name, text in samples:
                    add(f"* {key}, {name}: `{text}`")
                add("")
        d = res.get("deadline")
        if d:
            add(f"### 9d. {title}: a replica blackholed mid-run, {d['calls']:,} calls with `timeout={d['timeout_s']}`")
            add("")
            pause = k.get("deadline_pause_s")
            paced = f", each thread pausing {pause * 1e3:.0f} ms between calls" if pause else ""
            down = d.get("on", {}).get("node_down_after_s")
            seen = (f" dbrouter's probes marked it down {down:.1f} s after the blackhole began." if down is not None
                    else " dbrouter's probes did not mark it down before the calls ended.")
            add(f"{d['threads']} threads{paced}, pools of 10 (the default), point reads; the proxied replica is "
                "blackholed once a third of the calls were made and stays so until the end." + seen
                + " The naive setup has no deadline (psycopg2 `connect_timeout=5`, mysql.connector "
                "`connection_timeout=5`): it is given "
                f"{cfg.get('adv_naive_limit_s', float('nan')):g} s, then the threads still blocked in a call are counted "
                "and the proxy passes through again, which releases them.")
            add("")
            add("| Setup | calls finished | within 250 ms (of all calls) | p50 (ms) | p99 (ms) | p99.9 (ms) | max (ms) | "
                "errors | threads blocked at the end | after |")
            add("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | --- |")
            for key in ("on", "naive"):
                c = d.get(key)
                if not c:
                    continue
                if key == "on":
                    after = (f"threads {c['threads_before']} before the calls, {c['threads_after']} after (settled in "
                             f"{c['threads_settled_s']:.2f} s); connections in use {c['in_use_after']}")
                else:
                    after = (f"connections in use at the cut-off {c['in_use_after']}, all back "
                             f"{c.get('released_after_s', float('nan')):.1f} s after pass-through "
                             f"(left: {c.get('in_use_after_release', '?')})")
                errors = ", ".join(f"{name} {count:,}" for name, count in c["error_types"].items()) or "–"
                add(f"| {ADV_LABELS.get(key, key)} | {c['n']:,} | {c['share_within_target']:.2%} | "
                    f"{_fmt(c['p50_ms'], 2)} | {_fmt(c['p99_ms'], 1)} | {_fmt(c['p999_ms'], 1)} | {_fmt(c['max_ms'], 0)} "
                    f"| {errors} | {c['blocked_at_end']} | {after} |")
            add("")
            for key in ("on", "naive"):
                for name, text in d.get(key, {}).get("error_samples", {}).items():
                    add(f"* {key}, the first {name}: `{text}`")
                for late in d.get(key, {}).get("late_calls", []):
                    add(f"* {key}, a call past 250 ms: {late['seconds']:.3f} s, started "
                        f"{late['started_after_blackhole_s']:.2f} s after the blackhole began, `{late['outcome']}`")
            add("")
        df = res.get("defaults")
        if df:
            add(f"### 9e. {title}: Router defaults, a write to a blackholed primary")
            add("")
            add(f"`Router(primary via the proxy, [replicas])` with no option at all; after a first write, the proxy "
                f"blackholes and one `router.write(INSERT ...)` is timed: **{df['seconds']:.3f} s**, "
                f"`{df['outcome']}` (documented bound: max(1, connect_timeout) + health_interval = {df['bound_s']:g} s).")
            add("")
