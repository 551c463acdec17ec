"""The benchmark's verdict rules (pure logic): each target flips at the line the issue draws.

The numbers come from the stored full run (bench/results.json), changed one at a time.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Callable

import pytest

from bench import report

RESULTS = json.loads((Path(__file__).resolve().parent.parent / "bench" / "results.json").read_text())


def verdict(change: Callable[[dict[str, Any]], None], target_starts: str) -> str:
    results = copy.deepcopy(RESULTS)
    change(results)
    found = [t for t in report.evaluate_targets(results) if t["target"].startswith(target_starts)]
    assert len(found) == 1, [t["target"] for t in report.evaluate_targets(results)]
    return found[0]["verdict"]


# The targets the stored run does not meet, each open in its issue (the closing notes say why):
# - issue 18: mysql-connector's executemany already sends one multi-row INSERT per call (2.2x
#   measured; 13.5x over a loop of cursor.execute per row): 20x cannot hold as written;
# - issue 15: with hedged reads on, a spiky replica's p99 is 3-5x the healthy one (a won hedge
#   cuts its loser's connection, and the reconnect's SCRAM login costs the saturated 2 cores
#   about 25 slow reads); with one replica 10x slower and ejected, the features-on setup's
#   p99 on MariaDB was 1.59x and 1.86x in two runs (ejection alone: 0.76x and 0.80x), the
#   hedging watcher's wake-ups on a loaded client being the likely cost.
KNOWN_UNMET = [
    "MariaDB: write_many >= 20x mysql-connector executemany",
    "PostgreSQL, adversity, one replica with latency spikes (1% of its replies 200 ms late): read p99 with the "
    "features on <= 1.5x the healthy p99, <= 5% extra queries",
    "MariaDB, adversity, one replica with latency spikes (1% of its replies 200 ms late): read p99 with the "
    "features on <= 1.5x the healthy p99, <= 5% extra queries",
]


def test_stored_run_meets_every_target() -> None:
    targets = report.evaluate_targets(RESULTS)
    assert len(targets) == 48
    assert [t["target"] for t in targets if t["verdict"] != "PASS"] == KNOWN_UNMET


@pytest.mark.parametrize(("extra_us", "expected"), [(0.0, "PASS"), (0.5, "FAIL")])
def test_no_more_than_the_psycopg2_pool_means_not_above_it(extra_us: float, expected: str) -> None:
    def change(results: dict[str, Any]) -> None:
        pool = results["single_thread"]["postgres"]["pg.psycopg2_pool_ac"]["p50_us"]
        results["single_thread"]["postgres"]["pg.dbrouter_read"]["p50_us"] = [x + extra_us for x in pool]

    assert verdict(change, "PostgreSQL, 1 thread: router.read adds no more than") == expected


@pytest.mark.parametrize(("over_us", "expected"), [(9.9, "PASS"), (10.1, "FAIL")])
def test_at_most_10_us_over_the_floor(over_us: float, expected: str) -> None:
    def change(results: dict[str, Any]) -> None:
        floor = results["single_thread"]["postgres"]["pg.raw"]["p50_us"]
        results["single_thread"]["postgres"]["pg.dbrouter_read"]["p50_us"] = [x + over_us for x in floor]

    assert verdict(change, "PostgreSQL, 1 thread: router.read('SELECT 1') adds at most 10 us") == expected


def test_clearly_less_needs_two_microseconds() -> None:
    def change(results: dict[str, Any]) -> None:
        mine = results["single_thread"]["postgres"]["pg.dbrouter_read"]["p50_us"]
        results["single_thread"]["postgres"]["pg.sa_queuepool"]["p50_us"] = [x + 1.0 for x in mine]

    assert verdict(change, "PostgreSQL, 1 thread: router.read clearly less overhead than SQLAlchemy raw") == "FAIL"


@pytest.mark.parametrize(("share", "starved", "expected"), [(0.96, 0, "PASS"), (0.94, 0, "FAIL"), (0.99, 1, "FAIL")])
def test_ceiling_share_and_starvation(share: float, starved: int, expected: str) -> None:
    def change(results: dict[str, Any]) -> None:
        cell = results["matrix"]["mysql"]["sleep"]["my.dbrouter_read"]["64"]
        cell["throughput"] = share * cell["ceiling"]
        cell["starved_worst"] = starved

    assert verdict(change, "MySQL/MariaDB, 64 threads, pool of 10, 5 ms") == expected


def test_ceiling_is_connections_over_measured_service_time() -> None:
    for engine in ("postgres", "mysql"):
        service_s = RESULTS["matrix"][engine]["service_time_ms"] / 1e3
        for threads, cell in RESULTS["matrix"][engine]["sleep"]["pg.dbrouter_read" if engine == "postgres"
                                                               else "my.dbrouter_read"].items():
            assert cell["ceiling"] == pytest.approx(min(int(threads), 10) / service_s, rel=1e-3)  # stored rounded
            assert cell["ceiling_nominal"] == pytest.approx(min(int(threads), 10) / 0.005)


@pytest.mark.parametrize(("throughput_ratio", "p99_over_wait", "expected"),
                         [(1.01, 1.9, "PASS"), (0.99, 1.5, "FAIL"), (1.2, 2.1, "FAIL")])
def test_select1_64_threads_against_queuepool(throughput_ratio: float, p99_over_wait: float, expected: str) -> None:
    def change(results: dict[str, Any]) -> None:
        cells = results["matrix"]["postgres"]["select1"]
        mine, theirs = cells["pg.dbrouter_read"]["64"], cells["pg.sa_queuepool"]["64"]
        mine["throughput"] = theirs["throughput"] * throughput_ratio
        mine["little_wait_ms"] = 64 / mine["throughput"] * 1e3
        mine["p99_ms"] = mine["little_wait_ms"] * p99_over_wait

    assert verdict(change, "PostgreSQL, 64 threads, SELECT 1") == expected


@pytest.mark.parametrize(("ratio", "expected"), [(1.81, "PASS"), (1.79, "FAIL")])
def test_scale_out(ratio: float, expected: str) -> None:
    def change(results: dict[str, Any]) -> None:
        s = results["scale_out"]["postgres"]
        s["replicas_throughput"] = s["single_throughput"] * ratio
        s["ratio"] = ratio

    assert verdict(change, "PostgreSQL: reads over 2 replicas") == expected


# -- bulk writes and streams (issue 18): built here, so that they do not depend on a stored run -----


def _bulk(cells: dict[str, list[float]]) -> dict[str, Any]:
    return {key: {"label": key, "rows": 1000, "rows_per_s": values, "median": sorted(values)[len(values) // 2],
                  "best": max(values)} for key, values in cells.items()}


def bulk_verdicts(pg: dict[str, list[float]], my: dict[str, list[float]]) -> dict[str, str]:
    results = {"bulk": {"postgres": _bulk(pg), "mysql": _bulk(my)}, "config": {"bulk_rows": 1000}}
    return {t["target"].split(">=")[1].strip(): t["verdict"] for t in report.evaluate_targets(results)}


@pytest.mark.parametrize(("share", "expected"), [(0.81, "PASS"), (0.79, "FAIL")])
def test_write_many_against_copy_is_judged_round_by_round(share: float, expected: str) -> None:
    copy = [100.0, 200.0, 300.0]  # a busy round is slow for both: the ratio is taken within each round
    verdicts = bulk_verdicts({"pg.write_many_w2": [x * share for x in copy], "pg.copy": copy,
                              "pg.execute_values": [1.0, 1.0, 1.0]}, {})
    assert verdicts["0.8x psycopg2 COPY on one connection with the same encoding (batch_size=10000, workers=2)"] == expected
    assert verdicts["1.5x psycopg2 execute_values"] == "PASS"


@pytest.mark.parametrize(("share", "speedup", "expected"), [(1.0, 20.0, ("PASS", "PASS")), (0.99, 19.9, ("FAIL", "FAIL"))])
def test_mariadb_write_many_against_the_best_multirow_insert_and_executemany(share: float, speedup: float,
                                                                             expected: tuple[str, str]) -> None:
    best = [100.0, 300.0]
    verdicts = bulk_verdicts({}, {"my.write_many_w2": [x * share for x in best], "my.multirow_1000": [100.0, 10.0],
                                  "my.multirow_10000": [50.0, 300.0], "my.executemany": [x * share / speedup for x in best]})
    assert (verdicts["1.0x the best single-connection multi-row INSERT"], verdicts["20x mysql-connector executemany"]) \
        == expected


@pytest.mark.parametrize(("growth_mib", "share", "expected"), [(63.9, 0.9, ("PASS", "PASS")), (64.0, 0.89, ("FAIL", "FAIL"))])
def test_stream_memory_and_speed(growth_mib: float, share: float, expected: tuple[str, str]) -> None:
    named = [1000.0, 2000.0, 3000.0]

    def cell(values: list[float], growth: float) -> dict[str, Any]:
        return {"label": "x", "rows": 5_000_000, "batch_size": 2000, "rows_per_s": values,
                "median": values[1], "peak_growth": [growth] * 3, "peak_growth_max": growth}

    results = {"stream": {"postgres": {"pg.stream": cell([x * share for x in named], growth_mib * 2**20),
                                       "pg.named": cell(named, 1.0)}}, "config": {}}
    found = {t["target"]: t["verdict"] for t in report.evaluate_targets(results)}
    assert (found["PostgreSQL: router.stream of 5,000,000 rows: peak RSS growth < 64 MiB"],
            found["PostgreSQL: router.stream rows/s >= 0.9x a psycopg2 named cursor with the same itersize"]) == expected


# -- asyncio (phase async): built here too --------------------------------------------------------


def aio_verdict(aio: dict[str, Any], target_starts: str) -> str:
    found = [t for t in report.evaluate_targets({"async": aio}) if t["target"].startswith(target_starts)]
    assert len(found) == 1, [t["target"] for t in report.evaluate_targets({"async": aio})]
    return found[0]["verdict"]


@pytest.mark.parametrize(("router_added", "pool_added", "expected"),
                         [(20.0, 20.0, "PASS"), (12.0, 20.0, "PASS"), (20.5, 20.0, "FAIL")])
def test_async_router_adds_no_more_than_psycopg_pool(router_added: float, pool_added: float, expected: str) -> None:
    # The floor swings from round to round (a busy box): what each adds is taken within each round.
    floor = [100.0, 900.0, 95.0, 4000.0, 105.0, 110.0, 98.0]
    single = {"postgres": {"pg.aio_raw": {"p50_us": floor},
                           "pg.aio_router": {"p50_us": [x + router_added for x in floor]},
                           "pg.aio_psycopg_pool_ac": {"p50_us": [x + pool_added for x in floor]}}}
    assert aio_verdict({"single": single}, "PostgreSQL, asyncio, one task: AsyncRouter.read") == expected


def test_async_added_is_the_median_of_per_round_differences() -> None:
    floor = [100.0, 100.0, 100.0]
    router = [110.0, 110.0, 500.0]  # one bad round does not move the median difference (+10)
    pool = [112.0, 112.0, 112.0]
    assert report.added_over_floor(router, floor)[0] == 10.0
    single = {"postgres": {"pg.aio_raw": {"p50_us": floor}, "pg.aio_router": {"p50_us": router},
                           "pg.aio_psycopg_pool_ac": {"p50_us": pool}}}
    assert aio_verdict({"single": single}, "PostgreSQL, asyncio, one task") == "PASS"


@pytest.mark.parametrize(("turns", "expected"), [(100, "PASS"), (101, "FAIL"), (99, "FAIL"), (200, "FAIL")])
def test_async_exactly_one_round_trip(turns: int, expected: str) -> None:
    trips = {engine: {key: {"ops": 100, "round_trips": turns / 100, "messages": {}}}
             for engine, key in report.AIO_ROUTER.items()}
    for label in ("PostgreSQL", "MySQL/MariaDB"):
        assert aio_verdict({"trips": trips}, f"{label}, asyncio: exactly one round trip") == expected


def _fair(share: float, *, starved: int = 0, errors: int = 0, hung: int = 0) -> dict[str, Any]:
    service_ms = 5.8
    ceiling = 10 / (service_ms / 1e3)
    cell = {"throughput": share * ceiling, "starved_worst": starved, "errors": errors, "hung": hung,
            "max_gap_ms": 700.0}
    return {"postgres": {"tasks": 1000, "size": 10, "service_time_ms": service_ms, "ceiling": ceiling,
                         "cells": {"pg.aio_router": cell}}}


@pytest.mark.parametrize(("fair", "expected"), [
    (_fair(0.951), "PASS"), (_fair(0.949), "FAIL"), (_fair(0.99, starved=1), "FAIL"), (_fair(0.99, errors=1), "FAIL"),
    (_fair(0.99, hung=1), "FAIL"),
])
def test_async_ceiling_share_and_starvation(fair: dict[str, Any], expected: str) -> None:
    assert aio_verdict({"fair": fair}, "PostgreSQL, asyncio, 1,000 tasks on a pool of 10") == expected


# -- adversity (phase adversity, issue 15): built here too ----------------------------------------


def adversity_verdicts(engine_results: dict[str, Any], engine: str = "postgres") -> dict[str, str]:
    targets = report.evaluate_targets({"adversity": {engine: engine_results}})
    return {t["target"]: t["verdict"] for t in targets}


def only(verdicts: dict[str, str], contains: str) -> str:
    found = [v for t, v in verdicts.items() if contains in t]
    assert len(found) == 1, list(verdicts)
    return found[0]


def _tail(p99_ratio: float, extra: float, *, ejected: bool = True) -> dict[str, Any]:
    healthy = {"p50_ms": 0.2, "p99_ms": 1.0, "p999_ms": 3.0, "max_ms": 5.0, "errors": 0}

    def cell(p99: float, share: float | None) -> dict[str, Any]:
        c: dict[str, Any] = {"p50_ms": 0.2, "p99_ms": p99, "p999_ms": 9.0, "max_ms": 10.0, "errors": 0,
                             "warmup": {"n": 100, "p99_ms": 5.0, "seconds_to_steady": 1.5, "ejected": ejected}}
        if share is not None:
            c["extra_share"] = share
            c["counters"] = {"reads": 1000, "hedges": int(share * 1000), "retries": 0, "hedges_refused": 0}
        return c

    return {"healthy": healthy, "fault": "x",
            "setups": {"on": cell(p99_ratio, extra), "off": cell(4.0, 0.0), "naive": cell(9.0, None)}}


@pytest.mark.parametrize(("kind", "phrase"), [("spikes", "latency spikes"), ("slow", "10x slower")])
@pytest.mark.parametrize(("ratio", "extra", "expected"),
                         [(1.5, 0.05, "PASS"), (1.51, 0.0, "FAIL"), (1.0, 0.051, "FAIL")])
def test_slow_replica_p99_and_extra_queries(kind: str, phrase: str, ratio: float, extra: float,
                                            expected: str) -> None:
    verdicts = adversity_verdicts({kind: _tail(ratio, extra)})
    assert only(verdicts, phrase) == expected
    assert only(verdicts, phrase) == only(adversity_verdicts({kind: _tail(ratio, extra)}, "mysql"), phrase)


def test_slow_replica_is_judged_on_the_features_on_setup_only() -> None:
    tail = _tail(1.2, 0.01)
    tail["setups"]["off"]["p99_ms"] = tail["setups"]["naive"]["p99_ms"] = 50.0  # shown beside it, not judged
    assert only(adversity_verdicts({"slow": tail}), "10x slower") == "PASS"
    del tail["setups"]["on"]
    assert adversity_verdicts({"slow": tail}) == {}


def _overload(amplification: float, wait_s: float, goodput_share: float) -> dict[str, Any]:
    capacity = 400.0

    def cell(amp: float, wait: float, share: float) -> dict[str, Any]:
        return {"issued": 1000, "server_queries": amp * 1000, "amplification": amp, "wait_p99_s": wait,
                "goodput": share * capacity, "goodput_share": share}

    return {"overload": 3.0, "capacity": capacity, "flaky": 0.5, "cap_s": 0.1,
            "setups": {"on": cell(amplification, wait_s, goodput_share), "off": cell(2.5, 0.5, 0.5),
                       "naive": cell(3.0, 0.3, 0.2)}}


@pytest.mark.parametrize(("overload", "expected"), [
    (_overload(1.2, 0.1, 0.9), ("PASS", "PASS", "PASS")),
    (_overload(1.21, 0.1, 0.9), ("FAIL", "PASS", "PASS")),
    (_overload(1.0, 0.101, 0.9), ("PASS", "FAIL", "PASS")),
    (_overload(1.0, 0.05, 0.89), ("PASS", "PASS", "FAIL")),
])
def test_overload_amplification_queue_wait_and_goodput(overload: dict[str, Any], expected: tuple[str, ...]) -> None:
    verdicts = adversity_verdicts({"overload": overload})
    assert (only(verdicts, "reaching the servers"), only(verdicts, "queue wait"), only(verdicts, "goodput")) == expected


def _deadline(share: float, *, new_threads: tuple[str, ...] = (), after_close: int = 2, in_use: int = 0,
              threads_after: int = 20) -> dict[str, Any]:
    return {"calls": 10_000, "threads": 32, "timeout_s": 0.2,
            "on": {"n": 10_000, "share_within_target": share, "p999_ms": 201.0, "max_ms": 230.0, "errors": 3000,
                   "threads_before": 20, "threads_after": threads_after, "new_threads": list(new_threads),
                   "threads_after_close": after_close, "threads_baseline": 2, "in_use_after": in_use},
            "naive": {"n": 900, "seconds": 10.0, "share_within_target": 0.09, "blocked_at_end": 32}}


@pytest.mark.parametrize(("deadline", "expected"), [
    (_deadline(0.999), "PASS"), (_deadline(0.9989), "FAIL"),
    (_deadline(1.0, new_threads=("dbrouter-hedge_0", "dbrouter-hedge_1"), threads_after=22), "PASS"),  # a fixed pool
    (_deadline(1.0, new_threads=("dbrouter-cancel",)), "FAIL"), (_deadline(1.0, after_close=3), "FAIL"),
    (_deadline(1.0, new_threads=("dbrouter-hedge_0",), threads_after=21), "PASS"),
    (_deadline(1.0, threads_after=21), "FAIL"),
    (_deadline(1.0, in_use=1), "FAIL"),
])
def test_deadline_share_and_leaks(deadline: dict[str, Any], expected: str) -> None:
    assert only(adversity_verdicts({"deadline": deadline}), "blackholed mid-run") == expected


@pytest.mark.parametrize(("seconds", "expected"), [(6.0, "PASS"), (6.05, "PASS"), (6.051, "FAIL")])
def test_defaults_write_to_a_blackholed_primary(seconds: float, expected: str) -> None:
    defaults = {"seconds": seconds, "outcome": "WriteOutcomeUnknown: ...", "bound_s": 6.0}
    assert only(adversity_verdicts({"defaults": defaults}, "mysql"), "Router defaults") == expected


def test_adversity_adds_no_target_to_a_run_without_it() -> None:
    assert report.adversity_targets({}) == []
    without = {key: value for key, value in RESULTS.items() if key != "adversity"}
    assert not [t for t in report.evaluate_targets(without) if "adversity" in t["target"]]
