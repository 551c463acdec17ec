"""What a drill measured: a timeline, the headline results, limits, and a summary for people."""

from __future__ import annotations

import json
from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .._files import write_private
from ..workload import Op

__all__ = ["DrillReport", "Limit", "build_timeline", "summarise"]

BUCKET = 0.1  # seconds per timeline slot


@dataclass
class Limit:
    """A service-level limit given on the command line, and what was measured."""

    name: str
    limit: float
    measured: float | None = None

    @property
    def ok(self) -> bool:
        if self.measured is None:
            return False  # what could not be measured (writes never read back) is not within a limit
        if self.name.startswith("min-"):
            return self.measured >= self.limit
        return self.measured <= self.limit

    def describe(self) -> str:
        unit = "%" if "availability" in self.name else "s"
        shown = "nothing (not checked)" if self.measured is None else f"{self.measured:.3f}{unit}"
        verdict = "ok" if self.ok else "VIOLATED"
        return f"--{self.name} {self.limit:g}{unit}: measured {shown} ({verdict})"


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]


def build_timeline(ops: Sequence[Op], start: float, end: float) -> list[dict[str, Any]]:
    """Per 100 ms (by completion time): operations, errors by kind, latency p50 / p99 / max."""
    slots = max(1, int((end - start) / BUCKET) + 1)
    buckets: list[list[Op]] = [[] for _ in range(slots)]
    for op in ops:
        index = int((op.end - start) / BUCKET)
        if 0 <= index < slots:
            buckets[index].append(op)
    timeline = []
    for index, bucket in enumerate(buckets):
        latencies = [op.latency for op in bucket]
        timeline.append(
            {
                "t": round(index * BUCKET, 3),
                "ops": len(bucket),
                "reads": sum(op.kind == "read" for op in bucket),
                "writes": sum(op.kind == "write" for op in bucket),
                "errors": dict(Counter(op.error for op in bucket if op.error)),
                "p50": _percentile(latencies, 0.50),
                "p99": _percentile(latencies, 0.99),
                "max": max(latencies, default=0.0),
            }
        )
    return timeline


STALL_FLOOR = 1.0  # seconds: a write slower than this (and than 5x the p99 before the fault) stalled


def write_outages(writes: Sequence[Op], fault_at: float, run_end: float) -> list[tuple[float, float]]:
    """The periods (monotonic) in which the application could not get a write acknowledged
    promptly, from the fault on.

    A write that failed, or that waited and then succeeded but took longer than a stall
    (5x the p99 of the writes before the fault, at least `STALL_FLOOR`), opens an outage at
    its start; the outage lasts until the first prompt, acknowledged write that started no
    earlier ends (or the run ends). Overlapping outages are merged, so two faults with
    healthy time between them are two outages, not one, and a stall in which writes waited
    for a failover counts, though none failed.
    """
    before = sorted(op.latency for op in writes if op.ok and op.end < fault_at)
    stall = max(STALL_FLOOR, 5 * before[min(len(before) - 1, int(0.99 * len(before)))]) if before else STALL_FLOOR
    after = [op for op in writes if op.end >= fault_at]
    good = sorted((op for op in after if op.ok and op.latency <= stall), key=lambda op: op.start)
    # earliest_end[i]: the earliest end among good writes that started at or after good[i].start
    earliest_end = [0.0] * len(good)
    soonest = run_end
    for i in range(len(good) - 1, -1, -1):
        soonest = min(soonest, good[i].end)
        earliest_end[i] = soonest
    starts = [op.start for op in good]
    spans = []
    for op in after:
        if op.ok and op.latency <= stall:
            continue
        i = bisect_left(starts, op.start)
        spans.append((op.start, earliest_end[i] if i < len(good) else run_end))
    merged: list[tuple[float, float]] = []
    for begin, end in sorted(spans):
        if merged and begin <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((begin, end))
    return merged


def summarise(
    ops: Sequence[Op],
    *,
    start: float,
    fault_at: float,
    events: Sequence[dict[str, Any]],
    lost: list[int] | None,
    duplicated: list[int] | None,
) -> dict[str, Any]:
    """The headline numbers. Times are seconds; ``fault_at`` is absolute (monotonic).
    ``lost`` and ``duplicated`` are None when the writes could not be read back: the
    counts are then None ("not checked"), never a reassuring 0."""
    reads = [op for op in ops if op.kind == "read"]
    writes = [op for op in ops if op.kind == "write"]
    outages = write_outages(writes, fault_at, max((op.end for op in ops), default=fault_at))
    unavailable = sum(end - begin for begin, end in outages)
    detections = [e["t"] for e in events if e["t"] >= fault_at - start and e["name"] not in ("node_up", "lag_restored",
                                                                                           "breaker_closed", "replicas_restored")]
    detect = (min(detections) - (fault_at - start)) if detections else None
    return {
        "operations": len(ops),
        "reads": len(reads),
        "writes": len(writes),
        "acknowledged_writes": sum(op.ok for op in writes),
        "read_availability": 100.0 * sum(op.ok for op in reads) / len(reads) if reads else 100.0,
        "write_availability": 100.0 * sum(op.ok for op in writes) / len(writes) if writes else 100.0,
        "time_to_detect": detect,
        "write_unavailability": unavailable,
        "write_outages": [[round(begin - start, 3), round(end - start, 3)] for begin, end in outages],
        "errors_by_kind": dict(Counter(op.error for op in ops if op.error)),
        "max_latency": max((op.latency for op in ops), default=0.0),
        "p99_latency": _percentile([op.latency for op in ops], 0.99),
        **_latencies("read", reads),
        **_latencies("write", writes),
        "lost_writes": None if lost is None else len(lost),
        "lost_ids": (lost or [])[:1000],
        "duplicated_writes": None if duplicated is None else len(duplicated),
        "duplicated_ids": (duplicated or [])[:1000],
    }


def _latencies(kind: str, ops: Sequence[Op]) -> dict[str, float | None]:
    """p50, p99 and max of one kind of operation, failed ones included (as in ``max_latency``);
    None when there was none of that kind."""
    latencies = [op.latency for op in ops]
    return {
        f"{kind}_p50_latency": _percentile(latencies, 0.50) if latencies else None,
        f"{kind}_p99_latency": _percentile(latencies, 0.99) if latencies else None,
        f"{kind}_max_latency": max(latencies) if latencies else None,
    }


@dataclass
class DrillReport:
    scenario: str
    engine: str
    settings: dict[str, Any]
    fault_at: float  # seconds from the start
    recover_at: float | None
    duration: float
    timeline: list[dict[str, Any]]
    results: dict[str, Any]
    events: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)
    limits: list[Limit] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # steps that failed after the fault (a --recover command)
    started: str | None = None  # wall-clock start, ISO 8601 UTC: which run this was (times above are offsets)
    patroni: dict[str, Any] | None = None
    """On a Patroni cluster, Patroni's own timeline from its REST API (`PatroniTimeline.summary`):
    leader changes, member changes, its write unavailability and outages."""

    @property
    def violated(self) -> list[Limit]:
        return [limit for limit in self.limits if not limit.ok]

    def workload_line(self) -> str:
        """``asyncio, 8 tasks on one event loop; driver psycopg (async)``: how the workload ran
        ("" for a report written before reports said so)."""
        kind, threads, driver = (self.settings.get(key) for key in ("workload", "threads", "driver"))
        if kind is None:
            return ""
        workers = f"{threads} tasks on one event loop" if kind == "asyncio" else f"{threads} threads"
        return f"{kind}, {workers}; driver {driver}"

    def to_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "engine": self.engine,
            "started": self.started,
            "settings": self.settings,
            "fault_at": self.fault_at,
            "recover_at": self.recover_at,
            "duration": self.duration,
            "results": self.results,
            "limits": [{"name": c.name, "limit": c.limit, "measured": c.measured, "ok": c.ok} for c in self.limits],
            "events": self.events,
            "notes": self.notes,
            "errors": self.errors,
            "patroni": self.patroni,
            "timeline": self.timeline,
        }

    def write_json(self, path: Path) -> None:
        """Write `to_json`, created with mode 0600 (it names your hosts and what was done to them)."""
        write_private(path, json.dumps(self.to_json(), indent=1, default=str))

    def human(self) -> str:
        r = self.results
        detect = "not detected" if r["time_to_detect"] is None else f"{r['time_to_detect']:.2f}s"
        lines = [
            f"drill: {self.scenario} on {self.engine}, {self.duration:.1f}s, fault at {self.fault_at:.1f}s"
            + (f", recovery at {self.recover_at:.1f}s" if self.recover_at is not None else ""),
            f"  operations         {r['operations']} ({r['reads']} reads, {r['writes']} writes)",
            f"  time to detect     {detect}",
            f"  write downtime     {r['write_unavailability']:.2f}s" + _spans(r["write_outages"]),
            f"  read availability  {r['read_availability']:.3f}%",
            f"  write availability {r['write_availability']:.3f}%",
            f"  max latency        {r['max_latency'] * 1000:.1f}ms (p99 {r['p99_latency'] * 1000:.1f}ms)",
            f"  errors             {', '.join(f'{k}={v}' for k, v in sorted(r['errors_by_kind'].items())) or 'none'}",
            f"  acknowledged       {r['acknowledged_writes']} writes; " + (
                f"lost {r['lost_writes']}, duplicated {r['duplicated_writes']}" if r["lost_writes"] is not None
                else "lost and duplicated: not checked (the writes could not be read back)"),
        ]
        workload = self.workload_line()
        if workload:
            lines.insert(1, f"  workload           {workload}")
        if "slow_callbacks" in r:
            lines.append(f"  slow callbacks     {r['slow_callbacks']} took 5 ms or more on the workload's loop (asyncio "
                         f"debug mode): {r.get('slow_callbacks_computed', 0)} computed that long (CPU), "
                         f"{r.get('slow_callbacks_blocking', 0)} made a blocking call, "
                         f"{r.get('slow_callbacks_waited', 0)} waited (a lock, the GIL), "
                         f"{r.get('slow_callbacks_preempted', 0)} were preempted or collected garbage")
        if self.patroni is not None:
            p = self.patroni
            lines.insert(4, f"  Patroni's downtime {p['write_unavailability']:.2f}s" + _spans(p["write_outages"])
                         + " (no member a running primary, from its REST API)")
            lines.insert(5, f"  Patroni's leader   {leader_story(p['leader_changes'])}")
        if r["lost_ids"]:
            lines.append(f"  lost ids           {r['lost_ids'][:20]}{' ...' if len(r['lost_ids']) > 20 else ''}")
        if r["duplicated_ids"]:
            lines.append(f"  duplicated ids     {r['duplicated_ids'][:20]}")
        lines += [f"  note: {note}" for note in self.notes]
        lines += [f"  FAILED: {error.splitlines()[0]}" for error in self.errors]
        lines += [f"  limit {limit.describe()}" for limit in self.limits]
        return "\n".join(lines)


def _spans(spans: Sequence[Sequence[float]]) -> str:
    return f" ({', '.join(f'{begin:.2f}s-{end:.2f}s' for begin, end in spans)})" if spans else ""


def leader_story(changes: Sequence[dict[str, Any]]) -> str:
    """``pg0, none at 5.10s, pg2 at 6.08s``: who led, from when."""
    parts = []
    for index, change in enumerate(changes):
        who = change["leader"] or "none"
        parts.append(who if index == 0 else f"{who} at {change['t']:.2f}s")
    return ", ".join(parts) or "not seen"
