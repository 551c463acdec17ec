"""Seeded chaos runs: many threads on every Router entry point while faults come and go.

`run_chaos` starts its own local cluster (primary + 2 synchronous replicas)
with a fault proxy in front of every node, runs a seeded workload through a
Router, injects a seeded schedule of faults (kill and restart, SIGSTOP,
blackhole, latency, connection resets, promotion and rejoin, paused
replication) and checks the invariants: no stall, every node back in rotation
in time, no acknowledged write lost or duplicated, no write on a demoted
node, no WriteOutcomeUnknown after a COMMIT returned, nothing left open after
close. The same seed replays the same faults at the same times.
"""

from __future__ import annotations

from .plan import FaultSpec, make_plan
from .report import ChaosReport
from .runner import ROUTER_OPTIONS, run_chaos

__all__ = ["ROUTER_OPTIONS", "ChaosReport", "FaultSpec", "make_plan", "run_chaos"]
