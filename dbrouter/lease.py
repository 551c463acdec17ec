"""The lease: the one way a connection leaves a node's pool, and the one way back.

A `Lease` is taken through the node's breaker (admission) and pool (checkout),
and released with its `Outcome`. Release is the only place that feeds the
breaker, retires the node's connections after a loss, disarms the watchdog and
updates the node's latency average, so every caller (reads, writes,
transactions, sessions, bulk writes, integrations) counts the same way::

    lease = take(node)
    try:
        rows = lease.execute(sql, params)
    except BaseException as exc:
        decision = lease.release_after(exc, Phase.SENT, Work.READ)
        ...
    else:
        lease.release()

A lease handed to the caller (`HeldLease`, from `Router.lease`) that is
garbage-collected without a release gives its connection back as unknown: the
pool discards it at its next housekeeping and logs where it was borrowed (with
``leak_threshold`` set), the node is not blamed, and a trial it carried is
abandoned. dbrouter's own paths release every lease in ``try``/``except
BaseException``, and spare the hot path the finalizer. A lease held but never
released is reported by the pool's leak detection (``leak_threshold``).
"""

from __future__ import annotations

import contextlib
import enum
import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, TypeVar, cast

from .adapters._waker import Overtaken
from .deadline import CANCELLER, TIMER, Deadline
from .deadline import current as current_deadline
from .decisions import Action, BreakerOpen, Decision, Failure, Hung, Phase, Work, decide, failure_of
from .errors import ConnectError, DbRouterError, DeadlineExceeded, PoolTimeout, TooManyWaiting
from .resilience import REFUSED, TRIAL

if TYPE_CHECKING:
    from .adapters.base import Result
    from .pool import _Entry
    from .topology import Node

__all__ = ["HeldLease", "Lease", "Outcome", "admit", "answered", "checkout_failed", "checkout_wait", "not_taken", "take"]

T = TypeVar("T")

_LATENCY_ALPHA = 0.2  # weight of the newest sample in the moving average
_DRAIN_LIMIT = 1.0  # seconds an overtaken statement has to end on its own; past it, cancelled and its connection discarded

log = logging.getLogger("dbrouter.lease")


class Outcome(enum.Enum):
    """How a lease ended: what the node's breaker and pool learn from it."""

    OK = "ok"
    """The node answered."""
    CALLER_ERROR = "caller_error"
    """The node answered with an error that is not its fault (SQL, conflict, timeout)."""
    DEMOTED = "demoted"
    """The node refused a write as read-only: its breaker opens."""
    LOST_BEFORE_SEND = "lost_before_send"
    LOST_AFTER_SEND = "lost_after_send"
    LOST_IN_COMMIT = "lost_in_commit"
    HUNG = "hung"
    """No answer in time; the watchdog or a read timeout cut the connection."""
    DISCARDED = "discarded"
    """The connection's state is unknown (interrupted): discarded, the node not blamed."""


_LOST = {Phase.CONNECT: Outcome.LOST_BEFORE_SEND, Phase.BEFORE_SEND: Outcome.LOST_BEFORE_SEND,
         Phase.SENT: Outcome.LOST_AFTER_SEND, Phase.COMMIT: Outcome.LOST_IN_COMMIT}


def outcome_of(failure: Failure, phase: Phase, decision: Decision) -> Outcome:
    """The outcome a decided failure gives the lease."""
    if decision.blame_node:
        return Outcome.HUNG if failure is Failure.HUNG else _LOST[phase]
    if decision.demoted:
        return Outcome.DEMOTED
    if decision.connection_lost:
        return Outcome.DISCARDED
    return Outcome.CALLER_ERROR


class Lease:
    """A connection borrowed from ``node``; release it exactly once."""

    __slots__ = ("node", "conn", "_entry", "_aborted", "_cut", "_cancel_sent", "_timed", "_trial", "_overtaken")

    def __init__(self, node: Node, entry: _Entry, trial: bool = False, *, timed: bool = False) -> None:
        self.node = node
        self.conn = entry.conn
        self._entry: _Entry | None = entry
        self._aborted = False
        self._cut = False  # cut at the call's deadline: the connection is lost, the node not blamed
        self._cancel_sent = False  # and the server asked to cancel its statement
        self._timed = timed  # one statement ran (execute()): its time feeds Node.latency
        self._trial = trial  # admitted as the half-open breaker's trial
        self._overtaken = False  # a hedge answered first and ended this lease's wait (`mark_overtaken`)

    def __repr__(self) -> str:
        return f"<Lease {self.node.name}{'' if self._entry is not None else ' released'}>"

    def execute(self, sql: str, params: Any = None) -> Result:
        """Run one statement under the hung-statement guard; raises `Hung` when it was cut."""
        self._timed = True
        node = self.node
        if node.guard is None and current_deadline() is None:
            return node.adapter.execute(self.conn, sql, params)
        return self.run(lambda adapter, conn: cast("Result", adapter.execute(conn, sql, params)))

    def run(self, op: Callable[[Any, Any], T], extra: float = 0.0) -> T:
        """``op(adapter, conn)`` under the hung-statement guard (``extra`` seconds more
        for work that waits on purpose, such as a replay wait) and the call's deadline
        (`dbrouter.deadline`: cut when it passes, `DeadlineExceeded`)."""
        node = self.node
        if current_deadline() is not None:
            return self._run_by_deadline(op, extra)
        guard = node.guard
        if guard is None:
            return op(node.adapter, self.conn)
        return self._guarded(op, guard, extra)

    def _run_by_deadline(self, op: Callable[[Any, Any], T], extra: float) -> T:
        """`run` for a call with a deadline: the hung-statement guard as always, and the
        `Timer` cuts the connection when the deadline passes (a server-side cancel follows)."""
        deadline = current_deadline()
        assert deadline is not None
        node = self.node
        started = time.monotonic()
        if deadline.at <= started:
            raise self._judged(deadline.exceeded(f"before a statement on {node.name} was sent", node.name))
        cut = TIMER.arm(deadline.at, self.cut_now)
        try:
            guard = node.guard
            result = op(node.adapter, self.conn) if guard is None else self._guarded(op, guard, extra)
        except BaseException as exc:
            deadline.note(f"statements on {node.name}", time.monotonic() - started)
            if TIMER.disarm(cut) or not isinstance(exc, Exception):
                raise
            self._aborted = self._cut = True
            cancel = ("the server was asked to cancel it" if self._cancel_sent
                      else "no cancel sent: the node is seen down, or cancels are busy")
            raise self._judged(deadline.exceeded(f"in a statement on {node.name}, cut ({cancel})",
                                                 node.name)) from exc
        deadline.note(f"statements on {node.name}", time.monotonic() - started)
        if not TIMER.disarm(cut):
            self._aborted = self._cut = True  # cut just as it finished: the answer is good, the socket is not
        return result

    def _guarded(self, op: Callable[[Any, Any], T], guard: float, extra: float) -> T:
        node = self.node
        watchdog = node.watchdog
        token = watchdog.arm(time.monotonic() + guard + extra, lambda: node.adapter.abort(self.conn))
        try:
            result = op(node.adapter, self.conn)
        except BaseException as exc:
            if not watchdog.disarm(token):
                self._aborted = True
                if isinstance(exc, Exception):
                    raise Hung(
                        f"node {node.name} did not answer within {guard + extra:.3g}s "
                        "(statement timeout plus grace): hung or unreachable", node=node.name,
                    ) from exc
            raise
        if not watchdog.disarm(token):
            self._aborted = True  # cut just as it finished: the answer is good, the socket is not
        return result

    def mark_cut(self) -> None:
        """This lease is about to be cut on purpose (`cut_now`, from another thread): its
        connection is discarded when released, and its node not blamed."""
        self._aborted = self._cut = True

    def mark_overtaken(self) -> None:
        """A hedge answered first, and this lease's wait is told to end (`Adapter.overtakes`):
        if it ends with `Overtaken`, its connection is drained and pooled again, not lost."""
        self._overtaken = True

    def cut_now(self) -> None:
        """Cut the socket, so that a statement running on it returns now (the deadline
        passed, or a hedge won), then have the server cancel what the session runs."""
        node, conn = self.node, self.conn
        adapter = node.adapter
        self._cancel_sent = CANCELLER.cancel(adapter, adapter.session_id(conn), node.healthy)  # before the cut wakes the caller
        adapter.abort(conn)

    def _judged(self, exc: DeadlineExceeded) -> DeadlineExceeded:
        with contextlib.suppress(Exception):
            setattr(exc, _JUDGED, self)
        return exc

    def release(self, outcome: Outcome = Outcome.OK, error: BaseException | None = None) -> None:
        """Give the connection back and tell the node's breaker how it went."""
        entry = self._entry
        if entry is None:
            raise DbRouterError(f"lease on {self.node.name} released twice")
        self._entry = None
        node = self.node
        breaker = node.breaker
        if outcome is _OK or outcome is _CALLER_ERROR:
            answered(node, entry, self._timed, self._aborted)
            return
        if outcome is Outcome.DEMOTED:
            node.pool.give_back(entry, broken=self._aborted)
            breaker.force_open()
            node.report_demoted()
            return
        node.pool.give_back(entry, broken=True)
        if outcome is Outcome.DISCARDED:
            if self._trial:
                breaker.abandon_trial()  # the trial learned nothing: let another call try
        else:
            # A lost connection: the node most likely went down with it (crash, restart,
            # network), so its other connections are retired too.
            breaker.failure(error if isinstance(error, Exception) else ConnectError(f"{outcome.value} on {node.name}"))
            node.pool.invalidate(f"connection to {node.name} lost ({outcome.value})")

    def foreign(self, exc: BaseException) -> bool:
        """Whether ``exc`` says nothing about this lease's connection: dbrouter's own error
        about another call (a nested read on another node), or one another lease judged."""
        if self._aborted:
            return False
        judged = getattr(exc, _JUDGED, None)
        if judged is not None:
            return judged is not self
        return isinstance(exc, DbRouterError)

    def release_after(self, exc: BaseException, phase: Phase, work: Work) -> Decision:
        """Release after ``exc`` at ``phase``: decide, feed the node, return the decision.

        An error that is `foreign` to this lease is returned as the caller's: the pool
        tests the connection when it comes back (reset), and the node is not blamed.
        """
        if self._overtaken and isinstance(exc, Overtaken):
            self._hand_to_drain()
            return _FOREIGN
        if self.foreign(exc):
            self.release(Outcome.DISCARDED if not isinstance(exc, Exception) else _CALLER_ERROR, exc)
            return _FOREIGN
        if self._cut:
            failure = Failure.DEADLINE
        elif isinstance(exc, DeadlineExceeded):
            failure, phase = Failure.DEADLINE, Phase.BEFORE_SEND  # ran out before sending: nothing cut
        elif self._aborted and isinstance(exc, Exception):
            failure = Failure.HUNG
        else:
            failure = failure_of(exc, self.node.adapter)
        decision = decide(failure, phase, work)
        with contextlib.suppress(Exception):  # exceptions of C types without a __dict__
            setattr(exc, _JUDGED, self)
        self.release(outcome_of(failure, phase, decision), exc)
        return decision

    def _hand_to_drain(self) -> None:
        """Released after `Overtaken`: the statement is still in flight on the connection,
        which a thread of its own drains and pools again (nobody waits for it; the node is
        not blamed, and no time is counted)."""
        entry, self._entry = self._entry, None
        if entry is None:
            raise DbRouterError(f"lease on {self.node.name} released twice")
        if self._trial:
            self.node.breaker.abandon_trial()
        self.node.pool.draining.add(entry.key)
        threading.Thread(target=_drain, args=(self.node, entry), name="dbrouter-drain", daemon=True).start()

    @property
    def released(self) -> bool:
        return self._entry is None


class HeldLease(Lease):
    """A lease handed to the caller (`Router.lease`), who may drop it without releasing it.

    dbrouter's own paths release every lease they take, so only these pay for a finalizer.
    """

    __slots__ = ()

    def __del__(self) -> None:
        entry = self._entry
        if entry is not None:  # dropped without a release: the pool discards it later (lock-free here)
            self._entry = None
            self.node.pool.reclaim(entry)
            if self._trial:
                self.node.breaker.abandon_trial()


_OK = Outcome.OK
_CALLER_ERROR = Outcome.CALLER_ERROR
_FOREIGN = Decision(Action.RAISE)
_JUDGED = "_dbrouter_lease"  # set on an exception by the lease that judged it


def answered(node: Node, entry: _Entry, timed: bool, aborted: bool = False) -> None:
    """Give back a connection whose node answered: the pool takes it, a single statement's
    time feeds ``Node.latency`` (the latency policy), and a breaker that counted failures
    learns of the success. `Lease.release` does this, and so does `Core.read`'s fast path,
    which borrows the entry without a lease object while the breaker is clean."""
    returned = node.pool.give_back(entry, broken=aborted)
    if timed:
        elapsed, latency = returned - entry.borrowed_at, node.latency
        node.latency = elapsed if latency == 0.0 else latency + _LATENCY_ALPHA * (elapsed - latency)
        node.read_times.append(elapsed)
    breaker = node.breaker
    if not breaker.clean:
        breaker.success()


def _drain(node: Node, entry: _Entry) -> None:
    """An overtaken read's connection: the rest of its answer read, and pooled again. A
    statement still running after `_DRAIN_LIMIT` is cancelled on the server, as after a cut,
    and its connection discarded: a cancel sent before the answer had come could reach a later
    statement once the connection was pooled again, and most losers end on their own."""
    adapter = node.adapter
    try:
        idle = adapter.drain(entry.conn, _DRAIN_LIMIT)
    except Exception:  # noqa: BLE001 - a connection that cannot be drained is discarded
        log.debug("draining an overtaken connection of %s failed", node.name, exc_info=True)
        idle = False
    if not idle:
        CANCELLER.cancel(adapter, adapter.session_id(entry.conn), node.healthy)
    pool = node.pool
    pool.draining.discard(entry.key)
    pool.give_back(entry, broken=not idle)


def not_taken(node: Node, exc: BaseException) -> None:
    """A checkout that failed: a refused connect counts against the node."""
    if isinstance(exc, ConnectError):
        node.breaker.failure(exc)


def take(node: Node, timeout: float | None = None, kind: type[Lease] = Lease) -> Lease:
    """A lease on ``node`` if its breaker admits the call.

    Raises `BreakerOpen` (nothing sent, nothing counted), `ConnectError` (counted
    against the node), `PoolTimeout` or `PoolClosed`; with a call deadline
    (`dbrouter.deadline`), the checkout waits at most what is left of it.
    """
    trial = admit(node)
    deadline = current_deadline()
    started = 0.0 if deadline is None else time.monotonic()
    try:
        entry = node.pool.borrow(timeout if deadline is None else checkout_wait(node, timeout, deadline, started))
    except BaseException as exc:
        checkout_failed(node, exc, trial, deadline, started, timeout)
        raise
    if deadline is not None:
        deadline.note(f"pool wait on {node.name}", time.monotonic() - started)
    return kind(node, entry, trial)


# -- the parts of a checkout that are not I/O, shared with the asyncio lease (dbrouter.aio.lease) --


def admit(node: Node) -> bool:
    """Breaker admission: raises `BreakerOpen` when the node's breaker refuses the call;
    True when it is the half-open breaker's trial."""
    breaker = node.breaker
    if breaker.clean:
        return False
    admitted = breaker.admit()
    if admitted is REFUSED:
        raise BreakerOpen(f"node {node.name}: circuit breaker {breaker.state} after {breaker.failures} failures",
                          node=node.name)
    return admitted is TRIAL


def checkout_wait(node: Node, timeout: float | None, deadline: Deadline, started: float) -> float:
    """How long a checkout started at ``started`` may wait under ``deadline``: the pool's
    wait (or ``timeout``), cut to what is left; `DeadlineExceeded` when nothing is."""
    left = deadline.at - started
    if left <= 0:
        raise deadline.exceeded(f"before a connection of {node.name} was taken", node.name)
    return min(_pool_wait(node, timeout), left)


def checkout_failed(node: Node, exc: BaseException, trial: bool, deadline: Deadline | None, started: float,
                    timeout: float | None) -> None:
    """After a failed checkout: a refused connect counts against the node, a trial that
    never reached it is abandoned (it must not hold the node out), and a wait that the
    call's deadline cut short raises `DeadlineExceeded` instead of `PoolTimeout`."""
    not_taken(node, exc)
    if trial and not isinstance(exc, ConnectError):
        node.breaker.abandon_trial()
    if deadline is not None:
        deadline.note(f"pool wait on {node.name}", time.monotonic() - started)
        if (isinstance(exc, PoolTimeout) and not isinstance(exc, TooManyWaiting)
                and deadline.at - started < _pool_wait(node, timeout)):
            # It waited out what was left of the call. A full queue refused at once
            # (`TooManyWaiting`) is no deadline: that read goes to another node.
            raise deadline.exceeded(f"waiting for a connection of {node.name}", node.name) from exc


def _pool_wait(node: Node, timeout: float | None) -> float:
    return node.pool.config.acquire_timeout if timeout is None else timeout
