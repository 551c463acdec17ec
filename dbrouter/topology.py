"""Nodes and the monitor that keeps their health and replica lag current.

The monitor probes every node on its own connection (not a pooled one, so
probes neither take connections from the application nor skew pool
statistics) once per ``health_interval`` and hands the results to the router,
which decides health, lag exclusion and failover.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Sequence

from ._counter import Counter
from .adapters.base import Adapter
from .config import MonitorConfig, RoutingConfig
from .events import Events
from .pool import Pool
from .url import NodeAddress

from .resilience import OPEN

if TYPE_CHECKING:
    from .resilience import NodeBreaker, Watchdog

__all__ = ["Monitor", "Node", "ProbeResult", "Topology"]

log = logging.getLogger("dbrouter.topology")

PRIMARY = "primary"
REPLICA = "replica"

_LATENCY_ALPHA = 0.2  # weight of the newest sample in the moving average
_HISTORY = 3600  # primary positions remembered for lag (one per probe round at most)


class Node:
    """One server: where it is, its pool, and what the monitor last learned of it."""

    def __init__(
        self, name: str, address: NodeAddress, adapter: Adapter, pool: Pool, breaker: NodeBreaker,
        role: str, weight: float = 1.0,
    ) -> None:
        self.name = name
        self.breaker = breaker
        self.address = address
        self.adapter = adapter
        # The client-side statement limit, fixed once: the hot path reads an attribute.
        self.guard = adapter.guard_timeout if adapter.needs_watchdog else None
        self.pool = pool
        self.role = role
        self.weight = weight
        self.healthy = True
        self.lag: float | None = 0.0
        self.lag_excluded = False
        self.latency = 0.0
        self.probe_latency: float | None = None
        self.last_error: str | None = None

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
        return None


@dataclass
class ProbeResult:
    """What one probe round learned about one node."""

    node: Node
    ok: bool = False
    writable: bool | None = None
    position: str | None = None
    lag: float | None = None
    error: str | None = None
    latency: float | None = None  # seconds the role probe took


class _ProbeFailed(Exception):
    """A failed probe, as fed to the node's breaker."""


class Monitor:
    """Background prober: every node's role, position and lag, every ``health_interval``.

    Probes run in parallel, each bounded by ``probe_timeout``: a node that hangs
    is reported down after that long and never stalls the others. What to do
    with the results (health, lag exclusion, failover) is the router's call,
    through ``on_results``.
    """

    def __init__(
        self,
        nodes: Callable[[], Sequence[Node]],
        config: MonitorConfig,
        on_results: Callable[[list[ProbeResult]], None],
        *,
        probe_timeout: float,
        watchdog: Watchdog | None = None,
        name: str = "dbrouter-monitor",
    ) -> None:
        self._nodes = nodes
        self._config = config
        self._on_results = on_results
        self._probe_timeout = probe_timeout
        self._watchdog = watchdog
        self._probes: dict[str, Any] = {}
        self._probes_lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._probed = threading.Condition()
        self.rounds = 0
        self._executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix=f"{name}-probe")
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        """Probe now instead of at the next interval (a write found no primary)."""
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self._executor.shutdown(wait=False, cancel_futures=True)
        with self._probes_lock:
            probes, self._probes = self._probes, {}
        for node in self._nodes():
            conn = probes.get(node.name)
            if conn is not None:
                node.adapter.close(conn)

    def wait_rounds(self, count: int = 1, timeout: float = 10.0) -> bool:
        """Block until ``count`` more probe rounds have finished (tests, start-up)."""
        with self._probed:
            target = self.rounds + count
            return self._probed.wait_for(lambda: self.rounds >= target, timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self._on_results(self.probe_once())
            except Exception:  # noqa: BLE001 - the monitor must outlive any bug in a round
                log.exception("monitor round failed")
            with self._probed:
                self.rounds += 1
                self._probed.notify_all()
            elapsed = time.monotonic() - started
            self._wake.wait(max(0.0, self._config.health_interval - elapsed))
            self._wake.clear()

    def probe_once(self) -> list[ProbeResult]:
        """One round: roles and positions of all nodes, then lag of the read-only ones."""
        results = {node.name: ProbeResult(node) for node in self._nodes()}
        self._parallel(results.values(), self._probe_role)
        writable = [r for r in results.values() if r.ok and r.writable]
        primary_position = writable[0].position if len(writable) == 1 else None
        followers = [r for r in results.values() if r.ok and r.writable is False]
        self._parallel(followers, lambda r: self._probe_lag(r, primary_position))
        return list(results.values())

    def _parallel(self, results: Any, probe: Callable[[ProbeResult], None]) -> None:
        futures = {self._executor.submit(probe, r): r for r in results}
        if not futures:
            return
        done, late = wait(futures, timeout=self._probe_timeout)
        for future in late:
            result = futures[future]
            result.ok = False
            result.error = f"no answer within {self._probe_timeout:.3g}s"
            # The late probe still owns its connection: the watchdog or the read timeout
            # breaks it, and the probe closes it when it returns.
            log.debug("probe of %s timed out", result.node.name)

    def _probe_role(self, result: ProbeResult) -> None:
        def ask(adapter: Adapter, conn: Any) -> None:
            started = time.monotonic()
            result.writable = adapter.is_writable(conn)
            result.latency = time.monotonic() - started
            if result.writable:
                result.position = adapter.replication_position(conn)

        self._ask(result, ask)

    def _probe_lag(self, result: ProbeResult, primary_position: str | None) -> None:
        def ask(adapter: Adapter, conn: Any) -> None:
            result.position = adapter.replication_position(conn)
            if primary_position is not None and adapter.position_covers(result.position, primary_position) is None:
                # Positions this engine cannot compare client-side (MySQL GTID sets): ask the server.
                result.lag = adapter.replica_lag(conn, primary_position)

        self._ask(result, ask)

    def _ask(self, result: ProbeResult, ask: Callable[[Adapter, Any], None]) -> None:
        node = result.node
        with self._probes_lock:
            conn = self._probes.pop(node.name, None)  # held by this probe only
        token = None
        try:
            if conn is None:
                conn = node.adapter.connect(read_timeout=self._probe_timeout)
            if self._watchdog is not None and node.adapter.needs_watchdog:
                token = self._watchdog.arm(time.monotonic() + self._probe_timeout, partial(node.adapter.abort, conn))
            ask(node.adapter, conn)
            result.ok = True
        except Exception as exc:  # noqa: BLE001 - any probe failure marks the node down
            result.ok = False
            result.error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if conn is not None:
                node.adapter.close(conn)
            conn = None
        finally:
            if token is not None and not self._watchdog.disarm(token) and conn is not None:  # type: ignore[union-attr]
                node.adapter.close(conn)
                conn = None
        if conn is not None:
            with self._probes_lock:
                if self._stop.is_set() or node.name in self._probes:
                    node.adapter.close(conn)
                else:
                    self._probes[node.name] = conn


class Topology:
    """Who is the primary and who may serve reads, kept current from probe results.

    Roles change only here: with ``primary_discovery = "auto"`` the one node
    that reports itself writable is the primary, and a reachable read-only
    node is a replica. Two writable nodes at once is a split brain: writes stop
    (`SplitBrain`) until one of them is read-only again.
    """

    def __init__(self, nodes: list[Node], routing: RoutingConfig, monitor: MonitorConfig, events: Events) -> None:
        self.nodes = nodes
        self._routing = routing
        self._auto = monitor.primary_discovery == "auto"
        self._events = events
        # Re-entrant: a probe failure fed to a breaker calls back into refresh_readable.
        self._lock = threading.RLock()
        self.changed = threading.Condition(self._lock)
        self.primary: Node = nodes[0]
        self.replicas: tuple[Node, ...] = tuple(nodes[1:])
        self.readable: tuple[Node, ...] = self.replicas
        self.split_brain: tuple[str, ...] = ()
        self.failovers = Counter()
        self.version = 0  # bumped on every change of roles
        self._falling_back = False
        # (first seen, position) of the primary, oldest first: the yardstick for replica lag.
        self._history: deque[tuple[float, str]] = deque(maxlen=_HISTORY)

    # -- reads ---------------------------------------------------------------

    def refresh_readable(self) -> None:
        """Recompute the replicas that may serve reads."""
        with self._lock:
            self._refresh_locked()

    def _refresh_locked(self) -> None:
        max_lag = self._routing.max_replica_lag
        self.readable = tuple(n for n in self.replicas if n.why_not_serving(max_lag) is None)
        if self.readable and self._falling_back:
            self._falling_back = False
            self._events.emit("replicas_restored", None,
                              f"replicas serving reads again: {', '.join(n.name for n in self.readable)}")

    def reasons(self, nodes: Sequence[Node]) -> str:
        max_lag = self._routing.max_replica_lag
        return "; ".join(f"{n.name}: {n.why_not_serving(max_lag) or 'failed this call'}" for n in nodes)

    def note_fallback(self) -> bool:
        """Record that reads fell back to the primary; True the first time in a row."""
        first, self._falling_back = not self._falling_back, True
        return first

    # -- writes --------------------------------------------------------------

    def primary_problem(self) -> str | None:
        """Why writes cannot go to the primary now, or None."""
        if self.split_brain:
            return f"split brain: {', '.join(self.split_brain)} all accept writes"
        node = self.primary
        if not node.healthy:
            return f"primary {node.name} is down ({node.last_error or 'probe failed'})"
        if not node.breaker.available():
            failures = node.breaker.failures
            return f"primary {node.name}: circuit breaker {node.breaker.state}" + (
                f" after {failures} failures" if failures else " (it refused writes as read-only)"
            )
        return None

    def wait_for_change(self, version: int, deadline: float) -> bool:
        """Wait until roles change (a failover) or the deadline passes."""
        with self._lock:
            return self.changed.wait_for(lambda: self.version != version, max(0.0, deadline - time.monotonic()))

    # -- probe results -------------------------------------------------------------

    def apply(self, results: list[ProbeResult]) -> None:
        """Fold one probe round into health, lag exclusion and roles."""
        with self._lock:
            now = time.monotonic()
            if self._auto:
                self._discover_roles(results)
            writable = [r for r in results if r.ok and r.writable]
            if len(writable) == 1 and writable[0].node is self.primary and writable[0].position:
                self._note_primary_position(writable[0].position, now)
            for result in results:
                self._set_health(result)
                node = result.node
                if result.ok and result.writable is False:
                    node.lag = result.lag if result.lag is not None else self._lag_of(node, result.position, now)
                    self._set_lag_exclusion(node)
            self._refresh_locked()
            self.changed.notify_all()

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

    def _set_health(self, result: ProbeResult) -> None:
        node = result.node
        if result.ok:
            node.probe_latency = result.latency
        else:
            node.last_error = result.error
            # A failed probe is a node failure like any other: it counts toward the breaker
            # (an open breaker learns nothing from it, so it is left to its timer).
            if node.breaker.state != OPEN:
                node.breaker.failure(_ProbeFailed(result.error or "probe failed"))
        if result.ok == node.healthy:
            return
        node.healthy = result.ok
        if result.ok:
            node.last_error = None
            self._events.emit("node_up", node.name, f"{node.role} answers probes again")
        else:
            self._events.emit("node_down", node.name, f"{node.role} failed its probe: {result.error}",
                              level=logging.WARNING)

    def _set_lag_exclusion(self, node: Node) -> None:
        max_lag = self._routing.max_replica_lag
        excluded = max_lag is not None and (node.lag is None or node.lag > max_lag)
        if excluded == node.lag_excluded:
            return
        node.lag_excluded = excluded
        lag = "unknown" if node.lag is None else f"{node.lag:.2f}s"
        if excluded:
            self._events.emit("lag_excluded", node.name, f"replica lag {lag} over max_replica_lag {max_lag}s: no reads",
                              level=logging.WARNING, lag=node.lag)
        else:
            self._events.emit("lag_restored", node.name, f"replica lag {lag}: reads resume", lag=node.lag)

    def _discover_roles(self, results: list[ProbeResult]) -> None:
        writable = [r.node for r in results if r.ok and r.writable]
        if len(writable) > 1:
            names = tuple(sorted(n.name for n in writable))
            if names != self.split_brain:
                self.split_brain = names
                self._events.emit("split_brain", None, f"{', '.join(names)} all accept writes: writes stop until one is read-only",
                                  level=logging.ERROR, nodes=list(names))
            return
        if self.split_brain:
            self._events.emit("split_brain_resolved", None, f"one writable node again ({', '.join(n.name for n in writable) or 'none'})")
            self.split_brain = ()
        if len(writable) == 1 and writable[0] is not self.primary:
            self._failover(writable[0])
            self.replicas = tuple(n for n in self.nodes if n is not self.primary)

    def _failover(self, new: Node) -> None:
        old = self.primary
        old.role = REPLICA
        new.role = PRIMARY
        self.primary = new
        self.version += 1
        self._history.clear()  # positions of another node's history do not compare
        self.failovers.inc()
        new.lag, new.lag_excluded = 0.0, False
        new.breaker.reset()
        old.pool.invalidate(f"{old.name} is no longer the primary")
        self._events.emit("failover", new.name, f"primary is now {new.name} (was {old.name})",
                          level=logging.WARNING, old=old.name, new=new.name)
