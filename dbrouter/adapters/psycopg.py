"""PostgreSQL through psycopg 3 (``psycopg``), chosen by ``postgresql+psycopg://`` or ``driver = "psycopg"``.

What differs from psycopg2 for dbrouter's users: psycopg 3 binds parameters on the server
(its default ``Cursor``), so a parameter needs a type the server can infer where nothing
gives it one (``SELECT %s`` with a string fails, ``SELECT %s::text`` does not) and cannot
stand where SQL takes no parameter (``SET``, DDL); ``execute`` returns the rows of the first
statement of a multi-statement string (psycopg2: of the last). Values then reach a column by
an assignment cast from their own type, which `CopyRules` below follows for COPY.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import select
import struct
from itertools import chain
from typing import Any, Mapping, Sequence

import psycopg
from psycopg import pq, waiting
from psycopg.adapt import PyFormat
from psycopg.conninfo import make_conninfo
from psycopg.rows import TupleRow, tuple_row
from psycopg.types.json import Json, Jsonb

from ..config import ConnectOptions
from ..errors import ConfigurationError, ConnectError
from ..url import NodeAddress
from ._copy import CopyRules, NotNative
from ._pg import KEPT_QUERY_BYTES, KEPT_ROWS, PostgresBase, libpq_params
from ._text import first_line, scrub, split_insert_values
from ._waker import Overtaken, Waker
from .base import ReturnState

__all__ = ["PsycopgAdapter"]

_IDLE = pq.TransactionStatus.IDLE
_ACTIVE = pq.TransactionStatus.ACTIVE
_UNKNOWN = pq.TransactionStatus.UNKNOWN
_TUPLES_OK = pq.ExecStatus.TUPLES_OK
_CLEAN = ReturnState.CLEAN
_KEPT_ROWS = KEPT_ROWS
_KEPT_QUERY_BYTES = KEPT_QUERY_BYTES
_WAIT_INTERVAL = 0.1  # psycopg's own default (seconds between looks at a wait's signals)
_WAIT_R, _WAIT_W = int(waiting.Wait.R), int(waiting.Wait.W)
_READY_R, _READY_W = int(waiting.Ready.R), int(waiting.Ready.W)
_POLLIN, _POLLOUT = select.POLLIN, select.POLLOUT

# A statement takes at most 65535 parameters (the protocol's Bind message counts them in 16
# bits): a multi-row INSERT with more goes in several statements.
_MAX_PARAMS = 65535

_stream_names = itertools.count(1)  # server-side cursor names, unique in the process

# psycopg 3 prepares a statement on the server once it has run prepare_threshold times (5 by
# default) on a connection. dbrouter turns that off unless the URL asks for it
# (``?prepare_threshold=N``): a server-side prepared statement lives in one server session,
# and PgBouncer in transaction mode (before 1.21, or without max_prepared_statements) hands the
# next transaction another session, where it does not exist ("prepared statement
# _pg3_0 does not exist"); the gain, a parse and plan saved per statement, is small for the
# short statements a router sends, and the driver's cache of statement texts costs memory on
# every pooled connection.
_PREPARE_OPTION = "prepare_threshold"
_F4 = struct.Struct("f")


def _float_numeric(value: float) -> str:
    """A float as the server converts a float8 to numeric (``float8_numeric``: 15 significant digits)."""
    return "%.15g" % value


def _float4(value: float) -> str:
    """A float as the server converts a float8 to float4: a C cast from the double, rounded
    once (``float4in`` of the double's text would round that text, which can differ)."""
    single: float = _F4.unpack(_F4.pack(value))[0]  # (float) value, in C
    if (single == 0.0 and value != 0.0) or (math.isinf(single) and not math.isinf(value)):
        raise NotNative("a float out of float4's range")  # the INSERT's error
    return repr(single)


def _json_text(conn: Any, kind: type) -> Any:
    """The text psycopg sends for a JSON wrapper of ``kind``: its dumper's on this connection
    (which may have its own ``dumps``, set by ``set_json_dumps``)."""
    dumper = conn.adapters.get_dumper(kind, PyFormat.TEXT)(kind, conn)

    def text(value: Any) -> str:
        return bytes(dumper.dump(value)).decode("utf-8")

    return text


class _Connection(psycopg.Connection[TupleRow]):
    """A psycopg connection that keeps one cursor for dbrouter's own statements (see
    psycopg2's: making a cursor costs about as much as the rest of a pooled checkout), and
    whose wait a hedge that answered first can end (`dbrouter.hedging`): with a `Waker` set
    in ``dbrouter_waker``, the wait polls its pipe beside the socket, and when the hedge won,
    raises `Overtaken` and leaves the statement's generator in ``dbrouter_pending`` for
    `PsycopgAdapter.drain`. Without one, psycopg's own wait runs."""

    # Set by connect; close() sets it to None on a connection dbrouter never uses again.
    statement_cursor: psycopg.Cursor[TupleRow] | None
    dbrouter_waker: Waker | None = None
    dbrouter_pending: Any = None

    def wait(self, gen: Any, interval: float = _WAIT_INTERVAL, timeout: float | None = None) -> Any:
        waker = self.dbrouter_waker
        if waker is None or timeout is not None:
            return super().wait(gen, interval, timeout)
        return _wait_unless_overtaken(self, gen, waker)


def _wait_unless_overtaken(conn: _Connection, gen: Any, waker: Waker) -> Any:
    """Run ``gen`` (a psycopg generator on ``conn``'s socket) to its end, unless ``waker``
    fires for the read now armed: then `Overtaken`, the generator kept for the drain."""
    fileno = conn.pgconn.socket
    poller = waker.poller
    try:
        wanted = next(gen)
        while True:
            poller.register(fileno, (_POLLIN if wanted & _WAIT_R else 0) | (_POLLOUT if wanted & _WAIT_W else 0))
            ready = 0
            for fd, events in poller.poll():
                if fd != fileno:
                    if waker.meant_for_armed():
                        conn.dbrouter_waker = None
                        conn.dbrouter_pending = gen
                        raise Overtaken(f"a hedge answered first; the statement on session "
                                        f"{conn.pgconn.backend_pid} is left to be drained")
                    continue
                if events & _POLLOUT:
                    ready |= _READY_W
                if events & ~_POLLOUT:  # readable, or an error or hang-up that a read reports
                    ready |= _READY_R
            if ready:
                wanted = gen.send(ready)
    except StopIteration as ex:
        return ex.value
    finally:
        with contextlib.suppress(KeyError, ValueError):  # never registered, or closed
            poller.unregister(fileno)


def _replace_cursor(conn: Any) -> Any:
    """Give the connection a new statement cursor and return the old one, for the caller to
    close (which frees its statement and result) once it no longer needs it. The cursor is
    made as dbrouter's own, whatever ``cursor_factory`` and ``row_factory`` a borrower set."""
    old = conn.statement_cursor
    conn.statement_cursor = psycopg.Cursor(conn, row_factory=tuple_row)
    return old


def _held_bytes(cur: Any) -> int:
    """The bytes of the parameters the cursor keeps from its last statement (psycopg keeps
    the statement it sent, with its parameters dumped, until the next one)."""
    query = getattr(cur, "_query", None)
    params = getattr(query, "params", None)
    return sum(map(len, filter(None, params))) if params else 0


class PsycopgAdapter(PostgresBase):
    """psycopg 3 connections in autocommit mode, so a plain read is one round trip."""

    driver = "psycopg"
    overtakes = True

    def __init__(self, address: NodeAddress, options: ConnectOptions | None = None) -> None:
        super().__init__(address, options)
        url_options = dict(self.address.options)
        self._prepare_threshold = self._parse_prepare_threshold(url_options.pop(_PREPARE_OPTION, None))
        params = libpq_params(self.address, self.options, self.node, url_options)
        try:
            make_conninfo("", **params)  # libpq validates the keywords here, with no network traffic
        except psycopg.ProgrammingError as exc:
            raise ConfigurationError(
                f"invalid option for postgres node {self.node}: {first_line(str(exc))}"
            ) from None
        if self.address.password is not None:
            params["password"] = self.address.password
        self._params = params

    def _parse_prepare_threshold(self, text: str | None) -> int | None:
        if text is None or text.lower() == "none":
            return None
        if text.isascii() and text.isdigit() and int(text) <= 2147483647:
            return int(text)
        raise ConfigurationError(
            f"invalid value for option {_PREPARE_OPTION!r} of postgres node {self.node}: expected a whole "
            f"number (executions of a statement before psycopg prepares it; 0: at once) or none, got {text!r}"
        )

    def connect(self, *, read_timeout: float | None = None) -> Any:
        try:
            conn = _Connection.connect(autocommit=True, prepare_threshold=self._prepare_threshold, **self._params)
        except psycopg.Error as exc:
            reason = first_line(scrub(str(exc), self.address.password))
            raise ConnectError(
                f"cannot connect to postgres node {self.node}: {reason}", node=self.node
            ) from None
        conn.statement_cursor = psycopg.Cursor(conn, row_factory=tuple_row)
        self.remember_socket(conn)
        return conn

    def watch(self, conn: Any, waker: Any) -> None:
        conn.dbrouter_waker = waker

    def unwatch(self, conn: Any, waker: Any) -> None:
        if conn.dbrouter_waker is waker:
            conn.dbrouter_waker = None

    def drain(self, conn: Any, limit: float) -> bool:
        gen, conn.dbrouter_pending = conn.dbrouter_pending, None
        conn.dbrouter_waker = None
        if gen is None:
            return bool(conn.pgconn.transaction_status == _IDLE)
        with contextlib.suppress(Exception):  # answered, failed, or still running at the limit: the state tells
            waiting.wait(gen, conn.pgconn.socket, interval=_WAIT_INTERVAL, timeout=limit)
        return bool(conn.pgconn.transaction_status == _IDLE)

    def socket_fd(self, conn: Any) -> int | None:
        try:
            return int(conn.pgconn.socket)
        except (psycopg.Error, TypeError, ValueError):  # closed
            return None

    def session_id(self, conn: Any) -> int | None:
        try:
            return int(conn.pgconn.backend_pid)
        except (psycopg.Error, TypeError, ValueError):  # closed
            return None

    def ping(self, conn: Any) -> None:
        conn.statement_cursor.execute("SELECT 1")

    def return_state(self, conn: Any) -> ReturnState:
        # libpq's own transaction status (conn.info.transaction_status, without making the
        # ConnectionInfo): UNKNOWN once the connection is closed or lost.
        status = conn.pgconn.transaction_status
        if status == _IDLE:
            # Attribute reads only: psycopg keeps these on the client. A borrower's row or
            # cursor factory, or prepare threshold, would change what the next one gets.
            if (conn.autocommit and conn.isolation_level is None and conn.read_only is None
                    and conn.deferrable is None and conn.row_factory is tuple_row
                    and conn.cursor_factory is psycopg.Cursor and conn.prepare_threshold == self._prepare_threshold):
                return _CLEAN
            return ReturnState.DIRTY
        if status in (_UNKNOWN, _ACTIVE):
            return ReturnState.BROKEN
        return ReturnState.DIRTY

    def reset(self, conn: Any) -> None:
        if conn.pgconn.transaction_status != _IDLE:
            if conn.autocommit:
                conn.statement_cursor.execute("ROLLBACK")  # a transaction opened by an explicit BEGIN
            else:
                conn.rollback()
        # psycopg refuses these changes in a transaction; none is open now.
        if conn.isolation_level is not None:
            conn.isolation_level = None
        if conn.read_only is not None:
            conn.read_only = None
        if conn.deferrable is not None:
            conn.deferrable = None
        conn.row_factory = tuple_row
        conn.cursor_factory = psycopg.Cursor
        conn.prepare_threshold = self._prepare_threshold
        if not conn.autocommit:
            conn.autocommit = True

    def close(self, conn: Any) -> None:
        with contextlib.suppress(Exception):  # closing a broken connection may fail; nothing to do
            conn.close()
        conn.statement_cursor = None  # the cursor refers to the connection: break the cycle

    def execute(self, conn: Any, sql: str, params: Any = None) -> tuple[list[tuple[Any, ...]] | None, int]:
        cur = conn.statement_cursor
        cur.execute(sql, params)
        result = cur.pgresult
        if result is None or result.status != _TUPLES_OK:
            count = cur.rowcount
            if len(sql) > _KEPT_QUERY_BYTES or (params and _held_bytes(cur) > _KEPT_QUERY_BYTES):
                _replace_cursor(conn).close()
            return None, count
        rows = cur.fetchall()
        count = cur.rowcount
        if len(rows) > _KEPT_ROWS or len(sql) > _KEPT_QUERY_BYTES or (params and _held_bytes(cur) > _KEPT_QUERY_BYTES):
            _replace_cursor(conn).close()
        return rows, count

    def execute_many(self, conn: Any, sql: str, rows: Sequence[Any]) -> int:
        insert = split_insert_values(sql)
        cur = _replace_cursor(conn)  # a batch: its own cursor, closed with its statement and results
        try:
            if not (insert and rows and not isinstance(rows[0], Mapping)):
                cur.executemany(sql, rows)  # psycopg pipelines the statements: one round trip
                return int(cur.rowcount)
            # One multi-row INSERT: one round trip, the parameters dumped in one pass; more
            # than one when the batch has more parameters than a statement takes.
            head, width, tail = insert
            per = max(1, _MAX_PARAMS // width)
            if len(rows) <= per:
                return self._insert_rows(cur, head, width, tail, rows)
            own = conn.pgconn.transaction_status == _IDLE  # one statement was atomic: so are its parts
            if own:
                cur.execute("BEGIN")
            try:
                total = sum(self._insert_rows(cur, head, width, tail, rows[start:start + per])
                            for start in range(0, len(rows), per))
            except BaseException:
                if own:
                    with contextlib.suppress(Exception):  # the connection may be gone; the server rolls back
                        cur.execute("ROLLBACK")
                raise
            if own:
                cur.execute("COMMIT")
            return total
        finally:
            cur.close()

    @staticmethod
    def _insert_rows(cur: Any, head: str, width: int, tail: str, rows: Sequence[Any]) -> int:
        template = "(" + ",".join(["%s"] * width) + ")"
        cur.execute(f"{head}{','.join([template] * len(rows))}{tail}", list(chain.from_iterable(rows)))
        return int(cur.rowcount)

    def copy_rules(self, conn: Any) -> CopyRules:
        text_like = frozenset({"json", "jsonb", "S"})
        return CopyRules(
            json={Json: (_json_text(conn, Json), text_like), Jsonb: (_json_text(conn, Jsonb), frozenset({"jsonb"}))},
            floats={"numeric": _float_numeric, "float4": _float4},
        )

    def python_encoding(self, conn: Any) -> str:
        return str(conn.info.encoding)

    def copy_in(self, conn: Any, statement: str, data: bytes) -> int:
        cur = conn.statement_cursor
        with cur.copy(statement) as copy:
            copy.write(memoryview(data))  # psycopg hands it to libpq in slices, copying none
        return int(cur.rowcount)

    def open_stream(self, conn: Any, sql: str, params: Any, batch_size: int) -> Any:
        # A named (server-side) cursor lives in a transaction: psycopg sends BEGIN, then
        # DECLARE; each fetch is one FETCH FORWARD of batch_size rows.
        conn.autocommit = False
        cur = psycopg.ServerCursor(conn, f"dbrouter_stream_{next(_stream_names)}", row_factory=tuple_row)
        cur.itersize = batch_size
        cur.arraysize = batch_size
        cur.execute(sql, params)
        return cur

    def fetch_stream(self, conn: Any, state: Any) -> list[tuple[Any, ...]]:
        rows: list[tuple[Any, ...]] = state.fetchmany(state.arraysize)
        return rows

    def close_stream(self, conn: Any, state: Any, finished: bool) -> bool:
        conn.rollback()  # ends the transaction and the cursor with it: one round trip
        state.close()  # sends nothing: psycopg knows the cursor went with the transaction
        conn.autocommit = True
        return True

    def sqlstate(self, exc: BaseException) -> str | None:
        return exc.sqlstate if isinstance(exc, psycopg.Error) else None

    def connection_lost(self, exc: BaseException) -> bool:
        # libpq reports lost and failed connections without a SQLSTATE; psycopg raises
        # OperationalError for them (InterfaceError for a closed cursor or connection).
        return isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError)) and exc.sqlstate is None
