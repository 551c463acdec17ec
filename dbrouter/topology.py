"""Nodes and the monitor that keeps their health and replica lag current.

The monitor probes every node on its own connection (not a pooled one, so
probes neither take connections from the application nor skew pool
statistics) once per ``health_interval``, and tells the router when the set of
replicas that may serve reads changes.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Sequence

from .adapters.base import Adapter
from .config import MonitorConfig, RoutingConfig
from .events import Events
from .pool import Pool
from .url import NodeAddress

__all__ = ["Monitor", "Node"]

log = logging.getLogger("dbrouter.topology")

PRIMARY = "primary"
REPLICA = "replica"

_LATENCY_ALPHA = 0.2  # weight of the newest sample in the moving average


class Node:
    """One server: where it is, its pool, and what the monitor last learned of it."""

    def __init__(self, name: str, address: NodeAddress, adapter: Adapter, pool: Pool, role: str, weight: float = 1.0) -> None:
        self.name = name
        self.address = address
        self.adapter = adapter
        self.pool = pool
        self.role = role
        self.weight = weight
        self.healthy = True
        self.lag: float | None = 0.0
        self.lag_excluded = False
        self.latency = 0.0
        self.last_error: str | None = None

    def __repr__(self) -> str:
        return f"<Node {self.name} {self.role}{'' if self.healthy else ' down'}>"

    @property
    def outstanding(self) -> int:
        return self.pool.outstanding

    def observe_latency(self, seconds: float) -> None:
        """Fold one response time into the moving average (races only lose a sample)."""
        current = self.latency
        self.latency = seconds if current == 0.0 else current + _LATENCY_ALPHA * (seconds - current)

    def why_not_serving(self, max_lag: float | None) -> str | None:
        """Why this replica gets no reads now, or None when it may serve."""
        if not self.healthy:
            return f"down ({self.last_error or 'probe failed'})"
        if self.lag_excluded:
            lag = "unknown" if self.lag is None else f"{self.lag:.2f}s"
            return f"lag {lag} over max_replica_lag {max_lag}s"
        return None


class Monitor:
    """Background prober: node health and replica lag, every ``health_interval``."""

    def __init__(
        self,
        nodes: Callable[[], Sequence[Node]],
        monitor: MonitorConfig,
        routing: RoutingConfig,
        events: Events,
        on_change: Callable[[], None],
        name: str = "dbrouter-monitor",
    ) -> None:
        self._nodes = nodes
        self._config = monitor
        self._routing = routing
        self._events = events
        self._on_change = on_change
        self._probes: dict[str, Any] = {}
        self._stop = threading.Event()
        self._probed = threading.Condition()
        self.rounds = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        for node in self._nodes():
            self._drop_probe(node)

    def wait_rounds(self, count: int = 1, timeout: float = 10.0) -> bool:
        """Block until ``count`` more probe rounds have finished (for tests and start-up)."""
        with self._probed:
            target = self.rounds + count
            return self._probed.wait_for(lambda: self.rounds >= target, timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.probe_once()
            except Exception:  # noqa: BLE001 - the monitor must outlive any probe bug
                log.exception("monitor round failed")
            with self._probed:
                self.rounds += 1
                self._probed.notify_all()
            elapsed = time.monotonic() - started
            self._stop.wait(max(0.0, self._config.health_interval - elapsed))

    def probe_once(self) -> None:
        """Probe every node once; report a change in who may serve reads."""
        nodes = list(self._nodes())
        changed = False
        primary_position: str | None = None
        for node in nodes:
            if node.role != PRIMARY:
                continue
            position = self._probe(node, lambda a, c: a.replication_position(c))
            changed |= self._set_health(node, position is not None)
            primary_position = position
        max_lag = self._routing.max_replica_lag
        for node in nodes:
            if node.role != REPLICA:
                continue
            lag_holder: list[float | None] = []
            ok = self._probe(node, lambda a, c: lag_holder.append(a.replica_lag(c, primary_position)) or True)
            changed |= self._set_health(node, ok is not None)
            if ok is None:
                continue
            node.lag = lag_holder[0]
            excluded = max_lag is not None and (node.lag is None or node.lag > max_lag)
            if excluded != node.lag_excluded:
                node.lag_excluded = excluded
                changed = True
                lag_text = "unknown" if node.lag is None else f"{node.lag:.2f}s"
                if excluded:
                    self._events.emit("lag_excluded", node.name, f"replica lag {lag_text} over max_replica_lag {max_lag}s: no reads",
                                      level=logging.WARNING, lag=node.lag)
                else:
                    self._events.emit("lag_restored", node.name, f"replica lag {lag_text}: reads resume", lag=node.lag)
        if changed:
            self._on_change()

    def _set_health(self, node: Node, healthy: bool) -> bool:
        if healthy == node.healthy:
            return False
        node.healthy = healthy
        if healthy:
            node.last_error = None
            self._events.emit("node_up", node.name, f"{node.role} answers probes again")
        else:
            self._events.emit("node_down", node.name, f"{node.role} failed its probe: {node.last_error}", level=logging.WARNING)
        return True

    def _probe(self, node: Node, ask: Callable[[Adapter, Any], Any]) -> Any:
        """Run ``ask`` on the node's probe connection; None (and last_error set) on failure."""
        conn = self._probes.get(node.name)
        try:
            if conn is None:
                conn = node.adapter.connect()
                self._probes[node.name] = conn
            return ask(node.adapter, conn)
        except Exception as exc:  # noqa: BLE001 - any probe failure marks the node down
            node.last_error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            self._drop_probe(node)
            return None

    def _drop_probe(self, node: Node) -> None:
        conn = self._probes.pop(node.name, None)
        if conn is not None:
            node.adapter.close(conn)
