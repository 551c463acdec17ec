"""Chaos runs: seeded faults under 32 threads on each engine, every invariant must hold.

Each run starts its own cluster (primary + 2 synchronous replicas). Two seeds
of 30 s per engine; between them they inject every fault kind (kill, freeze,
blackhole, latency, reset, promote, pause). The cheap tests check the plan's
rules and that each write check fails on the evidence it exists for.
"""

from __future__ import annotations

import io
import time
from collections import Counter

import pytest

from dbrouter.chaos import make_plan, run_chaos
from dbrouter.chaos.invariants import check_writes, primary_intervals
from dbrouter.chaos.plan import END_MARGIN, FAULT_KINDS
from dbrouter.chaos.workload import ACKED, FAILED, UNKNOWN, WriteRecord

SEEDS = (17, 33)
DURATION = 30.0


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("engine", [pytest.param("postgres", marks=pytest.mark.postgres, id="postgres"),
                                    pytest.param("mariadb", marks=pytest.mark.mysql, id="mariadb")])
def test_every_invariant_holds_under_chaos(engine: str, seed: int) -> None:
    stream = io.StringIO()
    report = run_chaos(engine, DURATION, seed, 32, stream=stream)
    assert report.seed == seed and stream.getvalue().startswith(f"seed {seed}\n")
    assert any(run.started is not None for run in report.faults), report.human()
    assert sum(counts.get("ok", 0) for counts in report.operations.values()) > 1000, report.human()
    assert report.passed, "\n".join(report.failures) + "\n\n" + report.human()


def test_the_seeds_cover_every_fault_kind() -> None:
    kinds = {spec.kind for seed in SEEDS for spec in make_plan(seed, DURATION)}
    assert kinds == set(FAULT_KINDS)


@pytest.mark.parametrize("seed", range(30))
def test_a_plan_is_a_function_of_the_seed_and_keeps_its_rules(seed: int) -> None:
    plan = make_plan(seed, 45.0)
    assert plan == make_plan(seed, 45.0)
    for spec in plan:
        assert spec.at + spec.estimate <= 45.0 - END_MARGIN
        active = [other for other in plan if other.at <= spec.at < other.at + other.estimate]
        assert len(active) <= 2, active
        assert sum(other.server for other in active) <= 1, active


def _record(row_id: int, outcome: str, start: float = 10.0, end: float = 10.1, **kw: object) -> WriteRecord:
    return WriteRecord(row_id, "write", start, end, outcome, **kw)  # type: ignore[arg-type]


def test_the_write_checks_fail_on_what_they_exist_for() -> None:
    t0 = time.monotonic() - 100
    names = {5432: "n0", 5433: "n1"}
    # n0 is the primary until 20 s, then n1.
    intervals = primary_intervals("n0", [(t0 + 20.0, "n0", "n1")], t0 + 100)
    records = [
        _record(1, ACKED, t0 + 1, t0 + 1.1),  # present once: fine
        _record(2, ACKED, t0 + 2, t0 + 2.1),  # lost
        _record(3, UNKNOWN, t0 + 3, t0 + 3.1, error="WriteOutcomeUnknown"),  # present twice
        _record(4, FAILED, t0 + 4, t0 + 4.1, error="NoPrimaryAvailable"),  # applied all the same
        _record(5, ACKED, t0 + 25, t0 + 25.1),  # written by n0 after its demotion
        _record(6, UNKNOWN, t0 + 6, t0 + 6.1, error="WriteOutcomeUnknown", commit_returned=True),
        _record(7, ACKED, t0 + 19.9, t0 + 20.05),  # by n1 just before the event was recorded: fine
    ]
    rows = [(1, 5432), (3, 5432), (3, 5432), (4, 5432), (5, 5432), (6, 5432), (7, 5433), (99, 5432)]
    once, failed, demoted, commit = check_writes(records, rows, names, intervals, t0)
    assert not once.passed and Counter(d.split()[1] for d in once.details) == {"2": 1, "3": 1, "99": 1}
    assert not failed.passed and failed.details[0].startswith("row 4 ")
    assert not demoted.passed and len(demoted.details) == 1 and demoted.details[0].startswith("row 5 ")
    assert not commit.passed and len(commit.details) == 1
    clean = [r for r in records if r.id in (1, 7)]
    assert all(i.passed for i in check_writes(clean, [(1, 5432), (7, 5433)], names, intervals, t0))
