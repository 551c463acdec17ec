"""The lease in asyncio: `dbrouter.lease.Lease` with its statements awaited.

Taking a lease (breaker admission, then an awaited pool checkout) and releasing it
(the decision table, the breaker, the pool) are the sync lease's own code: only the
calls on the connection differ. The hung-statement guard is a timer on the loop
instead of the watchdog thread: past the adapter's limit (statement timeout plus
grace) the connection is cut (its socket shut down) and `Hung` raised. A call's
deadline (`dbrouter.deadline`) is the same kind of timer: at the deadline the
connection is cut, the server asked to cancel the statement (`dbrouter.deadline.CANCELLER`,
from a thread of its own), and `DeadlineExceeded` raised, the node not blamed.
A task cancelled by its caller aborts the connection too (its state is unknown); the
lease then releases it as interrupted, which does not blame the node.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable, TypeVar, cast

from ..deadline import CANCELLER, Deadline
from ..deadline import current as current_deadline
from ..decisions import Hung
from ..lease import HeldLease, Lease, admit, checkout_failed, checkout_wait

if TYPE_CHECKING:
    from ..adapters.aio import AsyncAdapter
    from ..adapters.base import Result
    from ..topology import Node

__all__ = ["AsyncHeldLease", "AsyncLease", "guarded", "statement", "take"]

T = TypeVar("T")

# After the socket was cut, how long a driver may take to notice before its task is cancelled.
_NOTICE = 1.0


async def guarded(adapter: AsyncAdapter, conn: Any, call: Awaitable[T], limit: float,
                  cut: Callable[[], None] | None = None) -> T:
    """``await call`` (a call on ``conn``), raising `asyncio.TimeoutError` after ``limit`` seconds.

    At the limit the connection's socket is cut (``cut()`` if given, which must shut it
    down, else `AsyncAdapter.abort`; on the loop, before the call's task resumes), so the driver's own
    wait ends with a connection error at once; the task is not cancelled first, because a
    driver handles a cancellation by talking to the server: psycopg 3 sends a cancel
    request and waits for the statement to end, 5 s and 5 s more, on a node that does not
    answer. Only a driver that has not noticed the cut ``_NOTICE`` later is cancelled.
    """
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    fired: list[bool] = []
    later: list[asyncio.TimerHandle] = []

    def fire() -> None:
        fired.append(True)
        if cut is None:
            adapter.abort(conn)
        else:
            cut()
        later.append(loop.call_later(_NOTICE, task.cancel))

    handle = loop.call_later(limit, fire)
    try:
        return await call
    except BaseException as exc:
        if not fired:
            raise
        if isinstance(exc, asyncio.CancelledError):
            uncancel = getattr(task, "uncancel", None)
            if uncancel is not None:  # Python 3.11+: this cancellation was ours, not the caller's
                uncancel()
        raise asyncio.TimeoutError(f"no answer within {limit:.3g}s") from exc
    finally:
        handle.cancel()
        for pending in later:
            pending.cancel()


class AsyncLease(Lease):
    """A connection borrowed from an `AsyncPool`; release it exactly once (`Lease.release`)."""

    __slots__ = ()

    async def execute(self, sql: str, params: Any = None) -> Result:  # type: ignore[override]
        """Run one statement under the hung-statement guard; raises `Hung` when it was cut."""
        self._timed = True
        return await self.run(lambda adapter, conn: cast("Awaitable[Result]", adapter.execute(conn, sql, params)))

    async def run(self, op: Callable[[AsyncAdapter, Any], Awaitable[T]], extra: float = 0.0) -> T:  # type: ignore[override]
        """``await op(adapter, conn)`` under the hung-statement guard (``extra`` seconds more
        for work that waits on purpose, such as a replay wait) and the call's deadline
        (`dbrouter.deadline`: cut when it passes, `DeadlineExceeded`)."""
        node = self.node
        adapter: AsyncAdapter = node.pool.adapter  # type: ignore[assignment]  # an AsyncPool's
        deadline = current_deadline()
        if deadline is not None:
            return await self._run_within(deadline, adapter, op, extra)
        limit = adapter.guard_timeout
        if limit is None:
            try:
                return await op(adapter, self.conn)
            except asyncio.CancelledError:
                self._aborted = True
                adapter.abort(self.conn)
                raise
        try:
            return await guarded(adapter, self.conn, op(adapter, self.conn), limit + extra, self._cut_hung)
        except asyncio.TimeoutError as exc:
            raise self._hung(limit + extra) from exc
        except asyncio.CancelledError:
            self._aborted = True
            adapter.abort(self.conn)
            raise

    async def _run_within(self, deadline: Deadline, adapter: AsyncAdapter, op: Callable[[AsyncAdapter, Any], Awaitable[T]],
                          extra: float) -> T:
        """`run` for a call with a deadline: one timer on the loop, at the hung-statement
        guard's limit or the deadline, whichever comes first; the deadline's cut also asks
        the server to cancel (as `Lease._run_by_deadline`, whose messages these are)."""
        node = self.node
        started = time.monotonic()
        left = deadline.at - started
        if left <= 0:
            raise self._judged(deadline.exceeded(f"before a statement on {node.name} was sent", node.name))
        guard = adapter.guard_timeout
        hung_first = guard is not None and guard + extra < left
        limit = guard + extra if guard is not None and hung_first else left
        try:
            result = await guarded(adapter, self.conn, op(adapter, self.conn), limit,
                                   self._cut_hung if hung_first else self.cut_now)
        except asyncio.TimeoutError as exc:
            deadline.note(f"statements on {node.name}", time.monotonic() - started)
            if hung_first:
                raise self._hung(limit) from exc
            cancel = ("the server was asked to cancel it" if self._cancel_sent
                      else "no cancel sent: the node is seen down, or cancels are busy")
            raise self._judged(deadline.exceeded(f"in a statement on {node.name}, cut ({cancel})",
                                                 node.name)) from exc
        except asyncio.CancelledError:
            deadline.note(f"statements on {node.name}", time.monotonic() - started)
            self._aborted = True
            adapter.abort(self.conn)
            raise
        except BaseException:
            deadline.note(f"statements on {node.name}", time.monotonic() - started)
            raise
        deadline.note(f"statements on {node.name}", time.monotonic() - started)
        return result  # cut just as it finished: the answer is good, the socket is not (marked by the cut)

    def _cut_hung(self) -> None:
        """The hung-statement guard's cut (on the loop): the connection is discarded."""
        self._aborted = True
        self.node.pool.adapter.abort(self.conn)

    def _hung(self, limit: float) -> Hung:
        self._aborted = True
        node = self.node
        return Hung(f"node {node.name} did not answer within {limit:.3g}s "
                    "(statement timeout plus grace): hung or unreachable", node=node.name)

    def cut_now(self) -> None:
        """As `Lease.cut_now`, on the loop (the deadline passed, or a hedge won): marked
        cut, the server asked to cancel the statement (from a thread of its own), then the
        socket shut down."""
        self._aborted = self._cut = True
        node, conn = self.node, self.conn
        adapter: AsyncAdapter = node.pool.adapter  # type: ignore[assignment]
        self._cancel_sent = CANCELLER.cancel(node.adapter, adapter.session_id(conn), node.healthy)
        adapter.abort(conn)


class AsyncHeldLease(AsyncLease, HeldLease):
    """An `AsyncLease` handed to the caller, who may drop it without releasing it."""

    __slots__ = ()


async def take(node: Node, timeout: float | None = None, kind: type[AsyncLease] = AsyncLease) -> AsyncLease:
    """A lease on ``node`` if its breaker admits the call (as `dbrouter.lease.take`, whose
    admission and deadline rules these are)."""
    trial = admit(node)
    deadline = current_deadline()
    started = 0.0 if deadline is None else time.monotonic()
    try:
        wait = timeout if deadline is None else checkout_wait(node, timeout, deadline, started)
        entry = await node.pool.borrow(wait)  # type: ignore[misc]  # an AsyncPool's
    except BaseException as exc:
        checkout_failed(node, exc, trial, deadline, started, timeout)
        raise
    if deadline is not None:
        deadline.note(f"pool wait on {node.name}", time.monotonic() - started)
    return kind(node, entry, trial)


def statement(sql: str, params: Any) -> Callable[[AsyncLease], Awaitable[tuple[Any, int]]]:
    """One statement as an operation on an async lease (as `dbrouter.routing.statement`)."""
    async def execute(lease: AsyncLease) -> tuple[Any, int]:
        return await lease.execute(sql, params)

    return execute
