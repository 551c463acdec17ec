"""The lease in asyncio: `dbrouter.lease.Lease` with its statements awaited.

Taking a lease (breaker admission, then an awaited pool checkout) and releasing it
(the decision table, the breaker, the pool) are the sync lease's own code: only the
calls on the connection differ. The hung-statement guard is a timer on the loop
instead of the watchdog thread: past the adapter's limit (statement timeout plus
grace) the call's task is cancelled, the connection aborted, and `Hung` raised.
A task cancelled by its caller aborts the connection too (its state is unknown); the
lease then releases it as interrupted, which does not blame the node.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Awaitable, Callable, TypeVar, cast

from ..decisions import BreakerOpen, Hung
from ..errors import ConnectError
from ..lease import HeldLease, Lease, not_taken
from ..resilience import REFUSED, TRIAL

if TYPE_CHECKING:
    from ..adapters.aio import AsyncAdapter
    from ..adapters.base import Result
    from ..topology import Node

__all__ = ["AsyncHeldLease", "AsyncLease", "guarded", "take"]

T = TypeVar("T")

# After the socket was cut, how long a driver may take to notice before its task is cancelled.
_NOTICE = 1.0


async def guarded(adapter: AsyncAdapter, conn: Any, call: Awaitable[T], limit: float) -> T:
    """``await call`` (a call on ``conn``), raising `asyncio.TimeoutError` after ``limit`` seconds.

    At the limit the connection's socket is cut (`AsyncAdapter.abort`), so the driver's own
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

    def cut() -> None:
        fired.append(True)
        adapter.abort(conn)
        later.append(loop.call_later(_NOTICE, task.cancel))

    handle = loop.call_later(limit, cut)
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
        for work that waits on purpose, such as a replay wait)."""
        node = self.node
        adapter: AsyncAdapter = node.pool.adapter  # type: ignore[assignment]  # an AsyncPool's
        limit = adapter.guard_timeout
        if limit is None:
            try:
                return await op(adapter, self.conn)
            except asyncio.CancelledError:
                self._aborted = True
                adapter.abort(self.conn)
                raise
        try:
            return await guarded(adapter, self.conn, op(adapter, self.conn), limit + extra)
        except asyncio.TimeoutError as exc:
            self._aborted = True
            raise Hung(f"node {node.name} did not answer within {limit + extra:.3g}s "
                       "(statement timeout plus grace): hung or unreachable", node=node.name) from exc
        except asyncio.CancelledError:
            self._aborted = True
            adapter.abort(self.conn)
            raise


class AsyncHeldLease(AsyncLease, HeldLease):
    """An `AsyncLease` handed to the caller, who may drop it without releasing it."""

    __slots__ = ()


async def take(node: Node, timeout: float | None = None, kind: type[AsyncLease] = AsyncLease) -> AsyncLease:
    """A lease on ``node`` if its breaker admits the call (as `dbrouter.lease.take`)."""
    breaker = node.breaker
    trial = False
    if not breaker.clean:
        admitted = breaker.admit()
        if admitted is REFUSED:
            raise BreakerOpen(f"node {node.name}: circuit breaker {breaker.state} after {breaker.failures} failures",
                              node=node.name)
        trial = admitted is TRIAL
    try:
        entry = await node.pool.borrow(timeout)  # type: ignore[misc]  # an AsyncPool's
    except BaseException as exc:
        not_taken(node, exc)
        if trial and not isinstance(exc, ConnectError):
            breaker.abandon_trial()
        raise
    return kind(node, entry, trial)
