"""Transactions on the primary: ``with router.transaction()`` and `run_transaction`.

A transaction holds one lease on the primary from BEGIN to COMMIT. Its
failures are judged by the decision table with what the transaction knows:
an error from its own statements or its COMMIT is about its connection; any
other error raised inside the block (the caller's code, or another node, for
example a nested ``router.connection("read")``) is not, and the connection is
tested by the ROLLBACK instead of being blamed.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterator, TypeVar, cast

from .adapters.base import Rows
from .decisions import Action, Phase, Work, failure_of
from .errors import DbRouterError
from .retrying import Retry

if TYPE_CHECKING:
    from .adapters.base import Result
    from .lease import Lease
    from .routing import Core
    from .topology import Node

__all__ = ["Results", "Transaction", "run_transaction", "transaction"]

log = logging.getLogger("dbrouter.transactions")

T = TypeVar("T")


class Results:
    """The rows of the last statement, handed out by fetchone / fetchall like a cursor."""

    _rows: Rows | None = None
    _cursor = 0

    def _keep(self, rows: Rows | None) -> None:
        self._rows, self._cursor = rows, 0

    def fetchone(self) -> tuple[Any, ...] | None:
        """The next row of the last statement, or None."""
        if not self._rows or self._cursor >= len(self._rows):
            return None
        row = self._rows[self._cursor]
        self._cursor += 1
        return row

    def fetchall(self) -> Rows:
        """The remaining rows of the last statement."""
        rows = (self._rows or [])[self._cursor:]
        self._cursor = len(self._rows or [])
        return rows


class Transaction(Results):
    """Statements inside `Router.transaction`: all on the primary, on one connection."""

    def __init__(self, lease: Lease) -> None:
        self._lease = lease
        self._closed = False
        self._failed: BaseException | None = None  # the last error of this transaction's own statements

    @property
    def connection(self) -> Any:
        """The underlying DB-API connection (for libraries that need one)."""
        return self._lease.conn

    @property
    def node(self) -> Node:
        """The primary this transaction runs on."""
        return self._lease.node

    def run(self, op: Callable[[Any, Any], T]) -> T:
        """``op(adapter, conn)`` inside the transaction, under the hung-statement guard."""
        if self._closed:
            raise DbRouterError("the transaction has ended; start a new one")
        try:
            return self._lease.run(op)
        except BaseException as exc:
            self._failed = exc
            raise

    def execute(self, sql: str, params: Any = None) -> int:
        """Run a statement; its rows, if any, are available through fetchone / fetchall. Returns the rowcount."""
        rows, count = self.run(lambda adapter, conn: cast("Result", adapter.execute(conn, sql, params)))
        self._keep(rows)
        return count

    def read(self, sql: str, params: Any = None) -> Rows:
        """Run a query on the primary, inside the transaction; returns its rows.

        Not held to the read rule of `Router.read`: it runs where the transaction runs,
        is never run again on its own, and ``SELECT ... FOR UPDATE`` belongs here."""
        self.execute(sql, params)
        return self.fetchall()

    def write(self, sql: str, params: Any = None) -> int:
        """Run a statement inside the transaction; returns its rowcount."""
        return self.execute(sql, params)


def _begin(lease: Lease) -> Lease:
    lease.run(lambda adapter, conn: adapter.begin(conn))
    return lease


@contextmanager
def transaction(core: Core, work: Work = Work.BLOCK,
                after_commit: Callable[[Lease], None] | None = None, *,
                call: str = "router.transaction()", outside_transaction: bool = False) -> Iterator[Transaction]:
    """A transaction on the primary (see `Router.transaction`).

    ``work`` is `Work.RERUN` under `run_transaction`: failures that allow it raise
    `Retry`. ``after_commit(lease)`` runs once the COMMIT returned, on the same
    connection; it records its own failure (the connection is then judged and
    released here): a committed transaction never becomes an unknown one.

    While the block runs, the thread counts as having a transaction of this router
    open (`Core.open_transactions`): a second one started beside it (``call``) raises
    `UsageError` unless ``outside_transaction``.
    """
    core.refuse_in_transaction(call, outside_transaction)
    lease = core.on_primary(_begin, work, phase=Phase.BEFORE_SEND, keep=True)
    tx = Transaction(lease)
    phase = Phase.SENT
    opened = core.open_transactions
    opened.count += 1
    try:
        yield tx
        tx._closed = True
        phase = Phase.COMMIT
        lease.run(lambda adapter, conn: adapter.commit(conn))
    except BaseException as exc:
        tx._closed = True
        _settle(core, lease, tx, exc, phase, work)
        raise
    finally:
        opened.count -= 1
    core.counts.writes.inc()
    if after_commit is None:
        lease.release()
        return
    try:
        after_commit(lease)
    except BaseException as exc:
        lease.release_after(exc, Phase.SENT, Work.READ)  # committed: only the connection is at stake
        if not isinstance(exc, Exception):
            raise
        log.debug("after COMMIT on %s: %s", lease.node.name, exc)
        return
    lease.release()


def _settle(core: Core, lease: Lease, tx: Transaction, exc: BaseException, phase: Phase, work: Work) -> None:
    """Release a failed transaction's lease; raise what the decision table says instead of ``exc``."""
    node = lease.node
    if phase is Phase.SENT and exc is not tx._failed and lease.foreign(exc):
        # Not this connection's error (another node's, raised by a nested call): the
        # ROLLBACK tells whether the connection is fine.
        try:
            lease.run(lambda adapter, conn: adapter.rollback(conn))
        except BaseException as rollback_error:
            lease.release_after(rollback_error, Phase.SENT, Work.BLOCK)
            if not isinstance(rollback_error, Exception):
                raise
            return
        lease.release()
        return
    decision = lease.release_after(exc, phase, work)
    if decision.action is Action.UNKNOWN and isinstance(exc, Exception):
        raise core.outcome_unknown(node, exc, "during COMMIT") from exc
    if decision.action is Action.RETRY and work is Work.RERUN and isinstance(exc, Exception):
        raise Retry(node, exc, failure_of(exc, node.adapter), phase, decision) from exc


def run_transaction(core: Core, fn: Callable[[Transaction], T], *, outside_transaction: bool = False) -> T:
    """Run ``fn(tx)`` in a transaction and return its result, running it again on
    serialization failures and deadlocks, and when the connection was lost before the
    COMMIT (the server rolled it back). A failure during the COMMIT raises `WriteOutcomeUnknown`."""

    def attempt() -> T:
        with transaction(core, Work.RERUN, call="router.run_transaction()",
                         outside_transaction=outside_transaction) as tx:
            return fn(tx)

    try:
        return core.retry(attempt)
    except Retry as last:
        failed = last
    raise failed.cause
