"""Per-call deadlines: ``timeout=`` on a call, ``with router.deadline(s):`` around several
calls, and the ``call_timeout`` option for every call that has neither.

A deadline is a point on the monotonic clock, kept in a context variable: it follows the
call into the breaker, the pool, the retries, transactions and sessions without being
passed along, and each asyncio task sees its own. A deadline only shortens: one nested
inside a shorter one changes nothing.

Where it is enforced (`dbrouter.lease`, `dbrouter.routing`):

- breaker admission costs nothing to wait for;
- a pool checkout waits at most what is left;
- retries, their pauses and a write's wait for a failover stop at it;
- a statement still running at the deadline has its connection cut by `Timer` (the
  socket is shut down, so the call returns at once whatever the node does, hung or
  blackholed), and `Canceller` asks the server, on a connection of its own, to cancel
  what the session was running (PostgreSQL ``pg_cancel_backend``, MySQL ``KILL QUERY``),
  so that the work does not run on unseen. The node is not blamed: the call ran out of
  time, which says nothing about the node (its probes judge it).

Then the call raises `DeadlineExceeded` (`DeadlineExceededAfterWrite` when a write or a
COMMIT had been sent), saying where the time went.
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import itertools
import logging
import math
import threading
import time
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Callable, Iterator

from . import _fork
from .config import MAX_WAIT
from .errors import ConfigurationError, DeadlineExceeded, DeadlineExceededAfterWrite

if TYPE_CHECKING:
    from .adapters.base import Adapter

__all__ = ["Canceller", "Deadline", "Timer", "current", "within"]

log = logging.getLogger("dbrouter.deadline")

_current: ContextVar[Deadline | None] = ContextVar("dbrouter_deadline", default=None)

current = _current.get
"""The deadline of the call running in this context, or None."""


class Deadline:
    """When a call must be done by, and where its time went (``note``)."""

    __slots__ = ("at", "seconds", "spans")

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds
        self.spans: list[tuple[str, float]] = []

    def left(self) -> float:
        """Seconds left (negative once it passed)."""
        return self.at - time.monotonic()

    def note(self, what: str, seconds: float) -> None:
        """Record that ``seconds`` went to ``what`` (``"pool wait on db1:5432"``)."""
        self.spans.append((what, seconds))

    def where(self) -> str:
        """The recorded spans, summed by what they were spent on, in order of first use."""
        totals: dict[str, list[float]] = {}
        for what, seconds in self.spans:
            total = totals.setdefault(what, [0.0, 0])
            total[0] += seconds
            total[1] += 1
        parts = [f"{what} {1000 * total:.0f} ms" + (f" ({count} times)" if count > 1 else "")
                 for what, (total, count) in totals.items()]
        return ", ".join(parts) if parts else "nothing recorded"

    def exceeded(self, doing: str, node: str | None = None, *, after_write: bool = False) -> DeadlineExceeded:
        """The error for this deadline running out while ``doing`` (on ``node``)."""
        kind = DeadlineExceededAfterWrite if after_write else DeadlineExceeded
        unknown = ": the write was sent and cut, it may or may not have been applied" if after_write else ""
        return kind(f"deadline of {self.seconds:.3g}s exceeded {doing}{unknown} (time went to: {self.where()})",
                    node=node)

    def __repr__(self) -> str:
        return f"<Deadline {self.seconds:.3g}s, {self.left():.3g}s left>"


def check_timeout(seconds: Any, name: str = "timeout") -> None:
    """A call's ``timeout=``: a number of seconds, > 0 and finite (at most `MAX_WAIT`)."""
    if (isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds)
            or not 0 < seconds <= MAX_WAIT):
        raise ConfigurationError(f"{name} must be a number of seconds > 0 and <= {MAX_WAIT:g}, got {seconds!r}")


@contextlib.contextmanager
def within(seconds: float | None) -> Iterator[Deadline | None]:
    """Run the body under a deadline ``seconds`` from now (None: whatever applies already),
    unless the one around it ends sooner. Yields the deadline in force."""
    outer = _current.get()
    if seconds is None:
        yield outer
        return
    check_timeout(seconds)
    if outer is not None and outer.at <= time.monotonic() + seconds:
        yield outer
        return
    deadline = Deadline(seconds)
    token = _current.set(deadline)
    try:
        yield deadline
    finally:
        _current.reset(token)


class _Armed:
    __slots__ = ("at", "seq", "fire", "state")

    def __init__(self, at: float, seq: int, fire: Callable[[], None]) -> None:
        self.at, self.seq, self.fire, self.state = at, seq, fire, _PENDING

    def __lt__(self, other: _Armed) -> bool:
        return (self.at, self.seq) < (other.at, other.seq)


_PENDING, _DISARMED, _FIRED = 0, 1, 2


IDLE_EXIT = 0.5
"""Seconds the timer's thread waits with nothing armed before it ends."""


class Timer:
    """Calls ``fire()`` at its time, to the millisecond, from one background thread.

    `arm` returns a token; `disarm` returns False when it fired already (the connection was
    cut: discard it). ``fire`` runs without the timer's lock held and must not block. The
    thread ends after `IDLE_EXIT` seconds with nothing armed (no thread of dbrouter's
    outlives its routers) and the next `arm` starts another.
    """

    def __init__(self, name: str = "dbrouter-deadline") -> None:
        self._name = name
        self._heap: list[_Armed] = []
        self._seq = itertools.count()
        self._cond = threading.Condition(threading.Lock())  # guards _heap and the tokens' state
        self._thread: threading.Thread | None = None
        self.fired = 0
        _fork.register(self)

    def _after_fork_in_child(self) -> None:
        """In a forked child: forget the parent's armed calls (their sockets are the parent's)."""
        self._heap = []
        self._cond = threading.Condition(threading.Lock())
        self._thread = None

    def arm(self, at: float, fire: Callable[[], None]) -> _Armed:
        token = _Armed(at, next(self._seq), fire)
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            heapq.heappush(self._heap, token)
            if self._heap[0] is token:
                self._cond.notify()
        return token

    def disarm(self, token: _Armed) -> bool:
        """True when it had not fired: nothing was cut."""
        with self._cond:
            if token.state == _FIRED:
                return False
            token.state = _DISARMED
            return True

    def _run(self) -> None:
        cond = self._cond
        while True:
            with cond:
                heap = self._heap
                while heap and heap[0].state == _DISARMED:
                    heapq.heappop(heap)
                if not heap:
                    cond.wait(IDLE_EXIT)
                    if not heap:  # decided under the lock: an arm from now on starts another thread
                        self._thread = None
                        return
                    continue
                wait = heap[0].at - time.monotonic()
                if wait > 0:
                    cond.wait(wait)
                    continue
                token = heapq.heappop(heap)
                token.state = _FIRED
                self.fired += 1
            try:
                token.fire()
            except Exception:  # noqa: BLE001 - the timer must keep running
                log.exception("cutting a call at its deadline failed")


class Canceller:
    """Asks servers to cancel statements (cut at their deadline, or hedges' losers), on
    connections of its own.

    One connection per node is kept between cancels, so a cancel is one statement, not a
    login (SCRAM, a server process, then the statement): at tens of hedges a second the
    logins slowed every read beside them. It is closed once unused for `KEPT_IDLE` seconds
    (looked at by the next cancel), when its router closes (`forget`), and dropped (not
    closed) in a forked child. At most ``workers`` cancels run at a time, each bounded by the
    node's ``connect_timeout`` (its connection is cut by the `Timer` past it); past that, or
    for a node that the probes see down, the cancel is skipped: the statement's socket is
    already cut (or its answer being drained), and the server stops at its next write to it.
    """

    KEPT_IDLE = 30.0

    def __init__(self, timer: Timer, workers: int = 2) -> None:
        self._timer = timer
        self._slots = threading.BoundedSemaphore(workers)
        self._kept_lock = threading.Lock()  # guards _kept only: no I/O under it
        self._kept: dict[int, tuple[Adapter, Any, float]] = {}  # id(adapter) -> (adapter, connection, last used)
        self.sent = 0
        self.skipped = 0
        _fork.register(self)

    def _after_fork_in_child(self) -> None:
        """In a forked child: the kept connections are the parent's (abandoned, never closed)."""
        kept, self._kept = self._kept, {}
        self._kept_lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(self._slots._initial_value)  # type: ignore[attr-defined]
        for adapter, conn, _ in kept.values():
            _fork.abandon(conn, adapter.socket_fd(conn))

    def cancel(self, adapter: Adapter, session_id: int | None, node_up: bool = True) -> bool:
        """Ask, from a thread of its own, that session ``session_id`` cancel its statement;
        False when skipped. From an event loop too: starting the thread is a short wait there,
        never the cancel's connect (handing the start to the timer's thread would start that
        thread instead, since it ends when idle)."""
        sql = None if session_id is None else adapter.cancel_sql(session_id)
        if sql is None or not node_up or not self._slots.acquire(blocking=False):
            self.skipped += 1
            return False
        threading.Thread(target=self._run, args=(adapter, sql), name="dbrouter-cancel", daemon=True).start()
        return True

    def forget(self, adapter: Adapter) -> None:
        """Close the connection kept for ``adapter``'s node (its router is closing)."""
        kept = self._pop(adapter)
        if kept is not None:
            adapter.close(kept[1])

    def _run(self, adapter: Adapter, sql: str) -> None:
        try:
            self._send(adapter, sql)
        finally:
            self._slots.release()

    def _send(self, adapter: Adapter, sql: str) -> bool:
        conn = self._take(adapter)
        fresh = conn is None
        limit = adapter.options.connect_timeout
        while True:
            if conn is None:
                try:
                    conn = adapter.connect(read_timeout=limit)
                except Exception as exc:  # noqa: BLE001 - the cut stands; the cancel was a courtesy
                    log.info("cancel on %s skipped: %s", adapter.node, exc)
                    return False
            token = self._timer.arm(time.monotonic() + limit, functools.partial(adapter.abort, conn))
            try:
                adapter.execute(conn, sql)
            except Exception as exc:  # noqa: BLE001 - as above
                self._timer.disarm(token)
                adapter.close(conn)
                if fresh:
                    log.info("cancel on %s failed: %s", adapter.node, exc)
                    return False
                conn, fresh = None, True  # the kept one had gone (server restart, idle timeout): a new one
                continue
            self.sent += 1
            if self._timer.disarm(token):
                self._keep(adapter, conn)
            else:  # cut just as it answered
                adapter.close(conn)
            return True

    def _take(self, adapter: Adapter) -> Any:
        """The connection kept for ``adapter``'s node (taken: one cancel uses it at a time), or None."""
        kept = self._pop(adapter)
        if kept is None:
            return None
        if time.monotonic() - kept[2] > self.KEPT_IDLE:
            adapter.close(kept[1])
            return None
        return kept[1]

    def _pop(self, adapter: Adapter) -> tuple[Adapter, Any, float] | None:
        """Take ``adapter``'s entry out of the kept connections (None: it has none)."""
        with self._kept_lock:
            kept = self._kept.get(id(adapter))
            if kept is None or kept[0] is not adapter:  # another adapter that had the same id
                return None
            del self._kept[id(adapter)]
        return kept

    def _keep(self, adapter: Adapter, conn: Any) -> None:
        """Keep ``conn`` for the next cancel on its node (one per node), and close the other
        nodes' connections unused for `KEPT_IDLE` seconds."""
        now = time.monotonic()
        closing: list[tuple[Adapter, Any]] = []
        with self._kept_lock:
            for key, (other, old, used) in list(self._kept.items()):
                if now - used > self.KEPT_IDLE:
                    del self._kept[key]
                    closing.append((other, old))
            if id(adapter) in self._kept:  # another cancel kept one meanwhile
                closing.append((adapter, conn))
            else:
                self._kept[id(adapter)] = (adapter, conn, now)
        for other, old in closing:
            other.close(old)


TIMER = Timer()
"""The process's deadline timer (one thread, started at the first deadline)."""
CANCELLER = Canceller(TIMER)
"""The process's server-side canceller."""
