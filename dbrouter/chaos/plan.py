"""The seeded fault schedule of a chaos run.

The whole schedule is drawn from ``random.Random(seed)`` before the run
starts, so that ``--seed`` replays the same faults, targets and timings
(relative to the start). Targets are roles ("primary", "replica 0"), not node
names: a promotion changes which node holds a role, and resolving the role
when the fault starts keeps the schedule meaningful after it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["FAULT_KINDS", "SERVER_FAULTS", "FaultSpec", "make_plan"]

# Kind -> relative weight in the schedule.
FAULT_KINDS: dict[str, float] = {
    "kill": 2.0,  # SIGKILL the server, restart it when the fault ends
    "freeze": 1.5,  # SIGSTOP, then SIGCONT
    "blackhole": 1.5,  # the node's proxy accepts but forwards nothing
    "latency": 1.0,  # the node's proxy delays every chunk
    "reset": 1.5,  # the node's proxy resets connections and cuts one right after a request
    "promote": 1.0,  # SIGKILL the primary, promote the most advanced replica, rejoin the old one
    "pause": 1.0,  # pause replay on a replica, then resume it
}

# Faults that act on the servers (and so on replication). At most one runs at a time: with
# one replica impaired the other still acknowledges synchronous commits, and a promotion
# starts only with both replicas healthy, so no acknowledged write can legitimately be lost.
SERVER_FAULTS = frozenset({"kill", "freeze", "promote", "pause"})

START_AT = 2.0  # the workload warms up first
END_MARGIN = 9.0  # no fault is planned to end later than this before the end of the run
MIN_DURATION = 15.0

# Rough time a fault keeps its node busy beyond its own duration (restart, catch-up, rejoin).
_RECOVERY_ESTIMATE = {"kill": 2.0, "promote": 6.0, "pause": 0.5}


@dataclass(frozen=True)
class FaultSpec:
    """One planned fault. ``at`` and ``duration`` are seconds; ``param`` depends on the kind:
    the added latency, the reset interval, or the time from the kill to the promotion."""

    index: int
    kind: str
    role: str  # "primary" or "replica"
    replica_index: int  # which replica (by name order) when role is "replica"
    at: float
    duration: float
    param: float = 0.0

    @property
    def server(self) -> bool:
        return self.kind in SERVER_FAULTS

    @property
    def estimate(self) -> float:
        """How long the fault is expected to keep its node busy, recovery included."""
        return self.param * (self.kind == "promote") + self.duration + _RECOVERY_ESTIMATE.get(self.kind, 0.0)

    @property
    def target(self) -> str:
        return "primary" if self.role == "primary" else f"replica {self.replica_index}"

    def describe(self) -> str:
        extra = {"latency": f" {self.param * 1000:.0f}ms", "reset": f" every {self.param:.2f}s",
                 "promote": f" (promote after {self.param:.2f}s)"}.get(self.kind, "")
        return f"#{self.index} {self.kind}{extra} on {self.target} at {self.at:.2f}s for {self.duration:.2f}s"


def make_plan(seed: int, duration: float, max_concurrent: int = 2) -> list[FaultSpec]:
    """The faults of a run of ``duration`` seconds: at most ``max_concurrent`` at once, at most
    one server fault at once, all planned to end ``END_MARGIN`` seconds before the end."""
    rng = random.Random(seed)
    kinds = list(FAULT_KINDS)
    weights = [FAULT_KINDS[k] for k in kinds]
    window_end = duration - END_MARGIN
    plan: list[FaultSpec] = []
    t = START_AT + rng.uniform(0.0, 1.0)
    while t < window_end and len(plan) < 100:
        kind = rng.choices(kinds, weights)[0]
        length = rng.uniform(1.0, 4.0)
        param = 0.0
        if kind == "latency":
            param = rng.uniform(0.02, 0.3)
        elif kind == "reset":
            param = rng.uniform(0.2, 1.0)
        elif kind == "promote":
            param = rng.uniform(0.5, 1.5)
        if kind == "promote":
            role, replica_index = "primary", 0
        elif kind == "pause":
            role, replica_index = "replica", rng.randrange(2)
        else:
            role = "primary" if rng.random() < 0.4 else "replica"
            replica_index = rng.randrange(2)
        spec = FaultSpec(len(plan), kind, role, replica_index, round(t, 3), round(length, 3), round(param, 3))
        active = [f for f in plan if f.at + f.estimate > t]
        if len(active) >= max_concurrent or (spec.server and any(f.server for f in active)):
            # Wait for the first active fault to end; the draws above are simply discarded,
            # which keeps the schedule a pure function of the seed.
            t = min(f.at + f.estimate for f in active) + rng.uniform(0.2, 1.0)
            continue
        if t + spec.estimate > window_end:
            break
        plan.append(spec)
        t += rng.uniform(0.5, 3.0)
    return plan
