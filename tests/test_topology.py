"""The control plane without servers: probe results and rounds folded into snapshots (pure logic).

Nodes are built with their adapters and unopened pools (no I/O); probe results are
handed to the control thread's step function directly.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from dbrouter import ConfigurationError
from dbrouter.adapters import make_adapter
from dbrouter.config import BreakerPolicy, ConnectOptions, MonitorConfig, PoolConfig, RoutingConfig
from dbrouter.events import Events
from dbrouter.monitor import ProbeResult
from dbrouter.pool import Pool
from dbrouter.resilience import NodeBreaker
from dbrouter.topology import Node, Topology
from dbrouter.url import parse_address
from dbrouter.watchdog import Watchdog


def make_topology(discovery: str = "auto") -> tuple[Topology, list[Node], Events]:
    events = Events()
    watchdog = Watchdog()
    nodes = []
    for index, name in enumerate(("p", "r1", "r2")):
        address = parse_address(f"postgresql://u@127.0.0.1:{20000 + index}/db")
        adapter = make_adapter(address, ConnectOptions())
        pool = Pool(adapter, PoolConfig(min_size=0), name=name, open=False)
        holder: list[Node] = []
        breaker = NodeBreaker(name, BreakerPolicy(fail_max=1, reset_timeout=60),
                              on_change=lambda old, new, h=holder: h[0].breaker_changed(old, new))
        node = Node(name, address, adapter, pool, breaker, "primary" if index == 0 else "replica", watchdog=watchdog)
        holder.append(node)
        nodes.append(node)
    topology = Topology(nodes, RoutingConfig(), MonitorConfig(health_interval=60, primary_discovery=discovery), events,
                        probe_timeout=1.0)
    return topology, nodes, events


def round_of(nodes: list[Node], writable: str, down: tuple[str, ...] = ()) -> list[ProbeResult]:
    return [ProbeResult(n, ok=n.name not in down, writable=(n.name == writable) if n.name not in down else None,
                        position="0/1" if n.name == writable else None, lag=0.0) for n in nodes]


def fold(topology: Topology, *messages: Any) -> None:
    """Hand the control thread's step what the prober would: each result, then the round's end."""
    for message in messages:
        if message[0] == "round":
            for result in message[1]:
                topology._inbox.put(("probe", result))
            topology._inbox.put(("round",))
        else:
            topology._inbox.put(message)
    topology._step()


def test_a_failover_publishes_the_new_roles_and_readable_replicas_at_once() -> None:
    topology, (p, r1, r2), events = make_topology()
    seen: list[str] = []
    events.on("failover", lambda event: seen.append(event.node or ""))
    fold(topology, ("round", round_of([p, r1, r2], "p")))
    assert topology.snapshot.primary is p and topology.snapshot.readable == (r1, r2)
    version = topology.snapshot.version
    fold(topology, ("round", round_of([p, r1, r2], "r1", down=("p",))))
    snapshot = topology.snapshot
    assert snapshot.version > version and snapshot.primary is r1
    assert set(snapshot.replicas) == {p, r2} and snapshot.readable == (r2,)  # not r1, not p (down)
    assert seen == ["r1"] and r1.role == "primary" and p.role == "replica"
    fold(topology, ("round", round_of([p, r1, r2], "r1")))
    assert p.healthy and topology.snapshot.readable == (r2,)  # p's breaker keeps it out for reset_timeout


def test_a_breaker_change_is_published_by_the_control_thread_with_no_lock_held() -> None:
    """The listener runs after the snapshot is published, and may wait for the next one
    from another thread without a deadlock (the old code ran listeners under its lock)."""
    topology, (p, r1, r2), events = make_topology()
    fold(topology, ("round", round_of([p, r1, r2], "p")))
    waited: list[bool] = []

    def listener(event: Any) -> None:
        version = topology.snapshot.version
        assert r1 not in topology.snapshot.readable  # published before the listener runs
        other = threading.Thread(target=lambda: waited.append(topology.wait_for_change(version - 1, 0)))
        other.start()
        other.join(2)

    events.on("breaker_open", listener)
    r1.breaker.failure(OSError("refused"))  # the listener only queues the change
    assert r1 in topology.snapshot.readable
    fold(topology)
    assert waited == [True] and r1 not in topology.snapshot.readable


def test_two_writable_nodes_stop_writes_until_one_is_read_only() -> None:
    topology, (p, r1, r2), _ = make_topology()
    fold(topology, ("round", round_of([p, r1, r2], "p")))
    both = round_of([p, r1, r2], "p")
    both[1].writable = True
    fold(topology, ("round", both))
    assert topology.snapshot.split_brain == ("p", "r1")
    assert "split brain" in (topology.primary_problem() or "")
    fold(topology, ("round", round_of([p, r1, r2], "p")))
    assert topology.snapshot.split_brain == () and topology.primary_problem() is None


@pytest.mark.parametrize("discovery", ["auto", "static"])
def test_one_server_named_twice_is_a_configuration_error_not_a_split_brain(discovery: str) -> None:
    """Issue 13 item 7: p and r1 are one server under two names; both answer writable. That
    was a split brain for ever; now it is a configuration error (auto discovery only: with
    static discovery something else owns the addresses), until the names part again."""
    topology, (p, r1, r2), events = make_topology(discovery)
    seen: list[Any] = []
    events.on("same_server", seen.append)
    both = round_of([p, r1, r2], "p")
    both[1].writable = True
    for result, identity in zip(both, ("server-a", "server-a", "server-b"), strict=True):
        result.identity = identity
    fold(topology, ("round", both))
    snapshot = topology.snapshot
    if discovery == "static":
        assert snapshot.same_server == () and topology.configuration_error() is None and seen == []
        return
    assert snapshot.same_server == (("p", "r1"),) and snapshot.split_brain == ()
    assert snapshot.primary is p
    error = topology.configuration_error()
    assert isinstance(error, ConfigurationError) and "nodes p and r1 are one server" in str(error)
    assert [event.data["nodes"] for event in seen] == [[["p", "r1"]]]
    fold(topology, ("round", both))  # told once
    assert len(seen) == 1
    apart = round_of([p, r1, r2], "p")
    for result, identity in zip(apart, ("server-a", "server-c", "server-b"), strict=True):
        result.identity = identity
    fold(topology, ("round", apart))
    assert topology.snapshot.same_server == () and topology.configuration_error() is None


def test_the_server_identity_is_asked_once_per_probe_connection() -> None:
    from dbrouter.monitor import Monitor

    node = FakeNode("a", FakeAdapter(True))
    identities: list[str | None] = []
    monitor = Monitor(lambda: [node], 0.02, lambda r: identities.append(r.identity),  # type: ignore[list-item]
                      lambda: None, probe_timeout=0.5)
    monitor.start()
    try:
        assert wait_for(lambda: len(identities) >= 5)
    finally:
        monitor.stop()
    assert node.adapter.identities == 1 and set(identities) == {"server-of-a"}


def wait_for(predicate: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def test_a_round_counts_and_wakes_waiters() -> None:
    topology, nodes, _ = make_topology()
    rounds = topology.rounds
    fold(topology, ("round", round_of(nodes, "p")), ("round", round_of(nodes, "p")))
    assert topology.rounds == rounds + 2


class FakeAdapter:
    """What the prober asks a node, answered from memory; ``hang`` blocks its answers."""

    needs_watchdog = False

    def __init__(self, writable: bool, hang_after: int = 1_000_000) -> None:
        self.writable = writable
        self.calls = 0
        self.identities = 0
        self.hang_after = hang_after
        self.hang = threading.Event()
        self.release = threading.Event()

    def connect(self, *, read_timeout: float | None = None) -> object:
        return object()

    def is_writable(self, conn: object) -> bool:
        self.calls += 1
        if self.hang.is_set() or self.calls > self.hang_after:
            self.release.wait(5)
        return self.writable

    def server_identity(self, conn: object) -> str:
        self.identities += 1
        return "server-of-a"

    def replication_position(self, conn: object) -> str:
        return "0/1"

    def position_covers(self, have: str, want: str) -> bool:
        return True

    def close(self, conn: object) -> None:
        pass


class FakeNode:
    def __init__(self, name: str, adapter: FakeAdapter) -> None:
        self.name = name
        self.adapter = adapter


def test_a_hung_node_does_not_hold_up_the_others_results() -> None:
    """Each node is probed on its own cadence: while one hangs, the others still report every
    interval, and the hung one is reported failed after probe_timeout; rounds still end."""
    from dbrouter.monitor import Monitor

    healthy, hung = FakeNode("a", FakeAdapter(True)), FakeNode("b", FakeAdapter(False))
    hung.adapter.hang.set()
    results: list[tuple[float, str, bool]] = []
    rounds: list[float] = []
    monitor = Monitor(lambda: [healthy, hung], 0.05,  # type: ignore[arg-type, list-item]
                      lambda r: results.append((time.monotonic(), r.node.name, r.ok)),
                      lambda: rounds.append(time.monotonic()), probe_timeout=0.5)
    started = time.monotonic()
    monitor.start()
    try:
        time.sleep(1.2)
    finally:
        hung.adapter.release.set()
        monitor.stop()
    from_a = [t - started for t, name, ok in results if name == "a" and ok]
    late_b = [t - started for t, name, ok in results if name == "b" and not ok]
    assert len(from_a) >= 12, from_a  # about every 0.05 s, not every 0.5 s
    assert late_b and 0.5 <= late_b[0] < 0.75, late_b
    assert len(rounds) >= 2


def test_a_replica_that_hangs_does_not_hold_up_role_decisions() -> None:
    """A node whose last answer was read-only cannot be a primary the router does not know
    of: once its probe is slower than the interval, rounds (and so failovers) go on without it."""
    from dbrouter.monitor import Monitor

    primary, replica = FakeNode("a", FakeAdapter(True)), FakeNode("b", FakeAdapter(False, hang_after=1))
    rounds: list[float] = []
    monitor = Monitor(lambda: [primary, replica], 0.05,  # type: ignore[arg-type, list-item]
                      lambda r: None, lambda: rounds.append(time.monotonic()), probe_timeout=2.0)
    started = time.monotonic()
    monitor.start()
    try:
        time.sleep(0.6)
    finally:
        replica.adapter.release.set()
        monitor.stop()
    assert len([t for t in rounds if t - started < 0.6]) >= 5, rounds  # not one round per probe_timeout


def test_a_primary_that_refused_a_write_as_read_only_takes_writes_once_a_probe_finds_it_writable() -> None:
    """Issue 14 (found by the patroni-crash drill): Patroni restarts a crashed primary in
    place in recovery and promotes it again seconds later. A write it refused meanwhile as
    read-only opened its breaker, and after the promotion the same node, writable by its
    probes, got no writes until reset_timeout (60 s here; 1.2 s longer than Patroni's own
    outage in the drill). A probe that finds it writable after the refusal is the evidence."""
    topology, (p, r1, r2), _events = make_topology()
    fold(topology, ("round", round_of([p, r1, r2], "p")))
    p.breaker.force_open()  # what a lease does with a write refused as read-only
    p.report_demoted()
    fold(topology, ("round", round_of([p, r1, r2], "p")))  # a round probed before the refusal...
    fold(topology, ("round", round_of([p, r1, r2], writable="none")))  # ...then read-only: in recovery
    assert topology.primary_problem() is not None and topology.snapshot.primary is p
    fold(topology, ("round", round_of([p, r1, r2], "p")))  # promoted again, in place
    fold(topology)  # the breaker's change, handed over by its listener
    assert topology.primary_problem() is None and p.breaker.state == "closed"
