"""A thread-safe connection pool for one node.

Design (see STYLE.md): the common checkout and return take no lock. The idle
connections are a deque whose ``pop`` and ``append`` are atomic under the GIL;
a checkout pops one, a return appends it back. Everything else (waiters,
growth, retiring, closing) happens under one lock that guards bookkeeping
only: connect, ping, reset and close happen outside it.

Waiters queue in FIFO order, each on a lock of its own, and are served under
the pool lock. A checkout does not take the lock-free path while anyone waits,
so it cannot jump the queue. The two sides never miss each other: a return
appends to the idle deque and then looks for waiters, a new waiter queues and
then looks at the idle deque (both in that order, and the GIL orders them), so
at least one of the two sees the other and serves the waiter. A waiter that
timed out has already left the queue, so it can never swallow a connection.
Whoever empties the idle deque (close, invalidate, housekeeping) does it by
popping, so every connection is taken by exactly one thread.

New connections are opened one at a time by a short-lived connector thread;
housekeeping (retire, prune, refill, leak check) runs on a daemon thread.

In a forked child (`dbrouter._fork`) the pool starts over empty, with new locks; the
connections it inherited are the parent's and are abandoned, never closed, reset or
handed out. A connection borrowed before the fork and given back in the child is
abandoned too (its generation is older than the fork's). Housekeeping and ``min_size``
start again at the pool's first checkout in the child, on the slow path (the pool is
empty): a child that never uses the pool opens nothing.
"""

from __future__ import annotations

import contextlib
import linecache
import logging
import random
import sys
import threading
import time
import weakref
from bisect import bisect_left
from collections import deque
from typing import TYPE_CHECKING, Any, Callable

from . import _fork
from ._counter import Counter
from .adapters.base import Adapter, ErrorKind, ReturnState
from .config import PoolConfig, check_wait
from .deadline import TIMER, Deadline
from .deadline import current as current_deadline
from .errors import (
    ConnectError,
    DeadlineExceeded,
    NodeRemoved,
    NodeUnavailable,
    PoolClosed,
    PoolError,
    PoolTimeout,
    TooManyWaiting,
)

if TYPE_CHECKING:
    from .watchdog import Watchdog

__all__ = ["Pool", "PoolStats"]

log = logging.getLogger("dbrouter.pool")

# Keys of Pool.stats(): stable names that dashboards and tests rely on.
SIZE = "size"
IDLE = "idle"
IN_USE = "in_use"
WAITING = "waiting"
ACQUIRED = "acquired"
TIMEOUTS = "timeouts"
REJECTED = "rejected"
CONNECT_ERRORS = "connect_errors"
OPENED = "opened"
CLOSED = "closed"
DISCARDED = "discarded"
LEAKS = "leaks"
WAIT_P50 = "acquire_wait_p50"
WAIT_P99 = "acquire_wait_p99"
MAX_SIZE = "max_size"

PoolStats = dict  # the mapping returned by Pool.stats(); keys are the constants above

# Upper bounds (seconds) of the acquire-wait histogram, exported to metrics and used for the
# percentiles in stats(). The first bucket holds the checkouts that did not wait at all.
WAIT_BUCKETS = (0.0, 0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0)
_BROKEN = ReturnState.BROKEN
_DIRTY = ReturnState.DIRTY
_EVENT_INTERVAL = 1.0  # at most one pool_exhausted event per second per pool
_LIFETIME_JITTER = 0.05  # retire up to 5% early so connections do not all expire at once
_STACK_LIMIT = 32
_INTERNAL_FILES = frozenset({__file__, contextlib.__file__})


class _Entry:
    """One pooled connection and its timestamps."""

    __slots__ = ("conn", "key", "generation", "created", "expires", "last_used", "borrowed_at", "borrower",
                 "leak_reported")

    def __init__(self, conn: Any, now: float, lifetime: float | None, generation: int) -> None:
        self.conn = conn
        self.key = id(conn)  # the _in_use key, computed once
        self.generation = generation
        self.created = now
        self.expires = (
            now + lifetime * (1.0 - random.random() * _LIFETIME_JITTER) if lifetime else float("inf")
        )
        self.last_used = now
        self.borrowed_at = 0.0
        self.borrower: list[tuple[Any, int]] | None = None
        self.leak_reported = False


class _Waiter:
    """A thread waiting for a connection.

    It sleeps on a lock of its own, which the thread that serves it releases
    (under the pool lock, after setting ``entry`` or ``error``). The woken thread
    never needs the pool lock, which is what keeps a fair hand-off cheap when
    many threads share a small pool.
    """

    __slots__ = ("wakeup", "entry", "error", "since")

    def __init__(self, since: float) -> None:
        self.wakeup = threading.Lock()
        self.wakeup.acquire()
        self.entry: _Entry | None = None
        self.error: BaseException | None = None
        self.since = since

    def serve(self, entry: _Entry | None, error: BaseException | None = None) -> None:
        self.entry, self.error = entry, error
        self.wakeup.release()


class _Borrowed:
    """``with pool.connection() as conn``: a class rather than a generator, which costs
    a fraction as much on every checkout."""

    __slots__ = ("_pool", "_timeout", "_entry")

    def __init__(self, pool: Pool, timeout: float | None) -> None:
        self._pool = pool
        self._timeout = timeout
        self._entry: _Entry | None = None

    def __enter__(self) -> Any:
        self._entry = self._pool.borrow(self._timeout)
        return self._entry.conn

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        entry, self._entry = self._entry, None
        if entry is None:
            return
        pool = self._pool
        if exc is None:
            pool.give_back(entry)
        else:
            broken = not isinstance(exc, Exception) or pool.adapter.classify(exc) is ErrorKind.UNREACHABLE
            pool.give_back(entry, broken=broken)


class Pool:
    """Connections to one node, shared by many threads.

    ``acquire()`` waits at most ``acquire_timeout`` and raises `PoolTimeout`
    naming the node, its size and the waiters; it raises `ConnectError`
    at once when the node cannot be reached and the pool holds no connection.

    In a child forked after it was opened, the pool starts over empty and wakes up at
    its first checkout there, calling ``after_fork()`` once (see the module docstring).
    """

    def __init__(
        self,
        adapter: Adapter,
        config: PoolConfig | None = None,
        *,
        name: str | None = None,
        watchdog: Watchdog | None = None,
        on_event: Callable[..., None] | None = None,
        open: bool = True,  # noqa: A002 - the psycopg_pool spelling
        after_fork: Callable[[], None] | None = None,
    ) -> None:
        self.adapter = adapter
        # Liveness pings on a node that hangs are cut short by the watchdog
        # (drivers without a read timeout only).
        self._watchdog = watchdog if adapter.needs_watchdog else None
        self._generation = 0  # bumped by invalidate(): older connections are not reused
        self._forked_at = 0  # the generation a forked child started at: older ones are the parent's
        self.config = config or PoolConfig()
        # Read on every checkout and return: bound once (the config is frozen).
        self._return_state = adapter.return_state
        self._bypass = self.config.validation_bypass
        self._leak_threshold = self.config.leak_threshold
        self.name = name or adapter.node
        self._lock = threading.Lock()
        self._idle: deque[_Entry] = deque()
        self._in_use: dict[int, _Entry] = {}
        self._dropped: deque[_Entry] = deque()  # borrowed entries whose borrower vanished (`reclaim`)
        self.draining: set[int] = set()  # keys of borrowed entries out draining a hedge's loser (`dbrouter.lease`)
        self._inherited: dict[int, _Entry] = {}  # in a forked child: borrowed before the fork (`entry_of`)
        self._waiters: deque[_Waiter] = deque()
        self._open = 0  # connections that exist: idle + in use
        self._connecting = 0
        self._growing = False
        self._closed = False
        self._removed = False  # closed because its node left the router: borrowers go elsewhere
        self._last_connect_error: BaseException | None = None
        self._failing = False  # log the first connect failure of a streak as a warning, the rest quietly
        self._drained = threading.Condition(self._lock)
        self._counts = {TIMEOUTS: 0, REJECTED: 0, CONNECT_ERRORS: 0, OPENED: 0, CLOSED: 0, DISCARDED: 0, LEAKS: 0}
        self._retried = 0  # checkouts that found their connection unusable and started over
        self._wait_buckets = [0] * (len(WAIT_BUCKETS) + 1)  # the last one is +Inf; [0] unused
        self._unwaited = Counter()  # the checkouts that did not wait (the first bucket), counted lock-free
        self._wait_sum = 0.0
        self._on_event = on_event  # (name, message, **data): pool_exhausted and leak events
        self._last_exhausted_event = 0.0
        self._stop = threading.Event()
        self._maint = self._maintenance_thread()
        # A pool dropped without close(): close its idle connections when it is collected
        # (a PostgreSQL connection keeps a cursor that refers back to it, so it would
        # otherwise stay open until the cycle collector runs). Also at interpreter exit: so
        # a forked child empties this very deque rather than replacing it (_after_fork_in_child).
        weakref.finalize(self, _close_idle, self._idle, adapter)
        self._opened = False
        self._dormant = False  # in a forked child, until its first use there (_revive)
        self._after_fork = after_fork
        _fork.register(self)
        if open:
            self.open()

    def _maintenance_thread(self) -> threading.Thread:
        return threading.Thread(
            target=_maintain, args=(weakref.ref(self), self._stop, self.config.maintenance_interval),
            name=f"dbrouter-{self.name}-maint", daemon=True,
        )

    def _after_fork_in_child(self) -> None:
        """In a forked child: abandon every connection of the parent's (idle, borrowed,
        dropped) and start over empty, with new locks. No thread starts here (another
        library's fork handler may not have run yet): housekeeping and ``min_size``
        connections of the child's own wait for the first use in the child (`_revive`)."""
        inherited = [*_take_all(self._idle), *self._in_use.values(), *_take_all(self._dropped)]
        self._inherited = dict(self._in_use)
        self._lock = threading.Lock()  # a thread of the parent may have held it at the fork
        self._drained = threading.Condition(self._lock)
        self._in_use = {}
        self.draining = set()
        self._waiters = deque()  # the parent's threads: none of them exists here
        self._open = self._connecting = 0
        self._growing = False  # a connector thread of the parent's will never finish here
        self._generation += 1
        self._forked_at = self._generation
        self._counts = dict.fromkeys(self._counts, 0)
        self._retried = 0
        self._wait_buckets = [0] * len(self._wait_buckets)
        self._unwaited = Counter()
        self._wait_sum = 0.0
        self._last_connect_error = None
        self._failing = False
        self._stop = threading.Event()
        if self._closed:
            self._stop.set()
        self._maint = self._maintenance_thread()
        self._dormant = self._opened and not self._closed
        for entry in inherited:
            _fork.abandon(entry.conn, self.adapter.socket_fd(entry.conn))

    def _revive(self, tell_owner: bool = True) -> None:
        """The first use of the pool in a forked child: start housekeeping and open ``min_size``
        connections again, then tell the owner (``after_fork``: the router wakes up its control
        plane and its other pools). Idempotent; called on the slow path only (the child's pool
        starts empty)."""
        with self._lock:
            if not self._dormant:
                return
            self._dormant = False
            self._maint.start()
            self._grow_locked()
        if tell_owner and self._after_fork is not None:
            self._after_fork()

    def open(self) -> Pool:
        """Start housekeeping and open ``min_size`` connections (in the background); idempotent.

        A pool built with ``open=False`` has done no I/O and started no thread until then.
        """
        with self._lock:
            if self._opened or self._closed:
                return self
            self._opened = True
            self._maint.start()
            if self.config.min_size:
                self._grow_locked()
        return self

    def __repr__(self) -> str:
        return f"<Pool {self.name} open={self._open} idle={len(self._idle)} max={self.config.max_size}>"

    # -- checkout and return -------------------------------------------------

    def acquire(self, timeout: float | None = None) -> Any:
        """Borrow a connection; give it back with `release`.

        Waits up to ``timeout`` (default ``acquire_timeout``) seconds.
        """
        return self.borrow(timeout).conn

    def release(self, conn: Any, *, broken: bool = False) -> None:
        """Return a borrowed connection; ``broken=True`` discards it."""
        self.give_back(self.entry_of(conn), broken=broken)

    def entry_of(self, conn: Any) -> _Entry:
        """The pool's record of a borrowed connection (raises `PoolError` for a stranger)."""
        entry = self._in_use.get(id(conn)) or self._inherited.get(id(conn))
        if entry is None or entry.conn is not conn:
            raise PoolError(f"connection returned to pool {self.name} does not belong to it or was returned twice")
        return entry

    def has_idle(self) -> bool:
        """Whether a checkout now would find a connection without waiting (a hint: racy)."""
        return bool(self._idle)

    def connection(self, timeout: float | None = None) -> _Borrowed:
        """Borrow a connection for a ``with`` block.

        On the way out an open transaction is rolled back; a connection that
        failed with a connection error is discarded, never handed out again.
        """
        return _Borrowed(self, timeout)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until ``min_size`` connections are open; raise `PoolTimeout` otherwise."""
        check_wait("timeout", timeout)
        if self._dormant:
            self._revive()
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if self._open >= self.config.min_size:
                    return
                error = self._last_connect_error
                if not self._growing:
                    self._grow_locked()
            if time.monotonic() >= deadline:
                raise PoolTimeout(
                    f"pool {self.name}: {self._open} of min_size {self.config.min_size} connections "
                    f"open after {timeout:.1f}s", node=self.name,
                ) from error
            time.sleep(0.01)

    def borrow(self, timeout: float | None = None) -> _Entry:
        """Check out a connection's entry (``entry.conn``); give it back with `give_back`.

        The lease (`dbrouter.lease`) borrows this way; `acquire` is the same for
        callers who hold a plain connection. Waits up to ``timeout`` (default
        ``acquire_timeout``): `PoolTimeout`, `ConnectError`, `PoolClosed`.
        """
        bypass = self._bypass
        if timeout is None:
            wait_for = self.config.acquire_timeout
        else:
            check_wait("timeout", timeout)
            wait_for = timeout
        deadline = None  # set on the first wait: discarded connections do not extend it
        while True:
            entry = None
            if not self._waiters:  # nobody queued: take an idle connection without the lock
                try:  # noqa: SIM105 - the hot path: suppress() would cost a context manager
                    entry = self._idle.pop()  # most recently used: warm, least likely to need a ping
                except IndexError:
                    pass
            if entry is not None:
                self._in_use[entry.key] = entry
                self._unwaited.inc()
                now = time.monotonic()
                if self._closed:  # closed after we popped it: close() left it to us
                    self._discard(entry, "pool closed", not_acquired=True)
                    raise self._closed_error()
            else:
                # Waited already, and was served a connection that proved unusable: keep our place.
                front = deadline is not None
                if deadline is None:
                    deadline = time.monotonic() + wait_for
                entry = self._queue(deadline, wait_for, front)
                now = time.monotonic()
            if now >= entry.expires or entry.generation != self._generation:
                self._discard(entry, "reached max_lifetime" if now >= entry.expires else "invalidated",
                              not_acquired=True)
                continue
            if now - entry.last_used > bypass:
                call_deadline = current_deadline()
                if call_deadline is not None and now >= call_deadline.at:  # no time left to check it: it stays pooled
                    self.give_back(entry)
                    raise call_deadline.exceeded(f"before a connection of {self.name} was checked", self.name)
                try:
                    self._ping(entry.conn, call_deadline)
                except DeadlineExceeded:
                    self._discard(entry, "liveness check cut at the call's deadline", not_acquired=True)
                    raise
                except Exception as exc:  # noqa: BLE001 - any failure means the connection is unusable
                    self._discard(
                        entry, f"failed liveness check: {exc.__class__.__name__}", not_acquired=True
                    )
                    continue
            entry.borrowed_at = now
            if self._leak_threshold is not None:
                entry.borrower = _capture_stack()
                entry.leak_reported = False
            return entry

    def _queue(self, deadline: float, timeout: float, front: bool = False) -> _Entry:
        """The slow way in: queue behind earlier waiters (or ahead of them, ``front``), open a
        connection if there is room."""
        if self._dormant:
            self._revive()
        waiter = _Waiter(time.monotonic())
        with self._lock:
            if self._closed:
                raise self._closed_error()
            limit = self.config.max_waiting
            if limit and not front and len(self._waiters) >= limit:
                self._counts[REJECTED] += 1
                raise TooManyWaiting(
                    f"pool {self.name}: {len(self._waiters)} callers already waiting for a connection "
                    f"(max_waiting {limit}; size {self._open}/{self.config.max_size}): refused at once",
                    node=self.name)
            if front:
                self._waiters.appendleft(waiter)
            else:
                self._waiters.append(waiter)
            self._serve_waiters_locked()  # a lock-free return may have just filled the idle deque
            if waiter.entry is None:
                self._grow_locked()
        return self._wait(waiter, deadline, timeout)

    def _ping(self, conn: Any, deadline: Deadline | None = None) -> None:
        """The liveness check, bounded by ``connect_timeout`` (drivers without a read timeout)
        and by the call's deadline, whichever comes first: cut then."""
        if deadline is not None:
            started = time.monotonic()
            cut = TIMER.arm(deadline.at, lambda: self.adapter.abort(conn))
            try:
                self._ping(conn)
            except Exception as exc:
                if not TIMER.disarm(cut):
                    deadline.note(f"liveness check on {self.name}", time.monotonic() - started)
                    raise deadline.exceeded(f"in the liveness check of a connection of {self.name}",
                                            self.name) from exc
                raise
            if not TIMER.disarm(cut):
                raise deadline.exceeded(f"in the liveness check of a connection of {self.name}", self.name)
            return
        if self._watchdog is None:
            self.adapter.ping(conn)
            return
        limit = self.adapter.options.connect_timeout
        token = self._watchdog.arm(time.monotonic() + limit, lambda: self.adapter.abort(conn))
        try:
            self.adapter.ping(conn)
        finally:
            if not self._watchdog.disarm(token):
                raise PoolError(f"pool {self.name}: liveness check got no answer within {limit:.3g}s")

    def _record_wait_locked(self, waited: float) -> None:
        self._wait_buckets[max(1, bisect_left(WAIT_BUCKETS, waited))] += 1
        self._wait_sum += waited

    def _wait(self, waiter: _Waiter, deadline: float, timeout: float) -> _Entry:
        """Sleep until served, failed or timed out; served waiters come back without the pool lock."""
        try:
            served = waiter.wakeup.acquire(True, max(0.0, deadline - time.monotonic()))
        except BaseException:  # KeyboardInterrupt while waiting: leave no trace in the queue
            self._abandon(waiter)
            raise
        if not served:
            with self._lock:
                if waiter.entry is None and waiter.error is None:
                    # Still queued: leave the queue under the lock, so nobody can serve us now.
                    self._waiters.remove(waiter)
                    error, notify = self._timeout_locked(timeout)
                else:
                    error = None  # served just as the timeout expired
            if error is not None:
                if notify and self._on_event is not None:
                    self._on_event("pool_exhausted", str(error), waiting=len(self._waiters))
                raise error from self._last_connect_error
        if waiter.error is not None:
            raise waiter.error
        assert waiter.entry is not None
        return waiter.entry

    def _abandon(self, waiter: _Waiter) -> None:
        """A waiter gave up (interrupted): leave the queue, or give back what it was just served."""
        with self._lock:
            if waiter.entry is None and waiter.error is None:
                self._waiters.remove(waiter)
                return
        if waiter.entry is not None:
            self.give_back(waiter.entry)

    def _timeout_locked(self, timeout: float) -> tuple[PoolTimeout, bool]:
        self._counts[TIMEOUTS] += 1
        message = (
            f"pool {self.name}: no connection free after {timeout:.3g}s "
            f"(size {self._open}/{self.config.max_size}, in use {len(self._in_use)}, "
            f"{len(self._waiters) + 1} waiting)"
        )
        if self._last_connect_error is not None and self._open < self.config.max_size:
            message += f"; last connect error: {self._last_connect_error}"
        now = time.monotonic()
        notify = now - self._last_exhausted_event >= _EVENT_INTERVAL
        if notify:
            self._last_exhausted_event = now
        return PoolTimeout(message, node=self.name), notify

    def give_back(self, entry: _Entry, *, broken: bool = False) -> float:
        """Take a borrowed entry back (``broken=True`` discards it); returns the time it was
        returned (monotonic), so that callers can tell how long they held it."""
        conn = entry.conn
        if entry.generation != self._generation:  # invalidated (no reset: it is closed), or the parent's
            self._retire_stale(entry)
            return time.monotonic()
        try:
            state = _BROKEN if broken else self._return_state(conn)
        except Exception:  # an adapter that cannot read a connection's state must not keep it out
            log.exception("pool %s: cannot tell the state of a returned connection; discarding it", self.name)
            state = _BROKEN
        if state is _DIRTY:
            try:
                self.adapter.reset(conn)
            except Exception as exc:  # noqa: BLE001 - a connection that cannot be reset is discarded
                log.debug("pool %s: reset failed, discarding connection: %s", self.name, exc)
                state = _BROKEN
        now = time.monotonic()
        if state is _BROKEN or now >= entry.expires:
            self._discard(entry, "broken" if state is _BROKEN else "retired")
            return now
        entry.last_used = now
        entry.borrower = None
        del self._in_use[entry.key]
        self._idle.append(entry)
        if self._waiters or self._closed:  # looked at after the append: see the module docstring
            self._after_return()
        return now

    def _retire_stale(self, entry: _Entry) -> None:
        """A returned connection of an older generation: invalidated since it was borrowed
        (closed), or borrowed before a fork and given back in the child (the parent's:
        abandoned, never closed or reset)."""
        if entry.generation < self._forked_at:
            self._inherited.pop(entry.key, None)
            _fork.abandon(entry.conn, self.adapter.socket_fd(entry.conn))
            return
        self._discard(entry, "invalidated")

    def _after_return(self) -> None:
        """A return found waiters (serve them) or a closed pool (close what is idle)."""
        with self._lock:
            if not self._closed:
                self._serve_waiters_locked()
                return
            idle = self._drain_idle_locked()
            self._drained.notify_all()
        for entry in idle:
            self.adapter.close(entry.conn)

    def _give_locked(self, entry: _Entry) -> None:
        """Park a free connection as idle and serve the oldest waiter, if any."""
        self._idle.append(entry)
        self._serve_waiters_locked()

    def _serve_waiters_locked(self) -> None:
        """Hand idle connections to waiters, oldest waiter first."""
        waiters, idle = self._waiters, self._idle
        while waiters:
            try:
                entry = idle.pop()
            except IndexError:
                return
            waiter = waiters.popleft()
            self._in_use[entry.key] = entry
            self._record_wait_locked(time.monotonic() - waiter.since)
            waiter.serve(entry)

    def _drain_idle_locked(self) -> list[_Entry]:
        """Take every idle connection out of the pool (by popping: lock-free checkouts may race)
        and count them as closed; the caller closes them outside the lock."""
        drained = _take_all(self._idle)
        self._open -= len(drained)
        self._counts[CLOSED] += len(drained)
        return drained

    def _discard(self, entry: _Entry, why: str, *, not_acquired: bool = False) -> None:
        """Close a borrowed connection that must not be reused, and replace it if needed."""
        log.debug("pool %s: discarding connection (%s)", self.name, why)
        self.adapter.close(entry.conn)
        with self._lock:
            if not_acquired:  # found unusable during checkout: the caller never had it
                self._retried += 1
            self._in_use.pop(entry.key, None)
            self._open -= 1
            self._counts[DISCARDED] += 1
            self._counts[CLOSED] += 1
            if self._closed:
                self._drained.notify_all()
            else:
                self._grow_locked()

    # -- growth --------------------------------------------------------------

    def _grow_locked(self) -> None:
        """Start the connector thread when there is demand and room. Holds the lock."""
        if self._growing or self._closed or not self._needs_connection_locked():
            return
        self._growing = True
        threading.Thread(
            target=self._connector, name=f"dbrouter-{self.name}-connect", daemon=True
        ).start()

    def _needs_connection_locked(self) -> bool:
        total = self._open + self._connecting
        if total >= self.config.max_size:
            return False
        return len(self._waiters) > 0 or total < self.config.min_size

    def _connector(self) -> None:
        """Open connections one at a time while someone needs one."""
        while True:
            with self._lock:
                if self._closed or not self._needs_connection_locked():
                    self._growing = False
                    return
                self._connecting += 1
            try:
                conn = self.adapter.connect()
            except Exception as exc:  # noqa: BLE001 - reported to waiters and in stats
                error = exc if isinstance(exc, ConnectError) else ConnectError(
                    f"cannot connect to node {self.name}: {exc}", node=self.name
                )
                with self._lock:
                    self._connecting -= 1
                    self._counts[CONNECT_ERRORS] += 1
                    self._last_connect_error = error
                    self._growing = False
                    if self._open == 0:
                        # Nobody holds a connection that could come back: fail fast.
                        while self._waiters:
                            self._waiters.popleft().serve(None, error)
                    first_failure, self._failing = not self._failing, True
                log.log(logging.WARNING if first_failure else logging.DEBUG, "pool %s: %s", self.name, error)
                return
            entry = _Entry(conn, time.monotonic(), self.config.max_lifetime, self._generation)
            with self._lock:
                self._connecting -= 1
                self._counts[OPENED] += 1
                self._last_connect_error = None
                if self._failing:
                    self._failing = False
                    log.info("pool %s: connected again", self.name)
                if not self._closed:
                    self._open += 1
                    self._give_locked(entry)
                    continue
                self._growing = False
            self.adapter.close(conn)
            return

    def invalidate(self, why: str) -> int:
        """Retire every current connection: idle ones now, borrowed ones when returned.

        Called when the node failed or changed role, so that no connection opened
        before that is used again. Returns how many idle connections were closed.
        """
        with self._lock:
            self._generation += 1
            idle = self._drain_idle_locked()
            self._counts[DISCARDED] += len(idle)
            self._grow_locked()
        for entry in idle:
            self.adapter.close(entry.conn)
        if idle:
            log.info("pool %s: closed %d idle connection(s): %s", self.name, len(idle), why)
        return len(idle)

    def cut_in_use(self, why: str) -> int:
        """Cut every borrowed connection's socket (`Adapter.abort`): a call blocked on one
        returns at once with a lost connection. Returns how many were cut.

        Called when the node stops answering its probes: a statement in flight there
        would otherwise wait for the driver's own timeout, which by default is none
        (MySQL) or minutes of TCP retransmission. Their borrowers give them back as lost.
        """
        with self._lock:
            borrowed = list(self._in_use.values())
        for entry in borrowed:
            self.adapter.abort(entry.conn)
        if borrowed:
            log.warning("pool %s: cut %d connection(s) in use: %s", self.name, len(borrowed), why)
        return len(borrowed)

    def fail_waiters(self, why: str) -> int:
        """Fail every queued caller at once with `NodeUnavailable` saying ``why``; returns how
        many there were.

        Called when the node is seen down: a connection borrowed before the failure may
        still be out (even by the same thread, under another alias), and waiting for it to
        come back would spend the callers' whole ``acquire_timeout`` on a dead node.
        """
        with self._lock:
            waiters = list(self._waiters)
            self._waiters.clear()
            for waiter in waiters:  # an exception each: they are raised in as many threads
                waiter.serve(None, NodeUnavailable(f"pool {self.name}: {why}", node=self.name))
        return len(waiters)

    # -- housekeeping --------------------------------------------------------

    def reclaim(self, entry: _Entry) -> None:
        """A borrowed entry whose borrower was garbage-collected without giving it back.

        Safe from a finalizer (any thread, any lock held): it only appends to a deque;
        housekeeping discards the connection (its state is unknown) and logs it.
        """
        self._dropped.append(entry)

    def _discard_dropped(self) -> None:
        for entry in _take_all(self._dropped):
            if self._in_use.get(entry.key) is not entry:
                continue  # returned after all
            log.warning("pool %s: a borrowed connection was dropped without being given back; discarded. "
                        "Borrowed at:\n%s", self.name, _format_stack(entry.borrower))
            self._discard(entry, "dropped by its borrower")

    def _housekeep(self) -> None:
        """Retire expired and long-idle connections, refill, report leaks. Never raises."""
        if self._dropped:
            self._discard_dropped()
        now = time.monotonic()
        retire: list[_Entry] = []
        cfg = self.config
        with self._lock:
            if self._closed:
                return
            examined = _take_all(self._idle)  # oldest-used first
            keep = []
            for entry in examined:
                idle_for = now - entry.last_used
                too_idle = cfg.max_idle is not None and idle_for > cfg.max_idle
                if (now >= entry.expires or entry.generation != self._generation
                        or (too_idle and self._open - len(retire) > cfg.min_size)):
                    retire.append(entry)
                else:
                    keep.append(entry)
            self._idle.extendleft(reversed(keep))  # behind connections returned meanwhile
            self._open -= len(retire)
            self._counts[CLOSED] += len(retire)
            self._serve_waiters_locked()
            self._grow_locked()
            leaks = []
            if cfg.leak_threshold is not None:
                for entry in list(self._in_use.values()):
                    if not entry.leak_reported and now - entry.borrowed_at > cfg.leak_threshold:
                        entry.leak_reported = True
                        leaks.append((now - entry.borrowed_at, entry.borrower))
                self._counts[LEAKS] += len(leaks)
        for entry in retire:
            self.adapter.close(entry.conn)
        for held, stack in leaks:
            message = (
                f"connection held for {held:.1f}s (leak_threshold {cfg.leak_threshold:.1f}s); borrowed at:\n"
                f"{_format_stack(stack)}"
            )
            log.warning("pool %s: %s", self.name, message)
            if self._on_event is not None:
                self._on_event("leak", message, held=held)

    # -- observation and shutdown ------------------------------------------------

    def wait_histogram(self) -> tuple[list[int], float, int]:
        """Acquire waits as (cumulative counts per `WAIT_BUCKETS` bound then +Inf, sum, count)."""
        with self._lock:
            counts = self._wait_counts_locked()
            total = self._wait_sum
        cumulative, running = [], 0
        for count in counts:
            running += count
            cumulative.append(running)
        return cumulative, total, running

    def _wait_counts_locked(self) -> list[int]:
        """Acquire waits per `WAIT_BUCKETS` bucket; the first (no wait) is counted lock-free."""
        counts = list(self._wait_buckets)
        counts[0] = self._unwaited.value
        return counts

    def stats(self) -> dict[str, Any]:
        """A snapshot of sizes, counters and acquire-wait percentiles (seconds)."""
        with self._lock:
            buckets = self._wait_counts_locked()
            snapshot: dict[str, Any] = {
                SIZE: self._open,
                MAX_SIZE: self.config.max_size,
                IDLE: len(self._idle),
                IN_USE: len(self._in_use),
                WAITING: len(self._waiters),
                ACQUIRED: sum(buckets) - self._retried,
                **self._counts,
            }
        snapshot[WAIT_P50] = _quantile(buckets, 0.50)
        snapshot[WAIT_P99] = _quantile(buckets, 0.99)
        return snapshot

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def outstanding(self) -> int:
        """Connections borrowed plus callers waiting: a lock-free load figure for balancers."""
        return len(self._in_use) + len(self._waiters)

    def _closed_error(self) -> PoolClosed:
        if self._removed:
            return NodeRemoved(f"node {self.name} was removed from the router")
        return PoolClosed(f"pool {self.name} is closed")

    def close(self, timeout: float = 5.0, *, removed: bool = False) -> None:
        """Close idle connections now and borrowed ones as they come back.

        Waits up to ``timeout`` seconds for borrowers; connections still out
        after that are logged and closed when they are returned. ``removed``: the
        node left the router, and a checkout raises `NodeRemoved` (which routing
        retries on another node) rather than `PoolClosed`.
        """
        check_wait("timeout", timeout)
        with self._lock:
            if self._closed:
                return
            self._removed = removed
            self._closed = True
            self._dormant = False
            idle = self._drain_idle_locked()
            while self._waiters:
                self._waiters.popleft().serve(None, self._closed_error())
        self._stop.set()
        for entry in idle:
            self.adapter.close(entry.conn)
        deadline = time.monotonic() + timeout
        with self._lock:
            # Until every connection is closed: borrowed ones, and those in the middle of a
            # lock-free checkout or return (out of both the idle deque and _in_use).
            while self._open > 0:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                # Lock-free returns do not notify: look again every 50 ms.
                self._drained.wait(min(remaining, 0.05))
            stragglers = list(self._in_use.values())
        if stragglers:
            log.warning(
                "pool %s: closed with %d connection(s) still borrowed; they close when returned",
                self.name, len(stragglers),
            )
        if self._maint.is_alive() and self._maint is not threading.current_thread():
            self._maint.join(timeout=max(0.0, deadline - time.monotonic()) + 1.0)

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def _take_all(idle: deque[_Entry]) -> list[_Entry]:
    """Empty the idle deque, oldest-used first, one atomic pop at a time: a lock-free
    checkout may pop concurrently, and each connection must go to exactly one taker."""
    taken = []
    while True:
        try:
            taken.append(idle.popleft())
        except IndexError:
            return taken


def _close_idle(idle: deque[_Entry], adapter: Adapter) -> None:
    """Finalizer of a pool that was never closed: close what is idle."""
    for entry in _take_all(idle):
        adapter.close(entry.conn)


def _quantile(buckets: list[int], q: float) -> float:
    """A quantile of the acquire waits, from the histogram: 0 in the no-wait bucket, else
    interpolated linearly within its bucket, as Prometheus' histogram_quantile does."""
    total = sum(buckets)
    if not total:
        return 0.0
    rank, seen = q * total, 0
    for index, count in enumerate(buckets):
        if count and seen + count >= rank:
            if index == 0:
                return 0.0
            low = WAIT_BUCKETS[index - 1]
            high = WAIT_BUCKETS[index] if index < len(WAIT_BUCKETS) else WAIT_BUCKETS[-1] * 2
            return low + (high - low) * (rank - seen) / count
        seen += count
    return WAIT_BUCKETS[-1]


def _maintain(pool_ref: weakref.ref[Pool], stop: threading.Event, interval: float) -> None:
    """Housekeeping loop; holds only a weak reference so an abandoned pool can be collected."""
    while not stop.wait(interval):
        pool = pool_ref()
        if pool is None:
            return
        try:
            pool._housekeep()
        except Exception:  # noqa: BLE001 - housekeeping must never kill its thread
            log.exception("pool %s: housekeeping failed", pool.name)
        del pool


def _capture_stack() -> list[tuple[Any, int]]:
    """The borrower's frames as (code, line) pairs: cheap now, formatted only on a leak."""
    frames: list[tuple[Any, int]] = []
    frame: Any = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename in _INTERNAL_FILES:
        frame = frame.f_back
    while frame is not None and len(frames) < _STACK_LIMIT:
        frames.append((frame.f_code, frame.f_lineno))
        frame = frame.f_back
    return frames


def _format_stack(stack: list[tuple[Any, int]] | None) -> str:
    if not stack:
        return "  (stack not recorded)"
    lines = []
    for code, lineno in reversed(stack):
        lines.append(f'  File "{code.co_filename}", line {lineno}, in {code.co_name}')
        source = linecache.getline(code.co_filename, lineno).strip()
        if source:
            lines.append(f"    {source}")
    return "\n".join(lines)
