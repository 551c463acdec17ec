"""Balancing policies (pure logic): each honours weights and its own rule."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import pytest

from dbrouter.balancing import LatencyAware, LeastOutstanding, RandomChoice, RoundRobin, make_balancer


@dataclass
class FakeNode:
    name: str
    weight: float = 1.0
    outstanding: int = 0
    latency: float = 0.0


def spread(balancer, nodes, n=3000) -> Counter:
    return Counter(balancer.choose(nodes).name for _ in range(n))


def test_round_robin_visits_each_in_turn() -> None:
    nodes = [FakeNode("a"), FakeNode("b"), FakeNode("c")]
    rr = RoundRobin()
    picks = [rr.choose(nodes).name for _ in range(9)]
    assert picks[:3] in (["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"])
    assert picks == picks[:3] * 3


def test_smooth_weighted_round_robin_is_exact_and_interleaved() -> None:
    nodes = [FakeNode("a", weight=2), FakeNode("b", weight=1)]
    rr = RoundRobin()
    picks = [rr.choose(nodes).name for _ in range(30)]
    assert Counter(picks) == {"a": 20, "b": 10}
    assert "bb" not in "".join(picks)  # no bursts of the light node


@pytest.mark.parametrize("policy", ["round_robin", "random", "latency", "least_outstanding"])
def test_weights_are_honoured(policy: str) -> None:
    nodes = [FakeNode("a", weight=3), FakeNode("b", weight=1)]
    if policy == "least_outstanding":
        # Load follows the picks: outstanding grows with each pick, as in a busy pool.
        balancer = make_balancer(policy)
        counts: Counter = Counter()
        for _ in range(4000):
            node = balancer.choose(nodes)
            counts[node.name] += 1
            node.outstanding += 1
    else:
        counts = spread(make_balancer(policy), nodes, 4000)
    share = counts["a"] / 4000
    assert 0.70 <= share <= 0.80, counts


def test_least_outstanding_avoids_the_busy_node() -> None:
    nodes = [FakeNode("a", outstanding=5), FakeNode("b", outstanding=0), FakeNode("c", outstanding=1)]
    assert spread(LeastOutstanding(), nodes, 100) == {"b": 100}


def test_least_outstanding_rotates_ties() -> None:
    nodes = [FakeNode("a"), FakeNode("b")]
    assert spread(LeastOutstanding(), nodes, 100) == {"a": 50, "b": 50}


def test_latency_aware_prefers_the_fast_node_but_explores() -> None:
    nodes = [FakeNode("fast", latency=0.001), FakeNode("slow", latency=0.010)]
    counts = spread(LatencyAware(), nodes, 2000)
    assert counts["fast"] > 0.7 * 2000
    unmeasured = [FakeNode("fast", latency=0.001), FakeNode("new", latency=0.0)]
    assert spread(LatencyAware(), unmeasured, 200)["new"] > 100


def test_random_spreads() -> None:
    counts = spread(RandomChoice(), [FakeNode("a"), FakeNode("b")], 2000)
    assert 800 < counts["a"] < 1200


def test_single_node() -> None:
    only = [FakeNode("a")]
    for policy in ("round_robin", "random", "latency", "least_outstanding"):
        assert make_balancer(policy).choose(only).name == "a"
