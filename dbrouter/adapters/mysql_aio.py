"""MySQL and MariaDB on asyncio through mysql-connector-python's ``mysql.connector.aio``.

The asyncio flavour of `dbrouter.adapters.mysql`: the same connect parameters, session
settings, SQL and error classification (the aio connection raises the classes of
``mysql.connector.errors``, which `MySQLAdapter.classify` knows), awaited. The aio
connection is the connector's pure-Python protocol over asyncio streams; there is no C
extension for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import socket
import ssl
from itertools import chain
from typing import TYPE_CHECKING, Any, Callable, Concatenate, Coroutine, Mapping, ParamSpec, Sequence, TypeVar

# No preload_mysql_extension() here: importing this module ran dbrouter's __init__, which
# loads the sync adapter's C extension first thing (asyncio itself imports ssl).
from mysql.connector import errors as myerrors
from mysql.connector.aio.connection import MySQLConnection as _AioMySQLConnection
from mysql.connector.aio.plugins import get_auth_plugin
from mysql.connector.constants import ClientFlag
from mysql.connector.cursor import RE_SQL_INSERT_STMT as _INSERT
from mysql.connector.utils import get_platform

from ..config import ConnectOptions
from ..errors import ConfigurationError, ConnectError
from ..url import NodeAddress
from ._text import first_line, scrub, split_insert_values
from .aio import AsyncAdapter
from .base import ErrorKind, Result, ReturnState
from .mysql import MySQLAdapter, fit_conn_attrs, gtid_covers

if TYPE_CHECKING:
    from mysql.connector.aio.cursor import MySQLCursor as _AioCursor

__all__ = ["DRIVER_AIO", "AsyncMySQLAdapter"]

DRIVER_AIO = "mysql-connector (asyncio)"

_T = TypeVar("_T")
_P = ParamSpec("_P")
_Self = TypeVar("_Self")

# The server's status flags (mysql.connector.constants.ServerFlag), as in .mysql.
_STATUS_IN_TRANS = 1
_STATUS_AUTOCOMMIT = 2
_STATUS_MORE_RESULTS = 8

# The connector names the client's platform in the connection attributes it sends at login,
# and finds out what it is the first time it is asked by running ``lsb_release -a`` (20 ms and
# more, then cached). Asked here, at import, so that no connect blocks the event loop for it.
get_platform()

# Nor for what the first login of a process would load: the authentication plugin's module,
# imported by name at login (compiled too on a fresh install: 1 ms, 5 ms in a busy CI run),
# and the server version's pattern, compiled when the handshake is parsed.
for _plugin in ("mysql_native_password", "caching_sha2_password", "sha256_password", "mysql_clear_password"):
    with contextlib.suppress(Exception):
        get_auth_plugin(_plugin)  # cached by the connector (lru_cache)
re.compile(r"^(\d{1,2})\.(\d{1,2})\.(\d{1,3})(.*)")  # mysql.connector.aio.abstracts.ServerInfo


class _Connection(_AioMySQLConnection):
    """The connector's asyncio connection, keeping the server's status flags and refusing a
    command while results are pending, as `dbrouter.adapters.mysql._PureConnection` does for
    the pure-Python sync one (the aio connection shares its protocol code and both gaps).

    Also: when TLS was not negotiated (a server without TLS, which the connector accepts
    unless ``ssl_verify_cert`` is set) while ``ssl_disabled`` is false, the connector's
    ``connect`` ends by unpacking the cipher of a plain socket (None) and raises TypeError
    (mysql-connector-python 9.x and 26.x) after login, with the socket left open. Marking
    such a session as plain before that check avoids it.
    """

    # Until the first reply: not autocommit, so a connection whose flags were never seen is
    # reset on return, never trusted.
    _server_status = 0
    # The TLS context of the adapter that opened this connection (`AsyncMySQLAdapter._tls`).
    _dbrouter_tls: _TlsContexts | None = None
    # The cursor kept for statements with parameters (`AsyncMySQLAdapter.execute`).
    _dbrouter_cursor: Any = None
    # True while a call of the adapter is under way on this connection (`_one_call`).
    _dbrouter_busy = False

    def _handle_server_status(self, flags: int) -> None:
        super()._handle_server_status(flags)
        self._server_status = flags

    def _refuse_out_of_sync(self) -> None:
        if self._server_status & _STATUS_MORE_RESULTS:
            raise myerrors.DatabaseError(
                msg="Commands out of sync; you can't run this command now", errno=2014, sqlstate="HY000"
            )

    async def cmd_query(self, *args: Any, **kwargs: Any) -> Any:
        self._refuse_out_of_sync()
        return await super().cmd_query(*args, **kwargs)

    async def cmd_ping(self) -> Any:
        self._refuse_out_of_sync()
        return await super().cmd_ping()

    def _add_default_conn_attrs(self) -> None:
        super()._add_default_conn_attrs()
        fit_conn_attrs(self._connection_attrs)  # the connector sends their length in one byte

    async def _do_auth(self) -> None:
        tls = self._dbrouter_tls
        if tls is not None and self._socket is not None and not self._ssl_disabled and self._client_flags & ClientFlag.SSL:
            # The connector builds a new SSLContext for every connection, loading the system's
            # CA certificates each time: 20 to 100 ms of blocking file and crypto work on the
            # event loop. The adapter builds it once, in a thread (OpenSSL's loading runs
            # without the GIL since Python 3.10.6, python/cpython#94637), and every connection
            # shares it.
            context = await tls.get(self._socket.build_ssl_context)
            self._socket.build_ssl_context = lambda **_: context  # type: ignore[method-assign]
        await super()._do_auth()

    async def _post_connection(self) -> None:
        await super()._post_connection()
        if not self._ssl_active:
            self._ssl_disabled = True  # see the class docstring: a plain session has no cipher


def _one_call(
    method: Callable[Concatenate[_Self, Any, _P], Coroutine[Any, Any, _T]],
) -> Callable[Concatenate[_Self, Any, _P], Coroutine[Any, Any, _T]]:
    """Mark the connection busy for the length of one call of the adapter on it. A call that
    ends, with its result or with an error the driver read to its end, clears the mark; one
    cancelled halfway (its task cancelled, its time limit reached) leaves it, and
    `AsyncMySQLAdapter.return_state` then says BROKEN even if nobody called `abort`: the
    rest of the reply may still be on its way, and would answer the next statement."""

    @functools.wraps(method)
    async def call(self: _Self, conn: Any, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        conn._dbrouter_busy = True
        try:
            result = await method(self, conn, *args, **kwargs)
        except myerrors.WriteTimeoutError as exc:
            if isinstance(exc.__cause__, asyncio.CancelledError):
                # A compressed connection (compress=true) turns a cancellation during a write
                # into WriteTimeoutError, after closing itself: the call stays cancelled, or
                # asyncio.timeout() would not see its timeout and task.cancel() would be lost.
                raise exc.__cause__ from None
            conn._dbrouter_busy = False
            raise
        except Exception:
            # The driver's errors come after it read the whole reply (a server error), or with
            # the connection lost or closed (which _is_broken sees).
            conn._dbrouter_busy = False
            raise
        conn._dbrouter_busy = False
        return result

    return call


class _TlsContexts:
    """One adapter's TLS context, built once, off the event loop, from the URL's options (what
    the connector would build for each connection)."""

    def __init__(self, params: Mapping[str, Any]) -> None:
        self._arguments = {
            "ssl_ca": params.get("ssl_ca"),
            "ssl_cert": params.get("ssl_cert"),
            "ssl_key": params.get("ssl_key"),
            "ssl_verify_cert": params.get("ssl_verify_cert", False),
            "ssl_verify_identity": params.get("ssl_verify_identity", False),
            "tls_versions": list(params.get("tls_versions") or []),
            "tls_cipher_suites": list(params.get("tls_ciphersuites") or []),
        }
        self._context: ssl.SSLContext | None = None

    async def get(self, build: Callable[..., ssl.SSLContext]) -> ssl.SSLContext:
        if self._context is None:
            # Two first connects at once may both build one; either serves.
            self._context = await asyncio.to_thread(build, **self._arguments)
        return self._context


class AsyncMySQLAdapter(AsyncAdapter):
    """``mysql.connector.aio`` connections in autocommit mode, one cached cursor each, over
    the node's sync `MySQLAdapter` (``sync``).

    Every call is awaited on the event loop and nothing of it blocks: connect is bounded
    by ``connect_timeout`` as a whole (the connector bounds only the TCP connect), and the
    TLS context is built once per adapter, in a thread. Unlike the sync adapter's, the
    connections have no read timeout unless the URL sets ``read_timeout`` (see
    `_connect_params`): the caller bounds each call by `guard_timeout` and aborts the
    connection when that passes. The server's statement timeout is set as by the sync
    adapter; TCP keepalives and TCP_USER_TIMEOUT as the PostgreSQL adapter has libpq set
    them.
    """

    engine = "mysql"
    driver = DRIVER_AIO
    sync: MySQLAdapter

    @classmethod
    def for_address(cls, address: NodeAddress, options: ConnectOptions | None = None) -> AsyncMySQLAdapter:
        return cls(MySQLAdapter(address, options))

    def __init__(self, sync: MySQLAdapter) -> None:
        super().__init__(sync)
        self._tls = _TlsContexts(sync._params)
        self._params = self._connect_params()

    def _connect_params(self) -> dict[str, Any]:
        # The sync adapter's parameters, checked and converted from the URL already; what the
        # aio connection takes differently is adjusted here.
        params = dict(self.sync._params)
        if "read_timeout" not in self.address.options:
            # The sync adapter bounds every read by the guard timeout. The aio connection
            # wraps each read of the socket (two per packet) in asyncio.wait_for, which on
            # Python 3.11 starts a task for each: over three times the client's CPU time per
            # query (SELECT 1: about 350 us instead of 100). The caller bounds a call instead
            # (asyncio.timeout(guard_timeout), then `abort`), one timer per call; a read_timeout
            # in the URL still applies.
            params.pop("read_timeout", None)
        if bool(params.get("ssl_cert")) != bool(params.get("ssl_key")):
            raise ConfigurationError(f"mysql node {self.node}: ssl_cert and ssl_key go together (a client certificate)")
        if not params.get("ssl_cert"):
            # The aio connection refuses ssl_ca without a client certificate (the sync one takes
            # it): the CA reaches the TLS context the adapter builds (_TlsContexts) instead.
            params.pop("ssl_ca", None)
        flags: list[int] = params.pop("client_flags", [])
        if flags:
            # The aio connection takes the flags as one int (a list breaks it), and replaces
            # the default flags with what it is given.
            combined = ClientFlag.get_default()
            for flag in flags:
                combined |= flag
            params["client_flags"] = combined
        return params

    @property
    def is_mariadb(self) -> bool | None:
        """Whether the node is MariaDB (None until a first connection told): kept on the sync
        adapter, whose `position_covers` needs it too."""
        return self.sync.is_mariadb

    async def connect(self) -> Any:
        params = self._params
        timeout = self.options.connect_timeout
        conn: _Connection | None = None
        try:
            # The connector adds its own attributes (pid, platform) to the dict it is given.
            conn = _Connection(**{**params, "conn_attrs": dict(params["conn_attrs"])})
            conn._dbrouter_tls = self._tls
            # The connector bounds the TCP connect only; the handshake, TLS and login too.
            await asyncio.wait_for(conn.connect(), timeout)
        except (myerrors.Error, OSError, asyncio.TimeoutError) as exc:
            self.abort(conn)
            reason = self._reason(exc, timeout)
            raise ConnectError(f"cannot connect to mysql node {self.node}: {reason}", node=self.node) from None
        except BaseException:  # cancelled: the half-open connection must not stay behind
            self.abort(conn)
            raise
        try:
            self._set_keepalives(conn)
            conn._dbrouter_cursor = await conn.cursor()  # no round trip on the aio connection
            # The connection asks the server for the session's sql_mode (which it needs to
            # escape parameters) at its first statement with parameters: asked here, a
            # statement is one round trip and nothing goes out before it.
            await conn.get_sql_mode()
            if self.sync.is_mariadb is None:
                self.sync.is_mariadb = "mariadb" in (conn.server_info or "").lower()
            statement_timeout = self.options.statement_timeout
            if statement_timeout is not None:
                if self.sync.is_mariadb:
                    await self.execute(conn, f"SET SESSION max_statement_time = {float(statement_timeout):.3f}")
                else:
                    await self.execute(conn, f"SET SESSION max_execution_time = {max(1, round(statement_timeout * 1000))}")
        except (myerrors.Error, OSError) as exc:
            self.abort(conn)
            reason = first_line(scrub(str(exc), self.address.password))
            raise ConnectError(f"cannot set up connection to mysql node {self.node}: {reason}", node=self.node) from None
        except BaseException:
            self.abort(conn)
            raise
        return conn

    def _reason(self, exc: BaseException, timeout: float) -> str:
        if isinstance(exc, asyncio.TimeoutError) or isinstance(exc.__cause__, asyncio.TimeoutError):
            return f"connect and login timed out after {timeout:g} s"
        if isinstance(exc, OSError) and not isinstance(exc, (socket.gaierror, ssl.SSLError)) and exc.errno and exc.errno > 0:
            # asyncio says "[Errno 111] Connect call failed ('127.0.0.1', 3306)": the node is
            # named already; what failed is in the error number.
            return f"{os.strerror(exc.errno)} (errno {exc.errno})"
        return first_line(scrub(str(exc), self.address.password)) or type(exc).__name__

    def _set_keepalives(self, conn: Any) -> None:
        """TCP keepalives as the PostgreSQL adapter asks libpq for them, and TCP_USER_TIMEOUT:
        keepalives only probe an idle connection, and with a statement sent and not
        acknowledged Linux retransmits for about 15 minutes."""
        sock = conn._socket._writer.transport.get_extra_info("socket")
        if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
            return  # a unix socket
        opts = self.options
        idle, interval = max(1, round(opts.keepalive_idle)), max(1, round(opts.keepalive_interval))
        settings = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
        for name, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", interval), ("TCP_KEEPCNT", opts.keepalive_count),
                            ("TCP_USER_TIMEOUT", 1000 * (idle + interval * opts.keepalive_count))):
            option = getattr(socket, name, None)
            if option is not None:  # Linux has them all; other systems some
                settings.append((socket.IPPROTO_TCP, option, value))
        for level, option, value in settings:
            with contextlib.suppress(OSError):
                sock.setsockopt(level, option, value)

    @_one_call
    async def ping(self, conn: Any) -> None:
        await conn.ping(reconnect=False)

    def return_state(self, conn: Any) -> ReturnState:
        if _is_broken(conn):
            return ReturnState.BROKEN
        status = conn._server_status
        if (status & _STATUS_IN_TRANS or not status & _STATUS_AUTOCOMMIT or status & _STATUS_MORE_RESULTS
                or conn.unread_result):
            return ReturnState.DIRTY
        return ReturnState.CLEAN

    @_one_call
    async def reset(self, conn: Any) -> None:
        if conn.unread_result:
            await conn.consume_results()
        while conn._server_status & _STATUS_MORE_RESULTS:
            # Results of a multi-statement (or a procedure) nobody read: until they are read,
            # every statement on this connection is refused (2014, "Commands out of sync").
            await conn._handle_result(await conn._socket.read(conn._read_timeout))
            if conn.unread_result:
                await conn.consume_results()
        if conn._server_status & _STATUS_IN_TRANS:
            await conn.rollback()
        if not conn._server_status & _STATUS_AUTOCOMMIT:
            await conn.set_autocommit(True)

    async def close(self, conn: Any) -> None:
        if _is_broken(conn) or conn.unread_result or conn._server_status & _STATUS_MORE_RESULTS:
            self.abort(conn)  # nothing to say to the server that it would read
            return
        try:
            # QUIT, then the socket closes; a server that stopped reading does not hold us up.
            await asyncio.wait_for(conn.close(), 1.0)
        except Exception:  # noqa: BLE001 - closing a broken connection may fail; nothing to do
            pass
        finally:
            self.abort(conn)  # no-op once closed; on cancellation, the socket still goes

    def abort(self, conn: Any) -> None:
        sock = getattr(conn, "_socket", None)
        if sock is None:
            return
        # No QUIT (that would be a write on a connection in an unknown state): the transport
        # drops the socket at once, and the connection reports itself not connected, so any
        # later call fails with "MySQL Connection not available" (UNREACHABLE). On the loop's
        # thread, as every call of the adapter: asyncio's transports are not thread-safe.
        sock._is_connected = False
        writer = getattr(sock, "_writer", None)
        transport = getattr(writer, "transport", None)
        if transport is not None:
            with contextlib.suppress(Exception):  # must not raise, whatever the state
                transport.abort()

    @_one_call
    async def execute(self, conn: Any, sql: str, params: Any = None) -> Result:
        if params is None:
            return await self._query(conn, sql)
        # The values escaped and put in by the cursor's own code (with the sql_mode asked at
        # connect: no round trip), then sent as the connection's lower-level call: the cursor's
        # execute() would then run its multi-statement splitter over the statement, values
        # included, and that splitter takes "DELIMITER" in a value for its command when the
        # quotes after it pair up (the value "DELIMITER $$ '" came back as ";\n'").
        cur: _AioCursor = conn._dbrouter_cursor
        return await self._query(conn, await cur._prepare_statement(sql, params))

    @staticmethod
    async def _query(conn: Any, statement: str | bytes) -> Result:
        """One statement as it is, its rows read (buffered): one round trip."""
        result = await conn.cmd_query(statement)
        if "columns" in result:
            rows, _ = await conn.get_rows()
            return rows, len(rows)
        return None, int(result["affected_rows"])

    @_one_call
    async def execute_many(self, conn: Any, sql: str, rows: Sequence[Any]) -> int:
        if not rows:
            return 0
        cur: _AioCursor = conn._dbrouter_cursor
        insert = split_insert_values(sql)
        width = insert[1] if insert else 0
        statement: bytes | None = None
        if insert and all(not isinstance(row, Mapping) and len(row) == width for row in rows):
            # Every value escaped in one call (the cursor's own escaping), and one multi-row
            # INSERT: the connector's executemany does the same rewrite with a regular
            # expression per row.
            head, _, tail = insert
            escaped = [
                v if isinstance(v, (bytes, bytearray)) else str(v).encode()
                for v in await cur._process_params(list(chain.from_iterable(rows)))
            ]
            values = b",".join(b"(" + b",".join(escaped[i:i + width]) + b")" for i in range(0, len(escaped), width))
            statement = head.encode() + values + tail.encode()
        elif _INSERT.match(sql):
            # Rows as mappings (or another INSERT form): the connector's own multi-row rewrite.
            statement = await cur._batch_insert(sql, rows)
        if statement is not None:
            _, count = await self._query(conn, statement)
            return count
        # Anything else runs once per row, as the connector's executemany would (without its
        # statement splitter: see execute).
        total = 0
        for row in rows:
            _, count = await self._query(conn, await cur._prepare_statement(sql, row))
            total += count
        return total

    @_one_call
    async def begin(self, conn: Any) -> None:
        await conn.start_transaction()

    @_one_call
    async def commit(self, conn: Any) -> None:
        await conn.commit()

    @_one_call
    async def rollback(self, conn: Any) -> None:
        await conn.rollback()

    @_one_call
    async def replication_position(self, conn: Any) -> str:
        sql = "SELECT @@global.gtid_current_pos" if self.is_mariadb else "SELECT @@global.gtid_executed"
        rows, _ = await self.execute(conn, sql)
        return str(self.sync._first_column(rows) or "")

    @_one_call
    async def has_replayed(self, conn: Any, position: str, timeout: float = 0.0) -> bool:
        if not position:
            return True
        first = self.sync._first_column
        if not self.is_mariadb:
            if timeout <= 0:
                rows, _ = await self.execute(conn, "SELECT GTID_SUBSET(%s, @@global.gtid_executed)", (position,))
                return bool(first(rows))
            rows, _ = await self.execute(conn, "SELECT WAIT_FOR_EXECUTED_GTID_SET(%s, %s)", (position, float(timeout)))
            return bool(first(rows) == 0)  # the wait returned 0: replayed in time
        # gtid_current_pos holds what this node applied, by replication or by its own
        # writes: one round trip answers for a caught-up replica and for a primary.
        rows, _ = await self.execute(conn, "SELECT @@global.gtid_current_pos")
        if gtid_covers(str(first(rows) or ""), position):
            return True
        if timeout <= 0:
            return False
        rows, _ = await self.execute(conn, "SELECT MASTER_GTID_WAIT(%s, %s)", (position, float(timeout)))
        return bool(first(rows) == 0)  # the wait returned 0: replayed in time

    def classify(self, exc: BaseException) -> ErrorKind:
        # The aio connection raises mysql.connector.errors' classes, which the sync adapter
        # classifies, and wraps socket errors (OperationalError 2055, InterfaceError 2013,
        # "MySQL Connection not available"). What it lets through as it is: OSError from
        # the TCP connect (refused, unreachable, DNS), and asyncio.TimeoutError (OSError's
        # TimeoutError from 3.11) or ConnectionResetError where a read or write fails
        # outside its wrapping; asyncio.IncompleteReadError is not raised by the reads it
        # uses (StreamReader.read), but is mapped too, for a later connector that does.
        if isinstance(exc, (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError)):
            return ErrorKind.UNREACHABLE
        return self.sync.classify(exc)


def _is_broken(conn: Any) -> bool:
    """Whether the client already knows the connection is gone or unusable (no round trip):
    closed or aborted, the server closed its end (a KILL, a restart: the reader saw the end
    of the stream), or a call on it never finished (cancelled without `abort`)."""
    if conn._dbrouter_busy or not conn.is_socket_connected():
        return True
    sock = conn._socket
    transport = getattr(sock._writer, "transport", None)
    reader = sock._reader
    return (transport is None or bool(transport.is_closing()) or reader is None or reader.at_eof()
            or reader.exception() is not None)
