"""Read-your-writes sessions, handed out by `Router.session`.

After each write in a `Session`, the session remembers the primary's
replication position (PostgreSQL WAL LSN, MariaDB GTID position, MySQL GTID
set). A later read in the session goes to a replica only if that replica has
replayed the position, waiting up to ``causal_wait`` for it (the server's own
wait where one exists: ``MASTER_GTID_WAIT``, ``WAIT_FOR_EXECUTED_GTID_SET``;
polling on PostgreSQL 15); otherwise the primary serves it. When the position
could not be read after a write (the connection broke just after COMMIT), the
session reads from the primary until its next write. With ``sticky_seconds``
set, sessions instead read from the primary for that long after their last write.

A session belongs to the thread that opened it: its position, the replicas known to
have it and the rows that `Session.fetchone` hands out are one caller's state, which
two threads would interleave (a read ordered before another thread's write, or that
thread's rows). A call from any other thread raises `UsageError`; open one session
per thread.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

from .adapters.base import Rows
from .decisions import Phase, Work
from .errors import UsageError
from .retrying import Retry
from .routing import statement
from .transactions import Results, Transaction, transaction

if TYPE_CHECKING:
    from .lease import Lease
    from .routing import Core
    from .topology import Node

__all__ = ["Session"]


_NOT_REPLAYED = object()
_UNKNOWN = "unknown"  # the position after the last write could not be read: read from the primary


class Session(Results):
    """Reads that see this session's writes, for the thread that opened it (others get
    `UsageError`); see the module docstring."""

    def __init__(self, core: Core) -> None:
        self._core = core
        self._position: str | None = None
        self._confirmed: set[str] = set()  # replicas known to have replayed _position
        self._sticky_until = 0.0
        self._owner = threading.get_ident()  # checked on every call: one C call
        self._owner_name = threading.current_thread().name

    def _check_thread(self) -> None:
        if threading.get_ident() != self._owner:
            raise UsageError(
                f"a Session belongs to the thread that opened it ({self._owner_name!r}) and was used from "
                f"{threading.current_thread().name!r}: its read-your-writes position and its fetchone() rows "
                "are one thread's; open a session in each thread (router.session())"
            )

    @property
    def position(self) -> str | None:
        """The primary's replication position after this session's last write (None before
        any write, ``"unknown"`` when it could not be read)."""
        return self._position

    def _wrote(self, lease: Lease) -> None:
        """After a committed write, on its connection: note where it landed."""
        routing = self._core.config.routing
        if routing.sticky_seconds is not None:
            self._sticky_until = time.monotonic() + routing.sticky_seconds
            return
        self._confirmed.clear()
        self._position = _UNKNOWN  # until read: a failure below leaves the session on the primary
        self._position = lease.run(lambda adapter, conn: adapter.replication_position(conn))

    def write(self, sql: str, params: Any = None, *, idempotent: bool = False, outside_transaction: bool = False) -> int:
        """Run a write on the primary (committed at once) and remember where it landed.

        Same failure rules as `Router.write`, `UsageError` beside an open transaction included.
        """
        self._check_thread()
        core = self._core
        core.refuse_in_transaction("session.write()", outside_transaction)
        core.counts.writes.inc()

        def write_keeping_lease(lease: Lease) -> tuple[Lease, int]:
            _, count = lease.execute(sql, params)
            return lease, count

        lease, count = core.on_primary(write_keeping_lease, Work.IDEMPOTENT if idempotent else Work.WRITE, keep=True)
        try:
            self._wrote(lease)
        except BaseException as exc:  # the write is done; reads go to the primary (see _wrote)
            lease.release_after(exc, Phase.SENT, Work.READ)
            if not isinstance(exc, Exception):
                raise
            return count
        lease.release()
        return count

    def read(self, sql: str, params: Any = None, *, unchecked: bool = False, idempotent: bool = False) -> Rows:
        """Run a read that sees this session's writes: on a replica that has them, else on the primary.

        The statement rule, ``unchecked`` and ``idempotent`` are those of `Router.read`:
        `NotAReadStatement` is raised before anything is sent.
        """
        self._check_thread()
        core = self._core
        if not unchecked:
            core.check_read(sql, params)
        work = Work.UNCHECKED if unchecked and not idempotent else Work.READ
        routing = core.config.routing
        primary = core.topology.snapshot.primary
        if routing.sticky_seconds is not None:
            if time.monotonic() < self._sticky_until:
                core.counts.reads.inc()
                return self._read_on(primary, sql, params, work)
            return core.read(sql, params, unchecked=unchecked, idempotent=idempotent)
        position = self._position
        if position is None:
            return core.read(sql, params, unchecked=unchecked, idempotent=idempotent)
        core.counts.reads.inc()
        node = core.choose_reader()
        if position != _UNKNOWN and node is not primary and node.name not in self._confirmed:
            def read_if_replayed(lease: Lease) -> Any:
                def run(adapter: Any, conn: Any) -> Any:
                    if not adapter.has_replayed(conn, position, routing.causal_wait):
                        return _NOT_REPLAYED
                    return adapter.execute(conn, sql, params)

                return lease.run(run, extra=routing.causal_wait)

            try:
                result = core.run_on(node, read_if_replayed, work)
            except Retry:
                result = _NOT_REPLAYED  # that replica failed: the primary is certain to have the write
            if result is not _NOT_REPLAYED:
                self._confirmed.add(node.name)
                rows: Rows = result[0] or []
                return rows
            core.counts.causal_primary_reads.inc()
            node = primary
        elif position == _UNKNOWN:
            core.counts.causal_primary_reads.inc()
            node = primary
        return self._read_on(node, sql, params, work, fallback=primary)

    def _read_on(self, node: Node, sql: str, params: Any, work: Work, fallback: Node | None = None) -> Rows:
        """A read that must be served by ``node`` (the primary, or a replica known to have
        the session's writes), else by ``fallback``: never by a node that may lack them."""
        targets = [node] if fallback is None or fallback is node else [node, fallback]
        for target in targets:
            try:
                rows, _ = self._core.run_on(target, statement(sql, params), work)
                return rows or []
            except Retry as failed:
                last = failed
        raise last.cause

    @contextmanager
    def transaction(self, *, outside_transaction: bool = False) -> Iterator[Transaction]:
        """A transaction on the primary; later reads in the session see what it committed.

        As `Router.transaction`: `UsageError` beside another transaction of the router on this thread.
        """
        self._check_thread()
        with transaction(self._core, Work.BLOCK, after_commit=self._wrote, call="session.transaction()",
                         outside_transaction=outside_transaction) as tx:
            yield tx

    def execute(self, sql: str, params: Any = None) -> int:
        """A read (one read statement by the rule of `Router.read`: rows via fetchone /
        fetchall, returns their count) or a write (anything else, on the primary, with the
        rules of `write`: returns the rowcount)."""
        self._check_thread()
        if self._core.is_read(sql):
            rows = self.read(sql, params)
            self._keep(rows)
            return len(rows)
        self._keep(None)
        return self.write(sql, params)

    def fetchone(self) -> tuple[Any, ...] | None:
        """The next row of the last statement, or None."""
        self._check_thread()
        return super().fetchone()

    def fetchall(self) -> Rows:
        """The remaining rows of the last statement."""
        self._check_thread()
        return super().fetchall()
