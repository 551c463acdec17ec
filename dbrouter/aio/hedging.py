"""Hedged reads in asyncio: `dbrouter.hedging`'s rules, with the hedge as a task.

The threshold (``hedge_after``: seconds, or ``"auto"``), the budget (``hedge_budget``)
and the counts are the sync router's `HedgePolicy` object itself (the `AsyncRouter`'s
``_Control`` router builds it); only the race is written again here. As for `Router`,
only `AsyncRouter.read` is hedged: never writes, transactions, sessions, streams or
``unchecked`` reads, and only onto another replica.

The race (`_Race`) runs on the loop, one step at a time, so it needs no lock: the caller's
task runs the read on the first node; a loop timer started with its statement starts the
hedge as a task at the threshold, if the budget allows. Whoever answers first wins; the
other's lease is marked cut before its socket is (`AsyncLease.cut_now`: discarded, its node
not blamed, its statement cancelled on the server from a thread), and its task ends on its
own once the driver sees the cut.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from ..adapters.base import Rows
from ..decisions import Phase, Work
from ..retrying import Retry
from .lease import AsyncLease, statement, take

if TYPE_CHECKING:
    from ..hedging import HedgePolicy
    from ..topology import Node
    from .router import AsyncRouter

__all__ = ["AsyncHedger"]

log = logging.getLogger("dbrouter.hedging")

_RUNNING, _FIRST_WON, _HEDGE_WON, _CALLED_OFF = 0, 1, 2, 3


class AsyncHedger:
    """An `AsyncRouter`'s hedged reads over the sync router's `HedgePolicy` (``policy``)."""

    def __init__(self, policy: HedgePolicy) -> None:
        self.policy = policy
        self._tasks: set[asyncio.Task[None]] = set()  # hedges running: held until they end

    async def read(self, router: AsyncRouter, node: Node, sql: str, params: Any) -> Rows:
        """``sql`` as a read on ``node``, hedged on another replica past the threshold."""
        after = self.policy.threshold(node)
        op = statement(sql, params)
        if after is None:
            return await router.read_with(node, op)
        race = _Race(self, node, sql, params, after)
        try:
            rows, _ = await router.run_on(node, race.first, Work.READ)
        except BaseException as exc:
            race.disarm()
            won = race.hedge_rows()
            if won is not None:
                return won  # the hedge answered first (and cut this read, or it failed on its own)
            race.call_off()
            if isinstance(exc, Retry):  # the first node failed: the usual retries
                return await router.read_again(exc, op)
            raise
        race.disarm()
        return rows or []

    def start(self, race: _Race) -> None:
        task = asyncio.get_running_loop().create_task(race.run_hedge(), name="dbrouter-hedge")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self.policy.sent.inc()

    def close(self) -> None:
        """Cancel the hedges still running (the router is closing)."""
        for task in list(self._tasks):
            task.cancel()


class _Race:
    """One hedged read: the first node's lease, the hedge's, and who won."""

    def __init__(self, hedger: AsyncHedger, node: Node, sql: str, params: Any, after: float) -> None:
        self._hedger = hedger
        self._node = node
        self._sql = sql
        self._params = params
        self._after = after
        self._armed: asyncio.TimerHandle | None = None  # the loop timer, once the first statement started
        self._state = _RUNNING
        self._first: AsyncLease | None = None
        self._hedge: AsyncLease | None = None
        self._rows: Rows | None = None

    # -- the caller's side --------------------------------------------------------------

    async def first(self, lease: AsyncLease) -> Any:
        """Run the first read on ``lease`` (an operation for `AsyncRouter.run_on`); the race
        is decided before the result leaves, while the lease is still held."""
        if self._state == _HEDGE_WON:
            rows = self._rows or []
            return rows, len(rows)
        self._first = lease
        # Timed from the statement's start, as for Router (see dbrouter.hedging).
        self._armed = asyncio.get_running_loop().call_later(self._after, self.start_hedge)
        result = await lease.execute(self._sql, self._params)
        if self._state == _RUNNING:
            self._state = _FIRST_WON
            _cut(self._hedge)
        return result

    def disarm(self) -> None:
        if self._armed is not None:
            self._armed.cancel()

    def hedge_rows(self) -> Rows | None:
        return self._rows if self._state == _HEDGE_WON else None

    def call_off(self) -> None:
        """The first read failed on its own (or its task was cancelled): the hedge, if any, is cut."""
        if self._state != _RUNNING:
            return
        self._state = _CALLED_OFF
        _cut(self._hedge)

    # -- the hedge's side ----------------------------------------------------------------

    def start_hedge(self) -> None:
        """The threshold passed (a loop callback, in the caller's context: its deadline holds)."""
        if self._state != _RUNNING:
            return
        hedger = self._hedger
        if hedger.policy.admit():
            hedger.start(self)

    async def run_hedge(self) -> None:
        node = self._hedger.policy.other_replica(self._node)
        if node is None:
            return
        try:
            lease = await take(node)
        except Exception as exc:  # noqa: BLE001 - a hedge that cannot start changes nothing
            log.debug("hedge on %s not started: %s", node.name, exc)
            return
        if self._state != _RUNNING:
            lease.release()
            return
        self._hedge = lease
        try:
            rows, _ = await lease.execute(self._sql, self._params)
        except BaseException as exc:
            lease.release_after(exc, Phase.SENT, Work.READ)
            if not isinstance(exc, Exception):
                raise
            return
        won = self._state == _RUNNING
        if won:
            self._state = _HEDGE_WON
            self._rows = rows or []
        lease.release()
        if won:
            self._hedger.policy.won.inc()
            _cut(self._first)


def _cut(lease: AsyncLease | None) -> None:
    """Cut the loser (marked cut first: discarded when released, its node not blamed)."""
    if lease is not None and not lease.released:
        lease.cut_now()
