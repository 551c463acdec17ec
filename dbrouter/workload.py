"""A mixed read/write workload through a `Router`, recording what the application saw.

Used by failover drills and by the resilience tests. Every write inserts a row
with a unique id, and the ids the router acknowledged are kept, so that after
a fault one can count lost writes (acknowledged but absent) and duplicated
writes (present more than once; the table has no unique key on purpose, so a
write applied twice would show).
"""

from __future__ import annotations

import itertools
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from .router import Router

__all__ = ["Op", "Workload"]

DEFAULT_TABLE = "dbrouter_drill"


@dataclass(frozen=True)
class Op:
    """One operation as the application saw it."""

    kind: str  # "read" or "write"
    start: float  # monotonic seconds
    end: float
    error: str | None = None  # exception class name, None when it succeeded
    row_id: int | None = None  # the id a write inserted
    detail: str | None = None  # the first line of the error message

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def latency(self) -> float:
        return self.end - self.start


@dataclass
class Workload:
    """``threads`` workers issuing reads and writes until `stop` or ``duration``.

    ``write_ratio`` is the share of writes, given to separate workers: that share of
    the threads only writes and the rest only reads, so that writes waiting out a
    failover cannot starve the reads unseen (with one thread, it does both). ``rate``
    (operations per second over all threads) paces the workers, None runs them flat
    out. Bounded: every worker stops at ``duration`` seconds after `start` at the latest.
    """

    router: Router
    threads: int = 8
    write_ratio: float = 0.3
    rate: float | None = None
    duration: float = 60.0
    table: str = DEFAULT_TABLE
    ops: list[Op] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)
    _ids: Any = field(default_factory=lambda: itertools.count(1))
    _lock: threading.Lock = field(default_factory=threading.Lock)
    started_at: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.write_ratio <= 1.0:
            raise ValueError(f"write_ratio must be between 0 and 1, got {self.write_ratio}")
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")

    def prepare(self) -> None:
        """Create the table (empty) on the primary. The table has no key: duplicates must show."""
        self.router.write(f"DROP TABLE IF EXISTS {self.table}")
        self.router.write(f"CREATE TABLE {self.table} (id bigint NOT NULL, worker int NOT NULL)")

    def start(self) -> None:
        self.started_at = time.monotonic()
        self._stop.clear()
        writers = self.writers
        for index in range(self.threads):
            role = "mixed" if self.threads == 1 else "write" if index < writers else "read"
            worker = threading.Thread(target=self._work, args=(index, role), name=f"dbrouter-workload-{index}",
                                      daemon=True)
            worker.start()
            self._workers.append(worker)

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop the workers; True when all of them finished within ``timeout``."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for worker in self._workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        return not any(worker.is_alive() for worker in self._workers)

    @property
    def writers(self) -> int:
        """How many of the threads only write (the others only read)."""
        if self.write_ratio == 0.0 or self.threads == 1:
            return 0 if self.write_ratio == 0.0 else 1
        if self.write_ratio == 1.0:
            return self.threads
        return min(self.threads - 1, max(1, round(self.threads * self.write_ratio)))

    def _work(self, index: int, role: str) -> None:
        rng = random.Random(index)
        interval = self.threads / self.rate if self.rate else 0.0
        next_at = time.monotonic()
        end = self.started_at + self.duration
        while not self._stop.is_set() and time.monotonic() < end:
            if interval:
                next_at += interval
                delay = next_at - time.monotonic()
                if delay > 0 and self._stop.wait(delay):
                    break
            if role == "write" or (role == "mixed" and rng.random() < self.write_ratio):
                self._write(index)
            else:
                self._read(rng)

    def _record(self, op: Op) -> None:
        with self._lock:
            self.ops.append(op)

    def _write(self, index: int) -> None:
        row_id = next(self._ids)
        start = time.monotonic()
        try:
            self.router.write(f"INSERT INTO {self.table} (id, worker) VALUES (%s, %s)", (row_id, index))
        except Exception as exc:  # noqa: BLE001 - the drill reports every kind of failure
            self._record(Op("write", start, time.monotonic(), type(exc).__name__, row_id, _first_line(exc)))
        else:
            self._record(Op("write", start, time.monotonic(), None, row_id))

    def _read(self, rng: random.Random) -> None:
        start = time.monotonic()
        try:
            self.router.read(f"SELECT count(*) FROM {self.table} WHERE id = %s", (rng.randrange(1, 1_000_000),))
        except Exception as exc:  # noqa: BLE001
            self._record(Op("read", start, time.monotonic(), type(exc).__name__, None, _first_line(exc)))
        else:
            self._record(Op("read", start, time.monotonic()))

    # -- results -------------------------------------------------------------

    def snapshot(self) -> list[Op]:
        with self._lock:
            return list(self.ops)

    @property
    def acknowledged(self) -> list[int]:
        """Ids of the writes the router reported as committed."""
        return [op.row_id for op in self.snapshot() if op.kind == "write" and op.ok and op.row_id is not None]

    def check_writes(self, rows: list[tuple[Any, ...]]) -> tuple[list[int], list[int]]:
        """Compare ``rows`` (``SELECT id FROM table`` on the primary) with the acknowledged
        writes: returns (lost ids, duplicated ids)."""
        counts: dict[int, int] = {}
        for (row_id,) in rows:
            counts[int(row_id)] = counts.get(int(row_id), 0) + 1
        lost = sorted(i for i in self.acknowledged if i not in counts)
        duplicated = sorted(i for i, n in counts.items() if n > 1)
        return lost, duplicated


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__
