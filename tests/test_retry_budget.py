"""The retry budget (issue 15, part 2): retries add at most ``retry_budget`` of the requests
of the last 10 s plus a floor a second; past it a call raises instead of retrying.

The arithmetic runs on a fake clock; the behaviour runs against real servers with a
replica that refuses every connection, through the public API.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest

import dbrouter
from dbrouter import NoReplicaAvailable, Router
from dbrouter.retrying import RetryBudget

from .conftest import free_low_port
from .test_control_plane import close_within


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def budget(ratio: float, floor: float) -> tuple[RetryBudget, Clock, list[int]]:
    clock = Clock()
    requests = [0]
    return RetryBudget(ratio, floor, lambda: requests[0], clock=clock), clock, requests


def allowed(b: RetryBudget, tries: int) -> int:
    return sum(b.allow() for _ in range(tries))


def test_the_floor_alone_allows_its_retries_a_second_and_no_more() -> None:
    b, clock, _ = budget(0.2, 10)
    assert allowed(b, 50) == 10  # no requests: the floor of the first second
    clock.now += 5
    assert allowed(b, 100) == 40  # 10 a second over 5 s, minus the 10 already made


def test_retries_may_add_the_ratio_of_the_requests_of_the_window() -> None:
    b, clock, requests = budget(0.2, 0)
    clock.now += 1
    requests[0] = 1000
    assert allowed(b, 500) == 200
    clock.now += 1
    requests[0] = 2000
    assert allowed(b, 500) == 200  # another 1000 requests, another 200 retries


def test_requests_older_than_the_window_stop_counting() -> None:
    b, clock, requests = budget(0.2, 0)
    for _ in range(10):  # 1000 requests a second for 10 s, no retries
        clock.now += 1
        requests[0] += 1000
        b.allow()  # a mark a second (one retry each, which the budget allows)
    clock.now += 30  # then a quiet 30 s: the window holds no request
    assert allowed(b, 10) == 0
    clock.now += 1
    requests[0] += 100
    assert allowed(b, 100) == 20


def test_a_refused_retry_is_not_counted_against_the_budget() -> None:
    b, clock, requests = budget(0.5, 0)
    clock.now += 1
    requests[0] = 10
    assert allowed(b, 100) == 5
    requests[0] = 12
    assert allowed(b, 100) == 1


def test_a_quiet_start_then_a_storm_gets_the_floor_not_an_hour_of_credit() -> None:
    b, clock, requests = budget(0.2, 10)
    clock.now += 3600  # an hour of evenly spread requests, and never a retry
    requests[0] = 3_600_000
    # The window's 10 s held 10,000 of them (evenly spread): 2,000 retries, plus the floor.
    assert allowed(b, 5000) == 2000 + 10 * 10


@pytest.mark.timeout(120)
def test_a_replica_that_refuses_costs_at_most_the_budget_in_retries(cluster: Any) -> None:
    """Half the reads go to a replica that refuses every connection, and neither its breaker
    (fail_max is huge) nor the probes (seen healthy once, then not again for a minute) take
    it out: without a budget every such read is retried; with one,
    retries stay within 20% of the requests plus the floor, and the reads beyond it raise
    NoReplicaAvailable saying so, with one event."""
    from dbrouter.faultproxy import FaultProxy

    good = cluster.replicas[0]
    with FaultProxy(upstream=("127.0.0.1", cluster.replicas[1].port), listen_port=free_low_port()) as proxy:
        bad_url = cluster.replicas[1].url.replace(f":{cluster.replicas[1].port}/", f":{proxy.port}/")
        common: dict[str, Any] = {"fail_max": 1_000_000, "health_interval": 60, "retry_backoff": 0,
                                  "connect_timeout": 2, "min_size": 0}

        def started(**options: Any) -> Router:
            router = Router(cluster.primary.url, [good.url, bad_url], **common, **options)
            assert router.wait_for_probes(timeout=10)
            proxy.refuse()
            proxy.reset_connections()
            return router

        unbudgeted = started(retry_budget=None)
        try:
            for _ in range(200):
                unbudgeted.read("SELECT 1")
            stats = unbudgeted.stats()
            assert stats["retries"] >= 90 and stats["retries_refused"] == 0, stats
        finally:
            assert close_within(unbudgeted)
        proxy.pass_through()

        router = started(retry_budget=0.2, retry_budget_floor=1)
        events: list[dbrouter.Event] = []
        router.on("retry_budget_exhausted", events.append)
        try:
            outcomes = []
            for _ in range(400):
                try:
                    router.read("SELECT 1")
                    outcomes.append("ok")
                except NoReplicaAvailable as exc:
                    assert "the retry budget is spent" in str(exc), exc
                    outcomes.append("refused")
            stats = router.stats()
            counts = {k: len(list(g)) for k, g in itertools.groupby(sorted(outcomes))}
            # 400 reads in a few seconds: at most 20% of them plus a retry a second.
            assert stats["retries"] <= 0.2 * 400 + 10, stats
            assert counts.get("refused", 0) == stats["retries_refused"] > 0, (counts, stats)
            assert counts["ok"] >= 200, counts
            assert len(events) == 1 and events[0].node is not None, events
        finally:
            assert close_within(router)
