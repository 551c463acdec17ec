"""Budgeted hedged reads: a read still running after ``hedge_after`` is also sent to another
replica; the first answer wins and the other is cut and cancelled.

Opt-in (``hedge_after`` seconds, or ``"auto"``: the first node's recent p95 read time), for
`Router.read` only: never for writes, transactions, sessions, streams or ``unchecked``
reads, and only to another replica (never the primary). ``hedge_budget`` caps the extra
reads (5% of reads over the last 10 s, plus one a second): past it a slow read just waits.

`HedgePolicy` is what is not I/O (the threshold, the budget, the counts), shared with the
asyncio router's hedged reads (`dbrouter.aio.hedging`), which use the same object.

The race (`_Race`): the caller runs the read on the first node in its own thread; the
`dbrouter.deadline.TIMER` starts the hedge on a worker thread at the threshold. Whoever
finishes first marks the race won under the race's lock, and marks the other's lease cut
before shutting its socket down, so the loser's lease is discarded (not pooled with a dead
socket) and its node not blamed; the server is asked to cancel the loser's statement. A
lease is marked won or cut only before its statement's result leaves the operation that ran
it, so a connection is never cut after it went back to its pool.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from . import _fork
from ._counter import Counter
from .deadline import TIMER
from .decisions import Phase, Work
from .lease import Lease, take
from .retrying import Retry, RetryBudget
from .routing import statement

if TYPE_CHECKING:
    from .routing import Core
    from .topology import Node

__all__ = ["HedgePolicy", "Hedger"]

log = logging.getLogger("dbrouter.hedging")

AUTO = "auto"
_SAMPLES = 256  # recent read times per node, for "auto"
_MIN_SAMPLES = 32  # fewer: no auto threshold yet, no hedge
_AUTO_FLOOR = 0.010  # seconds: a hedge that wins costs its loser's connection (a reconnect, ~5 ms);
# below this, scheduling jitter on a busy client would set hedges off that cannot pay for themselves
_AUTO_REFRESH = 0.5  # seconds between recomputations of a node's p95


class HedgePolicy:
    """When a read is hedged, and how many may be: the threshold (seconds, or "auto"), the
    budget and the counts (`Router.stats`' hedges, hedges_won, hedges_refused). No I/O:
    the sync router's `Hedger` is one, and the asyncio router's hedges use the same object."""

    def __init__(self, core: Core, hedge_after: float | str, budget: float) -> None:
        self._core = core
        self._after = hedge_after
        counts = core.counts
        self.budget = RetryBudget(budget, 1.0, lambda: counts.reads.value)
        self.sent = Counter()
        self.won = Counter()
        self.refused = Counter()
        self._p95: dict[str, tuple[float, float | None]] = {}  # node name -> (computed at, p95 or None)

    def admit(self) -> bool:
        """Whether a hedge may start now (the budget allows it); a refusal is counted. The
        caller counts the hedge in ``sent`` once it started."""
        if self.budget.allow():
            return True
        self.refused.inc()
        return False

    def other_replica(self, node: Node) -> Node | None:
        """Where a hedge of a read on ``node`` goes: another replica serving reads, by the
        router's policy; None when there is none."""
        core = self._core
        snapshot = core.topology.snapshot
        others = [n for n in snapshot.readable if n is not node and n in snapshot.replicas]
        if not others:
            return None
        chosen: Node = core._balancer.choose(others)  # type: ignore[assignment]
        return chosen

    def threshold(self, node: Node) -> float | None:
        """Seconds after which a read on ``node`` is hedged (None: not hedged now)."""
        after = self._after
        if not isinstance(after, str):
            return after
        now = time.monotonic()
        computed = self._p95.get(node.name)
        if (computed is None or now - computed[0] >= _AUTO_REFRESH
                or (computed[1] is None and len(node.read_times) >= _MIN_SAMPLES)):
            samples = sorted(node.read_times)
            p95 = None if len(samples) < _MIN_SAMPLES else max(_AUTO_FLOOR, samples[int(0.95 * (len(samples) - 1))])
            computed = (now, p95)
            self._p95[node.name] = computed
        return computed[1]


class Hedger(HedgePolicy):
    """A sync router's hedged reads: the policy, and the workers that run the hedges."""

    def __init__(self, core: Core, hedge_after: float | str, budget: float, workers: int = 4) -> None:
        super().__init__(core, hedge_after, budget)
        self._workers = workers
        self._executor: ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()  # guards _executor's creation; nothing is called under it
        _fork.register(self)

    def _after_fork_in_child(self) -> None:
        self._executor = None  # the parent's workers do not exist here
        self._executor_lock = threading.Lock()

    def close(self) -> None:
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)

    def read(self, node: Node, sql: str, params: Any) -> list[tuple[Any, ...]]:
        """``sql`` as a read on ``node``, hedged on another replica past the threshold."""
        core = self._core
        after = self.threshold(node)
        if after is None:
            return core.read_with(node, statement(sql, params))
        race = _Race(self, node, sql, params, after)
        try:
            rows, _ = core.run_on(node, race.first, Work.READ)
        except BaseException as exc:
            race.disarm()
            won = race.hedge_rows()
            if won is not None:
                return won  # the hedge answered first (and cut this read, or it failed on its own)
            race.call_off()
            if isinstance(exc, Retry):  # the first node failed: the usual retries
                return core.read_again(exc, statement(sql, params))
            raise
        race.disarm()
        return rows or []

    def submit(self, race: _Race) -> bool:
        executor = self._executor
        if executor is None:
            with self._executor_lock:
                executor = self._executor
                if executor is None:
                    executor = self._executor = ThreadPoolExecutor(self._workers, thread_name_prefix="dbrouter-hedge")
        try:
            executor.submit(contextvars.copy_context().run, race.run_hedge)
        except RuntimeError:  # shut down: the router is closing
            return False
        return True


_RUNNING, _FIRST_WON, _HEDGE_WON, _CALLED_OFF = 0, 1, 2, 3


class _Race:
    """One hedged read: the first node's lease, the hedge's, and who won (under ``_lock``)."""

    def __init__(self, hedger: Hedger, node: Node, sql: str, params: Any, after: float) -> None:
        self._hedger = hedger
        self._node = node
        self._sql = sql
        self._params = params
        self._after = after
        self._armed: Any = None  # the timer's token, once the first statement started
        self._lock = threading.Lock()  # guards the fields below; only flags are set under it
        self._state = _RUNNING
        self._first: Lease | None = None
        self._hedge: Lease | None = None
        self._rows: list[tuple[Any, ...]] | None = None

    # -- the caller's side --------------------------------------------------------------

    def first(self, lease: Lease) -> Any:
        """Run the first read on ``lease`` (an operation for `Core.run_on`); the race is
        decided before the result leaves, while the lease is still held."""
        with self._lock:
            if self._state == _HEDGE_WON:  # answered while this one waited for its connection
                rows = self._rows or []
                return rows, len(rows)
            self._first = lease
        # Timed from the statement's start: a read that waits for a connection is not hedged
        # (a hedge that wins costs its loser's connection, and a pool short of connections would
        # feed on that).
        self._armed = TIMER.arm(time.monotonic() + self._after, self.start_hedge)
        result = lease.execute(self._sql, self._params)
        loser = None
        with self._lock:
            if self._state == _RUNNING:
                self._state = _FIRST_WON
                loser = self._claim_cut(self._hedge)
        _cut(loser)
        return result

    def disarm(self) -> None:
        if self._armed is not None:
            TIMER.disarm(self._armed)

    def hedge_rows(self) -> list[tuple[Any, ...]] | None:
        with self._lock:
            return self._rows if self._state == _HEDGE_WON else None

    def call_off(self) -> None:
        """The first read failed on its own: the hedge, if any, is cut (the caller retries)."""
        with self._lock:
            if self._state != _RUNNING:
                return
            self._state = _CALLED_OFF
            loser = self._claim_cut(self._hedge)
        _cut(loser)

    # -- the hedge's side ----------------------------------------------------------------

    def start_hedge(self) -> None:
        """The threshold passed (the timer's thread: must not block)."""
        with self._lock:
            if self._state != _RUNNING:
                return
        hedger = self._hedger
        if not hedger.admit():
            return
        if hedger.submit(self):
            hedger.sent.inc()

    def run_hedge(self) -> None:
        node = self._hedger.other_replica(self._node)
        if node is None:
            return
        try:
            lease = take(node)
        except Exception as exc:  # noqa: BLE001 - a hedge that cannot start changes nothing
            log.debug("hedge on %s not started: %s", node.name, exc)
            return
        with self._lock:
            if self._state != _RUNNING:
                lease.release()
                return
            self._hedge = lease
        try:
            rows, _ = lease.execute(self._sql, self._params)
        except BaseException as exc:
            lease.release_after(exc, Phase.SENT, Work.READ)
            if not isinstance(exc, Exception):
                raise
            return
        won, loser = False, None
        with self._lock:
            if self._state == _RUNNING:
                self._state, won = _HEDGE_WON, True
                self._rows = rows or []
                loser = self._claim_cut(self._first)
        lease.release()
        if won:
            self._hedger.won.inc()
        _cut(loser)

    @staticmethod
    def _claim_cut(lease: Lease | None) -> Lease | None:
        """Mark the loser's lease cut (under the race's lock, before its socket is): its
        owner then discards the connection instead of pooling it."""
        if lease is None or lease.released:
            return None
        lease.mark_cut()
        return lease


def _cut(lease: Lease | None) -> None:
    if lease is not None:
        lease.cut_now()
