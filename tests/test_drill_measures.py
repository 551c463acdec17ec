"""The drill's write-outage measure, on operations built by hand (pure logic)."""

from __future__ import annotations

import pytest

from dbrouter.drill.report import summarise, write_outages
from dbrouter.workload import Op


def steady(begin: float, end: float, step: float = 0.01, latency: float = 0.002) -> list[Op]:
    ops, t = [], begin
    while t < end:
        ops.append(Op("write", t, t + latency))
        t += step
    return ops


def failing(begin: float, end: float, step: float = 0.01) -> list[Op]:
    ops, t = [], begin
    while t < end:
        ops.append(Op("write", t, t + 0.001, error="NoPrimaryAvailable"))
        t += step
    return ops


def test_two_outages_with_healthy_time_between_are_two_not_one() -> None:
    """The old measure ran from the first failure to the first success after the last one:
    here it said 6 s, merging both outages and the 3 s of healthy writes between them."""
    ops = steady(0, 5) + failing(5, 7) + steady(7, 10) + failing(10, 11) + steady(11, 15)
    outages = write_outages(ops, fault_at=5.0, run_end=15.0)
    assert len(outages) == 2
    total = sum(end - begin for begin, end in outages)
    assert 2.9 < total < 3.1, outages
    assert summarise(ops, start=0.0, fault_at=5.0, events=[], lost=[], duplicated=[])["write_unavailability"] == total


def test_a_stall_in_which_writes_waited_and_then_succeeded_counts() -> None:
    """With failover_wait, writes wait for the new primary and succeed: no write failed, and
    the old measure said 0 s."""
    waiting = [Op("write", 5.0 + i * 0.05, 8.0 + i * 0.001) for i in range(60)]  # all acknowledged at ~8 s
    ops = steady(0, 5) + waiting + steady(8.01, 12)
    outages = write_outages(ops, fault_at=5.0, run_end=12.0)
    assert len(outages) == 1
    begin, end = outages[0]
    assert begin == 5.0 and 8.0 < end < 8.1


def test_healthy_writes_after_the_fault_are_no_outage() -> None:
    ops = steady(0, 10)
    assert write_outages(ops, fault_at=5.0, run_end=10.0) == []


def test_an_outage_that_never_ends_lasts_to_the_end_of_the_run() -> None:
    ops = steady(0, 5) + failing(5, 9)
    assert write_outages(ops, fault_at=5.0, run_end=9.5) == [(5.0, 9.5)]


def test_reads_and_writes_have_latency_percentiles_of_their_own() -> None:
    """`dbrouter drill compare` shows them: fast failed writes must not hide slow reads."""
    reads = [Op("read", float(i), i + 0.010) for i in range(99)] + [Op("read", 99.0, 99.5)]
    writes = [Op("write", float(i), i + 0.001, error="NoPrimaryAvailable") for i in range(200)]
    results = summarise(reads + writes, start=0.0, fault_at=50.0, events=[], lost=[], duplicated=[])
    assert results["read_p50_latency"] == pytest.approx(0.010) and results["read_p99_latency"] == pytest.approx(0.010)
    assert results["read_max_latency"] == pytest.approx(0.5)
    assert results["write_p50_latency"] == pytest.approx(0.001) and results["write_max_latency"] == pytest.approx(0.001)
    only_reads = summarise(reads, start=0.0, fault_at=50.0, events=[], lost=[], duplicated=[])
    assert only_reads["write_p50_latency"] is None and only_reads["write_max_latency"] is None


def test_writes_that_could_not_be_read_back_are_not_checked_rather_than_zero() -> None:
    """A drill that could not read its writes back (no primary at the end) reported 0 lost
    and 0 duplicated writes, and a --max-lost-writes limit held: now neither is claimed."""
    from dbrouter.drill.figures import format_figure
    from dbrouter.drill.report import Limit, summarise

    results = summarise([], start=0.0, fault_at=0.0, events=[], lost=None, duplicated=None)
    assert results["lost_writes"] is None and results["duplicated_writes"] is None
    assert format_figure("lost_writes", None) == "not checked"
    limit = Limit("max-lost-writes", 0.0, measured=None)
    assert not limit.ok and "not checked" in limit.describe() and "VIOLATED" in limit.describe()
    checked = summarise([], start=0.0, fault_at=0.0, events=[], lost=[], duplicated=[])
    assert checked["lost_writes"] == 0 and checked["duplicated_writes"] == 0
