"""PostgreSQL through psycopg2."""

from __future__ import annotations

import contextlib
import io
import itertools
from itertools import chain
from typing import Any, Iterator, Mapping, Sequence, cast

import psycopg2
import psycopg2.extensions as ext
from psycopg2.extras import Json

from ..config import ConnectOptions
from ..errors import ConfigurationError, ConnectError
from ..url import NodeAddress
from ._copy import CopyRules
from ._pg import COPY_CHUNK, KEPT_QUERY_BYTES, KEPT_ROWS, PostgresBase, libpq_params
from ._text import first_line, scrub, split_insert_values
from .base import ReturnState

__all__ = ["COPY_RULES", "PostgresAdapter"]

_STATUS_IDLE = ext.TRANSACTION_STATUS_IDLE
_CLEAN = ReturnState.CLEAN
_STATUS_UNKNOWN = ext.TRANSACTION_STATUS_UNKNOWN
_STATUS_ACTIVE = ext.TRANSACTION_STATUS_ACTIVE
_KEPT_ROWS = KEPT_ROWS
_KEPT_QUERY_BYTES = KEPT_QUERY_BYTES

COPY_RULES = CopyRules(json={Json: (lambda value: str(value.dumps(value.adapted)), None)}, text_array_strings=True)
"""psycopg2 sends each value as a literal that the column's input function parses, its `Json` as
an untyped string literal (so its JSON text goes into any column), and a list as ``ARRAY[...]``."""

_stream_names = itertools.count(1)  # server-side cursor names, unique in the process


class _Connection(ext.connection):
    """A psycopg2 connection that keeps one cursor for dbrouter's own statements.

    Making a cursor and closing it costs about half a microsecond, as much as the
    rest of a pooled checkout; the pool's connections are used by one thread at a
    time, so one cursor each is enough.
    """

    __slots__ = ("statement_cursor", "_dbrouter_link")

    # Set by connect; close() sets it to None on a connection dbrouter never uses again.
    statement_cursor: ext.cursor


class _Stream:
    """A stream on a psycopg2 connection: the client-side cursor its batches come to, and the
    FETCH that asks for the next one."""

    __slots__ = ("cursor", "fetch", "first")

    def __init__(self, cursor: ext.cursor, fetch: str) -> None:
        self.cursor = cursor
        self.fetch = fetch
        self.first = True  # the first batch is in the cursor already


class _Fetched:
    """The rows of one FETCH, each built from libpq's result as the iteration reaches it (the
    cursor's own iterator, in C), as a named cursor's iteration builds them, where fetchmany()
    would build the batch's list of tuples first: measured, that list costs about 2% more client
    CPU per row (the tuples of a whole batch go cold in the cache before they are freed)."""

    __slots__ = ("_cursor", "_count")

    def __init__(self, cursor: ext.cursor) -> None:
        self._cursor = cursor
        self._count: int = cursor.rowcount

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        return cast("Iterator[tuple[Any, ...]]", self._cursor)


def _replace_cursor(conn: _Connection) -> ext.cursor:
    """Give the connection a new statement cursor and return the old one, for the caller to
    close (which frees its statement and result) once it no longer needs it."""
    old = conn.statement_cursor
    conn.statement_cursor = conn.cursor(cursor_factory=ext.cursor)
    return old


class PostgresAdapter(PostgresBase):
    """psycopg2 connections in autocommit mode, so a plain read is one round trip."""

    driver = "psycopg2"

    def __init__(self, address: NodeAddress, options: ConnectOptions | None = None) -> None:
        super().__init__(address, options)
        self._params = self._connect_params()

    def _connect_params(self) -> dict[str, Any]:
        params = libpq_params(self.address, self.options, self.node, self.address.options)
        try:
            # libpq validates the keywords here, with no network traffic.
            ext.parse_dsn(ext.make_dsn(**params))
        except psycopg2.ProgrammingError as exc:
            raise ConfigurationError(
                f"invalid option for postgres node {self.node}: {first_line(str(exc))}"
            ) from None
        if self.address.password is not None:
            params["password"] = self.address.password
        return params

    def connect(self, *, read_timeout: float | None = None) -> Any:
        try:
            conn = psycopg2.connect(connection_factory=_Connection, **self._params)
        except psycopg2.Error as exc:
            reason = first_line(scrub(str(exc), self.address.password))
            raise ConnectError(
                f"cannot connect to postgres node {self.node}: {reason}", node=self.node
            ) from None
        conn.autocommit = True
        conn.statement_cursor = conn.cursor(cursor_factory=ext.cursor)
        self.remember_socket(conn)
        return conn

    def socket_fd(self, conn: Any) -> int | None:
        try:
            return int(conn.fileno())
        except (psycopg2.Error, TypeError, ValueError):  # closed
            return None

    def session_id(self, conn: Any) -> int | None:
        try:
            return int(conn.get_backend_pid())
        except (psycopg2.Error, TypeError, ValueError):  # closed
            return None

    def ping(self, conn: Any) -> None:
        conn.statement_cursor.execute("SELECT 1")

    def return_state(self, conn: Any) -> ReturnState:
        if conn.closed:
            return ReturnState.BROKEN
        status = conn.get_transaction_status()
        if status == _STATUS_IDLE:
            # Attribute reads only: psycopg2 tracks these on the client.
            if conn.autocommit and conn.isolation_level is None and conn.readonly is None and conn.deferrable is None:
                return _CLEAN
            return ReturnState.DIRTY
        if status in (_STATUS_UNKNOWN, _STATUS_ACTIVE):
            return ReturnState.BROKEN
        return ReturnState.DIRTY

    def reset(self, conn: Any) -> None:
        if conn.get_transaction_status() != _STATUS_IDLE:
            if conn.autocommit:
                # A transaction opened by an explicit BEGIN: psycopg2 does not know of it.
                conn.statement_cursor.execute("ROLLBACK")
            else:
                conn.rollback()
        if conn.isolation_level is not None or conn.readonly is not None or conn.deferrable is not None:
            conn.set_session(isolation_level="DEFAULT", readonly="DEFAULT", deferrable="DEFAULT")
        if not conn.autocommit:
            conn.autocommit = True

    def close(self, conn: Any) -> None:
        with contextlib.suppress(Exception):  # closing a broken connection may fail; nothing to do
            conn.close()
        conn.statement_cursor = None  # the cursor refers to the connection: break the cycle

    def execute(self, conn: Any, sql: str, params: Any = None) -> tuple[list[tuple[Any, ...]] | None, int]:
        cur = conn.statement_cursor
        cur.execute(sql, params)
        if cur.description is None:
            count = cur.rowcount
            if len(cur.query) > _KEPT_QUERY_BYTES:
                _replace_cursor(conn).close()
            return None, count
        rows = cur.fetchall()
        count = cur.rowcount
        if len(rows) > _KEPT_ROWS or len(cur.query) > _KEPT_QUERY_BYTES:
            _replace_cursor(conn).close()
        return rows, count

    def execute_many(self, conn: Any, sql: str, rows: Sequence[Any]) -> int:
        insert = split_insert_values(sql)
        cur = _replace_cursor(conn)  # a batch: its own cursor, closed with its statement and results
        try:
            if insert and rows and not isinstance(rows[0], Mapping):
                # One multi-row INSERT: one round trip, and the parameters are
                # adapted in one C-level pass instead of a Python call per row.
                head, width, tail = insert
                template = "(" + ",".join(["%s"] * width) + ")"
                cur.execute(f"{head}{','.join([template] * len(rows))}{tail}", list(chain.from_iterable(rows)))
            else:
                cur.executemany(sql, rows)
            return cur.rowcount
        finally:
            cur.close()

    def copy_rules(self, conn: Any) -> CopyRules:
        return COPY_RULES

    def python_encoding(self, conn: Any) -> str:
        return ext.encodings.get(conn.encoding, "utf-8")

    def copy_in(self, conn: Any, statement: str, data: bytes) -> int:
        cur = conn.statement_cursor
        cur.copy_expert(statement, io.BytesIO(data), size=COPY_CHUNK)
        return int(cur.rowcount)

    def open_stream(self, conn: Any, sql: str, params: Any, batch_size: int) -> Any:
        # The server-side cursor of a psycopg2 named cursor, declared the same way, but in one
        # round trip with its transaction and first batch: BEGIN, DECLARE and the first FETCH
        # go as one query (the newline ends a comment at the end of sql). The connection stays
        # in autocommit mode, so close_stream's ROLLBACK leaves it clean.
        name = f"dbrouter_stream_{next(_stream_names)}"
        fetch = f"FETCH FORWARD {batch_size} FROM {name}"
        cur = conn.cursor(cursor_factory=ext.cursor)
        try:
            cur.execute(f"BEGIN;DECLARE {name} CURSOR WITHOUT HOLD FOR {sql}\n;{fetch}", params)
        except BaseException:
            cur.close()
            raise
        return _Stream(cur, fetch)

    def fetch_stream(self, conn: Any, state: Any) -> _Fetched:
        cur = state.cursor
        if state.first:
            state.first = False  # came with open_stream
        else:
            cur.execute(state.fetch)
        return _Fetched(cur)

    def close_stream(self, conn: Any, state: Any, finished: bool) -> bool:
        cur = state.cursor
        cur.execute("ROLLBACK")  # ends the transaction and the server-side cursor with it
        cur.close()
        return True

    def sqlstate(self, exc: BaseException) -> str | None:
        return exc.pgcode if isinstance(exc, psycopg2.Error) else None

    def connection_lost(self, exc: BaseException) -> bool:
        # libpq reports lost and failed connections without a SQLSTATE.
        return isinstance(exc, (psycopg2.OperationalError, psycopg2.InterfaceError)) and exc.pgcode is None
