"""Timing loops: one thread, many threads, and round trips on the wire.

Honesty rules on a 2-core box where the servers share the CPUs: contenders are
interleaved (every round runs each contender once, in a new shuffled order),
each number is a median over rounds, and every loop is bounded in count and
in time. ``time.perf_counter()`` everywhere.
"""

from __future__ import annotations

import logging
import random
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .contenders import Contender, Opened, Targets, gated
from .relay import CountingRelay

__all__ = [
    "CellResult", "count_round_trips", "matrix_runner", "median_ci", "per_thread_runner", "run_cell", "single_thread",
    "summarize_cells",
]

log = logging.getLogger("bench")

_ERROR_PAUSE = 0.001  # after a failed op, so a broken contender cannot spin
_JOIN_GRACE = 15.0  # seconds past the window a cell waits for its threads


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * (len(sorted_values) - 1) + 0.5))]


# -- other work on the box --------------------------------------------------------


def machine_busy(seconds: float = 0.5) -> float:
    """Share of all cores busy over ``seconds`` (from /proc/stat): servers, us and anyone else."""

    def ticks() -> tuple[int, int]:
        with open("/proc/stat") as fh:
            fields = [int(x) for x in fh.readline().split()[1:]]
        return sum(fields) - fields[3] - fields[4], sum(fields)

    busy0, total0 = ticks()
    time.sleep(seconds)
    busy1, total1 = ticks()
    return (busy1 - busy0) / max(1, total1 - total0)


class QuietGate:
    """Waits, within a budget for the whole run, until the machine is mostly idle.

    The servers share the box with whatever else runs on it (other test suites
    start their own database servers). Between measurements our own load is
    near zero, so a busy machine means someone else's work, which would be
    measured as ours. Each wait is recorded for the report.
    """

    def __init__(self, budget_s: float, threshold: float = 0.3) -> None:
        self.budget_s = budget_s
        self.threshold = threshold
        self.waited_s = 0.0
        self.log: list[dict[str, Any]] = []

    def wait(self, label: str) -> None:
        start = time.perf_counter()
        busy = machine_busy(0.3)
        while busy > self.threshold and self.waited_s + (time.perf_counter() - start) < self.budget_s:
            busy = machine_busy(1.0)
        waited = time.perf_counter() - start
        self.waited_s += waited
        self.log.append({"before": label, "busy": round(busy, 3), "waited_s": round(waited, 1)})
        if busy > self.threshold:
            log.warning("  machine still %.0f%% busy before %s (quiet-wait budget used up): measuring anyway", busy * 100, label)
        elif waited > 1.0:
            log.info("  waited %.0f s for the machine to quieten before %s", waited, label)


# -- one thread -------------------------------------------------------------------
#
# On this 2-core VM a loopback round trip is bimodal (about 30 us or about
# 65-80 us, by where the scheduler puts the connection's server process
# relative to the client), and the mode drifts. Long batches would hand one
# contender the fast mode and the next the slow one. So a round is short (a few
# milliseconds per contender, in a fresh random order), there are hundreds of
# rounds, comparisons are made within a round, and the caller reopens the
# contenders every so often (epochs) so that no connection keeps its placement.

_MAX_BATCH = 2_000  # ops per batch, whatever the calibration says


def _calibrate(run: Callable[[str], Any], sql: str, seconds: float, batch_seconds: float) -> int:
    """Warm up for ``seconds`` and return how many ops fill ``batch_seconds`` (at least 1)."""
    n = 0
    start = time.perf_counter()
    deadline = start + seconds
    while n < 100_000:
        run(sql)
        n += 1
        if time.perf_counter() >= deadline:
            break
    per_op = (time.perf_counter() - start) / n
    return max(1, min(_MAX_BATCH, round(batch_seconds / per_op)))


def _timed_batch(run: Callable[[str], Any], sql: str, n: int) -> tuple[float, float, float]:
    """(mean, median, client CPU) seconds per op over ``n`` ops, each op timed on its own.

    Client CPU is the whole process's CPU time (background threads included):
    the Python and driver work per op, without the wait for the server, so it
    is far less sensitive to how the scheduler places client and server.
    """
    lat = [0.0] * n
    clock = time.perf_counter
    cpu0 = time.process_time()
    start = clock()
    for i in range(n):
        t0 = clock()
        run(sql)
        lat[i] = clock() - t0
    total = clock() - start
    cpu = time.process_time() - cpu0
    return total / n, statistics.median(lat), cpu / n


def single_thread(
    opened: dict[str, Opened], sql: str, *, rounds: int, batch_seconds: float, seed: int, time_limit: float
) -> dict[str, dict[str, Any]]:
    """Per-op time of each contender over ``rounds`` short interleaved rounds.

    Returns, per contender key: ops per batch and, per round, the batch's mean
    and median (p50) microseconds per op and the client CPU microseconds per op. Stops early (and says so) if
    ``time_limit`` seconds pass.
    """
    sizes = {key: _calibrate(o.run, sql, 0.1, batch_seconds) for key, o in opened.items()}
    results: dict[str, dict[str, Any]] = {
        key: {"ops_per_batch": n, "mean_us": [], "p50_us": [], "cpu_us": []} for key, n in sizes.items()
    }
    rng = random.Random(seed)
    deadline = time.perf_counter() + time_limit
    done = 0
    for r in range(rounds):
        order = list(opened)
        rng.shuffle(order)
        for key in order:
            mean, p50, cpu = _timed_batch(opened[key].run, sql, sizes[key])
            results[key]["mean_us"].append(mean * 1e6)
            results[key]["p50_us"].append(p50 * 1e6)
            results[key]["cpu_us"].append(cpu * 1e6)
        done = r + 1
        if time.perf_counter() > deadline:
            log.warning("  single-thread: time limit reached after %d of %d rounds", done, rounds)
            break
        if done % max(1, rounds // 4) == 0:
            log.info("  single-thread: %d/%d rounds", done, rounds)
    for res in results.values():
        res["rounds"] = done
    return results


def median_ci(values: Sequence[float], *, seed: int = 1, resamples: int = 1000) -> tuple[float, float, float]:
    """Median and a 95% bootstrap confidence interval of the median."""
    rng = random.Random(seed)
    n = len(values)
    meds = sorted(statistics.median(rng.choices(values, k=n)) for _ in range(resamples))
    return statistics.median(values), meds[int(0.025 * resamples)], meds[int(0.975 * resamples) - 1]


# -- round trips on the wire ---------------------------------------------------------


def count_round_trips(contender: Contender, targets: Targets, read_port: int, write_port: int, ops: int) -> dict[str, Any]:
    """Client turns and labelled messages per op, through counting relays in front of both nodes.

    The contender is warmed up first (so that one-off work such as psycopg's
    automatic prepare after five executions per connection is done), then the
    counters are zeroed and ``ops`` single-thread ops are counted.
    """
    relays = [CountingRelay(read_port, targets.engine), CountingRelay(write_port, targets.engine)]
    try:
        relay_targets = Targets(
            targets.engine, relays[0].url_for(targets.read_url), relays[1].url_for(targets.write_url), quiet_monitor=True
        )
        opened = contender.open(relay_targets, 10)
        try:
            for _ in range(10 * 10 + 20):  # > 5 uses of each of the 10 pooled connections
                opened.run("SELECT 1")
            time.sleep(0.05)
            for relay in relays:
                relay.reset()
            for _ in range(ops):
                opened.run("SELECT 1")
            time.sleep(0.05)  # let the relay threads account for the last bytes
            turns = 0
            messages: dict[str, int] = {}
            for relay in relays:
                t, m = relay.snapshot()
                turns += t
                for label, count in m.items():
                    messages[label] = messages.get(label, 0) + count
        finally:
            opened.close()
    finally:
        for relay in relays:
            relay.stop()
    return {
        "ops": ops,
        "round_trips": turns / ops,
        "messages": {label: count / ops for label, count in sorted(messages.items(), key=lambda kv: -kv[1])},
    }


# -- many threads -----------------------------------------------------------------


@dataclass
class CellResult:
    threads: int
    window: float
    ops: int  # completed inside the window
    throughput: float  # ops per second
    p50_ms: float
    p99_ms: float
    max_ms: float
    starved: int  # threads that completed nothing inside the window
    errors: int
    hung: int  # threads still running after the grace period
    first_error: str | None = None
    per_thread_min: int = 0
    per_thread_max: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def run_cell(run: Callable[[str], Any], sql: str, threads: int, window: float) -> CellResult:
    """``threads`` threads run ``sql`` back to back for ``window`` seconds.

    Every thread starts at the same barrier and stops starting new ops at the
    deadline. An op counts toward throughput if it completed inside the window;
    the latency of every op started inside it is kept (so a thread stuck
    waiting shows up in ``max``). Threads are daemons and joined with a
    deadline: a contender that deadlocks is reported as ``hung``, not waited
    for forever.
    """
    barrier = threading.Barrier(threads + 1)
    box = {"end": 0.0}
    counts = [0] * threads
    errors = [0] * threads
    lats: list[list[float]] = [[] for _ in range(threads)]
    first_error: list[str] = []

    def worker(i: int) -> None:
        lat = lats[i]
        clock = time.perf_counter
        try:
            barrier.wait(timeout=30.0)
        except threading.BrokenBarrierError:
            return
        end = box["end"]
        done = 0
        while True:
            t0 = clock()
            if t0 >= end:
                break
            try:
                run(sql)
            except Exception as exc:  # noqa: BLE001 - counted and reported, never fatal
                errors[i] += 1
                if not first_error:
                    first_error.append(f"{type(exc).__name__}: {exc}")
                time.sleep(_ERROR_PAUSE)
                continue
            t1 = clock()
            lat.append(t1 - t0)
            if t1 <= end:
                done += 1
        counts[i] = done

    pool = [threading.Thread(target=worker, args=(i,), name=f"bench-worker-{i}", daemon=True) for i in range(threads)]
    for t in pool:
        t.start()
    box["end"] = time.perf_counter() + window
    barrier.wait(timeout=30.0)
    start = box["end"] - window
    give_up = box["end"] + _JOIN_GRACE
    for t in pool:
        t.join(timeout=max(0.0, give_up - time.perf_counter()))
    hung = sum(t.is_alive() for t in pool)
    elapsed = box["end"] - start
    total = sum(counts)
    merged = sorted(x for lat in lats for x in lat)
    return CellResult(
        threads=threads,
        window=elapsed,
        ops=total,
        throughput=total / elapsed,
        p50_ms=_quantile(merged, 0.50) * 1e3,
        p99_ms=_quantile(merged, 0.99) * 1e3,
        max_ms=(merged[-1] * 1e3) if merged else float("nan"),
        starved=sum(1 for c in counts if c == 0),
        errors=sum(errors),
        hung=hung,
        first_error=first_error[0] if first_error else None,
        per_thread_min=min(counts),
        per_thread_max=max(counts),
    )


def per_thread_runner(opened: list[Opened]) -> Callable[[str], Any]:
    """No pool at all: each of ``len(opened)`` threads gets its own raw connection.

    The reference for the many-thread cells: ten threads on ten connections is
    what a pool of ten could reach if checkout cost nothing.
    """
    free = list(opened)
    local = threading.local()

    def run(sql: str) -> Any:
        o = getattr(local, "opened", None)
        if o is None:
            o = local.opened = free.pop()  # list.pop is atomic under the GIL
        return o.run(sql)

    return run


def matrix_runner(contender: Contender, opened: Opened, size: int) -> Callable[[str], Any]:
    """The op used from many threads: pools that raise when exhausted get a semaphore."""
    return gated(opened.run, size) if contender.gate else opened.run


def summarize_cells(cells: list[CellResult]) -> dict[str, Any]:
    """Medians over rounds (worst round for starvation, max of max)."""
    def med(name: str) -> float:
        return statistics.median(getattr(c, name) for c in cells)

    return {
        "threads": cells[0].threads,
        "rounds": len(cells),
        "throughput": med("throughput"),
        "throughput_rounds": [c.throughput for c in cells],
        "p50_ms": med("p50_ms"),
        "p99_ms": med("p99_ms"),
        "max_ms": max(c.max_ms for c in cells),
        "starved_worst": max(c.starved for c in cells),
        "errors": sum(c.errors for c in cells),
        "hung": max(c.hung for c in cells),
        "first_error": next((c.first_error for c in cells if c.first_error), None),
        "per_thread_min": min(c.per_thread_min for c in cells),
        "per_thread_max": max(c.per_thread_max for c in cells),
    }
