"""The small interface every driver adapter implements.

The pool and the router are driver-agnostic; an adapter knows how to open a
connection, how to ask a node about itself, how to tidy a connection on return
and what an exception means. Driver imports stay inside the adapter modules.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from typing import Any, Iterator, Protocol, Sequence

from ..config import ConnectOptions
from ..url import NodeAddress
from . import _sockets

__all__ = ["Adapter", "Batch", "ErrorKind", "Result", "ReturnState", "Rows"]

Rows = list[tuple[Any, ...]]
"""The rows of a statement, as every adapter returns them."""
Result = tuple[Rows | None, int]
"""What `Adapter.execute` returns: the rows (None for a statement without a result) and the rowcount."""


class Batch(Protocol):
    """One batch of a stream (`Adapter.fetch_stream`): a list of rows, or rows that the driver
    builds only as they are iterated over. Either is sized, iterated once, and good until the
    stream's next fetch."""

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[tuple[Any, ...]]: ...


class ErrorKind(enum.Enum):
    """What an exception means for routing and retries."""

    UNREACHABLE = "unreachable"
    """Connect refused or timed out, connection lost, server shutting down: a node failure."""
    CONFLICT = "conflict"
    """Serialization failure or deadlock: the transaction may be retried as a whole."""
    READ_ONLY = "read_only"
    """The node refused a write because it is read-only (a replica, or a demoted primary)."""
    TIMEOUT = "timeout"
    """The server cancelled the statement at its statement timeout."""
    CALLER = "caller"
    """Syntax, constraint, permission, bad data: the caller's error, never retried."""


class ReturnState(enum.Enum):
    """What a connection needs when it comes back to the pool."""

    CLEAN = "clean"
    """Nothing open: reuse as is, no round trip."""
    DIRTY = "dirty"
    """A transaction or a changed autocommit mode: reset before reuse."""
    BROKEN = "broken"
    """Closed or unusable: discard."""


class Adapter(ABC):
    """One node's driver: connects and answers questions about connections.

    Implementations are thread-safe and hold no connection of their own.
    """

    engine: str = ""
    """``"postgres"`` or ``"mysql"``."""
    driver: str = ""
    """The driver and its implementation, as `Router.stats` and ``dbrouter status`` show it
    (``"psycopg2"``, ``"psycopg"``, ``"mysql-connector (C extension)"``, ``"mysql-connector (pure Python)"``)."""
    needs_watchdog: bool = False
    """True when the driver has no client-side read timeout, so a statement on a hung
    node must be aborted from outside (see `abort` and `resilience.Watchdog`)."""
    overtakes: bool = False
    """True when a statement's wait can be given up without cutting the connection (the
    driver's wait is dbrouter's to run: psycopg 3, pure-Python MySQL): a hedged read that lost raises
    `Overtaken` out of it, and its connection is drained (`drain`) rather than lost."""

    def __init__(self, address: NodeAddress, options: ConnectOptions | None = None) -> None:
        self.address = address
        self.options = options or ConnectOptions()

    @property
    def guard_timeout(self) -> float | None:
        """Client-side limit for one statement: the server's statement timeout plus a
        grace period, so that a live server always answers first and only a hung one
        hits it. None when no statement timeout is configured."""
        timeout = self.options.statement_timeout
        if timeout is None:
            return None
        return timeout + min(1.0, max(0.1, 0.25 * timeout))

    def abort(self, conn: Any) -> None:
        """Break a connection from another thread so that a blocked call returns now: its
        socket is shut down (when `socket_fd` knows it), and the connection then reports
        itself lost. Only the socket recorded at connect (`remember_socket`, or the C
        extension's `_sockets.claim`), if one was: the connection may be closing meanwhile,
        and its descriptor number reused by another."""
        _sockets.shutdown(self.socket_fd(conn), getattr(conn, "_dbrouter_link", None))

    def watch(self, conn: Any, waker: Any) -> None:
        """Have ``conn``'s statements wait on ``waker`` too (a `Waker`: a hedged read starts).
        Only for adapters that `overtakes`."""
        raise NotImplementedError(f"{type(self).__name__} does not overtake")

    def unwatch(self, conn: Any, waker: Any) -> None:
        """The hedged read that set ``waker`` ended: ``conn``'s statements no longer wait on it
        (left alone if another read set its own since: the connection may have been drained
        and borrowed again)."""
        raise NotImplementedError(f"{type(self).__name__} does not overtake")

    def drain(self, conn: Any, limit: float) -> bool:
        """Finish the statement an `Overtaken` wait left in flight on ``conn``: read what the
        server sends, for at most ``limit`` seconds (from another thread than the one that ran
        it). True when the connection is idle again (it may be pooled), False when it must be
        discarded. Only for adapters that `overtakes`."""
        return False

    def remember_socket(self, conn: Any) -> None:
        """Record which socket a new connection has (for `abort`)."""
        _sockets.remember(conn, self.socket_fd(conn))

    def session_id(self, conn: Any) -> int | None:
        """The server's id of ``conn``'s session (PostgreSQL's backend pid, MySQL's
        connection id), read without a round trip; None when unknown."""
        return None

    def cancel_sql(self, session_id: int) -> str | None:
        """The statement that, on another connection, cancels the statement session
        ``session_id`` is running (None: the engine has none)."""
        return None

    def socket_fd(self, conn: Any) -> int | None:
        """The descriptor of ``conn``'s socket, when the driver tells it (None otherwise);
        a forked child points it elsewhere before abandoning the connection (`dbrouter._fork`)."""
        return None

    @property
    def node(self) -> str:
        """The node's name for messages (``host:port``)."""
        return self.address.name

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.address.redacted}>"

    @abstractmethod
    def connect(self, *, read_timeout: float | None = None) -> Any:
        """Open a connection in autocommit mode.

        Raises `ConnectError` (naming the node and the reason) within
        ``connect_timeout``; never shows the password. ``read_timeout`` bounds
        every later read on drivers that support one (others use `abort`).
        """

    @abstractmethod
    def ping(self, conn: Any) -> None:
        """One cheap round trip; raises the driver's error when the connection is dead."""

    @abstractmethod
    def return_state(self, conn: Any) -> ReturnState:
        """Classify a returned connection without talking to the server."""

    @abstractmethod
    def reset(self, conn: Any) -> None:
        """Roll back anything open and restore autocommit (for `ReturnState.DIRTY`)."""

    @abstractmethod
    def close(self, conn: Any) -> None:
        """Close quietly: errors on close are not interesting."""

    @abstractmethod
    def execute(self, conn: Any, sql: str, params: Any = None) -> Result:
        """Run one statement on a pooled connection: ``(rows or None, rowcount)``.

        Uses a cursor cached per connection so that no extra round trip is made.
        """

    @abstractmethod
    def execute_many(self, conn: Any, sql: str, rows: Sequence[Any]) -> int:
        """Run one statement for many parameter rows in as few round trips as the
        driver allows; returns the total rowcount."""

    bulk_min_rows: int = 0
    """`write_many` asks for a `bulk_plan` only for a batch of at least this many rows (with
    fewer, a batch is the only one of its call, and a plain multi-row INSERT serves it best)."""

    def bulk_plan(self, conn: Any, sql: str) -> Any:
        """What `write_batch` needs to know about ``sql`` on this node, asked once per
        `write_many` call inside its first batch's transaction (None: nothing)."""
        return None

    def write_batch(self, conn: Any, sql: str, rows: list[Any], plan: Any) -> int:
        """Write one batch of `write_many` inside the open transaction, by the engine's
        fastest path for ``sql`` (``plan`` from `bulk_plan`); returns the rows written."""
        return self.execute_many(conn, sql, rows)

    @abstractmethod
    def open_stream(self, conn: Any, sql: str, params: Any, batch_size: int) -> Any:
        """Start streaming the result of ``sql`` (a server-side cursor, an unbuffered
        result); returns the stream's state for `fetch_stream` and `close_stream`."""

    @abstractmethod
    def fetch_stream(self, conn: Any, state: Any) -> Batch:
        """The next rows of a stream (at most its batch size; none at the end)."""

    @abstractmethod
    def close_stream(self, conn: Any, state: Any, finished: bool) -> bool:
        """End a stream (``finished``: a fetch came back short of the batch size, so every
        row was fetched). True when the connection is clean again; False when it must be
        discarded (the rest of an unbuffered result was not read)."""

    @abstractmethod
    def begin(self, conn: Any) -> None:
        """Start an explicit transaction on an autocommit connection."""

    def commit(self, conn: Any) -> None:
        conn.commit()

    def rollback(self, conn: Any) -> None:
        conn.rollback()

    @abstractmethod
    def is_writable(self, conn: Any) -> bool:
        """True when the node accepts writes (not in recovery / not read-only)."""

    @abstractmethod
    def server_port(self, conn: Any) -> int:
        """The port the server says it listens on: proves which node answered."""

    @abstractmethod
    def server_identity(self, conn: Any) -> str:
        """What tells the server behind ``conn`` from every other server, whatever address
        reached it: two configured nodes with the same identity are one server named twice."""

    @abstractmethod
    def replication_position(self, conn: Any) -> str:
        """This node's position: WAL LSN (PostgreSQL) or GTID position / set (MySQL family).

        On a primary, what it has written; on a replica, what it has replayed.
        """

    def position_covers(self, have: str, want: str) -> bool | None:
        """Whether position ``have`` includes ``want``, decided without the server;
        None when this engine's positions cannot be compared client-side."""
        return None

    @abstractmethod
    def has_replayed(self, conn: Any, position: str, timeout: float = 0.0) -> bool:
        """True when this node has replayed ``position``, waiting up to ``timeout`` seconds."""

    @abstractmethod
    def replica_lag(self, conn: Any, primary_position: str | None = None) -> float | None:
        """Replay lag in seconds on a replica (None when unknown, 0.0 on a primary)."""

    @abstractmethod
    def classify(self, exc: BaseException) -> ErrorKind:
        """Classify a driver exception by SQLSTATE or error number; by the message only where
        one number means several things (MySQL's 1290 names the server option that refused
        the statement: only --read-only / --super-read-only is `ErrorKind.READ_ONLY`)."""

    @staticmethod
    def _first_column(rows: Sequence[Sequence[Any]] | None) -> Any:
        return rows[0][0] if rows else None
