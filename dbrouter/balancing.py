"""Replica choice policies.

A balancer gets the replicas that may serve right now (healthy, not lagging,
breaker closed) and picks one. Every policy honours per-node weights. They
hold no lock across I/O and keep only small state of their own.
"""

from __future__ import annotations

import itertools
import random
import threading
from typing import Callable, Protocol, Sequence

from . import _fork

__all__ = [
    "Balancer",
    "LatencyAware",
    "LeastOutstanding",
    "RandomChoice",
    "RoundRobin",
    "Weighted",
    "make_balancer",
]


class Weighted(Protocol):
    """What a balancer needs to know about a node."""

    name: str
    weight: float

    @property
    def outstanding(self) -> int: ...

    @property
    def latency(self) -> float: ...


class Balancer(Protocol):
    def choose(self, nodes: Sequence[Weighted]) -> Weighted:
        """Pick one of ``nodes`` (never empty)."""
        ...


class RoundRobin:
    """Each replica in turn; with weights, smooth weighted round robin (as in nginx),
    so a node of weight 2 gets two reads in three without bursts."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._current: dict[str, float] = {}
        self._turn = itertools.count()
        _fork.register(self)

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()  # a thread of the parent may have held it at the fork

    def choose(self, nodes: Sequence[Weighted]) -> Weighted:
        if len(nodes) == 1:
            return nodes[0]
        first = nodes[0].weight
        if all(node.weight == first for node in nodes):
            return nodes[next(self._turn) % len(nodes)]
        total = 0.0
        best, best_current = nodes[0], float("-inf")
        with self._lock:
            for node in nodes:
                current = self._current.get(node.name, 0.0) + node.weight
                self._current[node.name] = current
                total += node.weight
                if current > best_current:
                    best, best_current = node, current
            self._current[best.name] -= total
        return best


class RandomChoice:
    """A random replica, in proportion to the weights."""

    def choose(self, nodes: Sequence[Weighted]) -> Weighted:
        if len(nodes) == 1:
            return nodes[0]
        return random.choices(nodes, weights=[node.weight for node in nodes])[0]


class LeastOutstanding:
    """The replica with the fewest connections in use (plus waiters) per unit of weight;
    ties are broken by rotation so that idle replicas share the load."""

    def __init__(self) -> None:
        self._turn = itertools.count()

    def choose(self, nodes: Sequence[Weighted]) -> Weighted:
        if len(nodes) == 1:
            return nodes[0]
        offset = next(self._turn)
        count = len(nodes)
        best = nodes[offset % count]
        best_load = best.outstanding / best.weight
        for i in range(1, count):
            node = nodes[(offset + i) % count]
            load = node.outstanding / node.weight
            if load < best_load:
                best, best_load = node, load
        return best


class LatencyAware:
    """Power of two choices on a moving average of response time.

    Two replicas are drawn in proportion to their weights; the one with the
    lower expected wait, latency x (outstanding + 1), serves. When the two are
    within 20% of each other the first drawn serves, so replicas that answer
    alike share reads by weight, while a clearly slower or busier one is
    avoided. Sampling two instead of taking the global best keeps every thread
    from herding onto the node that was fastest a moment ago. A node with no
    measurement yet scores 0, so it gets measured.
    """

    TIE = 0.8  # scores closer than this ratio count as equal

    def choose(self, nodes: Sequence[Weighted]) -> Weighted:
        if len(nodes) == 1:
            return nodes[0]
        a, b = random.choices(nodes, weights=[node.weight for node in nodes], k=2)
        if a is b:
            return a
        score_a, score_b = _score(a), _score(b)
        low, high = min(score_a, score_b), max(score_a, score_b)
        if high == 0.0 or low / high >= self.TIE:
            return a
        return a if score_a < score_b else b


def _score(node: Weighted) -> float:
    return node.latency * (node.outstanding + 1)


def make_balancer(policy: str) -> Balancer:
    """The balancer for a policy name (validated by `RoutingConfig`)."""
    factories: dict[str, Callable[[], Balancer]] = {
        "round_robin": RoundRobin,
        "random": RandomChoice,
        "least_outstanding": LeastOutstanding,
        "latency": LatencyAware,
    }
    return factories[policy]()
