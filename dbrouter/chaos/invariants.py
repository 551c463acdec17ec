"""The invariants of a chaos run, checked from what the harness recorded and read back.

Each check returns an `Invariant`: a name, PASS/FAIL and the evidence. The
write checks compare every recorded write with the rows on the final primary,
read directly from the server (not through the router under test).
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from .workload import ACKED, FAILED, UNKNOWN, WriteRecord

__all__ = ["Invariant", "StallDetector", "check_writes", "dump_stacks", "leftover_threads", "primary_intervals"]

# A failover event is recorded by a listener just after the router switched: a write that
# started up to this long before the recorded time may already have gone to the new primary.
EVENT_MARGIN = 0.25
MAX_LISTED = 15


@dataclass
class Invariant:
    name: str
    passed: bool
    details: list[str] = field(default_factory=list)

    def add(self, line: str) -> None:
        if len(self.details) < MAX_LISTED:
            self.details.append(line)
        elif len(self.details) == MAX_LISTED:
            self.details.append("... (more left out)")


def dump_stacks() -> str:
    """Every thread's current stack, named: what a stall report needs."""
    names = {t.ident: t.name for t in threading.enumerate()}
    parts = []
    for ident, frame in sys._current_frames().items():
        parts.append(f"--- thread {names.get(ident, ident)} ---\n" + "".join(traceback.format_stack(frame)))
    return "\n".join(parts)


class StallDetector:
    """Invariant a: no worker goes more than ``limit`` seconds without finishing an operation.

    On a stall it records every thread's stack and sets ``stop``, which ends the run.
    """

    def __init__(self, threads: int, limit: float, stop: threading.Event, alive: Callable[[int], bool],
                 t0: float) -> None:
        self.limit = limit
        self.stop = stop
        self.alive = alive
        self.t0 = t0
        self.last = [time.monotonic()] * threads
        self.stalls: list[str] = []
        self.stacks = ""
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-stall-detector", daemon=True)

    def done(self, index: int) -> None:
        self.last[index] = time.monotonic()

    def start(self) -> None:
        now = time.monotonic()
        self.last = [now] * len(self.last)
        self._thread.start()

    def close(self) -> None:
        self._done.set()
        self._thread.join(5.0)

    def _run(self) -> None:
        while not self._done.wait(0.25):
            now = time.monotonic()
            stalled = [i for i, last in enumerate(self.last) if now - last > self.limit and self.alive(i)]
            if stalled:
                self.stalls = [f"chaos-worker-{i}: nothing finished for {now - self.last[i]:.1f}s "
                               f"(at {now - self.t0:.1f}s)" for i in stalled]
                self.stacks = dump_stacks()
                self.stop.set()
                return

    def invariant(self, hung: list[str]) -> Invariant:
        result = Invariant(f"a. no stall: every worker finishes an operation within {self.limit:g}s",
                           not self.stalls and not hung)
        for line in self.stalls:
            result.add(line)
        for name in hung:
            result.add(f"{name} still running after the run was asked to stop")
        return result


def primary_intervals(initial: str, failovers: list[tuple[float, str, str]], end: float) -> dict[str, list[tuple[float, float]]]:
    """When the router considered each node the primary, from the failover events
    ``(time, old, new)``; the new primary's interval starts EVENT_MARGIN early."""
    intervals: dict[str, list[tuple[float, float]]] = {}
    current, since = initial, float("-inf")
    for at, _old, new in sorted(failovers):
        intervals.setdefault(current, []).append((since, at))
        current, since = new, at - EVENT_MARGIN
    intervals.setdefault(current, []).append((since, end))
    return intervals


def check_writes(records: list[WriteRecord], rows: list[tuple[Any, ...]], names: dict[int, str],
                 intervals: dict[str, list[tuple[float, float]]], t0: float) -> list[Invariant]:
    """Invariant c: compare the recorded writes with ``rows`` ((id, port) on the final primary)."""
    counts: Counter[int] = Counter()
    ports: dict[int, set[int]] = {}
    for row_id, port in rows:
        counts[int(row_id)] += 1
        ports.setdefault(int(row_id), set()).add(int(port))
    by_id = {r.id: r for r in records}
    acked = [r for r in records if r.outcome == ACKED]

    once = Invariant(f"c1. every acknowledged write exists exactly once ({len(acked)} acknowledged, "
                     f"{sum(r.outcome == UNKNOWN for r in records)} of unknown outcome)", True)
    for r in records:
        n = counts.get(r.id, 0)
        if (r.outcome == ACKED and n != 1) or n > 1:
            once.passed = False
            once.add(f"row {r.id} ({r.op}, {r.outcome}{', ' + r.error if r.error else ''}) found {n} times")
    for row_id in sorted(set(counts) - set(by_id)):
        once.passed = False
        once.add(f"row {row_id} was never written by the workload")

    failed = Invariant("c2. no write that failed with an error other than WriteOutcomeUnknown was applied", True)
    for r in records:
        if r.outcome == FAILED and counts.get(r.id, 0):
            failed.passed = False
            failed.add(f"row {r.id} ({r.op}) failed with {r.error} at {r.end - t0:.2f}s, yet it was applied")

    demoted = Invariant("c3. no write applied by a node after the router saw it demoted", True)
    for row_id, found in sorted(ports.items()):
        record = by_id.get(row_id)
        if record is None:
            continue
        for port in found:
            name = names.get(port, f"port {port}")
            windows = intervals.get(name, [])
            if not any(start <= record.end and record.start <= end for start, end in windows):
                demoted.passed = False
                when = ", ".join(f"{max(a - t0, 0):.2f}-{b - t0:.2f}s" for a, b in windows) or "never"
                demoted.add(f"row {row_id} ({record.op}, call {record.start - t0:.2f}-{record.end - t0:.2f}s) was "
                            f"written by {name}, the router's primary only at {when}")

    commit = Invariant("c4. no WriteOutcomeUnknown for a transaction whose COMMIT returned", True)
    seen: set[tuple[str, float]] = set()
    for r in records:
        if r.outcome == UNKNOWN and r.error == "WriteOutcomeUnknown" and r.commit_returned and (r.op, r.start) not in seen:
            seen.add((r.op, r.start))
            commit.passed = False
            commit.add(f"{r.op} of rows from {r.id} (call {r.start - t0:.2f}-{r.end - t0:.2f}s): COMMIT returned, "
                       f"then WriteOutcomeUnknown (rows found: {counts.get(r.id, 0)}): {r.message}")
    return [once, failed, demoted, commit]


def leftover_threads(exclude: set[str], wait: float) -> list[threading.Thread]:
    """Threads named dbrouter* (other than ``exclude``) still alive after up to ``wait`` seconds."""
    deadline = time.monotonic() + wait
    while True:
        left = [t for t in threading.enumerate() if t.name.startswith("dbrouter") and t.name not in exclude
                and t.is_alive()]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.02)
