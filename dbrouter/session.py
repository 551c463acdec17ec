"""Transactions and read-your-writes sessions, handed out by the `Router`.

Read-your-writes: after each write in a `Session`, the session remembers the
primary's replication position (PostgreSQL WAL LSN, MariaDB GTID position,
MySQL GTID set). A later read in the session goes to a replica only if that
replica has replayed the position, waiting up to ``causal_wait`` for it (the
server's own wait where one exists: ``MASTER_GTID_WAIT``,
``WAIT_FOR_EXECUTED_GTID_SET``; polling on PostgreSQL 15); otherwise the
primary serves it. With ``sticky_seconds`` set, sessions instead read from
the primary for that long after their last write.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Iterator, TypeVar

from .errors import DbRouterError, NodeUnavailable

if TYPE_CHECKING:
    from .resilience import Watchdog
    from .router import Router
    from .topology import Node

__all__ = ["Session", "Transaction"]

T = TypeVar("T")
Rows = list

_NOT_REPLAYED = object()


class _Results:
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


class Transaction(_Results):
    """Statements inside `Router.transaction`: all on the primary, on one connection."""

    def __init__(self, node: Node, conn: Any, watchdog: Watchdog) -> None:
        self._node = node
        self._conn = conn
        self._watchdog = watchdog
        self._closed = False

    @property
    def connection(self) -> Any:
        """The underlying DB-API connection (for libraries that need one)."""
        return self._conn

    def _guarded(self, op: Callable[[Any, Any], T]) -> T:
        """Run ``op(adapter, conn)`` under the hung-statement watchdog."""
        adapter = self._node.adapter
        guard = adapter.guard_timeout if adapter.needs_watchdog else None
        if guard is None:
            return op(adapter, self._conn)
        token = self._watchdog.arm(time.monotonic() + guard, partial(adapter.abort, self._conn))
        try:
            result = op(adapter, self._conn)
        except BaseException as exc:
            if not self._watchdog.disarm(token):
                raise NodeUnavailable(
                    f"primary {self._node.name} did not answer within {guard:.3g}s: hung or unreachable",
                    node=self._node.name,
                ) from exc
            raise
        self._watchdog.disarm(token)
        return result

    def execute(self, sql: str, params: Any = None) -> int:
        """Run a statement; its rows, if any, are available through fetchone / fetchall. Returns the rowcount."""
        if self._closed:
            raise DbRouterError("the transaction has ended; start a new one")
        rows, count = self._guarded(lambda adapter, conn: adapter.execute(conn, sql, params))
        self._keep(rows)
        return count

    def read(self, sql: str, params: Any = None) -> Rows:
        """Run a query on the primary, inside the transaction; returns its rows."""
        self.execute(sql, params)
        return self.fetchall()

    def write(self, sql: str, params: Any = None) -> int:
        """Run a statement inside the transaction; returns its rowcount."""
        return self.execute(sql, params)


class Session(_Results):
    """Reads that see this session's writes; see the module docstring."""

    def __init__(self, router: Router) -> None:
        self._router = router
        self._position: str | None = None
        self._confirmed: set[str] = set()  # replicas known to have replayed _position
        self._sticky_until = 0.0

    @property
    def position(self) -> str | None:
        """The primary's replication position after this session's last write."""
        return self._position

    def _wrote(self, node: Node, conn: Any) -> None:
        routing = self._router.config.routing
        if routing.sticky_seconds is not None:
            self._sticky_until = time.monotonic() + routing.sticky_seconds
        else:
            self._position = node.adapter.replication_position(conn)
            self._confirmed.clear()

    def write(self, sql: str, params: Any = None, *, idempotent: bool = False) -> int:
        """Run a write on the primary (committed at once) and remember where it landed.

        Same failure rules as `Router.write`.
        """
        router = self._router
        router._writes.inc()

        def write_and_note(adapter: Any, conn: Any) -> int:
            _, count = adapter.execute(conn, sql, params)
            self._wrote(router.topology.primary, conn)
            return count

        return router._on_primary(lambda node: router._attempt(node, sql, params, write_and_note), idempotent)

    def read(self, sql: str, params: Any = None) -> Rows:
        """Run a read that sees this session's writes: on a replica that has them, else on the primary."""
        router = self._router
        routing = router.config.routing
        if routing.sticky_seconds is not None:
            if time.monotonic() < self._sticky_until:
                router._reads.inc()
                rows, _ = router._attempt(router.topology.primary, sql, params)
                return rows or []
            return router.read(sql, params)
        position = self._position
        if position is None:
            return router.read(sql, params)
        router._reads.inc()
        node = router._reader()
        primary = router.topology.primary
        if node is not primary and node.name not in self._confirmed:
            def read_if_replayed(adapter: Any, conn: Any) -> Any:
                if not adapter.has_replayed(conn, position, routing.causal_wait):
                    return _NOT_REPLAYED
                return adapter.execute(conn, sql, params)

            try:
                result = router._attempt(node, sql, params, read_if_replayed, extra=routing.causal_wait)
            except Exception as exc:
                if not router._read_retryable(exc):
                    raise
                result = _NOT_REPLAYED  # that replica failed: the primary is certain to have the write
            if result is not _NOT_REPLAYED:
                self._confirmed.add(node.name)
                return result[0] or []
            router._causal_primary_reads.inc()
            node = primary
        rows, _ = router._attempt(node, sql, params)
        return rows or []

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """A transaction on the primary; later reads in the session see what it committed."""
        with self._router._transaction(self._wrote) as tx:
            yield tx

    def execute(self, sql: str, params: Any = None) -> int:
        """A read (SELECT, SHOW, EXPLAIN: rows via fetchone / fetchall, returns their count)
        or a write (anything else, on the primary: returns the rowcount)."""
        from .router import is_read_statement

        if is_read_statement(sql):
            rows = self.read(sql, params)
            self._keep(rows)
            return len(rows)
        self._keep(None)
        return self.write(sql, params)
