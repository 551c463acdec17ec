"""The prober: every node's role, replication position and lag, every ``health_interval``.

Each node is probed on a connection of its own (not a pooled one, so probes
neither take connections from the application nor skew pool statistics).
Probes run in parallel, each bounded by ``probe_timeout``: a node that hangs is
reported down after that long and never stalls the others. The prober decides
nothing: each round's results go to the control plane (`dbrouter.topology`).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from .adapters.base import Adapter

if TYPE_CHECKING:
    from .topology import Node
    from .watchdog import Watchdog

__all__ = ["Monitor", "ProbeResult"]

log = logging.getLogger("dbrouter.monitor")


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


class Monitor:
    """Background prober; hands every finished round to ``on_results``."""

    def __init__(
        self,
        nodes: Callable[[], Sequence[Node]],
        interval: float,
        on_results: Callable[[list[ProbeResult]], None],
        *,
        probe_timeout: float,
        watchdog: Watchdog | None = None,
        name: str = "dbrouter-probe",
    ) -> None:
        self._nodes = nodes
        self._interval = interval
        self._on_results = on_results
        self._probe_timeout = probe_timeout
        self._watchdog = watchdog
        self._probes: dict[str, Any] = {}
        self._probes_lock = threading.Lock()  # guards _probes only; nothing is called under it
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix=f"{name}-worker")
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
        self._executor.shutdown(wait=True, cancel_futures=True)
        with self._probes_lock:
            probes, self._probes = self._probes, {}
        for node in self._nodes():
            conn = probes.get(node.name)
            if conn is not None:
                node.adapter.close(conn)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                results = self.probe_once()
            except Exception:  # noqa: BLE001 - the prober must outlive any bug in a round
                log.exception("probe round failed")
                results = []
            if self._stop.is_set():
                return
            self._on_results(results)
            elapsed = time.monotonic() - started
            self._wake.wait(max(0.0, self._interval - elapsed))
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

    def _parallel(self, results: Iterable[ProbeResult], probe: Callable[[ProbeResult], None]) -> None:
        try:
            futures = {self._executor.submit(probe, r): r for r in results}
        except RuntimeError:  # shut down while stopping
            return
        if not futures:
            return
        _, late = wait(futures, timeout=self._probe_timeout)
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
        adapter = node.adapter
        with self._probes_lock:
            conn = self._probes.pop(node.name, None)  # held by this probe only
        token = None
        watchdog = self._watchdog if adapter.needs_watchdog else None
        try:
            if conn is None:
                conn = adapter.connect(read_timeout=self._probe_timeout)
            if watchdog is not None:
                probe_conn = conn
                token = watchdog.arm(time.monotonic() + self._probe_timeout, lambda: adapter.abort(probe_conn))
            ask(adapter, conn)
            result.ok = True
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
        if conn is not None:
            with self._probes_lock:
                keep = not self._stop.is_set() and node.name not in self._probes
                if keep:
                    self._probes[node.name] = conn
            if not keep:
                adapter.close(conn)
