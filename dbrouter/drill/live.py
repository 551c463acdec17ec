"""The once-a-second console view while a drill runs."""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any, Callable, TextIO

from ..aio.router import AsyncRouter
from ..router import Router
from ..workload import BaseWorkload

__all__ = ["LiveView"]


class LiveView:
    """Prints one block per second: throughput, errors, latency, and each node's state."""

    def __init__(self, router: Router | AsyncRouter, workload: BaseWorkload[Any], stream: TextIO,
                 names: Callable[[str], str]) -> None:
        self._router = router
        self._workload = workload
        self._stream = stream
        self._names = names
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dbrouter-drill-live", daemon=True)
        self.marks: list[str] = []  # "fault injected" etc., shown once on the next line

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self._stream.write(self.render(time.monotonic()) + "\n")
            self._stream.flush()

    def render(self, now: float) -> str:
        ops = [op for op in self._workload.snapshot() if op.end > now - 1.0]
        latencies = sorted(op.latency for op in ops)
        p50 = latencies[len(latencies) // 2] * 1000 if latencies else 0.0
        p99 = latencies[int(0.99 * (len(latencies) - 1))] * 1000 if latencies else 0.0
        errors = Counter(op.error for op in ops if op.error)
        elapsed = now - self._workload.started_at
        head = (f"t={elapsed:5.1f}s  {len(ops):6d} ops/s  p50 {p50:6.1f}ms  p99 {p99:7.1f}ms  errors: "
                + (", ".join(f"{k}={v}" for k, v in sorted(errors.items())) or "none"))
        if self.marks:
            head += "   <<< " + "; ".join(self.marks)
            self.marks.clear()
        rows = []
        for node in self._router.nodes:
            stats = node.pool.stats()
            lag = "" if node.role == "primary" else ("  lag ?" if node.lag is None else f"  lag {node.lag:.2f}s")
            rows.append(f"    {self._names(node.name):<10} {node.role:<8} {'up' if node.healthy else 'DOWN':<5} "
                        f"breaker {node.breaker.state:<9} pool {stats['in_use']}/{stats['size']}{lag}")
        return "\n".join([head, *rows])
