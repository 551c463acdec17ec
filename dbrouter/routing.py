"""The routing core: which node serves a call, one attempt on it, and the retries.

`Core` is what `Router` is made of, and the seam that transactions, sessions
and bulk writes build on (`dbrouter.transactions`, `dbrouter.session`,
`dbrouter.bulk`); none of them reaches into another's privates. Every
connection leaves a pool through a lease (`dbrouter.lease`), every failure is
judged by the decision table (`dbrouter.decisions`), and every retry runs in
the one executor (`dbrouter.retrying`).

Failure rules (the table has the detail):

- `Core.read` runs only one read statement (the rule is in `dbrouter.statements`):
  anything else raises `NotAReadStatement` before it is sent, so that a read is
  never a write on the primary and is never replayed. ``unchecked=True`` skips the
  rule; such a statement is not run again once it was sent (it may have written)
  unless the caller also passes ``idempotent=True``.
- A read that fails because its node failed (connection refused or lost, no
  answer within the statement timeout, breaker open) is retried on another
  node, with backoff, bounded by ``retry_attempts`` and ``retry_deadline``.
- A write is retried only when it provably never reached the server (it
  failed while getting a connection, or the node refused it as read-only), or
  when the caller marks it ``idempotent=True``. A write whose connection broke
  after it was sent raises `WriteOutcomeUnknown`: it may or may not have been
  applied, and it is never replayed silently.
- Without a usable primary a write fails at once with `NoPrimaryAvailable`,
  or waits up to ``failover_wait`` seconds for the control plane to find one.
  While two configured nodes are one server, writes raise `ConfigurationError`.

The hot path (`Core.read`, `Core.write`) is a breaker check, a pool checkout,
one statement and a return (a read first looks its statement's verdict up in a
dictionary): no lock is held across I/O, no extra round trip is made when the
connection is warm and clean, and retries cost nothing until something fails. Routing reads the control plane's snapshot with no lock.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence, TypeVar

from ._counter import Counter
from .adapters.base import Rows
from .balancing import Balancer
from .config import RouterConfig
from .deadline import Deadline, within
from .deadline import current as current_deadline
from .decisions import Action, Failure, Phase, Work, decide, failure_of
from .errors import (
    DeadlineExceeded,
    NoPrimaryAvailable,
    NoReplicaAvailable,
    NotAReadStatement,
    SplitBrain,
    UsageError,
    WriteOutcomeUnknown,
)
from .events import Events
from .lease import Lease, answered, not_taken, take
from .retrying import Retry, RetryExecutor
from .statements import QUOTED_PLACEHOLDER, UNSEEN, Verdicts
from .topology import REPLICA, Node, Topology, same_server_error

if TYPE_CHECKING:
    from .hedging import Hedger

__all__ = ["Core", "Counts", "OpenTransactions", "Rows", "refuse_read", "short", "statement"]

log = logging.getLogger("dbrouter.router")

T = TypeVar("T")

# Failures after which a write waits for the control plane rather than backing off.
_NODE_FAILURES = frozenset({Failure.NODE_DOWN, Failure.HUNG, Failure.REFUSED})


@dataclass
class Counts:
    """Router totals, as shown by `Router.stats`."""

    reads: Counter = field(default_factory=Counter)
    writes: Counter = field(default_factory=Counter)
    retries: Counter = field(default_factory=Counter)
    retries_refused: Counter = field(default_factory=Counter)
    """Retries the retry budget refused: the call raised its error instead."""
    fallbacks: Counter = field(default_factory=Counter)
    causal_primary_reads: Counter = field(default_factory=Counter)
    write_outcome_unknown: Counter = field(default_factory=Counter)
    deadline_exceeded: Counter = field(default_factory=Counter)
    """Calls that ran out of their deadline (`dbrouter.deadline`)."""


class OpenTransactions(threading.local):
    """Per thread: how many transactions (`dbrouter.transactions.transaction`) it has open
    on one router. Read by the calls that write on a connection of their own."""

    count = 0


class Core:
    """Routing over one cluster's `Topology`; see the module docstring."""

    config: RouterConfig
    events: Events
    topology: Topology
    counts: Counts
    open_transactions: OpenTransactions
    _balancer: Balancer
    _executor: RetryExecutor
    _read_verdicts: Verdicts
    """The read rule's verdicts for this cluster's engine (`dbrouter.statements`)."""
    hedger: Hedger | None = None
    """Hedged reads (`dbrouter.hedging`), when ``hedge_after`` is set."""

    # -- who serves -----------------------------------------------------------

    def choose_reader(self, exclude: Sequence[Node] = ()) -> Node:
        """The node a read would go to now (policy, lag, health and breakers applied):
        a replica, or the primary when none can serve (if ``fallback_to_primary``)."""
        topology = self.topology
        snapshot = topology.snapshot
        readable = snapshot.readable
        if exclude:
            readable = tuple(n for n in readable if n not in exclude)
        if readable:
            node: Node = self._balancer.choose(readable)  # type: ignore[assignment]
            pool = node.pool
            if pool.draining and not pool.has_idle():
                # Its connections are out draining hedges' losers (`Lease.mark_overtaken`): a
                # read would queue behind them while another replica has one free.
                for other in readable:
                    if other is not node and other.pool.has_idle():
                        return other
            return node
        if not snapshot.replicas:
            return snapshot.primary
        if not self.config.routing.fallback_to_primary:
            raise NoReplicaAvailable(
                f"no replica can serve reads ({topology.reasons(snapshot.replicas)}) and fallback_to_primary is off"
            )
        self.counts.fallbacks.inc()
        if topology.note_fallback():
            self.events.emit("fallback_to_primary", snapshot.primary.name,
                             f"no replica can serve reads ({topology.reasons(snapshot.replicas)}): reading from the primary",
                             level=logging.WARNING)
        return snapshot.primary

    def choose_writer(self, failover_deadline: float) -> tuple[Node, int]:
        """The primary and the snapshot version, waiting up to the deadline for one that can take writes.

        Raises `ConfigurationError` at once while two configured nodes are one server."""
        topology = self.topology
        while True:
            snapshot = topology.snapshot
            if snapshot.same_server:
                raise same_server_error(snapshot.same_server)
            problem = topology.primary_problem(snapshot)
            if problem is None:
                return snapshot.primary, snapshot.version
            now = time.monotonic()
            if now >= failover_deadline:
                deadline = current_deadline()
                if deadline is not None and now >= deadline.at:
                    raise deadline.exceeded(f"waiting for a primary that can take writes ({problem})")
                if snapshot.split_brain:
                    raise SplitBrain(f"writes stopped: {problem}; make all but one node read-only")
                raise NoPrimaryAvailable(f"no primary can take writes: {problem}")
            topology.wake()
            waited = time.monotonic()
            topology.wait_for_change(snapshot.version, min(failover_deadline, now + self.config.monitor.health_interval))
            deadline = current_deadline()
            if deadline is not None:
                deadline.note("waiting for a primary", time.monotonic() - waited)

    # -- one attempt ---------------------------------------------------------------

    def run_on(self, node: Node, op: Callable[[Lease], T], work: Work, *, phase: Phase = Phase.SENT,
               keep: bool = False, kind: type[Lease] = Lease) -> T:
        """One attempt of ``op(lease)`` on ``node``, which gets as far as ``phase`` when it
        fails; the lease is released afterwards unless ``keep`` (then ``op`` hands it on and
        the caller releases it; ``kind=HeldLease`` for one the caller may drop).

        Raises `Retry` when the decision table says the call may run again,
        `WriteOutcomeUnknown` when it says the outcome is unknown, else the error.
        """
        try:
            lease = take(node, kind=kind)
        except Exception as exc:
            retry = _retry_or_raise(node, exc, work)
            if retry is exc:
                raise
            raise retry from exc
        try:
            result = op(lease)
        except BaseException as exc:
            decision = lease.release_after(exc, phase, work)
            if decision.action is Action.RETRY:
                raise Retry(node, exc, failure_of(exc, node.adapter), phase, decision) from exc
            if decision.action is Action.UNKNOWN:
                if work is Work.UNCHECKED:
                    raise self.outcome_unknown(
                        node, exc, "after a statement read() did not check (unchecked=True) was sent",
                        "; pass idempotent=True too if it may run twice") from exc
                raise self.outcome_unknown(node, exc, "after the write was sent") from exc
            raise
        if not keep:
            lease.release()
        return result

    def outcome_unknown(self, node: Node, exc: BaseException, when: str, hint: str = "") -> WriteOutcomeUnknown:
        self.counts.write_outcome_unknown.inc()
        deadline = current_deadline()
        if isinstance(exc, DeadlineExceeded) and deadline is not None:
            cut = deadline.exceeded(f"{when} on {node.role} {node.name}", node.name, after_write=True)
            assert isinstance(cut, WriteOutcomeUnknown)
            return cut
        return WriteOutcomeUnknown(
            f"connection to {node.role} {node.name} broke {when}: it may or may not have been applied "
            f"({short(exc)}); not retried{hint}"
        )

    def retry(self, attempt: Callable[[], T]) -> T:
        """``attempt()``, then through the retry executor (this router's policy and counts)
        if it raised `Retry`: a call that succeeds at once costs no tenacity."""
        try:
            return attempt()
        except Retry as failed:
            first = failed
        try:
            return self._executor.run(attempt, after=first, deadline=_until(self.config.retry.retry_deadline),
                                      on_retry=self.counts.retries.inc)
        except Retry as last:
            ran_out = _ran_out(last)
            if ran_out is None:
                raise
            raise ran_out from last.cause

    def call_scope(self, timeout: float | None) -> AbstractContextManager[Deadline] | None:
        """The deadline scope of one public call (`scoped`): ``timeout`` if given, else
        ``call_timeout`` when no deadline is in force; None when the call runs as it is
        (the hot path)."""
        if timeout is None:
            timeout = self.config.routing.call_timeout
            if timeout is None or current_deadline() is not None:
                return None
        return self.scoped(timeout)

    @contextmanager
    def scoped(self, seconds: float) -> Iterator[Deadline]:
        """The calls in the block end within ``seconds`` (`dbrouter.deadline.within`); a
        `DeadlineExceeded` that leaves it is counted (once, however many scopes it leaves)."""
        with within(seconds) as deadline:
            assert deadline is not None
            try:
                yield deadline
            except DeadlineExceeded as exc:
                if not getattr(exc, "_dbrouter_counted", False):
                    exc._dbrouter_counted = True  # type: ignore[attr-defined]
                    self.counts.deadline_exceeded.inc()
                raise

    # -- reads -----------------------------------------------------------------

    def read(self, sql: str, params: Any = None, *, unchecked: bool = False, idempotent: bool = False,
             timeout: float | None = None) -> Rows:
        """Run one read statement on a replica chosen by the policy; returns the rows (a list of tuples).

        Retried on another node when a node fails. Falls back to the primary when
        no replica can serve (if ``fallback_to_primary``), else raises `NoReplicaAvailable`.

        ``sql`` must be one read statement by the rule in `dbrouter.statements` (one
        statement, starting with SELECT, WITH, VALUES, TABLE, SHOW, EXPLAIN or DESCRIBE,
        without a data-modifying CTE, a locking clause, INTO or a known state-changing
        function); anything else raises `NotAReadStatement` before it is sent.
        ``unchecked=True`` runs a statement you know only reads although the rule refuses
        it: it goes where a read goes, but once it was sent it is never run again (a lost
        connection raises `WriteOutcomeUnknown`) unless ``idempotent=True`` says it may.

        ``timeout`` (seconds) bounds the whole call, retries included (`dbrouter.deadline`):
        past it, `DeadlineExceeded`.
        """
        if timeout is not None or self.config.routing.call_timeout is not None:
            scope = self.call_scope(timeout)
            if scope is not None:
                with scope:
                    return self.read(sql, params, unchecked=unchecked, idempotent=idempotent)
        if unchecked:
            return self.read_as(sql, params, Work.READ if idempotent else Work.UNCHECKED)
        verdicts = self._read_verdicts
        problem = verdicts.get(sql, UNSEEN)
        if problem is not None:
            if problem is UNSEEN:
                problem = verdicts.judge(sql)
            if problem is not None:
                refuse_read(problem, params)
        self.counts.reads.inc()
        node = self.choose_reader()
        hedger = self.hedger
        after = None if hedger is None or node.role != REPLICA else hedger.threshold(node)
        if not node.breaker.clean or node.guard is not None or current_deadline() is not None:
            if after is not None:
                assert hedger is not None
                return hedger.read_leased(node, sql, params, after)
            return self.read_with(node, statement(sql, params))
        # The hot path: run_on inlined, the entry borrowed without a lease object while the
        # breaker is clean (nothing to admit, no trial); a failure gets its lease and its rules.
        # A hedged read (`dbrouter.hedging`) adds a flight, settled when the statement ends.
        try:
            entry = node.pool.borrow()
        except Exception as exc:
            not_taken(node, exc)
            first = _retry_or_raise(node, exc, Work.READ)
            if not isinstance(first, Retry):
                raise
            return self.read_again(first, statement(sql, params))
        flight = None if after is None else hedger.fly(node, entry, sql, params, after)  # type: ignore[union-attr]
        try:
            rows, _ = node.adapter.execute(entry.conn, sql, params)
        except BaseException as exc:
            race = None if flight is None else flight.settle()
            lease = Lease(node, entry) if race is None or race.first_lease is None else race.first_lease
            decision = lease.release_after(exc, Phase.SENT, Work.READ)
            if race is not None:
                won = race.hedge_rows()
                if won is not None:
                    return won  # the hedge answered first, and cut this read
                race.call_off()
            if decision.action is not Action.RETRY:
                raise
            first = Retry(node, exc, failure_of(exc, node.adapter), Phase.SENT, decision)
            return self.read_again(first, statement(sql, params))
        if flight is not None:
            race = flight.settle()
            if race is not None:
                race.first_answered()
                return rows or []
        answered(node, entry, True)
        return rows or []

    def check_read(self, sql: str, params: Any) -> None:
        """Raise `NotAReadStatement` unless ``sql`` (with ``params``) is one read statement."""
        problem = self._read_verdicts.problem(sql)
        if problem is not None:
            refuse_read(problem, params)

    def is_read(self, sql: str) -> bool:
        """Whether ``sql`` is one read statement by the read rule (parameters aside)."""
        problem = self._read_verdicts.problem(sql)
        return problem is None or problem is QUOTED_PLACEHOLDER

    def read_as(self, sql: str, params: Any, work: Work) -> Rows:
        """``sql`` as a read with ``work``'s rules (`Work.READ` or `Work.UNCHECKED`), not checked."""
        self.counts.reads.inc()
        return self.read_with(self.choose_reader(), statement(sql, params), work)

    def read_with(self, node: Node, op: Callable[[Lease], tuple[Any, int]], work: Work = Work.READ) -> Rows:
        """``op(lease)`` as a read on ``node``, retried on other nodes by ``work``'s rules."""
        try:
            rows, _ = self.run_on(node, op, work)
        except Retry as first:
            return self.read_again(first, op, work)
        return rows or []

    def read_again(self, first: Retry, op: Callable[[Lease], tuple[Any, int]], work: Work = Work.READ) -> Rows:
        """Retry a read that failed on ``first.node`` on the other nodes."""
        tried: list[Node] = [first.node]
        errors = {first.node.name: first.cause}
        if not self._executor.admit(first):
            raise NoReplicaAvailable(
                f"read failed on {first.node.name} ({short(first.cause)}); not retried: the retry budget is spent "
                f"(retries may add {self.config.retry.retry_budget:.0%} to the requests of the last 10s, plus "
                f"{self.config.retry.retry_budget_floor:g} a second)"
            ) from first.cause
        self.counts.retries.inc()

        def attempt() -> Any:
            node = self.choose_reader(exclude=tried)
            if node in tried and not node.healthy:
                raise _NoOtherNode(node)  # the only node left failed and its probes see it down
            try:
                return self.run_on(node, op, work)
            except Retry as again:
                tried.append(node)
                errors[node.name] = again.cause
                raise

        try:
            rows, _ = self._executor.run(attempt, attempts=max(1, self.config.retry.retry_attempts - 1),
                                         deadline=_until(self.config.retry.retry_deadline),
                                         on_retry=self.counts.retries.inc)
        except Retry as last:
            ran_out = _ran_out(last)
            if ran_out is not None:
                raise ran_out from last.cause
            summary = "; ".join(f"{name}: {short(err)}" for name, err in errors.items())
            spent = "; no more retries: the retry budget is spent" if last.budget_spent else ""
            raise NoReplicaAvailable(f"read failed on every node tried ({summary}){spent}") from last.cause
        except _NoOtherNode as only:
            summary = "; ".join(f"{name}: {short(err)}" for name, err in errors.items())
            raise NoReplicaAvailable(f"read failed on every node tried ({summary}); {only.node.name} is down "
                                     f"({only.node.last_error})") from errors[only.node.name]
        return rows or []

    # -- writes ----------------------------------------------------------------------

    def write(self, sql: str, params: Any = None, *, idempotent: bool = False, outside_transaction: bool = False,
              timeout: float | None = None) -> int:
        """Run one statement on the primary in its own committed transaction; returns the rowcount.

        Raises `NoPrimaryAvailable` when no primary can take it (after waiting up to
        ``failover_wait``), `SplitBrain` when two nodes accept writes, and
        `WriteOutcomeUnknown` when the connection broke after the statement was sent
        (unless ``idempotent=True``, which allows a retry). Raises `UsageError` at once
        when this thread has a `transaction` of this router open (see
        `refuse_in_transaction`), unless ``outside_transaction=True``.

        ``timeout`` (seconds) bounds the whole call, a failover wait included: past it,
        `DeadlineExceeded` (`DeadlineExceededAfterWrite` when the write was sent and cut).
        """
        if timeout is not None or self.config.routing.call_timeout is not None:
            scope = self.call_scope(timeout)
            if scope is not None:
                with scope:
                    return self.write(sql, params, idempotent=idempotent, outside_transaction=outside_transaction)
        self.refuse_in_transaction("router.write()", outside_transaction)
        self.counts.writes.inc()
        _, count = self.on_primary(statement(sql, params), Work.IDEMPOTENT if idempotent else Work.WRITE)
        return count

    def refuse_in_transaction(self, call: str, outside_transaction: bool) -> None:
        """Raise `UsageError` when this thread has a transaction of this router open and
        ``call`` would write on another connection of the primary: it would run outside the
        transaction and wait for the transaction's own row locks, which the transaction
        cannot release while its thread waits (on PostgreSQL until ``statement_timeout``, forever
        without one; on MySQL until ``innodb_lock_wait_timeout``). ``outside_transaction=True`` is
        the caller saying that a write committed apart is what it wants. One thread-local read:
        reads never pay it."""
        if not outside_transaction and self.open_transactions.count:
            raise _in_transaction(call)

    def on_primary(self, op: Callable[[Lease], T], work: Work, *, phase: Phase = Phase.SENT,
                   keep: bool = False) -> T:
        """``op(lease)`` on the primary with the write rules: retried while it provably never
        applied, waiting for a failover up to ``failover_wait``. See `run_on` for the rest."""
        routing, retry, monitor = self.config.routing, self.config.retry, self.config.monitor
        start = time.monotonic()
        failover_deadline = _until(routing.failover_wait, start)
        deadline = max(_until(retry.retry_deadline, start), failover_deadline)
        version = [0]

        def attempt() -> T:
            node, version[0] = self.choose_writer(failover_deadline)
            return self.run_on(node, op, work, phase=phase, keep=keep)

        try:  # the first attempt outside the executor: a write that succeeds costs no tenacity
            return attempt()
        except Retry as failed:
            first = failed

        def keep_going(last: Retry) -> bool:
            return time.monotonic() < failover_deadline

        def give_up(last: Retry) -> bool:
            # Past the failover window, a node that cannot be reached, hangs or was demoted
            # ends the call at once; a lost connection (idempotent) or a conflict is retried.
            return (last.decision.demoted or last.phase is Phase.CONNECT
                    or last.failure is Failure.HUNG or last.failure is Failure.REFUSED)

        def pause(last: Retry, seconds: float) -> None:
            if routing.failover_wait > 0 and (last.failure in _NODE_FAILURES or last.decision.demoted):
                now = time.monotonic()
                self.topology.wake()
                self.topology.wait_for_change(version[0], min(failover_deadline, now + max(0.05, monitor.health_interval)))
            elif seconds > 0:
                time.sleep(seconds)

        try:
            return self._executor.run(attempt, after=first, deadline=deadline, keep_going=keep_going,
                                      give_up=give_up, pause=pause, on_retry=self.counts.retries.inc)
        except Retry as failed:
            last = failed
        ran_out = _ran_out(last)
        if ran_out is not None:
            raise ran_out from last.cause
        error = write_failed(last)
        if error is last.cause:
            raise error  # a deadlock or serialization failure that outlived the retries, as it was
        raise error from last.cause


def write_failed(last: Retry) -> BaseException:
    """What a write raises once its retries are spent (`Core.on_primary` and the asyncio
    router's): `NoPrimaryAvailable` when the primary refused it or could not be reached,
    else its own error (a deadlock or serialization failure that outlived the retries)."""
    cause = last.cause
    spent = "; not retried: the retry budget is spent" if last.budget_spent else ""
    if last.decision.demoted:
        return NoPrimaryAvailable(
            f"primary {last.node.name} refused the write as read-only (demoted?): {short(cause)}{spent}")
    if last.failure in _NODE_FAILURES:
        what = "not sent" if last.phase is not Phase.SENT else "failed"
        return NoPrimaryAvailable(f"write {what}: primary {last.node.name}: {short(cause)}{spent}")
    return cause


class _NoOtherNode(Exception):
    """A read's retry found no node but one that failed it and is seen down."""

    def __init__(self, node: Node) -> None:
        super().__init__(node.name)
        self.node = node


def _until(seconds: float, start: float | None = None) -> float:
    """``seconds`` from ``start`` (now), or the call's deadline if that comes first."""
    until = (time.monotonic() if start is None else start) + seconds
    deadline = current_deadline()
    return until if deadline is None or deadline.at >= until else deadline.at


def _ran_out(last: Retry) -> DeadlineExceeded | None:
    """The error for retries that the call's deadline ended (None when it did not)."""
    deadline = current_deadline()
    if deadline is None or deadline.left() > 0:
        return None
    if isinstance(last.cause, DeadlineExceeded):
        return last.cause
    return deadline.exceeded(f"retrying after {short(last.cause)} on {last.node.name}", last.node.name)


def _in_transaction(call: str) -> UsageError:
    """The error for ``call`` made beside an open transaction (see `Core.refuse_in_transaction`)."""
    return UsageError(
        f"{call} while this thread has a transaction of this router open: it would run on another "
        "connection of the primary, outside the transaction, and wait for the transaction's own locks "
        "(on PostgreSQL until statement_timeout, forever without one; on MySQL until "
        "innodb_lock_wait_timeout). Use tx.execute() inside the "
        "transaction, or pass outside_transaction=True to run it on a connection of its own, committed "
        "apart from the transaction"
    )


def _retry_or_raise(node: Node, exc: Exception, work: Work) -> Exception:
    """What a failure to take a lease becomes: a `Retry` when the table allows, else itself."""
    failure = failure_of(exc, node.adapter)
    decision = decide(failure, Phase.CONNECT, work)
    if decision.action is Action.RETRY:
        return Retry(node, exc, failure, Phase.CONNECT, decision)
    return exc


def refuse_read(problem: str, params: Any) -> None:
    """Raise `NotAReadStatement` for ``problem`` (a verdict of `dbrouter.statements`), unless
    it is only a placeholder inside quotes and there are no parameters to put there."""
    if problem is QUOTED_PLACEHOLDER and params is None:
        return
    raise NotAReadStatement(
        f"read() refused the statement, nothing was sent: {problem}. Run writes with write() or "
        "in a transaction(); for a statement you know only reads, pass unchecked=True "
        "(see dbrouter.statements for the rule)",
        problem,
    )


def statement(sql: str, params: Any) -> Callable[[Lease], tuple[Any, int]]:
    """One statement as an operation on a lease (for `Core.run_on` and the read rules)."""
    def execute(lease: Lease) -> tuple[Any, int]:
        return lease.execute(sql, params)

    return execute


def short(exc: BaseException) -> str:
    """The first line of an error's message (or its type), for summaries."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
