"""A connection pool for one node, on an asyncio event loop: the twin of `dbrouter.pool.Pool`.

Same knobs (``min_size``, ``max_size``, ``acquire_timeout``, ``max_waiting``,
``max_lifetime``, ``max_idle``, ``validation_bypass``, ``leak_threshold``), same
statistics (the keys of `dbrouter.pool`), same errors, same fairness: waiters are
served oldest first, and a checkout does not take an idle connection while anyone
waits. What differs is only what the loop makes simpler: everything runs on the
pool's loop, one step at a time, so the bookkeeping needs no lock; the waits are
futures; connects, resets and housekeeping are tasks.

The lease calls `give_back` and `invalidate` from plain code on the loop: they return at
once (a connection that needs a reset gets a task for it). The control plane's thread
calls `invalidate` (on a failover) and `close`: from another thread those are handed to
the loop (``call_soon_threadsafe``), whose state the pool's is. `reclaim` (a finalizer's)
only appends to a deque, and `stats` only reads. `borrow` and `aclose` are awaited.

A pool is bound to the loop it was opened on; use it from that loop only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from bisect import bisect_left
from collections import deque
from typing import Any, Callable

from ..adapters.aio import AsyncAdapter
from ..adapters.base import ReturnState
from ..config import PoolConfig, check_wait
from ..deadline import current as current_deadline
from ..errors import ConnectError, NodeRemoved, NodeUnavailable, PoolClosed, PoolError, PoolTimeout, TooManyWaiting
from ..pool import (
    ACQUIRED,
    CLOSED,
    CONNECT_ERRORS,
    DISCARDED,
    IDLE,
    IN_USE,
    LEAKS,
    MAX_SIZE,
    OPENED,
    REJECTED,
    SIZE,
    TIMEOUTS,
    WAIT_BUCKETS,
    WAIT_P50,
    WAIT_P99,
    WAITING,
    _capture_stack,
    _Entry,
    _format_stack,
    _quantile,
)
from .lease import guarded

__all__ = ["AsyncPool"]

log = logging.getLogger("dbrouter.pool")

_BROKEN = ReturnState.BROKEN
_DIRTY = ReturnState.DIRTY
_EVENT_INTERVAL = 1.0  # at most one pool_exhausted event per second per pool


class _Expired(Exception):
    """A waiter's deadline passed (never leaves the pool: `borrow` raises `PoolTimeout`)."""


def _expire(waiter: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_exception(_Expired())


class AsyncPool:
    """Connections to one node for one event loop; see the module docstring."""

    def __init__(self, adapter: AsyncAdapter, config: PoolConfig | None = None, *, name: str | None = None,
                 on_event: Callable[..., None] | None = None) -> None:
        self.adapter = adapter
        self.config = config or PoolConfig()
        self.name = name or adapter.node
        self._return_state = adapter.return_state
        self._bypass = self.config.validation_bypass
        self._leak_threshold = self.config.leak_threshold
        self._on_event = on_event
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle: deque[_Entry] = deque()
        self.draining: set[int] = set()  # always empty: an asyncio hedge's loser is cut (see `Pool.draining`)
        self._in_use: dict[int, _Entry] = {}
        self._waiters: deque[asyncio.Future[_Entry]] = deque()
        self._since: dict[int, float] = {}  # id(waiter future) -> when it began to wait
        self._dropped: deque[_Entry] = deque()
        self._tasks: set[asyncio.Task[Any]] = set()  # connects, resets, closes: kept until done
        self._generation = 0
        self._open = 0  # idle + in use + being reset
        self._connecting = 0
        self._growing = False
        self._opened = False
        self._closed = False
        self._removed = False
        self._last_connect_error: BaseException | None = None
        self._failing = False
        self._counts = {TIMEOUTS: 0, REJECTED: 0, CONNECT_ERRORS: 0, OPENED: 0, CLOSED: 0, DISCARDED: 0, LEAKS: 0}
        self._retried = 0
        self._wait_buckets = [0] * (len(WAIT_BUCKETS) + 1)
        self._wait_sum = 0.0
        self._last_exhausted_event = 0.0
        self._housekeeper: asyncio.Task[None] | None = None
        self._loop_thread: int | None = None

    def has_idle(self) -> bool:
        """Whether a checkout now would find a connection without waiting (a hint)."""
        return bool(self._idle)

    def __repr__(self) -> str:
        return f"<AsyncPool {self.name} open={self._open} idle={len(self._idle)} max={self.config.max_size}>"

    # -- life -----------------------------------------------------------------------

    def open(self) -> AsyncPool:
        """Start housekeeping and ``min_size`` connects on the running loop; idempotent."""
        if self._opened or self._closed:
            return self
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._opened = True
        self._housekeeper = self._loop.create_task(self._housekeeping(), name=f"dbrouter-{self.name}-maint")
        self._grow()
        return self

    def open_soon(self, loop: asyncio.AbstractEventLoop, loop_thread: int) -> None:
        """Open on ``loop`` (run by the thread ``loop_thread``), from any thread. A pool made off
        the loop (a node the discovery thread adds) is bound to the loop at once, so that
        what other threads call on it (`close`, `invalidate`) is handed to the loop, and it
        opens there soon after (or at its first `borrow`, whichever comes first)."""
        if self._opened or self._closed:
            return
        self._loop, self._loop_thread = loop, loop_thread
        if threading.get_ident() == loop_thread:
            self.open()
            return
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: the pool never opens
            loop.call_soon_threadsafe(self.open)

    def _spawn(self, coro: Any, name: str) -> bool:
        """Run ``coro`` as a task of the pool's loop; False (``coro`` dropped) when the loop is gone."""
        loop = self._loop
        if loop is None or loop.is_closed() or not loop.is_running():
            coro.close()  # a stopped loop would never run it
            return False
        task = loop.create_task(coro, name=f"dbrouter-{self.name}-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    def _close_later(self, conn: Any) -> None:
        """Close ``conn`` in a task; without a loop to run it, cut it now."""
        if not self._spawn(self._close_conn(conn), "close"):
            self.adapter.discard(conn)

    # -- checkout and return -----------------------------------------------------------

    async def borrow(self, timeout: float | None = None) -> _Entry:
        """Check out a connection's entry; give it back with `give_back`.

        Waits up to ``timeout`` (default ``acquire_timeout``): `PoolTimeout`,
        `TooManyWaiting`, `ConnectError`, `PoolClosed`.
        """
        if timeout is None:
            wait_for = self.config.acquire_timeout
        else:
            check_wait("timeout", timeout)
            wait_for = timeout
        if not self._opened:
            self.open()
        deadline: float | None = None
        while True:
            if self._closed:
                raise self._closed_error()
            entry: _Entry | None = None
            if not self._waiters and self._idle:
                entry = self._idle.pop()  # most recently used: warm
                self._in_use[entry.key] = entry
                self._wait_buckets[0] += 1
                now = handed = time.monotonic()
            else:
                front = deadline is not None  # served an unusable connection: keep our place
                if deadline is None:
                    deadline = time.monotonic() + wait_for
                entry = await self._queue(deadline, wait_for, front)
                now = time.monotonic()
                # Idle as of its hand-over, not of now: a loop that is late to resume this
                # task must not add a liveness ping to every checkout, making it later still.
                handed = entry.borrowed_at
            if now >= entry.expires or entry.generation != self._generation:
                self._discard(entry, "reached max_lifetime" if now >= entry.expires else "invalidated",
                              not_acquired=True)
                continue
            if handed - entry.last_used > self._bypass:
                # Bounded by connect_timeout and by the call's deadline (dbrouter.deadline), as
                # `dbrouter.pool.Pool` bounds it: cut then, the connection discarded.
                limit = self.adapter.options.connect_timeout
                call_deadline = current_deadline()
                by_deadline = False
                if call_deadline is not None:
                    left = call_deadline.at - now
                    if left <= 0:  # no time left to check it: it stays pooled
                        self.give_back(entry)
                        raise call_deadline.exceeded(f"before a connection of {self.name} was checked", self.name)
                    by_deadline, limit = left < limit, min(left, limit)
                try:
                    await guarded(self.adapter, entry.conn, self.adapter.ping(entry.conn), limit)
                except (Exception, asyncio.CancelledError) as exc:
                    self.adapter.abort(entry.conn)
                    cut = by_deadline and isinstance(exc, asyncio.TimeoutError)
                    self._discard(entry, "liveness check cut at the call's deadline" if cut
                                  else f"failed liveness check: {exc.__class__.__name__}", not_acquired=True)
                    if isinstance(exc, asyncio.CancelledError):
                        raise
                    if cut:
                        assert call_deadline is not None
                        call_deadline.note(f"liveness check on {self.name}", time.monotonic() - now)
                        raise call_deadline.exceeded(f"in the liveness check of a connection of {self.name}",
                                                     self.name) from exc
                    continue
            entry.borrowed_at = now
            if self._leak_threshold is not None:
                entry.borrower = _capture_stack()
                entry.leak_reported = False
            return entry

    async def _queue(self, deadline: float, timeout: float, front: bool) -> _Entry:
        limit = self.config.max_waiting
        if limit and not front and len(self._waiters) >= limit:
            self._counts[REJECTED] += 1
            raise TooManyWaiting(
                f"pool {self.name}: {len(self._waiters)} callers already waiting for a connection "
                f"(max_waiting {limit}; size {self._open}/{self.config.max_size}): refused at once", node=self.name)
        assert self._loop is not None
        waiter: asyncio.Future[_Entry] = self._loop.create_future()
        self._since[id(waiter)] = time.monotonic()
        if front:
            self._waiters.appendleft(waiter)
        else:
            self._waiters.append(waiter)
        self._serve_waiters()
        if not waiter.done():
            self._grow()
        # The wait is the future itself, with one timer that fails it at the deadline: a
        # wait_for would make a task per wait (a third of a checkout's CPU with 1,000 waiters).
        expire = self._loop.call_later(max(0.0, deadline - time.monotonic()), _expire, waiter)
        try:
            return await waiter
        except _Expired:
            self._leave(waiter)
            error, notify = self._timeout_error(timeout)
            if notify and self._on_event is not None:
                self._on_event("pool_exhausted", str(error), waiting=len(self._waiters))
            raise error from self._last_connect_error
        except asyncio.CancelledError:
            self._leave(waiter)
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.give_back(waiter.result())  # served, but the caller is gone
            raise
        finally:
            expire.cancel()

    def _leave(self, waiter: asyncio.Future[_Entry]) -> None:
        self._since.pop(id(waiter), None)
        with contextlib.suppress(ValueError):  # served or failed meanwhile: not queued any more
            self._waiters.remove(waiter)
        if not waiter.done():
            waiter.cancel()

    def _timeout_error(self, timeout: float) -> tuple[PoolTimeout, bool]:
        self._counts[TIMEOUTS] += 1
        message = (f"pool {self.name}: no connection free after {timeout:.3g}s "
                   f"(size {self._open}/{self.config.max_size}, in use {len(self._in_use)}, "
                   f"{len(self._waiters) + 1} waiting)")
        if self._last_connect_error is not None and self._open < self.config.max_size:
            message += f"; last connect error: {self._last_connect_error}"
        now = time.monotonic()
        notify = now - self._last_exhausted_event >= _EVENT_INTERVAL
        if notify:
            self._last_exhausted_event = now
        return PoolTimeout(message, node=self.name), notify

    def _serve_waiters(self) -> None:
        waiters, idle = self._waiters, self._idle
        while waiters and idle:
            waiter = waiters.popleft()
            since = self._since.pop(id(waiter), None)
            if waiter.done():  # cancelled: gone
                continue
            entry = idle.pop()
            self._in_use[entry.key] = entry
            entry.borrowed_at = handed = time.monotonic()  # the hand-over; borrow sets the real one
            waited = handed - since if since is not None else 0.0
            self._wait_buckets[max(1, bisect_left(WAIT_BUCKETS, waited))] += 1
            self._wait_sum += waited
            waiter.set_result(entry)

    def give_back(self, entry: _Entry, *, broken: bool = False) -> float:
        """Take a borrowed entry back (``broken=True`` discards it); returns the time (monotonic).
        Never waits: a connection that needs a reset gets a task for it."""
        now = time.monotonic()
        if entry.generation != self._generation:
            self._discard(entry, "invalidated")
            return now
        try:
            state = _BROKEN if broken else self._return_state(entry.conn)
        except Exception:
            log.exception("pool %s: cannot tell the state of a returned connection; discarding it", self.name)
            state = _BROKEN
        if state is _BROKEN or now >= entry.expires or self._closed:
            self._discard(entry, "broken" if state is _BROKEN else "retired", polite=state is not _BROKEN)
            return now
        if state is _DIRTY:
            if not self._spawn(self._reset(entry), "reset"):
                self._discard(entry, "needs a reset, and its loop is gone")
            return now
        self._park(entry, now)
        return now

    def _park(self, entry: _Entry, now: float) -> None:
        entry.last_used = now
        entry.borrower = None
        self._in_use.pop(entry.key, None)
        self._idle.append(entry)
        if self._waiters:
            self._serve_waiters()

    async def _reset(self, entry: _Entry) -> None:
        try:
            await guarded(self.adapter, entry.conn, self.adapter.reset(entry.conn), self.adapter.options.connect_timeout)
        except (Exception, asyncio.CancelledError) as exc:  # noqa: BLE001 - a connection that cannot be reset goes
            self.adapter.abort(entry.conn)
            self._discard(entry, f"reset failed: {exc.__class__.__name__}")
            return
        if self._closed or entry.generation != self._generation:
            self._discard(entry, "closed or invalidated during its reset")
            return
        self._park(entry, time.monotonic())

    def _discard(self, entry: _Entry, why: str, *, not_acquired: bool = False, polite: bool = False) -> None:
        """Drop a connection that must not be reused: cut at once (broken, invalidated: a
        goodbye to a node that failed could wait), or closed in a task when ``polite``."""
        log.debug("pool %s: discarding connection (%s)", self.name, why)
        if not_acquired:
            self._retried += 1
        self._in_use.pop(entry.key, None)
        self._open -= 1
        self._counts[DISCARDED] += 1
        self._counts[CLOSED] += 1
        if polite:
            self._close_later(entry.conn)
        else:
            self.adapter.discard(entry.conn)
        if not self._closed:
            self._grow()

    async def _close_conn(self, conn: Any) -> None:
        try:
            await guarded(self.adapter, conn, self.adapter.close(conn), 1.0)
        except (Exception, asyncio.TimeoutError):  # noqa: BLE001 - closing a broken connection may fail
            self.adapter.abort(conn)

    # -- growth -------------------------------------------------------------------------

    def _needs_connection(self) -> bool:
        total = self._open + self._connecting
        if total >= self.config.max_size:
            return False
        return bool(self._waiters) or total < self.config.min_size

    def _grow(self) -> None:
        if self._growing or self._closed or not self._needs_connection():
            return
        self._growing = True
        self._spawn(self._connector(), "connect")

    async def _connector(self) -> None:
        """Open connections one at a time while someone needs one."""
        try:
            while not self._closed and self._needs_connection():
                self._connecting += 1
                try:
                    conn = await self.adapter.connect()
                except Exception as exc:  # noqa: BLE001 - reported to waiters and in stats
                    self._connecting -= 1
                    error = exc if isinstance(exc, ConnectError) else ConnectError(
                        f"cannot connect to node {self.name}: {exc}", node=self.name)
                    self._counts[CONNECT_ERRORS] += 1
                    self._last_connect_error = error
                    if self._open == 0:
                        while self._waiters:  # nobody holds a connection that could come back: fail fast
                            waiter = self._waiters.popleft()
                            self._since.pop(id(waiter), None)
                            if not waiter.done():
                                waiter.set_exception(error)
                    first, self._failing = not self._failing, True
                    log.log(logging.WARNING if first else logging.DEBUG, "pool %s: %s", self.name, error)
                    return
                self._connecting -= 1
                self._counts[OPENED] += 1
                self._last_connect_error = None
                if self._failing:
                    self._failing = False
                    log.info("pool %s: connected again", self.name)
                if self._closed:
                    await self._close_conn(conn)
                    return
                entry = _Entry(conn, time.monotonic(), self.config.max_lifetime, self._generation)
                self._open += 1
                self._idle.append(entry)
                self._serve_waiters()
        finally:
            self._growing = False

    def _elsewhere(self, call: Callable[..., Any], *args: Any) -> bool:
        """From a thread other than the loop's (the control plane's): hand ``call`` to the
        loop and say so; the pool's state is the loop's alone."""
        if self._loop_thread is None or threading.get_ident() == self._loop_thread:
            return False
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # closed meanwhile: nothing left to do
                loop.call_soon_threadsafe(call, *args)
        return True

    def invalidate(self, why: str) -> int:
        """Retire every current connection: idle ones now, borrowed ones when returned. From
        another thread (the control plane, on a failover), it runs on the loop soon after and
        returns 0."""
        if self._elsewhere(self.invalidate, why):
            return 0
        self._generation += 1
        idle = list(self._idle)
        self._idle.clear()
        self._open -= len(idle)
        self._counts[CLOSED] += len(idle)
        self._counts[DISCARDED] += len(idle)
        for entry in idle:  # the node failed or changed role: cut, no goodbye
            self.adapter.discard(entry.conn)
        self._grow()
        if idle:
            log.info("pool %s: closed %d idle connection(s): %s", self.name, len(idle), why)
        return len(idle)

    def cut_in_use(self, why: str) -> int:
        """Cut every borrowed connection (see `dbrouter.pool.Pool.cut_in_use`). From another
        thread it runs on the loop soon after and returns 0."""
        if self._elsewhere(self.cut_in_use, why):
            return 0
        borrowed = list(self._in_use.values())
        for entry in borrowed:
            self.adapter.abort(entry.conn)
        if borrowed:
            log.warning("pool %s: cut %d connection(s) in use: %s", self.name, len(borrowed), why)
        return len(borrowed)

    def fail_waiters(self, why: str) -> int:
        """Fail every queued caller with `NodeUnavailable` saying ``why`` (the node was seen down; see
        `dbrouter.pool.Pool.fail_waiters`). From another thread it runs on the loop soon
        after and returns 0."""
        if self._elsewhere(self.fail_waiters, why):
            return 0
        failed = 0
        while self._waiters:
            waiter = self._waiters.popleft()
            self._since.pop(id(waiter), None)
            if not waiter.done():
                waiter.set_exception(NodeUnavailable(f"pool {self.name}: {why}", node=self.name))
                failed += 1
        return failed

    # -- housekeeping ---------------------------------------------------------------------

    def reclaim(self, entry: _Entry) -> None:
        """A borrowed entry whose borrower was collected without giving it back (any thread):
        housekeeping discards it."""
        self._dropped.append(entry)

    async def _housekeeping(self) -> None:
        interval = self.config.maintenance_interval
        while not self._closed:
            await asyncio.sleep(interval)
            try:
                self._housekeep()
            except Exception:  # noqa: BLE001 - housekeeping must never end
                log.exception("pool %s: housekeeping failed", self.name)

    def _housekeep(self) -> None:
        while self._dropped:
            entry = self._dropped.popleft()
            if self._in_use.get(entry.key) is entry:
                log.warning("pool %s: a borrowed connection was dropped without being given back; discarded. "
                            "Borrowed at:\n%s", self.name, _format_stack(entry.borrower))
                self.adapter.abort(entry.conn)
                self._discard(entry, "dropped by its borrower")
        now = time.monotonic()
        cfg = self.config
        keep: list[_Entry] = []
        retire: list[_Entry] = []
        for entry in self._idle:  # oldest-used first
            too_idle = cfg.max_idle is not None and now - entry.last_used > cfg.max_idle
            if (now >= entry.expires or entry.generation != self._generation
                    or (too_idle and self._open - len(retire) > cfg.min_size)):
                retire.append(entry)
            else:
                keep.append(entry)
        if retire:
            self._idle = deque(keep)
            self._open -= len(retire)
            self._counts[CLOSED] += len(retire)
            for entry in retire:
                self._close_later(entry.conn)
        self._serve_waiters()
        self._grow()
        if cfg.leak_threshold is not None:
            for entry in list(self._in_use.values()):
                held = now - entry.borrowed_at
                if not entry.leak_reported and held > cfg.leak_threshold:
                    entry.leak_reported = True
                    self._counts[LEAKS] += 1
                    message = (f"connection held for {held:.1f}s (leak_threshold {cfg.leak_threshold:.1f}s); "
                               f"borrowed at:\n{_format_stack(entry.borrower)}")
                    log.warning("pool %s: %s", self.name, message)
                    if self._on_event is not None:
                        self._on_event("leak", message, held=held)

    # -- observation and shutdown -------------------------------------------------------------

    def wait_histogram(self) -> tuple[list[int], float, int]:
        cumulative, running = [], 0
        for count in self._wait_buckets:
            running += count
            cumulative.append(running)
        return cumulative, self._wait_sum, running

    def stats(self) -> dict[str, Any]:
        buckets = list(self._wait_buckets)
        return {
            SIZE: self._open,
            MAX_SIZE: self.config.max_size,
            IDLE: len(self._idle),
            IN_USE: len(self._in_use),
            WAITING: len(self._waiters),
            ACQUIRED: sum(buckets) - self._retried,
            **self._counts,
            WAIT_P50: _quantile(buckets, 0.50),
            WAIT_P99: _quantile(buckets, 0.99),
        }

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def outstanding(self) -> int:
        return len(self._in_use) + len(self._waiters)

    def _closed_error(self) -> PoolClosed:
        if self._removed:
            return NodeRemoved(f"node {self.name} was removed from the router")
        return PoolClosed(f"pool {self.name} is closed")

    def close(self, timeout: float = 0.0, *, removed: bool = False) -> None:
        """Stop: fail the waiters, close idle connections (in tasks), and borrowed ones as they
        come back. Never waits; `aclose` waits for the borrowers too. From another thread, it
        runs on the loop soon after."""
        if self._closed or self._elsewhere(lambda: self.close(timeout, removed=removed)):
            return
        self._closed = True
        self._removed = removed
        error = self._closed_error()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error)
        self._since.clear()
        idle = list(self._idle)
        self._idle.clear()
        self._open -= len(idle)
        self._counts[CLOSED] += len(idle)
        for entry in idle:
            self._close_later(entry.conn)
        if self._housekeeper is not None:
            self._housekeeper.cancel()

    async def aclose(self, timeout: float = 5.0, *, removed: bool = False) -> None:
        """`close`, then wait up to ``timeout`` for borrowed connections to come back and for
        the pool's tasks (connects, resets, closes) to finish."""
        check_wait("timeout", timeout)
        self.close(removed=removed)
        deadline = time.monotonic() + timeout
        while self._in_use and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self._in_use:
            log.warning("pool %s: closed with %d connection(s) still borrowed; they close when returned",
                        self.name, len(self._in_use))
        pending = [t for t in self._tasks if not t.done()]
        if self._housekeeper is not None:
            pending.append(self._housekeeper)
        if pending:
            await asyncio.wait(pending, timeout=max(0.05, deadline - time.monotonic()))
            for task in pending:
                if not task.done():
                    task.cancel()

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Until ``min_size`` connections are open; `PoolTimeout` otherwise."""
        check_wait("timeout", timeout)
        if not self._opened:
            self.open()
        deadline = time.monotonic() + timeout
        while self._open < self.config.min_size:
            if time.monotonic() >= deadline:
                raise PoolTimeout(f"pool {self.name}: {self._open} of min_size {self.config.min_size} connections "
                                  f"open after {timeout:.1f}s", node=self.name) from self._last_connect_error
            self._grow()
            await asyncio.sleep(0.01)

    def entry_of(self, conn: Any) -> _Entry:
        entry = self._in_use.get(id(conn))
        if entry is None or entry.conn is not conn:
            raise PoolError(f"connection returned to pool {self.name} does not belong to it or was returned twice")
        return entry
