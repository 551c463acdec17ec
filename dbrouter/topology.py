"""Nodes, the routing snapshot, and the control plane that is its only writer.

Request threads never change topology. They read `Topology.snapshot`, an
immutable `Snapshot` (primary, replicas, readable replicas, version), with one
attribute load, and report what they learn (a breaker changed state, a write
was refused as read-only) by putting a message in the control plane's inbox.
Membership changes (`Topology.add`, `Topology.remove`) are messages too: the
caller waits for the control thread to publish the snapshot that has them.

The control thread (``dbrouter-monitor``) is the only writer of roles, health,
lag, readability and the servers behind the nodes. It folds probe results and rounds (from `dbrouter.monitor`) and
reports into the next snapshot, publishes it, and only then, holding no lock,
emits events (listeners and log handlers run there), drives breakers
(pybreaker, possibly Redis I/O) and invalidates pools.

Lock order: the control plane holds no lock while it works. ``_published`` (a
Condition) is held only to bump the round count and notify waiters, and
nothing is called under it. pybreaker's lock may be held while a breaker
listener puts a message in the inbox (a `queue.SimpleQueue`, which never
blocks). ``_revive_lock`` is held only in a forked child, to start the control thread
and the prober once (see `dbrouter._fork`). See `dbrouter.resilience` and
`dbrouter.pool` for theirs.
"""

from __future__ import annotations

import logging
import queue
import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

from . import _fork
from ._counter import Counter
from .adapters.base import Adapter
from .config import MonitorConfig, RoutingConfig
from .errors import ConfigurationError, UsageError
from .events import Events
from .monitor import Monitor, ProbeResult
from .pool import ACQUIRED, Pool
from .resilience import CLOSED, HALF_OPEN, OPEN
from .url import NodeAddress

if TYPE_CHECKING:
    from .resilience import NodeBreaker
    from .watchdog import Watchdog

__all__ = ["Node", "Snapshot", "Topology", "same_server_error"]

log = logging.getLogger("dbrouter.topology")

PRIMARY = "primary"
REPLICA = "replica"

_NOT_PROBED = "not probed yet"
_SLOW_SAMPLES = 20  # reads a replica serves before its read time is judged
_SLOW_ROUNDS = 2  # rounds in a row a replica must be found slow to be ejected
_HISTORY = 3600  # primary positions remembered for lag (one per probe round at most)
_BREAKER_EVENTS = {OPEN: "breaker_open", HALF_OPEN: "breaker_half_open", CLOSED: "breaker_closed"}


class Node:
    """One server: where it is, its pool, and what the control plane last learned of it.

    Role, health and lag are written by the control thread only.
    """

    def __init__(
        self, name: str, address: NodeAddress, adapter: Adapter, pool: Pool, breaker: NodeBreaker,
        role: str, weight: float = 1.0, *, watchdog: Watchdog,
    ) -> None:
        self.name = name
        self.breaker = breaker
        self.address = address
        self.adapter = adapter
        self.watchdog = watchdog
        # The client-side statement limit, fixed once: the hot path reads an attribute.
        self.guard = adapter.guard_timeout if adapter.needs_watchdog else None
        self.pool = pool
        self.role = role
        self.weight = weight
        self.healthy = True
        self.lag: float | None = 0.0
        self.lag_excluded = False
        self.latency = 0.0
        self.read_times: deque[float] = deque(maxlen=256)  # the latest statements' times (hedge_after="auto")
        self.probe_latency: float | None = None
        self.slow_until = 0.0  # monotonic time until which a slow replica gets no reads (0: not ejected)
        self.slow_ejections = 0  # ejections in a row
        self.slow_since_reads = 0  # the pool's checkouts when its read time began to be judged afresh
        self.slow_rounds = 0  # probe rounds in a row it was found slow (one is noise: a pause, a spike)
        self.last_error: str | None = None
        self._report: Callable[[Any], None] = lambda message: None

    def __repr__(self) -> str:
        return f"<Node {self.name} {self.role}{'' if self.healthy else ' down'}>"

    @property
    def outstanding(self) -> int:
        return self.pool.outstanding

    def why_not_serving(self, max_lag: float | None) -> str | None:
        """Why this node gets no reads now, or None when it may serve."""
        if not self.healthy:
            return f"down ({self.last_error or 'probe failed'})"
        if not self.breaker.available():
            return f"circuit breaker {self.breaker.state} after {self.breaker.failures} failures"
        if self.lag_excluded:
            lag = "unknown" if self.lag is None else f"{self.lag:.2f}s"
            return f"lag {lag} over max_replica_lag {max_lag}s"
        if self.slow_until:
            return f"slow: out of rotation for {max(0.0, self.slow_until - time.monotonic()):.1f}s more"
        return None

    def report_demoted(self) -> None:
        """This node refused a write as read-only: tell the control plane (never blocks)."""
        self._report(("demoted", self))

    def breaker_changed(self, old: str, new: str) -> None:
        """From pybreaker's listener, inside its lock: hand the change over, never block."""
        self._report(("breaker", self, old, new))


@dataclass(frozen=True)
class Snapshot:
    """Who serves, as of one moment: read with one attribute load, never changed."""

    version: int
    primary: Node
    replicas: tuple[Node, ...]
    readable: tuple[Node, ...]
    split_brain: tuple[str, ...] = ()
    failovers: int = 0
    same_server: tuple[tuple[str, ...], ...] = ()
    """Groups of configured nodes that turned out to be one server (a configuration error)."""


def same_server_error(groups: tuple[tuple[str, ...], ...]) -> ConfigurationError:
    """The error for nodes that are one server named more than once."""
    named = "; ".join(f"nodes {', '.join(group[:-1])} and {group[-1]} are one server" for group in groups)
    return ConfigurationError(
        f"{named} (the same server reached under different names): list each server once; "
        "writes stop until then"
    )


@dataclass
class _Effects:
    """What a control step does once the snapshot is published, with no lock held."""

    events: list[tuple[str, str | None, str, int, dict[str, Any]]] = field(default_factory=list)
    actions: list[Callable[[], None]] = field(default_factory=list)

    def emit(self, name: str, node: str | None, message: str, level: int = logging.INFO, **data: Any) -> None:
        self.events.append((name, node, message, level, data))


class Topology:
    """Who is the primary and who may serve reads, kept current by one control thread.

    Roles change only here: with ``primary_discovery = "auto"`` the one node
    that reports itself writable is the primary, and a reachable read-only
    node is a replica. Two writable nodes at once is a split brain: writes stop
    (`SplitBrain`) until one of them is read-only again.

    Also with ``"auto"``, each node's server is identified by the first probe on each
    new probe connection (`Adapter.server_identity`). Two nodes on one server (one
    address as primary, another as replica) would look like a split brain forever:
    instead writes raise `ConfigurationError` naming both, until the configuration
    (or what the names point to) changes. With ``"static"`` something else owns the
    addresses (a proxy, a virtual IP may move onto a server also listed as a replica),
    so nothing is checked.
    """

    def __init__(self, nodes: list[Node], routing: RoutingConfig, monitor: MonitorConfig, events: Events, *,
                 probe_timeout: float, watchdog: Watchdog | None = None) -> None:
        self.nodes = list(nodes)
        """Every node: replaced, never changed in place, by the control thread (membership)."""
        self._routing = routing
        self._interval = monitor.health_interval
        self._auto = monitor.primary_discovery == "auto"
        self._events = events
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        for node in nodes:
            node._report = self._inbox.put
        self.failovers = Counter()
        self.snapshot = Snapshot(0, nodes[0], tuple(nodes[1:]), tuple(nodes[1:]))
        # The control thread's working state, published through the snapshot.
        self._state_primary = nodes[0]
        self._state_replicas = tuple(nodes[1:])
        self._state_split_brain: tuple[str, ...] = ()
        self._state_same_server: tuple[tuple[str, ...], ...] = ()
        self._identities: dict[str, str] = {}  # node name -> its server, as of its probe connection
        self._published = threading.Condition()
        self.rounds = 0  # probe rounds folded in
        self._falling_back = False
        # (first seen, position) of the primary, oldest first: the yardstick for replica lag.
        self._history: deque[tuple[float, str]] = deque(maxlen=_HISTORY)
        self._latest: dict[str, ProbeResult] = {}  # each node's last probe result
        # Nodes whose breaker a write refused as read-only opened -> what the probes applied
        # since then found: _REFUSED, _SEEN_READ_ONLY, _WRITABLE_AGAIN (control thread only;
        # see _discover_roles).
        self._refused: dict[str, int] = {}
        self._prober = Monitor(lambda: self.nodes, monitor.health_interval,
                               lambda result: self._inbox.put(("probe", result)),
                               lambda: self._inbox.put(("round",)),
                               probe_timeout=probe_timeout, watchdog=watchdog)
        self._thread = threading.Thread(target=self._run, name="dbrouter-monitor", daemon=True)
        self._started = False
        self._stopped = False
        self._dormant = False  # in a forked child, until the router's first use there (revive)
        self._revive_lock = threading.Lock()
        _fork.register(self)

    def _after_fork_in_child(self) -> None:
        """In a forked child (see `dbrouter._fork`): a new inbox and condition (the parent's
        threads may have held their locks) and a prober that starts over. The control thread
        and the prober start again at the router's first use in the child (`revive`), not
        here: another library's fork handler may not have run yet. The snapshot and what the
        control thread knew stay; if the fork caught the control thread in the middle of a
        step, the next probe round decides the roles again."""
        self._inbox = queue.SimpleQueue()
        for node in self.nodes:
            node._report = self._inbox.put
        self._published = threading.Condition()
        self._revive_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="dbrouter-monitor", daemon=True)
        self._prober._after_fork_in_child()
        self._dormant = self._started and not self._stopped

    def revive(self) -> None:
        """In a forked child, at the router's first use there: start the control thread and
        the prober again (if they were running in the parent). Idempotent, cheap otherwise."""
        if not self._dormant:
            return
        with self._revive_lock:
            if not self._dormant:
                return
            self._dormant = False
            self._thread.start()
            self._prober.start()

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        if not self._started:
            self._started = True
            self._thread.start()
            self._prober.start()

    def stop(self, timeout: float = 5.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        with self._revive_lock:
            self._dormant = False  # a child that closes the router before using it starts nothing
        self._prober.stop(timeout)
        self._inbox.put(("stop",))
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # -- what request threads use (no lock) ---------------------------------------

    @property
    def primary(self) -> Node:
        return self.snapshot.primary

    @property
    def replicas(self) -> tuple[Node, ...]:
        return self.snapshot.replicas

    @property
    def readable(self) -> tuple[Node, ...]:
        return self.snapshot.readable

    @property
    def split_brain(self) -> tuple[str, ...]:
        return self.snapshot.split_brain

    @property
    def version(self) -> int:
        return self.snapshot.version

    def wake(self) -> None:
        """Probe every node now rather than at the next interval."""
        self.revive()
        self._prober.wake()

    def reasons(self, nodes: Sequence[Node]) -> str:
        max_lag = self._routing.max_replica_lag
        return "; ".join(f"{n.name}: {n.why_not_serving(max_lag) or 'failed this call'}" for n in nodes)

    def note_fallback(self) -> bool:
        """Record that reads fell back to the primary; True the first time in a row."""
        first, self._falling_back = not self._falling_back, True
        return first

    def primary_problem(self, snapshot: Snapshot | None = None) -> str | None:
        """Why writes cannot go to the primary now, or None."""
        snap = snapshot or self.snapshot
        if snap.split_brain:
            return f"split brain: {', '.join(snap.split_brain)} all accept writes"
        node = snap.primary
        if not node.healthy:
            return f"primary {node.name} is down ({node.last_error or 'probe failed'})"
        breaker = node.breaker
        if not breaker.clean and not breaker.available():
            failures = breaker.failures
            return f"primary {node.name}: circuit breaker {breaker.state}" + (
                f" after {failures} failures" if failures else " (it refused writes as read-only)"
            )
        return None

    def configuration_error(self) -> ConfigurationError | None:
        """The configuration error found by probing (one server named twice), or None."""
        groups = self.snapshot.same_server
        return same_server_error(groups) if groups else None

    def wait_for_change(self, version: int, deadline: float) -> bool:
        """Wait until a snapshot newer than ``version`` is published or the deadline passes."""
        self.revive()
        with self._published:
            return self._published.wait_for(lambda: self.snapshot.version != version,
                                            max(0.0, deadline - time.monotonic()))

    def wait_rounds(self, count: int = 1, timeout: float = 10.0) -> bool:
        """Block until ``count`` more probe rounds have been folded in (tests, start-up)."""
        self.revive()
        with self._published:
            target = self.rounds + count
            return self._published.wait_for(lambda: self.rounds >= target, timeout)

    # -- membership (any thread; the control thread applies it) ---------------------

    def add(self, node: Node, timeout: float = 10.0) -> None:
        """Add ``node`` as a replica; returns once a published snapshot has it. It serves
        reads from its first successful probe (the prober is woken for it).

        Raises `ConfigurationError` when a node of that name is already in."""
        self._ask_control(("add", node), timeout)

    def remove(self, name: str, timeout: float = 10.0) -> Node:
        """Take the node called ``name`` out; returns it once no published snapshot routes
        to it (its pool is the caller's to close).

        Raises `ConfigurationError` for an unknown name and `UsageError` for the primary."""
        node: Node = self._ask_control(("remove", name), timeout)
        return node

    def _ask_control(self, request: tuple[str, Any], timeout: float) -> Any:
        self.revive()
        if not self._started or self._stopped:
            raise UsageError("the router is not open: open it before changing its nodes"
                             if not self._started else "the router is closed")
        reply = _Reply()
        self._inbox.put(("member", request, reply))
        if not reply.done.wait(timeout):
            raise UsageError(f"the control plane did not apply {request[0]} within {timeout:g}s")
        if reply.error is not None:
            raise reply.error
        return reply.result

    def _change_members(self, request: tuple[str, Any], reply: _Reply, effects: _Effects) -> None:
        op, arg = request
        try:
            if op == "add":
                self._add(arg, effects)
            else:
                reply.result = self._remove(arg, effects)
        except (ConfigurationError, UsageError) as exc:
            reply.error = exc
        # Answered once the snapshot with the change is published.
        effects.actions.append(reply.done.set)

    def _add(self, node: Node, effects: _Effects) -> None:
        if any(n.name == node.name for n in self.nodes):
            raise ConfigurationError(f"node {node.name} is already in the router; give each node a distinct name")
        node._report = self._inbox.put
        node.role = REPLICA
        node.healthy, node.last_error = False, _NOT_PROBED
        self.nodes = [*self.nodes, node]
        self._state_replicas = (*self._state_replicas, node)
        effects.actions.append(self._prober.wake)
        effects.emit("node_added", node.name, f"replica {node.address.redacted} added: reads once it answers a probe")

    def _remove(self, name: str, effects: _Effects) -> Node:
        node = next((n for n in self.nodes if n.name == name), None)
        if node is None:
            known = ", ".join(n.name for n in self.nodes)
            raise ConfigurationError(f"no node called {name!r} in the router (nodes: {known})")
        if node is self._state_primary:
            raise UsageError(f"node {name} is the primary: it can be removed once another node is the primary")
        self.nodes = [n for n in self.nodes if n is not node]
        self._state_replicas = tuple(n for n in self._state_replicas if n is not node)
        self._latest.pop(name, None)
        self._refused.pop(name, None)
        if self._identities.pop(name, None) is not None:
            self._check_same_server(effects)
        node._report = lambda message: None
        effects.actions.append(lambda: self._prober.forget(node))
        effects.emit("node_removed", name, f"{node.role} {node.address.redacted} removed: no new reads, "
                     "reads in flight finish")
        return node

    # -- the control thread ---------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                if self._step():
                    return
            except Exception:  # noqa: BLE001 - the control plane must outlive any bug
                log.exception("control plane: a step failed")

    def _step(self) -> bool:
        """Fold what is in the inbox, publish, then act; True when told to stop."""
        try:
            message = self._inbox.get(timeout=self._next_timer())
        except queue.Empty:
            message = ("tick",)
        batch = [message]
        while True:
            try:
                batch.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        effects = _Effects()
        rounds = 0
        stop = False
        for item in batch:
            kind = item[0]
            try:
                if kind == "probe":
                    self._apply(item[1], effects)
                elif kind == "round":
                    if self._auto:
                        self._discover_roles(list(self._latest.values()), effects)
                    self._judge_speed(effects)
                    rounds += 1
                elif kind == "breaker":
                    self._breaker_changed(item[1], item[2], item[3], effects)
                elif kind == "demoted":
                    self._refused[item[1].name] = _REFUSED
                    effects.actions.append(self._prober.wake)
                elif kind == "member":
                    self._change_members(item[1], item[2], effects)
                elif kind == "stop":
                    stop = True
            except Exception:  # noqa: BLE001 - the control plane must outlive any bug
                log.exception("control plane: handling %s failed", kind)
        self._restore_slow(effects)
        self._publish(effects, rounds)
        self._run_effects(effects)
        return stop

    def _next_timer(self) -> float:
        """Until an open breaker's ``reset_timeout`` runs out (the node becomes eligible
        for a trial without any state change), at most one health interval."""
        wait = self._interval
        now = time.monotonic()
        for node in self.nodes:
            due = node.breaker.trial_due()
            if due is not None and due > now:
                wait = min(wait, due - now + 0.001)
            if node.slow_until > now:
                wait = min(wait, node.slow_until - now + 0.001)
        return wait

    def _publish(self, effects: _Effects, rounds: int) -> None:
        old = self.snapshot
        max_lag = self._routing.max_replica_lag
        readable = tuple(n for n in self._state_replicas if n.why_not_serving(max_lag) is None)
        if readable and self._falling_back:
            self._falling_back = False
            effects.emit("replicas_restored", None,
                         f"replicas serving reads again: {', '.join(n.name for n in readable)}")
        new = Snapshot(old.version + 1, self._state_primary, self._state_replicas, readable, self._state_split_brain,
                       self.failovers.value, self._state_same_server)
        changed = (new.primary, new.replicas, new.readable, new.split_brain, new.same_server) != (
            old.primary, old.replicas, old.readable, old.split_brain, old.same_server)
        # A probe round always publishes: health the snapshot does not hold (the primary's)
        # may have changed, and writers waiting for a usable primary look again.
        if changed or rounds:
            with self._published:
                self.snapshot = new
                self.rounds += rounds
                self._published.notify_all()

    def _run_effects(self, effects: _Effects) -> None:
        for action in effects.actions:
            try:
                action()
            except Exception:  # noqa: BLE001 - one failed action must not stop the rest
                log.exception("control plane: action failed")
        for name, node, message, level, data in effects.events:
            self._events.emit(name, node, message, level=level, **data)

    def _breaker_changed(self, node: Node, old: str, new: str, effects: _Effects) -> None:
        level = logging.WARNING if new == OPEN else logging.INFO
        message = f"circuit breaker {old} -> {new}"
        last = node.breaker.last_failure
        if new == OPEN and last:
            message += f" (last failure: {last})"
        effects.emit(_BREAKER_EVENTS[new], node.name, message, level,
                     old=old, new=new, failures=node.breaker.failures, last_failure=last)

    def _apply(self, result: ProbeResult, effects: _Effects) -> None:
        """Fold one probe result into the node's health and lag (roles wait for the round)."""
        now = time.monotonic()
        node = result.node
        if not any(n is node for n in self.nodes):
            return  # probed before it was removed
        self._latest[node.name] = result
        if node.name in self._refused:
            # Writable again only after a probe saw it read-only or down: a probe that was under
            # way when the write was refused may still say writable.
            if not (result.ok and result.writable):
                self._refused[node.name] = _SEEN_READ_ONLY
            elif self._refused[node.name] == _SEEN_READ_ONLY:
                self._refused[node.name] = _WRITABLE_AGAIN
        if self._auto and result.identity is not None and self._identities.get(node.name) != result.identity:
            self._identities[node.name] = result.identity
            self._check_same_server(effects)
        if result.ok and result.writable and node is self._state_primary and result.position:
            self._note_primary_position(result.position, now)
        self._set_health(result, effects)
        if result.ok and result.writable is False:
            lag = result.lag if result.lag is not None else self._lag_of(node, result.position, now)
            # While the primary is down its last positions cannot be replayed by anyone: lag
            # measured against them would grow and take every replica out of rotation with
            # it. Only the news that a replica has replayed all of them (no lag) is taken then:
            # a replica kept out for lag that caught up just before the primary died serves.
            if self._state_primary.healthy or (lag == 0.0 and node.lag_excluded):
                node.lag = lag
                self._set_lag_exclusion(node, effects)

    def _note_primary_position(self, position: str, now: float) -> None:
        """Remember when the primary was first seen at each position (one entry per change)."""
        history = self._history
        if not history or history[-1][1] != position:
            history.append((now, position))

    def _lag_of(self, node: Node, replayed: str | None, now: float) -> float | None:
        """Seconds since the primary first reached a position this replica has not replayed.

        Measured against positions, not replay timestamps: a replica of an idle
        primary is not lagging, however long ago it replayed its last transaction.
        Accurate to one probe interval. None when unknown.
        """
        if replayed is None or not self._history:
            return None
        covers = node.adapter.position_covers
        oldest_missing = None
        for seen_at, position in reversed(self._history):
            verdict = covers(replayed, position)
            if verdict is None:
                return None
            if verdict:
                break
            oldest_missing = seen_at
        return 0.0 if oldest_missing is None else max(0.0, now - oldest_missing)

    def _check_same_server(self, effects: _Effects) -> None:
        """Group the nodes by the server behind them: more than one node on a server is a
        configuration error, published in the snapshot (writes raise it)."""
        by_server: dict[str, list[str]] = {}
        for node in self.nodes:
            identity = self._identities.get(node.name)
            if identity is not None:
                by_server.setdefault(identity, []).append(node.name)
        groups = tuple(tuple(names) for names in by_server.values() if len(names) > 1)
        if groups == self._state_same_server:
            return
        self._state_same_server = groups
        if groups:
            effects.emit("same_server", None, str(same_server_error(groups)), logging.ERROR,
                         nodes=[list(group) for group in groups])
        else:
            log.info("no two configured nodes are the same server any more: writes resume")

    def _distinct_servers(self, nodes: list[Node]) -> list[Node]:
        """``nodes`` with one node per server (the current primary kept where it is one)."""
        seen: set[object] = set()
        distinct = []
        for node in sorted(nodes, key=lambda n: n is not self._state_primary):
            server = self._identities.get(node.name, node)
            if server not in seen:
                seen.add(server)
                distinct.append(node)
        return distinct

    def _set_health(self, result: ProbeResult, effects: _Effects) -> None:
        node = result.node
        breaker = node.breaker
        if result.ok:
            node.probe_latency = result.latency
            if not breaker.clean:
                if not node.healthy:
                    # The probes saw it down and now see it answer (a server restarted in
                    # place, as Patroni does before promoting it again): the same evidence
                    # that took it out puts it back, whatever the breaker's timer says. Its
                    # pooled connections are from before: the first one used would fail and
                    # open the breaker again, this time for reset_timeout.
                    effects.actions.append(lambda: _invalidate(node.pool, f"{node.name} answers probes again"))
                    effects.actions.append(breaker.reset)
                else:
                    # A probe that got an answer is a successful trial for a half-open breaker
                    # (and for an open one whose reset_timeout has passed).
                    effects.actions.append(breaker.probe_succeeded)
        else:
            node.last_error = result.error
            # A failed probe is a node failure like any other: it counts toward the breaker
            # (an open breaker learns nothing from it, so it is left to its timer).
            if breaker.state != OPEN:
                failure = _ProbeFailed(result.error or "probe failed")
                effects.actions.append(lambda: breaker.failure(failure))
            if result.unresponsive:
                # A node that does not answer its probe in probe_timeout will not answer the
                # statements in flight there either: they are cut now rather than left to the
                # driver's timeouts (none by default on MySQL, TCP's minutes on a lost host).
                why = f"{node.role} {node.name} did not answer its probe ({result.error})"
                effects.actions.append(lambda: _cut_in_use(node.pool, why))
        if result.ok == node.healthy:
            return
        node.healthy = result.ok
        if result.ok:
            again = "" if node.last_error == _NOT_PROBED else " again"
            node.last_error = None
            effects.emit("node_up", node.name, f"{node.role} answers probes{again}")
        else:
            down = f"{node.role} failed its probe: {result.error}"
            effects.emit("node_down", node.name, down, logging.WARNING)
            # Callers queued on its pool wait for connections that will come back broken.
            effects.actions.append(lambda: _fail_waiters(node.pool, f"node {down}"))

    def _set_lag_exclusion(self, node: Node, effects: _Effects) -> None:
        max_lag = self._routing.max_replica_lag
        excluded = max_lag is not None and (node.lag is None or node.lag > max_lag)
        if excluded == node.lag_excluded:
            return
        node.lag_excluded = excluded
        lag = "unknown" if node.lag is None else f"{node.lag:.2f}s"
        if excluded:
            effects.emit("lag_excluded", node.name, f"replica lag {lag} over max_replica_lag {max_lag}s: no reads",
                         logging.WARNING, lag=node.lag)
        else:
            effects.emit("lag_restored", node.name, f"replica lag {lag}: reads resume", lag=node.lag)

    def _judge_speed(self, effects: _Effects) -> None:
        """Once a round: eject a replica whose reads are much slower than the others' (see
        `RoutingConfig.slow_replica_ratio`). Judged on the median of the latest reads each
        replica served (`Node.read_times`), against the median of the other serving replicas',
        once it has served a few reads (since it came back, after a time out), and only when
        found slow in two rounds in a row: a slow replica stays slow."""
        routing = self._routing
        ratio = routing.slow_replica_ratio
        if ratio is None:
            return
        max_lag = routing.max_replica_lag
        replicas = self._state_replicas
        serving = [n for n in replicas if n.why_not_serving(max_lag) is None and n.read_times
                   and n.pool.stats()[ACQUIRED] - n.slow_since_reads >= _SLOW_SAMPLES]
        # Each replica's typical read: the median of its latest reads (deque.copy holds the GIL:
        # the readers' appends cannot tear it). A median, not the moving average: 1% of reads
        # 200 ms late (a stall now and then, which hedged reads are for) moved the average by
        # tens of ms and ejected a replica whose reads were fine.
        typical = {n: statistics.median(n.read_times.copy()) for n in serving}
        room = len(replicas) // 2 - sum(1 for n in replicas if n.slow_until)
        now = time.monotonic()
        for node in sorted(serving, key=lambda n: typical[n], reverse=True):
            others = [typical[n] for n in serving if n is not node and not n.slow_until]
            if not others:
                return
            median = statistics.median(others)
            latency = typical[node]
            if latency <= ratio * median or latency - median <= routing.slow_replica_margin:
                node.slow_ejections = node.slow_rounds = 0  # measured since it came back, and fine
                continue
            node.slow_rounds += 1
            if node.slow_rounds < _SLOW_ROUNDS or room <= 0:
                continue
            room -= 1
            node.slow_rounds = 0
            node.slow_ejections += 1
            period = routing.slow_replica_ejection * 2 ** min(node.slow_ejections - 1, 3)
            node.slow_until = now + period
            effects.emit("slow_ejected", node.name,
                         f"replica reads take {latency * 1000:.1f}ms (median), {latency / median:.1f}x the others' "
                         f"{median * 1000:.1f}ms: no reads for {period:g}s", logging.WARNING,
                         latency=latency, median=median, seconds=period)

    def _restore_slow(self, effects: _Effects) -> None:
        """A slow replica's time out is over: back in rotation, its read times measured afresh."""
        now = time.monotonic()
        for node in self._state_replicas:
            if node.slow_until and now >= node.slow_until:
                node.slow_until = 0.0
                node.latency = 0.0
                node.read_times.clear()
                node.slow_since_reads = node.pool.stats()[ACQUIRED]
                effects.emit("slow_restored", node.name, "replica back in rotation after its time out for slowness")

    def _discover_roles(self, results: list[ProbeResult], effects: _Effects) -> None:
        # One server named twice is not a split brain (see _check_same_server).
        writable = self._distinct_servers([r.node for r in results if r.ok and r.writable])
        if len(writable) > 1:
            names = tuple(sorted(n.name for n in writable))
            if names != self._state_split_brain:
                self._state_split_brain = names
                effects.emit("split_brain", None, f"{', '.join(names)} all accept writes: writes stop until one is read-only",
                             logging.ERROR, nodes=list(names))
            return
        if self._state_split_brain:
            effects.emit("split_brain_resolved", None, f"one writable node again ({', '.join(n.name for n in writable) or 'none'})")
            self._state_split_brain = ()
        if len(writable) == 1 and writable[0] is not self._state_primary:
            self._failover(writable[0], effects)
        elif len(writable) == 1 and self._refused.get(writable[0].name) == _WRITABLE_AGAIN:
            # The primary refused a write as read-only (a crashed primary restarted in place
            # comes back in recovery before Patroni promotes it again) and a probe since says it
            # takes writes: the evidence that opened its breaker is gone, whatever the timer says.
            del self._refused[writable[0].name]
            effects.actions.append(writable[0].breaker.reset)

    def _failover(self, new: Node, effects: _Effects) -> None:
        old = self._state_primary
        old.role = REPLICA
        new.role = PRIMARY
        self._state_primary = new
        self._state_replicas = tuple(n for n in self.nodes if n is not new)
        self._history.clear()  # positions of another node's history do not compare
        self.failovers.inc()
        new.lag, new.lag_excluded = 0.0, False
        new.slow_until, new.slow_ejections = 0.0, 0
        self._refused.pop(new.name, None)
        effects.actions.append(new.breaker.reset)
        effects.actions.append(lambda: _invalidate(old.pool, f"{old.name} is no longer the primary"))
        effects.emit("failover", new.name, f"primary is now {new.name} (was {old.name})", logging.WARNING,
                     old=old.name, new=new.name)


_REFUSED, _SEEN_READ_ONLY, _WRITABLE_AGAIN = range(3)


class _Reply:
    """The control thread's answer to a membership change, set after it is published."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: Any = None
        self.error: Exception | None = None


def _cut_in_use(pool: Pool, why: str) -> None:
    pool.cut_in_use(why)


def _fail_waiters(pool: Pool, why: str) -> None:
    pool.fail_waiters(why)


def _invalidate(pool: Pool, why: str) -> None:
    pool.invalidate(why)


class _ProbeFailed(Exception):
    """A failed probe, as fed to the node's breaker."""
