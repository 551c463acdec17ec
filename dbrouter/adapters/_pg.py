"""What the PostgreSQL adapters share, whatever the driver (psycopg2, psycopg 3).

The SQLSTATEs and what they mean, the libpq connection parameters dbrouter sets and the
URL options it checks, the SQL of the probes (role, port, identity, replication position,
lag, replay), and the COPY path of `Router.write_many`. `PostgresBase` implements the
probes and the bulk path on the adapter's own `execute`, so a driver's module keeps only
what is the driver's: connect, the statement cursor, return state and reset, streams, the
COPY call, and reading the SQLSTATE off its exceptions. No driver is imported here.
"""

from __future__ import annotations

import math
import time
from abc import abstractmethod
from typing import Any, Mapping

from ..config import MAX_KEEPALIVE_COUNT, MAX_KEEPALIVE_SECONDS, MAX_WAIT, ConnectOptions
from ..errors import ConfigurationError, ConnectError
from ._copy import CATALOG_SQL, CopyPlan, CopyRules, copy_target, encode_batch, make_plan
from .base import Adapter, ErrorKind

__all__ = ["COPY_CHUNK", "COPY_MIN_ROWS", "INT_OPTIONS", "KEPT_QUERY_BYTES", "KEPT_ROWS", "PostgresBase",
           "classify_sqlstate", "libpq_params"]

# SQLSTATEs, by what they mean for routing (Appendix A of the PostgreSQL manual).
_UNREACHABLE_CODES = frozenset({"57P01", "57P02", "57P03", "53300", "08000", "08003", "08006", "08001", "08004"})
_CONFLICT_CODES = frozenset({"40001", "40P01", "55P03"})
_READ_ONLY_CODES = frozenset({"25006"})
_TIMEOUT_CODES = frozenset({"57014"})
INSUFFICIENT_PRIVILEGE = "42501"

# libpq's integer options that a URL query may set, with the range dbrouter accepts: libpq reads
# them only when it connects (so a typo would fail every connect under load), and
# connect_timeout=0 there means waiting forever.
INT_OPTIONS: Mapping[str, tuple[int, int]] = {
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
KEPT_ROWS = 1000
KEPT_QUERY_BYTES = 64 * 1024

# COPY takes two round trips (the statement, then the data) where a multi-row INSERT takes
# one; below this many rows a batch goes as the INSERT.
COPY_MIN_ROWS = 64
# The COPY data goes to libpq in pieces of this size (it copies each into its send buffer).
COPY_CHUNK = 256 * 1024

_IS_WRITABLE_SQL = "SELECT pg_is_in_recovery()"
_SERVER_PORT_SQL = "SELECT inet_server_port()"
# A primary and its streaming replicas share the system identifier; the postmaster's start
# time (to the microsecond) and port tell them apart. Where a hosted service keeps
# pg_control_system() from the user, start time and port alone still do.
_STARTED = "current_setting('port') || '/' || extract(epoch FROM pg_postmaster_start_time())::text"
_IDENTITY_SQL = f"SELECT system_identifier::text || '/' || {_STARTED} FROM pg_control_system()"
_IDENTITY_FALLBACK_SQL = f"SELECT {_STARTED}"
_POSITION_SQL = (
    "SELECT (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()"
    " ELSE pg_current_wal_lsn() END)::text"
)
_HAS_REPLAYED_SQL = (
    "SELECT (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()"
    " ELSE pg_current_wal_lsn() END) >= %s::pg_lsn"
)
_LAG_SQL = (
    "SELECT pg_is_in_recovery(),"
    " pg_last_wal_replay_lsn() >= COALESCE(%s::pg_lsn, pg_last_wal_receive_lsn()),"
    " EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp())::float8"
)


def classify_sqlstate(code: str | None, lost: bool) -> ErrorKind:
    """What a PostgreSQL error means, by its SQLSTATE; ``lost``: the driver reported a failed
    or lost connection (libpq gives those no SQLSTATE)."""
    if code is None:
        return ErrorKind.UNREACHABLE if lost else ErrorKind.CALLER
    if code in _CONFLICT_CODES:
        return ErrorKind.CONFLICT
    if code in _READ_ONLY_CODES:
        return ErrorKind.READ_ONLY
    if code in _TIMEOUT_CODES:
        return ErrorKind.TIMEOUT
    if code in _UNREACHABLE_CODES or code.startswith("08"):
        return ErrorKind.UNREACHABLE
    return ErrorKind.CALLER


def libpq_params(address: Any, opts: ConnectOptions, node: str, options: Mapping[str, str]) -> dict[str, Any]:
    """The libpq connection parameters for a node, without its password: dbrouter's (connect
    timeout, keepalives, TCP_USER_TIMEOUT, application_name, statement_timeout), then the URL's
    ``options`` (the integer ones checked here). The driver checks the keywords themselves."""
    params: dict[str, Any] = {
        "host": address.host,
        "port": address.port,
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
    if address.user:
        params["user"] = address.user
    if address.database:
        params["dbname"] = address.database
    for key, (low, high) in INT_OPTIONS.items():
        text = options.get(key)
        if text is not None and not (text.isascii() and text.isdigit() and low <= int(text) <= high):
            raise ConfigurationError(
                f"invalid value for option {key!r} of postgres node {node}: "
                f"expected a whole number from {low} to {high}, got {text!r}"
            )
    params.update(options)
    if opts.statement_timeout is not None:
        ms = max(1, round(opts.statement_timeout * 1000))
        params["options"] = f"{params.get('options', '')} -c statement_timeout={ms}".strip()
    return params


def _lsn(text: str) -> int:
    """A WAL location 'X/Y' (two hex numbers) as one integer."""
    high, low = text.split("/")
    return (int(high, 16) << 32) + int(low, 16)


class PostgresBase(Adapter):
    """The probes and the bulk path of a PostgreSQL adapter, on its `execute`.

    A driver's adapter sets `driver`, implements `Adapter`'s connection methods, and
    `sqlstate`, `connection_lost`, `copy_rules`, `copy_in` and `python_encoding`. Its
    connections keep a ``statement_cursor`` (BEGIN, COMMIT and ROLLBACK go through it).
    """

    engine = "postgres"
    needs_watchdog = True  # libpq has no read timeout
    bulk_min_rows = COPY_MIN_ROWS

    def cancel_sql(self, session_id: int) -> str | None:
        # pg_cancel_backend, not libpq's cancel request: that one cannot be given a timeout
        # before PostgreSQL 17's libpq, and a hung node must not hold the thread that asks.
        return f"SELECT pg_cancel_backend({int(session_id)})"

    @abstractmethod
    def sqlstate(self, exc: BaseException) -> str | None:
        """The SQLSTATE of a driver exception (None for any other, or for a lost connection)."""

    @abstractmethod
    def connection_lost(self, exc: BaseException) -> bool:
        """True for a driver exception that reports a failed or lost connection."""

    @abstractmethod
    def copy_rules(self, conn: Any) -> CopyRules:
        """How this driver sends each Python type in an INSERT (see `dbrouter.adapters._copy`)."""

    @abstractmethod
    def copy_in(self, conn: Any, statement: str, data: bytes) -> int:
        """Run ``COPY ... FROM STDIN`` with ``data``; returns the rows copied."""

    @abstractmethod
    def python_encoding(self, conn: Any) -> str:
        """The Python codec of the connection's client encoding."""

    def classify(self, exc: BaseException) -> ErrorKind:
        if isinstance(exc, ConnectError):
            return ErrorKind.UNREACHABLE
        return classify_sqlstate(self.sqlstate(exc), self.connection_lost(exc))

    def begin(self, conn: Any) -> None:
        conn.statement_cursor.execute("BEGIN")

    # The connections are in autocommit mode, where the drivers' commit() and rollback() do
    # nothing: the transaction was opened by our BEGIN, so close it the same way.
    def commit(self, conn: Any) -> None:
        conn.statement_cursor.execute("COMMIT")

    def rollback(self, conn: Any) -> None:
        conn.statement_cursor.execute("ROLLBACK")

    def is_writable(self, conn: Any) -> bool:
        rows, _ = self.execute(conn, _IS_WRITABLE_SQL)
        return not self._first_column(rows)

    def server_port(self, conn: Any) -> int:
        rows, _ = self.execute(conn, _SERVER_PORT_SQL)
        return int(self._first_column(rows))

    def server_identity(self, conn: Any) -> str:
        try:
            rows, _ = self.execute(conn, _IDENTITY_SQL)
        except Exception as exc:
            if self.sqlstate(exc) != INSUFFICIENT_PRIVILEGE:
                raise
            rows, _ = self.execute(conn, _IDENTITY_FALLBACK_SQL)
        return str(self._first_column(rows))

    def replication_position(self, conn: Any) -> str:
        rows, _ = self.execute(conn, _POSITION_SQL)
        return str(self._first_column(rows))

    def position_covers(self, have: str, want: str) -> bool | None:
        try:
            return _lsn(have) >= _lsn(want)
        except ValueError:
            return None

    def has_replayed(self, conn: Any, position: str, timeout: float = 0.0) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            rows, _ = self.execute(conn, _HAS_REPLAYED_SQL, (position,))
            if self._first_column(rows):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(min(_REPLAY_POLL, max(0.0, deadline - time.monotonic())))

    def replica_lag(self, conn: Any, primary_position: str | None = None) -> float | None:
        rows, _ = self.execute(conn, _LAG_SQL, (primary_position,))
        in_recovery, caught_up, since_replay = rows[0] if rows else (False, True, None)
        if not in_recovery or caught_up:
            return 0.0
        return None if since_replay is None else max(0.0, float(since_replay))

    def bulk_plan(self, conn: Any, sql: str) -> CopyPlan | None:
        """A `CopyPlan` when ``sql`` is a plain INSERT into a table COPY can load alike."""
        target = copy_target(sql)
        if target is None:
            return None
        rows, _ = self.execute(conn, CATALOG_SQL, (target[0],))
        return make_plan(sql, rows or [], self.copy_rules(conn))

    def write_batch(self, conn: Any, sql: str, rows: list[Any], plan: Any) -> int:
        """``COPY ... FROM STDIN`` in text format when ``plan`` allows it and every value of
        the batch is one COPY stores as this driver's INSERT would (see
        `dbrouter.adapters._copy`); else the multi-row INSERT."""
        if isinstance(plan, CopyPlan) and len(rows) >= self.bulk_min_rows:
            text = encode_batch(plan, rows)
            if text is not None:
                try:
                    data = text.encode(self.python_encoding(conn))
                except (UnicodeError, LookupError):
                    data = None  # not in the connection's encoding: the driver says so for the INSERT
                if data is not None:
                    del text
                    return self.copy_in(conn, plan.statement, data)
        return self.execute_many(conn, sql, rows)
