"""PostgreSQL through psycopg 3's ``AsyncConnection``, for `AsyncRouter`.

The sync twin is `dbrouter.adapters.psycopg.PsycopgAdapter`: the same connection
parameters (checked once there), the same SQL, the same classification (both flavours
raise the same exception classes) and the same rules for what a returned connection
needs. What differs is that every round trip is awaited, and that a call cut short (its
task cancelled, or the router's hung-statement timer) leaves the connection unusable:
`abort` shuts its socket, and the pool discards it.

A connection is opened on a thread (`_open_pgconn`), not on the loop: libpq's login runs
inside ``PQconnectPoll``, and a SCRAM password login computes 4,096 rounds of PBKDF2 there,
4 to 10 ms of CPU that would stop the loop (psycopg's own ``AsyncConnection.connect`` polls
it on the loop). The loop then wraps the ready ``PGconn`` in an `AsyncConnection`.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from concurrent.futures import Future
from itertools import chain
from typing import Any, Mapping, Sequence

import psycopg
from psycopg import generators, pq, waiting
from psycopg.conninfo import make_conninfo
from psycopg.rows import TupleRow, tuple_row

from ..config import ConnectOptions
from ..errors import ConnectError
from ..url import NodeAddress
from . import _sockets
from ._pg import _HAS_REPLAYED_SQL, _POSITION_SQL, _REPLAY_POLL, KEPT_QUERY_BYTES, KEPT_ROWS
from ._text import first_line, scrub, split_insert_values
from .aio import AsyncAdapter
from .base import ReturnState
from .psycopg import PsycopgAdapter, _held_bytes

__all__ = ["AsyncPsycopgAdapter"]

# Placeholders per statement of an async multi-row INSERT. psycopg parses a query of more than
# 50 parameters afresh on every call (it caches only short ones), on the loop, at about 2.7 us
# per placeholder on this 2-core machine: 1,000 placeholders held the loop 2.7 ms (5 ms in a
# busy CI run); 256 hold it under 1 ms, and the batch takes a few more round trips.
_LOOP_PARAMS = 256

_IDLE = pq.TransactionStatus.IDLE
_ACTIVE = pq.TransactionStatus.ACTIVE
_UNKNOWN = pq.TransactionStatus.UNKNOWN
_TUPLES_OK = pq.ExecStatus.TUPLES_OK
_CLEAN = ReturnState.CLEAN


class _Connection(psycopg.AsyncConnection[TupleRow]):
    """An async psycopg connection with one cursor for dbrouter's own statements."""

    statement_cursor: psycopg.AsyncCursor[TupleRow] | None


def _open_pgconn(conninfo: str, timeout: float) -> Future[pq.abc.PGconn]:
    """A logged-in, non-blocking ``PGconn``, opened by a thread of its own (psycopg's own
    connect generator, waited on there). A thread per connect, ended with it: a connect
    waits on the server for milliseconds, and no thread of dbrouter's outlives its routers."""
    opened: Future[pq.abc.PGconn] = Future()

    def run() -> None:
        try:
            opened.set_result(waiting.wait_conn(generators.connect(conninfo), interval=0.1, timeout=timeout))
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting task
            opened.set_exception(exc)

    threading.Thread(target=run, name="dbrouter-pg-connect", daemon=True).start()
    return opened


def _finish_abandoned(done: Future[Any]) -> None:
    """A connect whose caller gave up (cancelled, or past its bound): close what it opened."""
    if not done.cancelled() and done.exception() is None:
        with contextlib.suppress(Exception):
            done.result().finish()


def _replace_cursor(conn: Any) -> Any:
    old = conn.statement_cursor
    conn.statement_cursor = psycopg.AsyncCursor(conn, row_factory=tuple_row)
    return old


class AsyncPsycopgAdapter(AsyncAdapter):
    """psycopg 3 async connections in autocommit mode: a plain read is one round trip."""

    driver = "psycopg (async)"
    sync: PsycopgAdapter

    @classmethod
    def for_address(cls, address: NodeAddress, options: ConnectOptions | None = None) -> AsyncPsycopgAdapter:
        return cls(PsycopgAdapter(address, options))

    async def connect(self) -> Any:
        sync = self.sync
        bound = max(2.0, self.options.connect_timeout)  # libpq's connect_timeout: whole seconds, at least 2
        opening = _open_pgconn(make_conninfo("", **sync._params), bound)
        awaited = asyncio.wrap_future(opening)
        try:
            # The thread's wait is bounded by connect_timeout; this bounds the whole of it,
            # name lookup and login included, and a cancelled caller leaves it to finish.
            pgconn = await asyncio.wait_for(asyncio.shield(awaited), bound + 1.0)
        except BaseException as exc:
            opening.add_done_callback(_finish_abandoned)
            awaited.add_done_callback(lambda done: done.cancelled() or done.exception())  # retrieved: no warning
            if isinstance(exc, (psycopg.Error, OSError, asyncio.TimeoutError)):
                reason = first_line(scrub(str(exc), self.address.password)) or "no answer in time"
                raise ConnectError(f"cannot connect to postgres node {self.node}: {reason}", node=self.node) from None
            raise
        conn = _Connection(pgconn)
        await conn.set_autocommit(True)  # no round trip: psycopg's autocommit is the client's
        conn.prepare_threshold = sync._prepare_threshold
        conn.statement_cursor = psycopg.AsyncCursor(conn, row_factory=tuple_row)
        return conn

    def abort(self, conn: Any) -> None:
        # Shut the socket down (no round trip): the connection reports itself lost from now on.
        try:
            fd = int(conn.pgconn.socket)
        except (psycopg.Error, AttributeError, TypeError, ValueError):
            return
        _sockets.shutdown(fd)

    def discard(self, conn: Any) -> None:
        self.abort(conn)
        with contextlib.suppress(Exception):  # PQfinish: its goodbye fails at once on a shut socket
            conn.pgconn.finish()
        conn.statement_cursor = None

    async def ping(self, conn: Any) -> None:
        await conn.statement_cursor.execute("SELECT 1")

    def return_state(self, conn: Any) -> ReturnState:
        status = conn.pgconn.transaction_status
        if status == _IDLE:
            if (conn.autocommit and conn.isolation_level is None and conn.read_only is None
                    and conn.deferrable is None and conn.row_factory is tuple_row
                    and conn.cursor_factory is psycopg.AsyncCursor
                    and conn.prepare_threshold == self.sync._prepare_threshold):
                return _CLEAN
            return ReturnState.DIRTY
        if status in (_UNKNOWN, _ACTIVE):
            return ReturnState.BROKEN
        return ReturnState.DIRTY

    async def reset(self, conn: Any) -> None:
        if conn.pgconn.transaction_status != _IDLE:
            if conn.autocommit:
                await conn.statement_cursor.execute("ROLLBACK")
            else:
                await conn.rollback()
        if conn.isolation_level is not None:
            await conn.set_isolation_level(None)
        if conn.read_only is not None:
            await conn.set_read_only(None)
        if conn.deferrable is not None:
            await conn.set_deferrable(None)
        conn.row_factory = tuple_row
        conn.cursor_factory = psycopg.AsyncCursor
        conn.prepare_threshold = self.sync._prepare_threshold
        if not conn.autocommit:
            await conn.set_autocommit(True)

    async def close(self, conn: Any) -> None:
        with contextlib.suppress(Exception):  # closing a broken connection may fail; nothing to do
            await conn.close()
        conn.statement_cursor = None

    async def execute(self, conn: Any, sql: str, params: Any = None) -> tuple[list[tuple[Any, ...]] | None, int]:
        cur = conn.statement_cursor
        await cur.execute(sql, params)
        result = cur.pgresult
        if result is None or result.status != _TUPLES_OK:
            count = cur.rowcount
            if len(sql) > KEPT_QUERY_BYTES or (params and _held_bytes(cur) > KEPT_QUERY_BYTES):
                await _replace_cursor(conn).close()
            return None, count
        rows = await cur.fetchall()
        count = cur.rowcount
        if len(rows) > KEPT_ROWS or len(sql) > KEPT_QUERY_BYTES or (params and _held_bytes(cur) > KEPT_QUERY_BYTES):
            await _replace_cursor(conn).close()
        return rows, count

    async def execute_many(self, conn: Any, sql: str, rows: Sequence[Any]) -> int:
        insert = split_insert_values(sql)
        cur = _replace_cursor(conn)
        try:
            if not (insert and rows and not isinstance(rows[0], Mapping)):
                await cur.executemany(sql, rows)
                return int(cur.rowcount)
            head, width, tail = insert
            per = max(1, _LOOP_PARAMS // width)
            template = "(" + ",".join(["%s"] * width) + ")"
            own = len(rows) > per and conn.pgconn.transaction_status == _IDLE
            if own:
                await cur.execute("BEGIN")
            total = 0
            try:
                for start in range(0, len(rows), per):
                    part = rows[start:start + per]
                    await cur.execute(f"{head}{','.join([template] * len(part))}{tail}", list(chain.from_iterable(part)))
                    total += int(cur.rowcount)
            except BaseException:
                if own:
                    with contextlib.suppress(Exception):
                        await cur.execute("ROLLBACK")
                raise
            if own:
                await cur.execute("COMMIT")
            return total
        finally:
            await cur.close()

    async def begin(self, conn: Any) -> None:
        await conn.statement_cursor.execute("BEGIN")

    async def commit(self, conn: Any) -> None:
        await conn.statement_cursor.execute("COMMIT")

    async def rollback(self, conn: Any) -> None:
        await conn.statement_cursor.execute("ROLLBACK")

    async def replication_position(self, conn: Any) -> str:
        rows, _ = await self.execute(conn, _POSITION_SQL)
        return str(rows[0][0]) if rows else ""

    async def has_replayed(self, conn: Any, position: str, timeout: float = 0.0) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            rows, _ = await self.execute(conn, _HAS_REPLAYED_SQL, (position,))
            if rows and rows[0][0]:
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(min(_REPLAY_POLL, max(0.0, deadline - time.monotonic())))
