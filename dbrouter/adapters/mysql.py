"""MySQL and MariaDB through mysql-connector-python: its C extension when it loaded, else
(or with ``use_pure=true`` in the URL) its pure-Python connection."""

from __future__ import annotations

import contextlib
import logging
import math
import random
import select
import ssl
import threading
import time
from bisect import bisect_right
from itertools import accumulate, chain
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol, Sequence

from . import mysql_extension_error, preload_mysql_extension

preload_mysql_extension()

from mysql.connector import errors as myerrors  # noqa: E402 - must come after the C extension is loaded
from mysql.connector.connection import MySQLConnection  # noqa: E402
from mysql.connector.constants import ClientFlag  # noqa: E402
from mysql.connector.cursor import (  # noqa: E402
    RE_PY_PARAM,
    RE_SQL_INSERT_STMT,
    _bytestr_format_dict,
    _ParamSubstitutor,
)

_CConnection: Callable[..., Any] | None
_C_EXTENSION_ERROR: str | None
try:
    from mysql.connector.connection_cext import CMySQLConnection
except ImportError as _exc:  # the extension did not load: pure Python only
    _CConnection = None
    _C_EXTENSION_ERROR = mysql_extension_error() or str(_exc)
else:
    _CConnection = CMySQLConnection
    _C_EXTENSION_ERROR = None


class _NoCExtensionError(Exception):
    """Stands in for the C extension's error class when it did not load: nothing raises it.
    (``myerrors.Error`` in its place made every client-side error without a number, such as
    "Not enough parameters for the SQL statement", a lost connection in `classify`.)"""


try:  # the C extension's own errors: its connection's commit() and rollback() raise them as they are
    from _mysql_connector import MySQLError as _CExtensionError  # type: ignore[import-not-found]  # untyped C module
except ImportError:  # pure Python only
    _CExtensionError = _NoCExtensionError

HAVE_C_EXTENSION = _CConnection is not None
"""Whether mysql-connector's C extension loaded in this process."""

DRIVER_C = "mysql-connector (C extension)"
DRIVER_PURE = "mysql-connector (pure Python)"

from ..config import MAX_WAIT, ConnectOptions  # noqa: E402
from ..errors import ConfigurationError, ConnectError  # noqa: E402
from ..url import NodeAddress  # noqa: E402
from . import _sockets  # noqa: E402
from ._text import first_line, scrub, split_insert_values  # noqa: E402
from ._waker import Overtaken, Waker  # noqa: E402
from .base import Adapter, ErrorKind, ReturnState  # noqa: E402

__all__ = ["DRIVER_C", "DRIVER_PURE", "HAVE_C_EXTENSION", "MySQLAdapter"]

log = logging.getLogger("dbrouter.adapters.mysql")


class _FirstCConnect:
    """The C client library sets itself up (``mysql_library_init``, its plugins) at the
    first connect of the process, and threads doing that at once can crash it (a segfault
    in about 1 of 50 processes that opened their first connections from six threads;
    none in 600 once one connect had finished first). So connects wait for the first
    successful one. The wait is bounded by connect_timeout: behind a first connect to a
    hung node, the others go ahead rather than stall (and a child forked while another
    thread held the lock waits once, not for ever). The lock is held over I/O only until
    one connect has succeeded in this process."""

    def __init__(self) -> None:
        self.ready = False
        self._lock = threading.Lock()

    def first_connect(self, factory: Callable[..., Any], params: Mapping[str, Any], timeout: float) -> Any:
        got = self._lock.acquire(timeout=min(timeout, MAX_WAIT))
        try:
            conn = factory(**params)
            self.ready = True
            return conn
        finally:
            if got:
                self._lock.release()


_c_client = _FirstCConnect()


if TYPE_CHECKING:

    class _Cursor(Protocol):
        """The calls made on the connector's cursor, C or pure Python (a connection's
        ``_dbrouter_cursor``): its execute() for statements without parameters on the
        pure-Python connection, and its own code that puts parameters in."""

        @property
        def description(self) -> Sequence[tuple[Any, ...]] | None: ...

        @property
        def rowcount(self) -> int: ...

        def execute(self, operation: str, params: Any = ...) -> None: ...

        def fetchall(self) -> list[tuple[Any, ...]]: ...

        def _batch_insert(self, operation: str, seq_params: Sequence[Any]) -> bytes | None: ...

        # The pure-Python cursor's (the C extension's connection has prepare_for_mysql).
        def _process_params(self, params: Sequence[Any]) -> tuple[Any, ...]: ...

        def _process_params_dict(self, params: dict[str, Any]) -> dict[bytes, Any]: ...


# Client (2xxx) and server error numbers, by what they mean for routing.
_UNREACHABLE_ERRNOS = frozenset(
    {
        1040,  # too many connections
        1053,  # server shutdown in progress
        1152, 1153, 1154, 1155, 1156, 1157, 1158, 1159, 1160, 1161,  # aborted / network read-write
        1927,  # MariaDB: connection was killed
        2002, 2003, 2005, 2006, 2013, 2026, 2047, 2048, 2055,
        4031,  # MySQL: disconnected by the server for inactivity
    }
)
_CONFLICT_ERRNOS = frozenset({1205, 1213})  # lock wait timeout, deadlock
# 1836 read-only mode; 1290 only when it names a read-only option (below). Not 1792 (a write in
# a transaction the caller started READ ONLY): that says nothing about the node.
_READ_ONLY_ERRNOS = frozenset({1836})
# 1290 ER_OPTION_PREVENTS_STATEMENT, "The MariaDB server is running with the %s option so it
# cannot execute this statement", names the option that refused the statement. --read-only and
# --super-read-only: the node is read-only (a replica, a demoted primary). Anything else is the
# caller's: --secure-file-priv (SELECT ... INTO OUTFILE or LOAD DATA with a path the server may
# not use; MariaDB says it for a missing directory too), --skip-grant-tables, ... The option name
# is not translated in localized messages (lc_messages), so the text is a safe key.
_OPTION_PREVENTS_STATEMENT = 1290
_TIMEOUT_ERRNOS = frozenset({1969, 3024})  # MariaDB max_statement_time, MySQL max_execution_time

# The connector's server-status flags (also mysql.connector.constants.ServerFlag).
_STATUS_IN_TRANS = 1
_STATUS_AUTOCOMMIT = 2
_STATUS_MORE_RESULTS = 8  # SERVER_MORE_RESULTS_EXISTS: a multi-statement left results unread

# MySQL 8's default collation (utf8mb4_0900_ai_ci) is unknown to MariaDB.
DEFAULT_COLLATION = "utf8mb4_general_ci"

# Room left in max_allowed_packet for the packet header and the statement's head and tail.
_PACKET_MARGIN = 1024


# The connector's Python protocol code sends the connection attributes' total length as one
# byte (mysql.connector.protocol.make_conn_attrs), where the protocol wants a length-encoded
# integer: from 251 bytes on, the handshake fails ("ubyte format requires 0 <= number <=
# 255") or is malformed. The connector's defaults alone come close (a long host name, the
# OS's version string, a six-digit pid), so the least useful go first until they fit.
_ATTRS_LIMIT = 250
_ATTRS_DROPPED_FIRST = ("_os", "_source_host", "_platform", "_client_license", "_client_version")


def fit_conn_attrs(attrs: dict[str, Any]) -> None:
    """Drop (then cut) connection attributes until the connector can send them."""

    def size() -> int:
        return sum(2 + len(str(k).encode()) + len(str(v or "").encode()) for k, v in attrs.items())

    for name in _ATTRS_DROPPED_FIRST:
        if size() <= _ATTRS_LIMIT:
            return
        attrs.pop(name, None)
    for name in list(attrs):
        if size() <= _ATTRS_LIMIT:
            return
        attrs[name] = str(attrs[name] or "")[:32]


def _watched_class(base: type) -> type:
    """A subclass of the pure-Python connection's socket class ``base`` (swapped in at
    connect, `_watch_socket`): with a `Waker` set (`MySQLAdapter.watch`, a hedged read), each
    packet read first waits for the socket to be readable or the waker to fire for the read
    now armed; then `Overtaken`, before a byte of the answer is read (the connector reads
    exact packet lengths and keeps nothing back, so the answer is still whole on the socket
    for `MySQLAdapter.drain`). A direct subclass: a mixin would change the object layout."""
    plain_send, plain_recv = base.send, base.recv  # type: ignore[attr-defined]

    def send(self: Any, *args: Any, **kwargs: Any) -> Any:
        self.dbrouter_asked = True  # the next packet read is the first of an answer
        return plain_send(self, *args, **kwargs)

    def recv(self: Any, read_timeout: int | None = None) -> bytearray:
        waker = self.dbrouter_waker
        if waker is not None and self.dbrouter_asked:  # the rest of an answer comes with its first packet
            self.dbrouter_asked = False
            sock = self.sock
            if not (isinstance(sock, ssl.SSLSocket) and sock.pending()) and _overtaken_first(sock.fileno(), waker):
                self.dbrouter_waker = None
                self.dbrouter_pending = True  # the statement's answer is left on the socket
                raise Overtaken("a hedge answered first; the statement's answer is left to be drained")
        return plain_recv(self, read_timeout)  # type: ignore[no-any-return]

    return type(f"Watched{base.__name__}", (base,), {"send": send, "recv": recv, "dbrouter_waker": None,
                                                      "dbrouter_pending": False, "dbrouter_asked": False})


def _overtaken_first(fileno: int, waker: Waker) -> bool:
    """Wait until ``fileno`` is readable (False) or ``waker`` fires for the read armed (True)."""
    poller = waker.poller
    poller.register(fileno, select.POLLIN)
    try:
        while True:
            woken = False
            for fd, _ in poller.poll():
                if fd == fileno:
                    return False
                woken = True
            if woken and waker.meant_for_armed():
                return True
    finally:
        poller.unregister(fileno)


_watched_classes: dict[type, type] = {}


def _watch_socket(conn: Any) -> None:
    """Swap the class of ``conn``'s socket object for its watched subclass (`_watched_class`)."""
    sock = conn._socket
    base = type(sock)
    watched = _watched_classes.get(base)
    if watched is None:
        watched = _watched_classes[base] = _watched_class(base)
    sock.__class__ = watched


class _PureConnection(MySQLConnection):
    """The connector's pure-Python connection, keeping the server's status flags, and
    refusing a command while results are pending, as the C extension's does.

    The C extension's connection exposes the flags of the server's last reply
    (``_server_status``); the pure-Python one reads them from every OK and EOF
    packet in ``_handle_server_status`` but keeps only two of them, not the
    autocommit flag. `MySQLAdapter.return_state` needs all three without a round
    trip: a session switched to ``SET autocommit = 0`` must not go back into the
    pool as clean, where the next borrower's writes would never be committed.

    After a multi-statement whose later results are unread, the pure-Python
    connection sends the next command anyway and takes the oldest unread result
    for its answer: from then on every statement gets the answer of the one before
    (a replication position read after ``SELECT ...; DELETE ...`` came back empty,
    so a session's next read went to a replica without the DELETE). The C
    extension refuses with error 2014, "Commands out of sync"; so does this class.
    """

    # Until the first reply: not autocommit, so a connection whose flags were never seen
    # (a connector that stopped calling the hook) is reset on return, never trusted.
    _server_status = 0

    def _handle_server_status(self, flags: int) -> None:
        super()._handle_server_status(flags)
        self._server_status = flags

    def _refuse_out_of_sync(self) -> None:
        if self._server_status & _STATUS_MORE_RESULTS:
            raise myerrors.DatabaseError(
                msg="Commands out of sync; you can't run this command now", errno=2014, sqlstate="HY000"
            )

    def cmd_query(self, *args: Any, **kwargs: Any) -> Any:
        self._refuse_out_of_sync()
        return super().cmd_query(*args, **kwargs)

    def cmd_ping(self) -> Any:
        self._refuse_out_of_sync()
        return super().cmd_ping()

    def _add_default_conn_attrs(self) -> None:
        super()._add_default_conn_attrs()
        # The sync connection's dict is _conn_attrs (the asyncio connection's, _connection_attrs):
        # with the other name, every pure-Python connect failed with an AttributeError.
        fit_conn_attrs(self._conn_attrs)


_fallback_logged = False
_fallback_lock = threading.Lock()


def _log_fallback_once(node: str) -> None:
    """Say once per process that MySQL connections run in pure Python, and why."""
    global _fallback_logged
    with _fallback_lock:
        if _fallback_logged:
            return
        _fallback_logged = True
    log.warning(
        "mysql node %s: mysql-connector's C extension is not in use (%s); MySQL connections use the "
        "connector's pure-Python implementation (about 50 us more per query). The extension must load "
        "before anything loads OpenSSL: import dbrouter before ssl, hashlib or requests, or add a .pth "
        "file as scripts/setup.sh does. Add use_pure=true to the node URLs to choose pure Python "
        "(and silence this warning).", node, _C_EXTENSION_ERROR,
    )


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _seconds(text: str) -> int:
    """A socket timeout in whole seconds: the connector hands it to the socket, where inf
    overflows and 0 or less is refused (or means no timeout at all)."""
    value = int(text) if text.strip().isdigit() else None
    if value is None or not 1 <= value <= MAX_WAIT:
        raise ValueError(f"expected whole seconds from 1 to {MAX_WAIT:.0f}, got {text!r}")
    return value


def _list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


# URL query options passed through to mysql.connector.connect, with their types.
URL_OPTIONS: dict[str, Callable[[str], Any]] = {
    "ssl_ca": str,
    "ssl_cert": str,
    "ssl_key": str,
    "ssl_disabled": _bool,
    "ssl_verify_cert": _bool,
    "ssl_verify_identity": _bool,
    "tls_versions": _list,
    "tls_ciphersuites": _list,
    "charset": str,
    "collation": str,
    "use_pure": _bool,
    "read_timeout": _seconds,
    "write_timeout": _seconds,
    "auth_plugin": str,
    "compress": _bool,
    "unix_socket": str,
    "time_zone": str,
    "sql_mode": str,
    # The server reports the rows an UPDATE matched instead of the rows it changed (the
    # FOUND_ROWS client flag, set at login): Django's save() relies on it, and
    # dbrouter.integrations.django sets it.
    "found_rows": _bool,
}


class MySQLAdapter(Adapter):
    """mysql-connector connections in autocommit mode with one cached cursor each.

    ``cursor()`` on the connector pings the server first, so each connection
    keeps the one cursor it was opened with and a read stays one round trip.

    Connections are the C extension's (``CMySQLConnection``) when it loaded, else the
    connector's pure-Python ones (``MySQLConnection``); the URL option ``use_pure``
    chooses explicitly (``use_pure=false`` without the extension is a
    `ConfigurationError` naming why it did not load). `driver` says which.
    """

    engine = "mysql"

    def __init__(self, address: NodeAddress, options: ConnectOptions | None = None) -> None:
        super().__init__(address, options)
        self._params = self._connect_params()
        chosen: bool | None = self._params.pop("use_pure", None)
        if chosen is False and _CConnection is None:
            raise ConfigurationError(
                f"mysql node {self.node}: use_pure=false, but mysql-connector's C extension is not "
                f"available ({_C_EXTENSION_ERROR})"
            )
        self._pure = chosen if chosen is not None else _CConnection is None
        if self._pure and chosen is None:
            _log_fallback_once(self.node)
        self.driver = DRIVER_PURE if self._pure else DRIVER_C
        # A hedged read that lost: the pure-Python connection reads its socket in Python, so its
        # wait can be ended (`_watched_class`); the C extension's waits in C, and is cut.
        self.overtakes = self._pure
        # The class connect() instantiates: the choice mysql.connector.connect() would make,
        # made here once, so that `driver` is true of every connection.
        self._connection_class: Callable[..., Any] = _PureConnection
        if not self._pure and _CConnection is not None:
            self._connection_class = _CConnection
        self.is_mariadb: bool | None = None
        self._max_packet: int | None = None  # @@max_allowed_packet, asked at the first bulk write
        # Statements without parameters go straight to the C extension's connection (see
        # execute), and through the cursor on the pure-Python one. (The reason given for the
        # cursor, that the pure-Python cmd_query refuses a multi-statement, does not hold for
        # connector 26.10: statements with parameters go to cmd_query on both.)
        self._direct = not self._pure

    def _connect_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {
            "host": self.address.host,
            "port": self.address.port,
            "connection_timeout": max(1, math.ceil(self.options.connect_timeout)),
            "autocommit": True,
            "charset": "utf8mb4",
            "collation": DEFAULT_COLLATION,
            "get_warnings": False,
            "conn_attrs": {"program_name": self.options.application_name},
        }
        if self.address.user:
            params["user"] = self.address.user
        if self.address.database:
            params["database"] = self.address.database
        for key, text in self.address.options.items():
            convert = URL_OPTIONS.get(key)
            if convert is None:
                raise ConfigurationError(
                    f"invalid option {key!r} for mysql node {self.node}; "
                    f"known: {', '.join(sorted(URL_OPTIONS))}"
                )
            try:
                params[key] = convert(text)
            except ValueError as exc:
                raise ConfigurationError(
                    f"invalid value for option {key!r} of mysql node {self.node}: {exc}"
                ) from None
        if params.pop("found_rows", False):
            params["client_flags"] = [ClientFlag.FOUND_ROWS]
        guard = self.guard_timeout
        if guard is not None and "read_timeout" not in params:
            # The client gives up a little after the server would have cancelled the
            # statement: only a hung server gets this far.
            params["read_timeout"] = max(1, math.ceil(guard))
        if self.address.password is not None:
            params["password"] = self.address.password
        return params

    def connect(self, *, read_timeout: float | None = None) -> Any:
        # The connector adds its attributes to the conn_attrs dict it is given, and
        # _PureConnection drops some of them: each connection gets a copy of its own, not the
        # one dict of every connection (and thread) of this adapter.
        params = {**self._params, "conn_attrs": dict(self._params["conn_attrs"])}
        if read_timeout is not None:
            params["read_timeout"] = max(1, math.ceil(read_timeout))
        try:
            if self._pure or _c_client.ready:
                conn: Any = self._connection_class(**params)
            else:
                conn = _c_client.first_connect(self._connection_class, params, self.options.connect_timeout)
        except (myerrors.Error, OSError) as exc:
            reason = first_line(scrub(str(exc), self.address.password))
            raise ConnectError(
                f"cannot connect to mysql node {self.node}: {reason}", node=self.node
            ) from None
        try:
            if self._pure:
                self.remember_socket(conn)
                _watch_socket(conn)
            else:
                self._find_socket(conn)
            conn._dbrouter_cursor = conn.cursor()
            # The encoding the cursor gives a statement (utf8mb4's is Python's utf8), asked once.
            conn._dbrouter_charset = conn.python_charset
            if self._pure:
                # The pure-Python connection asks for the session's sql_mode (a ping, then a
                # SELECT) at its first statement with parameters, which it needs to escape them:
                # asked here, a statement is one round trip and nothing goes out before it.
                _ = conn.sql_mode
            if self.is_mariadb is None:
                self.is_mariadb = "mariadb" in (conn.server_info or "").lower()
            timeout = self.options.statement_timeout
            if timeout is not None:
                if self.is_mariadb:
                    self.execute(conn, f"SET SESSION max_statement_time = {float(timeout):.3f}")
                else:
                    self.execute(conn, f"SET SESSION max_execution_time = {max(1, round(timeout * 1000))}")
        except myerrors.Error as exc:
            self.close(conn)
            reason = first_line(scrub(str(exc), self.address.password))
            raise ConnectError(
                f"cannot set up connection to mysql node {self.node}: {reason}", node=self.node
            ) from None
        return conn

    def socket_fd(self, conn: Any) -> int | None:
        # The pure-Python connection's socket; the C extension's, found when it connected.
        sock = getattr(getattr(conn, "_socket", None), "sock", None)
        if sock is None:
            return _sockets.claimed_fd(conn)
        try:
            return int(sock.fileno())
        except (OSError, ValueError):
            return None

    def _find_socket(self, conn: Any) -> None:
        """Find the C extension's socket among the process's descriptors (`_sockets`), so
        that `abort` can cut it (and a forked child leave it alone)."""
        found = _sockets.candidates(self.address.port)
        for attempt in range(10):
            if len(found) <= 1:
                break
            # Two connects to this server raced: the socket whose received bytes grow with a
            # ping on this connection is its own (the other may be pinging too: then again,
            # after a random pause that breaks the lockstep).
            if attempt:
                time.sleep(random.uniform(0, 0.002 * attempt))
            before = [_sockets.received(fd) for fd, _, _ in found]
            conn.ping()
            grew = [c for c, was in zip(found, before, strict=True)
                    if was is not None and _sockets.received(c[0]) != was]
            found = grew or found
        if len(found) == 1:
            _sockets.claim(conn, found[0][0], found[0][1])

    def watch(self, conn: Any, waker: Any) -> None:
        conn._socket.dbrouter_waker = waker

    def unwatch(self, conn: Any, waker: Any) -> None:
        link = conn._socket
        if link is not None and link.dbrouter_waker is waker:
            link.dbrouter_waker = None

    def drain(self, conn: Any, limit: float) -> bool:
        link = conn._socket
        link.dbrouter_waker = None
        if not link.dbrouter_pending:
            return self.return_state(conn) is ReturnState.CLEAN
        link.dbrouter_pending = False
        sock = link.sock
        kept, kept_read = sock.gettimeout(), conn._read_timeout
        try:
            # Every read of the answer bounded: the socket's timeout, and the connection's
            # read timeout, which each packet read sets on the socket (when it sets any).
            sock.settimeout(limit)
            conn._read_timeout = limit
            result = conn._handle_result(link.recv(limit))
            if "columns" in result:
                conn.get_rows()
        except myerrors.Error as exc:
            if self.classify(exc) is ErrorKind.UNREACHABLE:  # no answer in time, or the connection broke
                return False
            # else the statement's own error, from the server: it answered
        except OSError:
            return False
        finally:
            conn._read_timeout = kept_read
            with contextlib.suppress(OSError):
                sock.settimeout(kept)
        return self.return_state(conn) is ReturnState.CLEAN

    def session_id(self, conn: Any) -> int | None:
        try:
            return int(conn.connection_id)
        except (TypeError, ValueError, myerrors.Error):
            return None

    def cancel_sql(self, session_id: int) -> str | None:
        return f"KILL QUERY {int(session_id)}"

    def ping(self, conn: Any) -> None:
        conn.ping(reconnect=False)

    def return_state(self, conn: Any) -> ReturnState:
        if _is_closed(conn):
            return ReturnState.BROKEN
        # The server reports its flags in every reply (kept by the C extension's connection
        # and by _PureConnection); reading them costs nothing, whereas conn.autocommit would
        # ask the server.
        status = conn._server_status
        if (status & _STATUS_IN_TRANS or not status & _STATUS_AUTOCOMMIT or status & _STATUS_MORE_RESULTS
                or conn.unread_result):
            return ReturnState.DIRTY
        return ReturnState.CLEAN

    def reset(self, conn: Any) -> None:
        if conn.unread_result:
            conn.consume_results()
        while conn._server_status & _STATUS_MORE_RESULTS:
            # Results of a multi-statement (or a procedure) nobody read: until they are read,
            # every statement on this connection fails with 2014 "Commands out of sync".
            # The pure-Python connection has no next_result: its cursors read the next one.
            if self._pure:
                conn._dbrouter_cursor.nextset()
            else:
                conn.next_result()
            if conn.unread_result:
                conn.consume_results()
        status = conn._server_status
        if status & _STATUS_IN_TRANS:
            conn.rollback()
        if not conn._server_status & _STATUS_AUTOCOMMIT:
            conn.autocommit = True

    def close(self, conn: Any) -> None:
        with contextlib.suppress(Exception):  # closing a broken connection may fail; nothing to do
            conn.close()

    def execute(self, conn: Any, sql: str, params: Any = None) -> tuple[list[tuple[Any, ...]] | None, int]:
        if params is None and self._direct:
            # The connector's documented lower-level calls: the same round trip and the same
            # conversions, without the cursor's statement splitting (about 15 us per statement).
            result = conn.cmd_query(sql)
            if "columns" in result:
                rows = conn.get_rows()[0]
                return rows, len(rows)
            return None, result["affected_rows"]
        if params is None:
            cur: _Cursor = conn._dbrouter_cursor
            cur.execute(sql)
            if cur.description is not None:
                rows = cur.fetchall()
                return rows, cur.rowcount
            return None, cur.rowcount
        # With parameters, the statement is put together here by the connector's own code and
        # sent by the connection's lower-level call: the cursor's execute() runs a
        # multi-statement splitter over the statement after the values are in
        # (mysql.connector._scripting.split_multi_statement), which takes "DELIMITER" and
        # whitespace in a value for its client command when the quotes after it pair up, and
        # rewrites the statement: the value "DELIMITER $$ '" was stored as ";\n'", and one
        # with a backslash after the word failed as a lost connection.
        return self._query(conn, self._statement(conn, sql, params))

    def _statement(self, conn: Any, sql: str, params: Any) -> bytes:
        """``sql`` with ``params`` put in as the cursor's execute() puts them (the connector's
        escaping, in C with the extension; the same errors), before its splitter."""
        statement = self._encode(conn, sql)
        if not params:
            return statement
        if isinstance(params, dict):
            if self._pure:
                cur: _Cursor = conn._dbrouter_cursor
                return _bytestr_format_dict(statement, cur._process_params_dict(params))
            return _bytestr_format_dict(statement, conn.prepare_for_mysql(params))
        if not isinstance(params, (list, tuple)):
            raise myerrors.ProgrammingError(
                f"Could not process parameters: {type(params).__name__}, it must be of type list, tuple or dict"
            )
        escaped = conn._dbrouter_cursor._process_params(params) if self._pure else conn.prepare_for_mysql(params)
        put = _ParamSubstitutor(escaped)
        statement = RE_PY_PARAM.sub(put, statement)
        if put.remaining != 0:
            raise myerrors.ProgrammingError("Not all parameters were used in the SQL statement")
        return statement

    @staticmethod
    def _encode(conn: Any, sql: str) -> bytes:
        try:
            return sql.encode(conn._dbrouter_charset)
        except UnicodeError as exc:  # what the cursor raises (a charset other than utf8mb4)
            raise myerrors.ProgrammingError(str(exc)) from None

    def _escape(self, conn: Any, values: list[Any]) -> Sequence[bytes | bytearray]:
        """Each value as the connector escapes it, quoted: in one call into C with the extension;
        by the pure-Python cursor's code otherwise (bytes or bytearrays)."""
        if self._pure:
            cur: _Cursor = conn._dbrouter_cursor
            return [v if isinstance(v, (bytes, bytearray)) else str(v).encode() for v in cur._process_params(values)]
        escaped: Sequence[bytes] = conn.prepare_for_mysql(values)
        return escaped

    def _query(self, conn: Any, statement: bytes) -> tuple[list[tuple[Any, ...]] | None, int]:
        """One statement sent as it is (no statement splitting), its rows read: one round trip."""
        if self._pure:
            conn.handle_unread_result()  # as the cursor does (the C extension's cmd_query does it)
        result = conn.cmd_query(statement)
        if "columns" in result:
            rows = conn.get_rows()[0]
            return rows, len(rows)
        return None, int(result["affected_rows"])

    def execute_many(self, conn: Any, sql: str, rows: Sequence[Any]) -> int:
        if not rows:
            return 0
        insert = split_insert_values(sql)
        width = insert[1] if insert else 0
        statement: bytes | None = None
        if insert and all(not isinstance(row, Mapping) and len(row) == width for row in rows):
            # Escape every value in one call (C code with the extension) and build the
            # multi-row INSERT directly: the connector's executemany does the same
            # rewrite with Python work per row, which serialises bulk writers on the GIL.
            head, _, tail = insert
            escaped = self._escape(conn, list(chain.from_iterable(rows)))
            values = b",".join(b"(" + b",".join(escaped[i:i + width]) + b")" for i in range(0, len(escaped), width))
            statement = self._encode(conn, head) + values + self._encode(conn, tail)
        elif RE_SQL_INSERT_STMT.match(sql):
            # Rows as mappings (or another INSERT form): the connector's own multi-row rewrite.
            cur: _Cursor = conn._dbrouter_cursor
            statement = cur._batch_insert(sql, rows)
        if statement is not None:
            return self._query(conn, statement)[1]
        # Anything else runs once per row, as the connector's executemany would (without its
        # statement splitter: see execute).
        total = 0
        for row in rows:
            total += self._query(conn, self._statement(conn, sql, row))[1]
        return total

    def bulk_plan(self, conn: Any, sql: str) -> int:
        """The server's max_allowed_packet, which bounds each INSERT of a batch (asked once per
        node: it changes only with the server's configuration)."""
        if self._max_packet is None:
            rows, _ = self.execute(conn, "SELECT @@max_allowed_packet")
            self._max_packet = int(self._first_column(rows))
        return self._max_packet

    def write_batch(self, conn: Any, sql: str, rows: list[Any], plan: Any) -> int:
        """The batch as multi-row INSERTs, as many rows in each as ``max_allowed_packet``
        takes (``plan``; one statement when it is unknown), every value escaped by the
        connector (in C with the extension); other statements through `execute_many`."""
        insert = split_insert_values(sql)
        width = insert[1] if insert else 0
        if (not insert or not rows or not all(issubclass(kind, (tuple, list)) for kind in set(map(type, rows)))
                or set(map(len, rows)) != {width}):
            return self.execute_many(conn, sql, rows)  # mappings, or rows of another width: the driver's way
        head, _, tail = insert
        escaped = self._escape(conn, list(chain.from_iterable(rows)))
        values = [b"(" + b",".join(escaped[i:i + width]) + b")" for i in range(0, len(escaped), width)]
        del escaped
        start, end = self._encode(conn, head), self._encode(conn, tail)
        limit = (plan if isinstance(plan, int) else 1 << 62) - len(start) - len(end) - _PACKET_MARGIN
        widest = max(map(len, values))
        if widest > limit:
            raise ValueError(
                f"a row of this batch takes {widest} bytes in the INSERT, more than the server's "
                f"max_allowed_packet ({plan} bytes) allows for one statement"
            )
        # Cut where the running size (each row plus its comma) would pass the limit.
        ends = list(accumulate(len(v) + 1 for v in values))
        count, first, base = 0, 0, 0
        while first < len(values):
            last = max(first + 1, bisect_right(ends, base + limit, lo=first))
            count += self._query(conn, start + b",".join(values[first:last]) + end)[1]
            base = ends[last - 1]
            first = last
        return count

    def open_stream(self, conn: Any, sql: str, params: Any, batch_size: int) -> Any:
        # The statement as execute() sends it (past the cursor's splitter), its result left
        # unbuffered: the rows stay on the server's side of the socket until fetched
        # (mysql_use_result with the C extension).
        statement = self._encode(conn, sql) if params is None else self._statement(conn, sql, params)
        if self._pure:
            conn.handle_unread_result()
        conn.cmd_query(statement)
        return batch_size

    def fetch_stream(self, conn: Any, state: Any) -> list[tuple[Any, ...]]:
        if not conn.unread_result:  # the end was read (or the statement had no rows)
            return []
        rows: list[tuple[Any, ...]] = conn.get_rows(count=state)[0]
        return rows

    def close_stream(self, conn: Any, state: Any, finished: bool) -> bool:
        # An unbuffered result must be read to its end before the connection can run anything
        # else: a stream closed early leaves its connection to be discarded instead.
        return finished and not conn.unread_result

    def begin(self, conn: Any) -> None:
        conn.start_transaction()

    def is_writable(self, conn: Any) -> bool:
        rows, _ = self.execute(conn, "SELECT @@global.read_only, @@global.innodb_read_only")
        read_only, innodb_read_only = rows[0] if rows else (1, 1)
        return not int(read_only) and not int(innodb_read_only)

    def server_port(self, conn: Any) -> int:
        rows, _ = self.execute(conn, "SELECT @@port")
        return int(self._first_column(rows))

    def server_identity(self, conn: Any) -> str:
        # MySQL has a UUID per data directory. MariaDB has none: servers that replicate from
        # each other must have distinct server ids, and host name, port and data directory
        # tell apart the ones that do not.
        mariadb = "SELECT CONCAT_WS('/', @@server_id, @@hostname, @@port, @@datadir)"
        rows, _ = self.execute(conn, mariadb if self.is_mariadb else "SELECT @@server_uuid")
        return str(self._first_column(rows))

    def replication_position(self, conn: Any) -> str:
        sql = "SELECT @@global.gtid_current_pos" if self.is_mariadb else "SELECT @@global.gtid_executed"
        rows, _ = self.execute(conn, sql)
        return str(self._first_column(rows) or "")

    def position_covers(self, have: str, want: str) -> bool | None:
        if not self.is_mariadb:
            return None  # MySQL GTID sets: the server compares them (GTID_SUBSET)
        try:
            return gtid_covers(have, want)
        except ValueError:
            return None

    def has_replayed(self, conn: Any, position: str, timeout: float = 0.0) -> bool:
        if not position:
            return True
        if not self.is_mariadb:
            if timeout <= 0:
                rows, _ = self.execute(conn, "SELECT GTID_SUBSET(%s, @@global.gtid_executed)", (position,))
                return bool(self._first_column(rows))
            rows, _ = self.execute(
                conn, "SELECT WAIT_FOR_EXECUTED_GTID_SET(%s, %s)", (position, float(timeout))
            )
            return bool(self._first_column(rows) == 0)  # the wait returned 0: replayed in time
        # gtid_current_pos holds what this node applied, by replication or by its own
        # writes: one round trip answers for a caught-up replica and for a primary.
        rows, _ = self.execute(conn, "SELECT @@global.gtid_current_pos")
        if gtid_covers(str(self._first_column(rows) or ""), position):
            return True
        if timeout <= 0:
            return False
        rows, _ = self.execute(conn, "SELECT MASTER_GTID_WAIT(%s, %s)", (position, float(timeout)))
        return bool(self._first_column(rows) == 0)  # the wait returned 0: replayed in time

    def replica_lag(self, conn: Any, primary_position: str | None = None) -> float | None:
        cur: _Cursor = conn._dbrouter_cursor
        cur.execute("SHOW SLAVE STATUS" if self.is_mariadb else "SHOW REPLICA STATUS")
        rows = cur.fetchall()
        if not rows:
            return 0.0  # not a replica
        names = [d[0] for d in cur.description] if cur.description else []
        if primary_position and self.has_replayed(conn, primary_position):
            return 0.0
        row = dict(zip(names, rows[0], strict=False))
        seconds = row.get("Seconds_Behind_Master", row.get("Seconds_Behind_Source"))
        return None if seconds is None else float(seconds)

    def classify(self, exc: BaseException) -> ErrorKind:
        if isinstance(exc, ConnectError):
            return ErrorKind.UNREACHABLE
        if isinstance(exc, (myerrors.ConnectionTimeoutError, myerrors.ReadTimeoutError, myerrors.WriteTimeoutError)):
            return ErrorKind.UNREACHABLE
        if not isinstance(exc, (myerrors.Error, _CExtensionError)):
            return ErrorKind.CALLER
        errno: int | None = getattr(exc, "errno", None)
        if errno in _CONFLICT_ERRNOS:
            return ErrorKind.CONFLICT
        if errno in _READ_ONLY_ERRNOS:
            return ErrorKind.READ_ONLY
        if errno == _OPTION_PREVENTS_STATEMENT:
            return ErrorKind.READ_ONLY if _names_read_only_option(exc) else ErrorKind.CALLER
        if errno in _TIMEOUT_ERRNOS:
            return ErrorKind.TIMEOUT
        if errno in _UNREACHABLE_ERRNOS:
            return ErrorKind.UNREACHABLE
        if (errno is None or errno < 0) and isinstance(exc, (myerrors.InterfaceError, myerrors.OperationalError,
                                                             _CExtensionError)):
            if _unconvertible_parameter(exc):
                return ErrorKind.CALLER  # nothing was sent: the connection is as it was
            # "MySQL Connection not available": the client already knows it is gone.
            return ErrorKind.UNREACHABLE
        return ErrorKind.CALLER


def _unconvertible_parameter(exc: BaseException) -> bool:
    """Whether the C extension refused a parameter's Python type before sending anything
    ("Python type dict cannot be converted", "Failed converting Python 'x'"): an error with
    no number, like a lost connection's, but the caller's. (The pure-Python connector raises
    a ProgrammingError for it.)"""
    text = (getattr(exc, "msg", None) or str(exc)).lower()
    return "cannot be converted" in text or "failed converting python" in text


def _names_read_only_option(exc: BaseException) -> bool:
    """Whether a 1290 refusal names --read-only or --super-read-only (not --secure-file-priv, ...)."""
    text = (getattr(exc, "msg", None) or str(exc)).lower()
    return "read-only" in text or "read_only" in text


def _is_closed(conn: Any) -> bool:
    """Whether the client already knows the connection is gone (no round trip)."""
    is_closed = getattr(conn, "is_closed", None)  # the C extension's connection
    if is_closed is not None:
        return bool(is_closed())
    sock = getattr(conn, "_socket", None)  # the pure-Python connection: close() keeps its socket
    sock = getattr(sock, "sock", None)     # objects, but a closed socket has no file descriptor
    return sock is None or sock.fileno() < 0


def gtid_covers(current: str, wanted: str) -> bool:
    """True when MariaDB GTID position ``current`` includes ``wanted``, domain by domain."""
    have: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in current.split(","))):
        domain, _server, seq = part.split("-")
        have[domain] = int(seq)
    for part in filter(None, (p.strip() for p in wanted.split(","))):
        domain, _server, seq = part.split("-")
        if have.get(domain, -1) < int(seq):
            return False
    return True
