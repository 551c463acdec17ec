"""The prober: every node's role, replication position and lag, each on its own cadence.

Each node is probed on a connection of its own (not a pooled one, so probes
neither take connections from the application nor skew pool statistics), once
per ``health_interval``, and every result goes to the control plane
(`dbrouter.topology`) as soon as it is in: a node that answers again is seen
within one interval even while another node hangs. A probe that has not
answered within ``probe_timeout`` is reported failed (the probe itself is cut
by the watchdog or the read timeout). Roles are decided per round: a round
ends once every node has reported for it (an answer, or no answer in time), so
a failover or a split brain is never judged on a mix of old and new answers.
A new probe connection first asks which server it reached (`Adapter.server_identity`,
once per connection), so the control plane can tell one server named twice.
The prober decides nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

from . import _fork
from .adapters.base import Adapter

if TYPE_CHECKING:
    from .topology import Node
    from .watchdog import Watchdog

__all__ = ["Monitor", "ProbeResult"]

log = logging.getLogger("dbrouter.monitor")


@dataclass
class ProbeResult:
    """What one probe learned about one node."""

    node: Node
    ok: bool = False
    writable: bool | None = None
    position: str | None = None
    lag: float | None = None
    error: str | None = None
    latency: float | None = None  # seconds the role probe took
    identity: str | None = None  # the server behind the probe connection (Adapter.server_identity)
    unresponsive: bool = False  # failed by running out of time (no answer, a connect that timed out), not by a refusal


class _Lane:
    """One node's probing state (guarded by the monitor's lock)."""

    __slots__ = ("future", "started", "round", "reported", "read_only")

    def __init__(self) -> None:
        self.future: Future[None] | None = None
        self.started = 0.0
        self.round = -1  # the round the probe in flight belongs to
        self.reported = -1  # the last round this node reported for
        self.read_only = False  # its last answer said read-only


class Monitor:
    """Background prober; hands each result to ``on_result`` and each finished round to ``on_round``."""

    def __init__(
        self,
        nodes: Callable[[], Sequence[Node]],
        interval: float,
        on_result: Callable[[ProbeResult], None],
        on_round: Callable[[], None],
        *,
        probe_timeout: float,
        watchdog: Watchdog | None = None,
        name: str = "dbrouter-probe",
    ) -> None:
        self._nodes = nodes
        self._interval = interval
        self._on_result = on_result
        self._on_round = on_round
        self._probe_timeout = probe_timeout
        self._watchdog = watchdog
        self._probes: dict[str, tuple[Any, str | None]] = {}  # an idle probe connection per node, and its server
        self._in_flight: dict[str, Any] = {}  # the connection each running probe uses (for a forked child)
        self._lock = threading.Lock()  # guards _probes, _in_flight, _lanes and _round; nothing is called under it
        self._lanes: dict[str, _Lane] = {}
        self._round = 0
        self._primary_position: str | None = None
        self._stop = threading.Event()
        self._signal = threading.Event()  # a result came in, or wake() was called
        self._forced = False
        self._name = name
        self._executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix=f"{name}-worker")
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _after_fork_in_child(self) -> None:
        """In a forked child (called by the topology): abandon the parent's probe connections,
        kept and in flight, and start over with new locks, lanes and threads (not started:
        the topology starts them at the router's first use in the child)."""
        inherited = [*((name, kept[0]) for name, kept in self._probes.items()), *self._in_flight.items()]
        self._probes, self._in_flight, self._lanes = {}, {}, {}
        self._lock = threading.Lock()
        stopped = self._stop.is_set()
        self._stop = threading.Event()
        if stopped:
            self._stop.set()
        self._signal = threading.Event()
        self._executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix=f"{self._name}-worker")
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        adapters = {node.name: node.adapter for node in self._nodes()}
        for name, conn in inherited:
            adapter = adapters.get(name)
            _fork.abandon(conn, adapter.socket_fd(conn) if adapter is not None else None)

    def wake(self) -> None:
        """Probe now instead of at the next interval (a write found no primary)."""
        self._forced = True
        self._signal.set()

    def forget(self, node: Node) -> None:
        """``node`` left the router: close its kept probe connection and drop its lane (a
        probe in flight finishes, and its connection is closed, not kept)."""
        with self._lock:
            self._lanes.pop(node.name, None)
            kept = self._probes.pop(node.name, None)
        if kept is not None:
            node.adapter.close(kept[0])

    def _is_member(self, node: Node) -> bool:
        return any(n is node for n in self._nodes())

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._signal.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        # Probes in flight end within probe_timeout (the watchdog or the read timeout cuts them).
        self._executor.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            probes, self._probes = self._probes, {}
        for node in self._nodes():
            kept = probes.get(node.name)
            if kept is not None:
                node.adapter.close(kept[0])

    def _run(self) -> None:
        next_tick = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_tick or self._forced:
                self._forced = False
                try:
                    self._tick(now)
                except Exception:  # noqa: BLE001 - the prober must outlive any bug
                    log.exception("probe tick failed")
                next_tick = now + self._interval
            self._end_round_if_complete()
            self._signal.wait(max(0.0, next_tick - time.monotonic()))
            self._signal.clear()

    def _tick(self, now: float) -> None:
        """Start a probe of every node that has none in flight; report the ones stuck too long."""
        late: list[Node] = []
        start: list[tuple[Node, int]] = []
        with self._lock:
            current = self._round
            for node in self._nodes():
                lane = self._lanes.setdefault(node.name, _Lane())
                if lane.future is None or lane.future.done():
                    lane.started, lane.round = now, current
                    start.append((node, current))
                    lane.future = Future()  # reserved until submitted below
                elif now - lane.started > self._probe_timeout and lane.reported < current:
                    lane.reported = current
                    late.append(node)
        for node, round_ in start:
            try:
                future = self._executor.submit(self._probe, node, round_)
            except RuntimeError:  # shut down while stopping
                return
            with self._lock:
                self._lanes[node.name].future = future
        for node in late:
            log.debug("probe of %s: no answer within %.3gs", node.name, self._probe_timeout)
            self._on_result(ProbeResult(node, ok=False, error=f"no answer within {self._probe_timeout:.3g}s",
                                        unresponsive=True))

    def _end_round_if_complete(self) -> None:
        """A round ends when every node has reported for it, except that a node whose last
        answer said read-only and whose probe is slower than the interval holds nothing up:
        it cannot be a primary the router does not know of (it would need a promotion it has
        not answered about), and waiting for it would delay a failover by up to probe_timeout."""
        now = time.monotonic()
        with self._lock:
            lanes = [self._lanes.get(node.name) for node in self._nodes()]
            for lane in lanes:
                if lane is None:
                    return
                if lane.reported < self._round and not (lane.read_only and now - lane.started > self._interval):
                    return
            self._round += 1
        self._on_round()

    def _probe(self, node: Node, round_: int) -> None:
        result = ProbeResult(node)
        self._ask(result)
        if self._stop.is_set():
            return
        with self._lock:
            lane = self._lanes.get(node.name)
            if lane is None:  # forgotten: the node left the router while it was probed
                return
            lane.reported = max(lane.reported, round_)
            lane.read_only = result.ok and result.writable is False
        self._on_result(result)
        self._signal.set()

    def _ask(self, result: ProbeResult) -> None:
        """Role and position, and for a read-only node the lag where the server must say it.

        A kept probe connection that fails is replaced once at once: after a network blip
        or a server restart the old connection is dead while the node answers again, and a
        failure then would take the node out of rotation for another ``reset_timeout``.
        """
        node = result.node
        adapter = node.adapter
        with self._lock:
            kept = self._probes.pop(node.name, None)  # held by this probe only
            if kept is not None:
                self._in_flight[node.name] = kept[0]
        started = time.monotonic()
        conn = self._attempt(adapter, kept, result)
        if (conn is None and kept is not None and not self._stop.is_set()
                and time.monotonic() - started < self._probe_timeout / 2):  # failed fast: not a hang
            conn = self._attempt(adapter, None, result)
        result.unresponsive = not result.ok and time.monotonic() - started >= self._probe_timeout / 2
        with self._lock:
            self._in_flight.pop(node.name, None)
            keep = (conn is not None and not self._stop.is_set() and node.name not in self._probes
                    and self._is_member(node))
            if keep:
                self._probes[node.name] = (conn, result.identity)
        if conn is not None and not keep:
            adapter.close(conn)

    def _attempt(self, adapter: Adapter, kept: tuple[Any, str | None] | None, result: ProbeResult) -> Any:
        """One try on the ``kept`` connection (a new one when None); the connection if it is still good.

        A new connection first asks which server it reached (once per connection: a
        connection stays on its server), so that one server named twice is found.
        """
        token = None
        watchdog = self._watchdog if adapter.needs_watchdog else None
        conn, identity = kept if kept is not None else (None, None)
        try:
            if conn is None:
                conn = adapter.connect(read_timeout=self._probe_timeout)
                with self._lock:
                    self._in_flight[result.node.name] = conn
            if watchdog is not None:
                probe_conn = conn
                token = watchdog.arm(time.monotonic() + self._probe_timeout, lambda: adapter.abort(probe_conn))
            if kept is None:
                identity = self._identity(adapter, conn)
            result.identity = identity
            self._ask_node(adapter, conn, result)
            result.ok, result.error = True, None
        except Exception as exc:  # noqa: BLE001 - any probe failure marks the node down
            result.ok = False
            result.error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if conn is not None:
                adapter.close(conn)
            conn = None
        finally:
            if token is not None and watchdog is not None and not watchdog.disarm(token) and conn is not None:
                adapter.close(conn)
                conn = None
        return conn

    @staticmethod
    def _identity(adapter: Adapter, conn: Any) -> str | None:
        try:
            return adapter.server_identity(conn)
        except Exception as exc:  # noqa: BLE001 - unknown identity: the node is still probed
            log.debug("probe of %s: server identity unknown: %s", adapter.node, exc)
            return None

    def _ask_node(self, adapter: Adapter, conn: Any, result: ProbeResult) -> None:
        started = time.monotonic()
        result.writable = adapter.is_writable(conn)
        result.latency = time.monotonic() - started
        result.position = adapter.replication_position(conn)
        if result.writable:
            self._primary_position = result.position
            return
        primary_position = self._primary_position
        if primary_position is not None and adapter.position_covers(result.position, primary_position) is None:
            # Positions this engine cannot compare client-side (MySQL GTID sets): ask the server.
            result.lag = adapter.replica_lag(conn, primary_position)
