"""PostgreSQL through psycopg2."""

from __future__ import annotations

import contextlib
import io
import itertools
import math
import os
import socket
import time
from itertools import chain
from typing import Any, Mapping, Sequence

import psycopg2
import psycopg2.errors
import psycopg2.extensions as ext

from ..config import MAX_KEEPALIVE_COUNT, MAX_KEEPALIVE_SECONDS, MAX_WAIT, ConnectOptions
from ..errors import ConfigurationError, ConnectError
from ..url import NodeAddress
from ._copy import CATALOG_SQL, CopyPlan, copy_target, encode_batch, make_plan
from ._text import first_line, scrub, split_insert_values
from .base import Adapter, ErrorKind, ReturnState

__all__ = ["PostgresAdapter"]

# SQLSTATEs, by what they mean for routing (Appendix A of the PostgreSQL manual).
_UNREACHABLE_CODES = frozenset({"57P01", "57P02", "57P03", "53300", "08000", "08003", "08006", "08001", "08004"})
_CONFLICT_CODES = frozenset({"40001", "40P01", "55P03"})
_READ_ONLY_CODES = frozenset({"25006"})
_TIMEOUT_CODES = frozenset({"57014"})

_STATUS_IDLE = ext.TRANSACTION_STATUS_IDLE
_CLEAN = ReturnState.CLEAN
_STATUS_UNKNOWN = ext.TRANSACTION_STATUS_UNKNOWN
_STATUS_ACTIVE = ext.TRANSACTION_STATUS_ACTIVE

# libpq's integer options that a URL query may set, with the range dbrouter accepts: libpq reads
# them only when it connects (so a typo would fail every connect under load), and
# connect_timeout=0 there means waiting forever.
_INT_OPTIONS: Mapping[str, tuple[int, int]] = {
    "connect_timeout": (1, int(MAX_WAIT)),
    "keepalives": (0, 1),
    "keepalives_idle": (1, MAX_KEEPALIVE_SECONDS),
    "keepalives_interval": (1, MAX_KEEPALIVE_SECONDS),
    "keepalives_count": (1, MAX_KEEPALIVE_COUNT),
    "tcp_user_timeout": (0, 2147483647),  # milliseconds, an int; 0: the system's default
}

# Wait for replay by polling: PostgreSQL 15 has no server-side wait for an LSN.
_REPLAY_POLL = 0.005

# A statement cursor that fetched more rows than this, or ran a longer statement (the
# text includes the bound values), is replaced by a new one: an idle pooled connection
# never holds on to a large result or a large statement.
_KEPT_ROWS = 1000
_KEPT_QUERY_BYTES = 64 * 1024

# COPY takes two round trips (the statement, then the data) where a multi-row INSERT takes
# one; below this many rows a batch goes as the INSERT.
_COPY_MIN_ROWS = 64
# The COPY data goes to libpq in pieces of this size (it copies each into its send buffer).
_COPY_CHUNK = 256 * 1024

_stream_names = itertools.count(1)  # server-side cursor names, unique in the process


class _Connection(ext.connection):
    """A psycopg2 connection that keeps one cursor for dbrouter's own statements.

    Making a cursor and closing it costs about half a microsecond, as much as the
    rest of a pooled checkout; the pool's connections are used by one thread at a
    time, so one cursor each is enough.
    """

    __slots__ = ("statement_cursor",)

    # Set by connect; close() sets it to None on a connection dbrouter never uses again.
    statement_cursor: ext.cursor


def _replace_cursor(conn: _Connection) -> ext.cursor:
    """Give the connection a new statement cursor and return the old one, for the caller to
    close (which frees its statement and result) once it no longer needs it."""
    old = conn.statement_cursor
    conn.statement_cursor = conn.cursor(cursor_factory=ext.cursor)
    return old


class PostgresAdapter(Adapter):
    """psycopg2 connections in autocommit mode, so a plain read is one round trip."""

    engine = "postgres"
    driver = "psycopg2"
    needs_watchdog = True  # libpq has no read timeout

    def __init__(self, address: NodeAddress, options: ConnectOptions | None = None) -> None:
        super().__init__(address, options)
        self._params = self._connect_params()

    def _connect_params(self) -> dict[str, Any]:
        opts = self.options
        params: dict[str, Any] = {
            "host": self.address.host,
            "port": self.address.port,
            # libpq takes whole seconds and treats anything under 2 as 2.
            "connect_timeout": max(2, math.ceil(opts.connect_timeout)),
            "keepalives": 1,
            "keepalives_idle": max(1, round(opts.keepalive_idle)),
            "keepalives_interval": max(1, round(opts.keepalive_interval)),
            "keepalives_count": opts.keepalive_count,
            # Keepalives only probe an idle connection: with a statement sent and no ACK (a
            # node whose packets are dropped, an RDS failover), Linux retransmits for about 15
            # minutes. TCP_USER_TIMEOUT ends that after as long as keepalives would take.
            "tcp_user_timeout": 1000 * (round(opts.keepalive_idle)
                                        + round(opts.keepalive_interval) * opts.keepalive_count),
            "application_name": opts.application_name,
        }
        if self.address.user:
            params["user"] = self.address.user
        if self.address.database:
            params["dbname"] = self.address.database
        for key, (low, high) in _INT_OPTIONS.items():
            text = self.address.options.get(key)
            if text is not None and not (text.isascii() and text.isdigit() and low <= int(text) <= high):
                raise ConfigurationError(
                    f"invalid value for option {key!r} of postgres node {self.node}: "
                    f"expected a whole number from {low} to {high}, got {text!r}"
                )
        params.update(self.address.options)
        if opts.statement_timeout is not None:
            ms = max(1, round(opts.statement_timeout * 1000))
            params["options"] = f"{params.get('options', '')} -c statement_timeout={ms}".strip()
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
        return conn

    def abort(self, conn: Any) -> None:
        # Shutting the socket down wakes libpq from its blocking read at once; the
        # connection then reports itself lost and the pool discards it.
        try:
            sock = socket.socket(fileno=os.dup(conn.fileno()))
        except (OSError, psycopg2.Error):
            return
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        finally:
            sock.close()

    def socket_fd(self, conn: Any) -> int | None:
        try:
            return int(conn.fileno())
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

    bulk_min_rows = _COPY_MIN_ROWS

    def bulk_plan(self, conn: Any, sql: str) -> CopyPlan | None:
        """A `CopyPlan` when ``sql`` is a plain INSERT into a table COPY can load alike."""
        target = copy_target(sql)
        if target is None:
            return None
        rows, _ = self.execute(conn, CATALOG_SQL, (target[0],))
        return make_plan(sql, rows or [])

    def write_batch(self, conn: Any, sql: str, rows: list[Any], plan: Any) -> int:
        """``COPY ... FROM STDIN`` in text format when ``plan`` allows it and every value of
        the batch is one COPY stores as the INSERT would (see `dbrouter.adapters._copy`);
        else the multi-row INSERT."""
        if isinstance(plan, CopyPlan) and len(rows) >= _COPY_MIN_ROWS:
            text = encode_batch(plan, rows)
            if text is not None:
                try:
                    data = text.encode(ext.encodings.get(conn.encoding, "utf-8"))
                except (UnicodeError, LookupError):
                    data = None  # not in the connection's encoding: psycopg2 says so for the INSERT
                if data is not None:
                    del text
                    cur = conn.statement_cursor
                    cur.copy_expert(plan.statement, io.BytesIO(data), size=_COPY_CHUNK)
                    return int(cur.rowcount)
        return self.execute_many(conn, sql, rows)

    def open_stream(self, conn: Any, sql: str, params: Any, batch_size: int) -> Any:
        # A named (server-side) cursor lives in a transaction: psycopg2 sends BEGIN, then
        # DECLARE; each fetch is one FETCH FORWARD of batch_size rows.
        conn.autocommit = False
        cur = conn.cursor(name=f"dbrouter_stream_{next(_stream_names)}")
        cur.itersize = batch_size
        cur.arraysize = batch_size
        cur.execute(sql, params)
        return cur

    def fetch_stream(self, conn: Any, state: Any) -> list[tuple[Any, ...]]:
        rows: list[tuple[Any, ...]] = state.fetchmany(state.arraysize)
        return rows

    def close_stream(self, conn: Any, state: Any, finished: bool) -> bool:
        conn.rollback()  # ends the transaction and the cursor with it: one round trip
        state.close()
        conn.autocommit = True
        return True

    def begin(self, conn: Any) -> None:
        conn.statement_cursor.execute("BEGIN")

    # On an autocommit connection psycopg2's commit()/rollback() do nothing:
    # the transaction was opened by our BEGIN, so close it the same way.
    def commit(self, conn: Any) -> None:
        conn.statement_cursor.execute("COMMIT")

    def rollback(self, conn: Any) -> None:
        conn.statement_cursor.execute("ROLLBACK")

    def is_writable(self, conn: Any) -> bool:
        rows, _ = self.execute(conn, "SELECT pg_is_in_recovery()")
        return not self._first_column(rows)

    def server_port(self, conn: Any) -> int:
        rows, _ = self.execute(conn, "SELECT inet_server_port()")
        return int(self._first_column(rows))

    def server_identity(self, conn: Any) -> str:
        # A primary and its streaming replicas share the system identifier; the postmaster's
        # start time (to the microsecond) and port tell them apart. Where a hosted service
        # keeps pg_control_system() from the user, start time and port alone still do.
        started = "current_setting('port') || '/' || extract(epoch FROM pg_postmaster_start_time())::text"
        try:
            rows, _ = self.execute(conn, f"SELECT system_identifier::text || '/' || {started} FROM pg_control_system()")
        except psycopg2.errors.InsufficientPrivilege:
            rows, _ = self.execute(conn, f"SELECT {started}")
        return str(self._first_column(rows))

    def replication_position(self, conn: Any) -> str:
        rows, _ = self.execute(
            conn,
            "SELECT (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()"
            " ELSE pg_current_wal_lsn() END)::text",
        )
        return str(self._first_column(rows))

    def position_covers(self, have: str, want: str) -> bool | None:
        try:
            return _lsn(have) >= _lsn(want)
        except ValueError:
            return None

    def has_replayed(self, conn: Any, position: str, timeout: float = 0.0) -> bool:
        deadline = time.monotonic() + timeout
        sql = (
            "SELECT (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()"
            " ELSE pg_current_wal_lsn() END) >= %s::pg_lsn"
        )
        while True:
            rows, _ = self.execute(conn, sql, (position,))
            if self._first_column(rows):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(min(_REPLAY_POLL, max(0.0, deadline - time.monotonic())))

    def replica_lag(self, conn: Any, primary_position: str | None = None) -> float | None:
        rows, _ = self.execute(
            conn,
            "SELECT pg_is_in_recovery(),"
            " pg_last_wal_replay_lsn() >= COALESCE(%s::pg_lsn, pg_last_wal_receive_lsn()),"
            " EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp())::float8",
            (primary_position,),
        )
        in_recovery, caught_up, since_replay = rows[0] if rows else (False, True, None)
        if not in_recovery or caught_up:
            return 0.0
        return None if since_replay is None else max(0.0, float(since_replay))

    def classify(self, exc: BaseException) -> ErrorKind:
        if isinstance(exc, ConnectError):
            return ErrorKind.UNREACHABLE
        if not isinstance(exc, psycopg2.Error):
            return ErrorKind.CALLER
        code = exc.pgcode
        if code is None:
            # libpq reports lost and failed connections without a SQLSTATE.
            if isinstance(exc, (psycopg2.OperationalError, psycopg2.InterfaceError)):
                return ErrorKind.UNREACHABLE
            return ErrorKind.CALLER
        if code in _CONFLICT_CODES:
            return ErrorKind.CONFLICT
        if code in _READ_ONLY_CODES:
            return ErrorKind.READ_ONLY
        if code in _TIMEOUT_CODES:
            return ErrorKind.TIMEOUT
        if code in _UNREACHABLE_CODES or code.startswith("08"):
            return ErrorKind.UNREACHABLE
        return ErrorKind.CALLER


def _lsn(text: str) -> int:
    """A WAL location 'X/Y' (two hex numbers) as one integer."""
    high, low = text.split("/")
    return (int(high, 16) << 32) + int(low, 16)
