"""The asyncio MySQL adapter (``mysql.connector.aio``) against the suite's MariaDB cluster.

Each test runs its coroutine with ``asyncio.run`` (a fresh event loop per test): the suite
has no asyncio plugin, and an adapter is used on one loop at a time anyway.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator

import pytest

from dbrouter import ConfigurationError, ConnectError, ConnectOptions
from dbrouter.adapters import ErrorKind, ReturnState, make_async_adapter
from dbrouter.adapters.mysql import MySQLAdapter
from dbrouter.adapters.mysql_aio import DRIVER_AIO, AsyncMySQLAdapter
from dbrouter.cluster import LocalNode, MariaDBCluster, MariaDBNode
from dbrouter.url import parse_address

from .conftest import wait_until
from .test_bad_input import free_port

pytestmark = pytest.mark.mysql


def adapter_for(url: str, **options: Any) -> AsyncMySQLAdapter:
    adapter = make_async_adapter(parse_address(url), ConnectOptions(**options) if options else None)
    assert isinstance(adapter, AsyncMySQLAdapter)
    return adapter


async def first(adapter: AsyncMySQLAdapter, conn: Any, sql: str, params: Any = None) -> Any:
    rows, _ = await adapter.execute(conn, sql, params)
    assert rows
    return rows[0][0]


async def raised(call: Awaitable[Any]) -> BaseException:
    """The exception ``call`` raises (the test fails if it raises none)."""
    try:
        await call
    except Exception as exc:  # noqa: BLE001 - what is raised is what is tested
        return exc
    raise AssertionError("no exception")


@pytest.fixture
def maria_table(maria_cluster: Any) -> Iterator[str]:
    """A fresh ``(id, v)`` table on the MariaDB primary, replicated everywhere; dropped afterwards."""
    name = "a" + uuid.uuid4().hex[:10]
    maria_cluster.primary.query(f"CREATE TABLE {name} (id bigint primary key, v varchar(40))")
    maria_cluster.wait_replicated(timeout=10)
    yield name
    for replica in maria_cluster.replicas:
        maria_cluster.resume_replication(replica)
    maria_cluster.primary.query(f"DROP TABLE IF EXISTS {name}")


def test_make_async_adapter_wraps_the_sync_adapter(maria_cluster: Any) -> None:
    url = maria_cluster.primary.url
    adapter = adapter_for(url, statement_timeout=2.0)
    assert isinstance(adapter.sync, MySQLAdapter)
    assert adapter.driver == DRIVER_AIO == "mysql-connector (asyncio)"
    assert adapter.engine == "mysql" and adapter.node == f"127.0.0.1:{maria_cluster.primary.port}"
    assert adapter.guard_timeout == adapter.sync.guard_timeout == pytest.approx(2.5)
    assert maria_cluster.password not in repr(adapter)
    # No read timeout on the aio connection unless the URL asks for one (see _connect_params).
    assert "read_timeout" in adapter.sync._params and "read_timeout" not in adapter._params
    assert adapter_for(url + "?read_timeout=7")._params["read_timeout"] == 7
    with pytest.raises(ConfigurationError, match="ssl_cert and ssl_key"):
        adapter_for(url + "?ssl_cert=/nonexistent/client.pem")


def test_connect_and_query(maria_cluster: Any) -> None:
    async def body() -> None:
        adapter = adapter_for(maria_cluster.primary.url, keepalive_idle=17, keepalive_interval=4, keepalive_count=2)
        conn = await adapter.connect()
        try:
            assert adapter.is_mariadb is True and adapter.sync.is_mariadb is True
            assert adapter.return_state(conn) is ReturnState.CLEAN
            assert await adapter.execute(conn, "SELECT 1, 'x', NULL") == ([(1, "x", None)], 1)
            assert await adapter.execute(conn, "SELECT %s, %s, %s", (2, "it's", None)) == ([(2, "it's", None)], 1)
            assert await adapter.execute(conn, "SELECT %(a)s", {"a": "named"}) == ([("named",)], 1)
            assert await adapter.execute(conn, "DO 1") == (None, 0)
            rows, _ = await adapter.execute(
                conn, "SELECT @@session.autocommit, @@character_set_client, @@collation_connection"
            )
            assert rows == [(1, "utf8mb4", "utf8mb4_general_ci")]
            await adapter.ping(conn)
            sock = conn._socket._writer.transport.get_extra_info("socket")
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 17
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 4
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 2
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 1000 * (17 + 4 * 2)
            assert adapter.return_state(conn) is ReturnState.CLEAN
        finally:
            await adapter.close(conn)
        assert adapter.return_state(conn) is ReturnState.BROKEN

    asyncio.run(body())


def test_found_rows_url_option_reaches_the_aio_connection(maria_cluster: Any, maria_table: str) -> None:
    """The sync adapter passes client flags as a list, which the aio connection cannot take."""

    async def body() -> None:
        plain, found = adapter_for(maria_cluster.primary.url), adapter_for(maria_cluster.primary.url + "?found_rows=true")
        a, b = await plain.connect(), await found.connect()
        try:
            await plain.execute(a, f"INSERT INTO {maria_table} VALUES (1, 'same')")
            same = f"UPDATE {maria_table} SET v = 'same' WHERE id = 1"
            assert await plain.execute(a, same) == (None, 0)  # changed
            assert await found.execute(b, same) == (None, 1)  # matched
        finally:
            await plain.close(a)
            await found.close(b)

    asyncio.run(body())


def test_connect_errors_name_the_node_and_never_the_password(maria_cluster: Any) -> None:
    node = maria_cluster.primary
    secret = "wrong-" + uuid.uuid4().hex
    base, database = node.url.rsplit("/", 1)
    refused_port = free_port()
    cases = {
        "refused": (node.url.replace(f":{node.port}/", f":{refused_port}/"), f"127.0.0.1:{refused_port}", "Connection refused"),
        "password": (node.url.replace(maria_cluster.password, secret), f"127.0.0.1:{node.port}", "Access denied"),
        "database": (f"{base}/nodb_{uuid.uuid4().hex[:8]}", f"127.0.0.1:{node.port}", "nodb_"),
    }

    async def body() -> None:
        for case, (url, named, says) in cases.items():
            adapter = adapter_for(url, connect_timeout=3)
            start = time.monotonic()
            error = await raised(adapter.connect())
            assert time.monotonic() - start < 3.5, case
            assert isinstance(error, ConnectError), (case, error)
            text = str(error)
            assert named in text and says in text, (case, text)
            assert secret not in text and maria_cluster.password not in text, case
            assert error.__cause__ is None and error.__suppress_context__, case
            assert adapter.classify(error) is ErrorKind.UNREACHABLE, case

    asyncio.run(body())


def test_connect_to_a_server_that_never_answers_times_out(maria_cluster: Any) -> None:
    """A listener that accepts and never sends its handshake: the connector bounds only the TCP
    connect; the adapter bounds connect and login as a whole by connect_timeout."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)  # the kernel completes the TCP handshake; nobody ever answers
        port = listener.getsockname()[1]
        url = maria_cluster.primary.url.replace(f":{maria_cluster.primary.port}/", f":{port}/")

        async def body() -> None:
            adapter = adapter_for(url, connect_timeout=0.5)
            start = time.monotonic()
            error = await raised(adapter.connect())
            elapsed = time.monotonic() - start
            assert isinstance(error, ConnectError) and "timed out after 0.5 s" in str(error), error
            assert f"127.0.0.1:{port}" in str(error)
            assert 0.45 <= elapsed < 2.0, elapsed
            assert adapter.classify(error) is ErrorKind.UNREACHABLE

        asyncio.run(body())


def test_server_errors_are_classified(maria_cluster: Any, maria_table: str) -> None:
    async def body() -> None:
        primary = adapter_for(maria_cluster.primary.url, statement_timeout=0.3)
        replica = adapter_for(maria_cluster.replicas[0].url)
        conn, ro = await primary.connect(), await replica.connect()
        try:
            error = await raised(replica.execute(ro, f"INSERT INTO {maria_table} VALUES (1, 'x')"))
            assert getattr(error, "errno", None) == 1290, error
            assert replica.classify(error) is ErrorKind.READ_ONLY

            for bad in ("SELEC 1", "SELECT * FROM no_such_table_x", "SELECT %s, %s"):
                error = await raised(primary.execute(conn, bad, (1,) if "%s" in bad else None))
                assert primary.classify(error) is ErrorKind.CALLER, (bad, error)
                assert primary.return_state(conn) is ReturnState.CLEAN, bad

            # MariaDB's SLEEP() ends quietly at max_statement_time; real work raises 1969.
            start = time.monotonic()
            error = await raised(primary.execute(conn, "SELECT SUM(seq * seq) FROM seq_1_to_1000000000 WHERE seq % 7 = 3"))
            assert getattr(error, "errno", None) == 1969, error
            assert primary.classify(error) is ErrorKind.TIMEOUT
            assert time.monotonic() - start < 2.0
            assert primary.return_state(conn) is ReturnState.CLEAN
            assert await first(primary, conn, "SELECT 7") == 7
        finally:
            await primary.close(conn)
            await replica.close(ro)

    asyncio.run(body())


def test_deadlock_is_classified_conflict(maria_cluster: Any, maria_table: str) -> None:
    async def body() -> None:
        adapter = adapter_for(maria_cluster.primary.url)
        a, b = await adapter.connect(), await adapter.connect()
        try:
            await adapter.execute(a, f"INSERT INTO {maria_table} VALUES (10, '0'), (11, '0')")
            await adapter.begin(a)
            await adapter.begin(b)
            await adapter.execute(a, f"UPDATE {maria_table} SET v = 'a' WHERE id = 10")
            await adapter.execute(b, f"UPDATE {maria_table} SET v = 'b' WHERE id = 11")
            waiting = asyncio.create_task(adapter.execute(a, f"UPDATE {maria_table} SET v = 'a' WHERE id = 11"))
            await asyncio.sleep(0.2)  # a waits for b's lock; b now asks for a's
            outcomes = [await raised(adapter.execute(b, f"UPDATE {maria_table} SET v = 'b' WHERE id = 10")), None]
            try:
                await waiting
            except Exception as exc:  # noqa: BLE001
                outcomes[1] = exc
            errors = [exc for exc in outcomes if isinstance(exc, BaseException)]
            assert len(errors) == 1, outcomes
            assert getattr(errors[0], "errno", None) == 1213
            assert adapter.classify(errors[0]) is ErrorKind.CONFLICT
        finally:
            for conn in (a, b):
                if adapter.return_state(conn) is ReturnState.DIRTY:
                    await adapter.reset(conn)
                await adapter.close(conn)

    asyncio.run(body())


def test_killed_connection_is_unreachable_and_broken(maria_cluster: Any) -> None:
    async def body() -> None:
        adapter = adapter_for(maria_cluster.primary.url)
        conn, killer = await adapter.connect(), await adapter.connect()
        try:
            session = await first(adapter, conn, "SELECT CONNECTION_ID()")
            await adapter.execute(killer, f"KILL {int(session)}")
            # The reader sees the server close its end: broken without a round trip.
            deadline = time.monotonic() + 3
            while adapter.return_state(conn) is not ReturnState.BROKEN and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert adapter.return_state(conn) is ReturnState.BROKEN
            error = await raised(adapter.execute(conn, "SELECT 1"))
            assert adapter.classify(error) is ErrorKind.UNREACHABLE, error
            error = await raised(adapter.ping(conn))
            assert adapter.classify(error) is ErrorKind.UNREACHABLE, error
        finally:
            await adapter.close(conn)
            await adapter.close(killer)

    asyncio.run(body())


def test_return_state_and_reset(maria_cluster: Any, maria_table: str) -> None:
    async def body() -> None:
        adapter = adapter_for(maria_cluster.primary.url)
        conn = await adapter.connect()
        try:
            # A transaction: dirty until reset, and rolled back by it.
            await adapter.begin(conn)
            await adapter.execute(conn, f"INSERT INTO {maria_table} VALUES (1, 'rolled back')")
            assert adapter.return_state(conn) is ReturnState.DIRTY
            await adapter.reset(conn)
            assert adapter.return_state(conn) is ReturnState.CLEAN
            assert await first(adapter, conn, f"SELECT count(*) FROM {maria_table}") == 0
            await adapter.begin(conn)
            await adapter.execute(conn, f"INSERT INTO {maria_table} VALUES (2, 'kept')")
            await adapter.commit(conn)
            assert adapter.return_state(conn) is ReturnState.CLEAN
            await adapter.begin(conn)
            await adapter.rollback(conn)
            assert adapter.return_state(conn) is ReturnState.CLEAN

            # Autocommit switched off as SQL: no transaction is open, only a server flag.
            await adapter.execute(conn, "SET autocommit = 0")
            assert adapter.return_state(conn) is ReturnState.DIRTY
            await adapter.reset(conn)
            assert adapter.return_state(conn) is ReturnState.CLEAN
            assert await first(adapter, conn, "SELECT @@session.autocommit") == 1
            await adapter.execute(conn, "SET autocommit = 0")
            await adapter.execute(conn, f"INSERT INTO {maria_table} VALUES (3, 'implicit')")
            assert adapter.return_state(conn) is ReturnState.DIRTY
            await adapter.reset(conn)
            assert adapter.return_state(conn) is ReturnState.CLEAN
            assert await first(adapter, conn, f"SELECT count(*) FROM {maria_table} WHERE id = 3") == 0

            # A multi-statement leaves results unread: later statements are refused, not
            # answered with the previous one's result, until the reset reads them.
            assert await adapter.execute(conn, "SELECT 1; SELECT 2; SELECT 3") == ([(1,)], 1)
            assert adapter.return_state(conn) is ReturnState.DIRTY
            for refused in (adapter.execute(conn, "SELECT 4"), adapter.replication_position(conn), adapter.commit(conn)):
                error = await raised(refused)
                assert getattr(error, "errno", None) == 2014, error
                assert adapter.classify(error) is ErrorKind.CALLER
            await adapter.reset(conn)
            assert adapter.return_state(conn) is ReturnState.CLEAN
            assert await adapter.execute(conn, "SELECT 5") == ([(5,)], 1)
            assert await adapter.execute(conn, "SELECT %s", (6,)) == ([(6,)], 1)
        finally:
            await adapter.close(conn)
        assert maria_cluster.primary.query(f"SELECT id, v FROM {maria_table}") == [(2, "kept")]

    asyncio.run(body())


def test_values_that_look_like_delimiter_commands_arrive_intact(maria_cluster: Any, maria_table: str) -> None:
    """The connector's cursor runs a multi-statement splitter over the statement with its
    values in, which takes ``DELIMITER`` in a value for the client command when the quotes
    after it pair up ("DELIMITER $$ '" was stored as ";\\n'"): the adapter sends statements
    with parameters past it."""
    values = ["DELIMITER $$ '", "x'\nDELIMITER //\n'", "delimiter ; \"", "DELIMITER\t;;'; SELECT 2; '"]

    async def body() -> None:
        adapter = adapter_for(maria_cluster.primary.url)
        conn = await adapter.connect()
        try:
            for value in values:
                assert await adapter.execute(conn, "SELECT %s", (value,)) == ([(value,)], 1), value
                assert await adapter.execute(conn, "SELECT %(v)s", {"v": value}) == ([(value,)], 1), value
            insert = f"INSERT INTO {maria_table} (id, v) VALUES (%s, %s)"
            await adapter.execute(conn, insert, (0, values[0]))
            assert await adapter.execute_many(conn, insert, list(enumerate(values[1:], start=1))) == 3
            mapped = f"INSERT INTO {maria_table} (id, v) VALUES (%(id)s, %(v)s)"
            assert await adapter.execute_many(conn, mapped, [{"id": 10 + i, "v": v} for i, v in enumerate(values)]) == 4
            update = f"UPDATE {maria_table} SET v = %s WHERE id = %s"
            assert await adapter.execute_many(conn, update, [(v, 20 + i) for i, v in enumerate(values)]) == 0
            assert await adapter.execute_many(conn, update, [(v, 10 + i) for i, v in enumerate(reversed(values))]) == 4
            assert adapter.return_state(conn) is ReturnState.CLEAN
        finally:
            await adapter.close(conn)
        stored = dict(maria_cluster.primary.query(f"SELECT id, v FROM {maria_table}"))
        assert stored == {**dict(enumerate(values)), **{10 + i: v for i, v in enumerate(reversed(values))}}

    asyncio.run(body())


def test_execute_many_is_one_multi_row_insert(maria_cluster: Any, maria_table: str) -> None:
    async def body() -> None:
        adapter = adapter_for(maria_cluster.primary.url)
        conn = await adapter.connect()
        try:
            async def inserts() -> int:
                rows, _ = await adapter.execute(conn, "SHOW SESSION STATUS LIKE 'Com_insert'")
                assert rows
                return int(rows[0][1])

            before = await inserts()
            rows = [(1, "plain"), (2, "it's \"quoted\" \\ here"), (3, None), (4, "ünïcødé")]
            count = await adapter.execute_many(conn, f"INSERT INTO {maria_table} (id, v) VALUES (%s, %s)", rows)
            assert count == 4
            assert await inserts() == before + 1  # one statement for the four rows
            assert maria_cluster.primary.query(f"SELECT id, v FROM {maria_table} ORDER BY id") == rows

            # Rows as mappings: the connector's multi-row rewrite, also one statement.
            count = await adapter.execute_many(
                conn, f"INSERT INTO {maria_table} (id, v) VALUES (%(id)s, %(v)s)", [{"id": 5, "v": "e"}, {"id": 6, "v": "f"}]
            )
            assert count == 2
            assert await inserts() == before + 2
            # Other statements: once per row.
            count = await adapter.execute_many(conn, f"UPDATE {maria_table} SET v = %s WHERE id = %s", [("x", 1), ("y", 2)])
            assert count == 2
            assert await adapter.execute_many(conn, f"UPDATE {maria_table} SET v = %s", []) == 0
            upsert = f"INSERT INTO {maria_table} (id, v) VALUES (%s, %s) ON DUPLICATE KEY UPDATE v = VALUES(v)"
            assert await adapter.execute_many(conn, upsert, [(1, "z"), (7, "g")]) == 3  # 2 for the update, 1 insert
            assert adapter.return_state(conn) is ReturnState.CLEAN
        finally:
            await adapter.close(conn)
        assert maria_cluster.primary.query(f"SELECT v FROM {maria_table} WHERE id IN (1, 2, 7) ORDER BY id") == [
            ("z",), ("y",), ("g",)
        ]

    asyncio.run(body())


def test_replication_position_and_has_replayed(maria_cluster: Any, maria_table: str) -> None:
    paused_node = maria_cluster.replicas[1]

    async def body() -> None:
        primary = adapter_for(maria_cluster.primary.url)
        replica = adapter_for(maria_cluster.replicas[0].url)
        paused = adapter_for(paused_node.url)
        p, r, s = await primary.connect(), await replica.connect(), await paused.connect()
        try:
            before = await primary.replication_position(p)
            await primary.execute(p, f"INSERT INTO {maria_table} VALUES (1, 'one')")
            after = await primary.replication_position(p)
            assert after and after != before
            assert primary.position_covers(after, before) is True and primary.position_covers(before, after) is False
            assert await primary.has_replayed(p, after)
            assert await primary.has_replayed(p, "")
            assert await replica.has_replayed(r, after, timeout=10)
            assert await first(replica, r, f"SELECT v FROM {maria_table} WHERE id = 1") == "one"
            assert replica.position_covers(await replica.replication_position(r), after) is True

            maria_cluster.pause_replication(paused_node)
            await primary.execute(p, f"INSERT INTO {maria_table} VALUES (2, 'two')")
            position = await primary.replication_position(p)
            assert not await paused.has_replayed(s, position)
            start = time.monotonic()
            assert not await paused.has_replayed(s, position, timeout=0.3)  # MASTER_GTID_WAIT, awaited
            assert time.monotonic() - start >= 0.25
            assert paused.return_state(s) is ReturnState.CLEAN
            maria_cluster.resume_replication(paused_node)
            assert await paused.has_replayed(s, position, timeout=10)
        finally:
            maria_cluster.resume_replication(paused_node)
            for adapter, conn in ((primary, p), (replica, r), (paused, s)):
                await adapter.close(conn)

    asyncio.run(body())


def test_abort_after_a_cancelled_call(maria_cluster: Any) -> None:
    """A call cancelled halfway leaves the reply on its way: the connection is broken at once
    (even before abort), abort closes its socket without a round trip, no later call can use
    it, and the server session goes away."""
    node = maria_cluster.primary

    def sessions(session: int) -> int:
        return int(node.query("SELECT count(*) FROM information_schema.PROCESSLIST WHERE ID = %s", (session,))[0][0])

    async def body() -> int:
        adapter = adapter_for(node.url)
        conn = await adapter.connect()
        session = int(await first(adapter, conn, "SELECT CONNECTION_ID()"))
        task = asyncio.create_task(adapter.execute(conn, "SELECT SLEEP(5)"))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert adapter.return_state(conn) is ReturnState.BROKEN  # the call never finished
        start = time.monotonic()
        adapter.abort(conn)
        adapter.abort(conn)  # again: still quiet
        assert time.monotonic() - start < 0.01  # no round trip
        assert adapter.return_state(conn) is ReturnState.BROKEN
        for call in (adapter.execute(conn, "SELECT 1"), adapter.execute(conn, "SELECT %s", (1,)), adapter.ping(conn),
                     adapter.begin(conn)):
            error = await raised(call)
            assert adapter.classify(error) is ErrorKind.UNREACHABLE, error
        await adapter.close(conn)  # quiet on an aborted connection
        adapter.abort(object())  # never raises, whatever it is given
        return session

    session = asyncio.run(body())
    assert wait_until(lambda: sessions(session) == 0, timeout=8), "the server session outlived the abort"


def test_read_timeout_url_option_bounds_each_read(maria_cluster: Any) -> None:
    """The aio connection's read timeout (off unless the URL sets it): a read that waits
    longer raises ReadTimeoutError, whose errno is 3024 like MySQL's max_execution_time, but
    which is the client giving up on the node (UNREACHABLE, not TIMEOUT); the connector
    closes the connection."""

    async def body() -> None:
        adapter = adapter_for(maria_cluster.primary.url + "?read_timeout=1")
        conn = await adapter.connect()
        try:
            start = time.monotonic()
            error = await raised(adapter.execute(conn, "SELECT SLEEP(3)"))
            assert 0.9 <= time.monotonic() - start < 2.5
            assert getattr(error, "errno", None) == 3024, error
            assert adapter.classify(error) is ErrorKind.UNREACHABLE
            assert adapter.return_state(conn) is ReturnState.BROKEN
        finally:
            await adapter.close(conn)

    asyncio.run(body())


def test_cancelled_write_on_a_compressed_connection_stays_cancelled(
    maria_cluster: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A compressed connection's writes turn CancelledError into WriteTimeoutError: the
    adapter gives the caller its cancellation back. (A write that waits: the first drain
    waits until cancelled, as it would for a server that stopped reading.)"""
    from mysql.connector.aio import utils

    async def body() -> None:
        adapter = adapter_for(maria_cluster.primary.url + "?compress=true")
        conn = await adapter.connect()
        try:
            assert await adapter.execute(conn, "SELECT %s, REPEAT('x', 100)", (1,)) == ([(1, "x" * 100)], 1)
            drain = utils.StreamWriter.drain
            stuck: list[asyncio.Event] = []

            async def stuck_once(writer: Any) -> None:
                if not stuck:
                    stuck.append(asyncio.Event())
                    await stuck[0].wait()
                await drain(writer)

            monkeypatch.setattr(utils.StreamWriter, "drain", stuck_once)
            task = asyncio.create_task(adapter.execute(conn, "SELECT 1 /* more than 50 bytes: compressed */"))
            await asyncio.sleep(0.1)
            assert stuck and not task.done()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert adapter.return_state(conn) is ReturnState.BROKEN
        finally:
            monkeypatch.undo()
            await adapter.close(conn)

    asyncio.run(body())


def test_connect_cancelled_leaves_nothing_open(maria_cluster: Any) -> None:
    """A connect cancelled while it waits for the server (here one that never answers) drops
    its socket: the listener sees it closed."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        url = maria_cluster.primary.url.replace(f":{maria_cluster.primary.port}/", f":{port}/")

        async def body() -> None:
            adapter = adapter_for(url, connect_timeout=5)
            task = asyncio.create_task(adapter.connect())
            await asyncio.sleep(0.2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        asyncio.run(body())
        accepted, _ = listener.accept()
        with accepted:
            accepted.settimeout(2)
            assert accepted.recv(1) == b""  # closed by the client, nothing sent


_RUSAGE_THREAD = getattr(resource, "RUSAGE_THREAD", None)  # Linux


class _SlowCallbacks(logging.Handler):
    """asyncio's debug-mode reports of callbacks that held the loop too long ("Executing
    <Handle ...> took 0.012 seconds"), minus those the kernel's scheduler explains.

    The machine runs other load (chaos runs on two cores), so a 1 ms callback preempted for
    20 ms is reported too (and a virtual CPU the hypervisor takes away shows no context
    switch at all). `run` measures each callback's thread CPU time and context switches, and
    the loop logs its report right after the callback returns, so each report is checked
    against its callback's numbers: it counts when the callback used 5 ms of CPU or more, or
    waited of its own accord (a voluntary context switch: a blocking system call, a sleep, a
    lock, or the GIL, so the measured code must run no other thread). A callback that
    computes for long or blocks counts whatever the load."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.reports: list[str] = []
        self.excused = 0
        self._last: tuple[float, int, int] | None = None

    def run(self, handle: Any, run: Callable[[Any], None]) -> None:
        if _RUSAGE_THREAD is None:
            self._last = None
            run(handle)
            return
        cpu, before = time.thread_time(), resource.getrusage(_RUSAGE_THREAD)
        try:
            run(handle)
        finally:
            after = resource.getrusage(_RUSAGE_THREAD)
            self._last = (time.thread_time() - cpu, after.ru_nvcsw - before.ru_nvcsw, after.ru_nivcsw - before.ru_nivcsw)

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if not (message.startswith("Executing ") and " took " in message):
            return
        if self._last is None:
            self.reports.append(message)
            return
        cpu, waited, preempted = self._last
        if cpu < 0.005 and not waited:
            self.excused += 1
        else:
            self.reports.append(f"{message} (CPU {cpu * 1000:.1f} ms, {waited} voluntary and {preempted} "
                                f"involuntary context switches)")


def slow_callbacks(
    monkeypatch: pytest.MonkeyPatch, measured: Callable[[], Awaitable[None]], warm_up: Callable[[], Awaitable[None]]
) -> list[str]:
    """What asyncio's debug mode reports of callbacks that held the loop more than 5 ms while
    ``measured`` ran (see `_SlowCallbacks`), each attempt on a new loop after ``warm_up`` (not
    measured). An attempt with reports is repeated, and those of three attempts are returned
    (none when any attempt had none): a callback that really blocks shows up in every one."""
    handler = _SlowCallbacks()
    original = asyncio.events.Handle._run
    monkeypatch.setattr(asyncio.events.Handle, "_run", lambda handle: handler.run(handle, original))
    asyncio_log = logging.getLogger("asyncio")

    async def attempt() -> list[str]:
        await warm_up()
        asyncio.get_running_loop().slow_callback_duration = 0.005
        handler.reports.clear()
        await measured()
        return list(handler.reports)

    asyncio_log.addHandler(handler)
    try:
        seen: list[str] = []
        for number in range(1, 4):
            reports = asyncio.run(attempt(), debug=True)
            if not reports:
                return []
            seen += [f"attempt {number}: {report}" for report in reports]
        return seen
    finally:
        asyncio_log.removeHandler(handler)


def test_nothing_of_the_adapter_blocks_the_event_loop(
    maria_cluster: Any, maria_table: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In asyncio debug mode, no callback of connect, execute, execute_many, has_replayed,
    reset and close holds the loop for more than 5 ms.

    Left out: a first connect on each loop, before measuring (the first connect of a process
    imports the auth plugin's module; the platform lookup the connector does for its
    connection attributes is done at import by the adapter module)."""
    primary_url, replica_url = maria_cluster.primary.url, maria_cluster.replicas[0].url

    async def warm_up() -> None:
        adapter = adapter_for(primary_url)
        await adapter.close(await adapter.connect())

    async def measured() -> None:
        primary, replica = adapter_for(primary_url, statement_timeout=5), adapter_for(replica_url)
        p, r = await primary.connect(), await replica.connect()
        try:
            await primary.execute(p, f"DELETE FROM {maria_table}")
            for i in range(20):
                await primary.execute(p, "SELECT %s, 'x'", (i,))
                await primary.execute(p, f"SELECT id, v FROM {maria_table} ORDER BY id")
            await primary.execute_many(p, f"INSERT INTO {maria_table} (id, v) VALUES (%s, %s)",
                                       [(n, f"row {n}") for n in range(200)])
            position = await primary.replication_position(p)
            assert await primary.has_replayed(p, position)
            assert await replica.has_replayed(r, position, timeout=10)
            await primary.begin(p)
            await primary.execute(p, f"DELETE FROM {maria_table}")
            await primary.reset(p)
            for _ in range(3):
                await primary.close(await primary.connect())
        finally:
            await primary.close(p)
            await replica.close(r)

    reports = slow_callbacks(monkeypatch, measured, warm_up)
    assert not reports, "\n".join(reports)


def make_certificate(directory: Path, name: str) -> Path:
    """A self-signed certificate for 127.0.0.1 (its own CA) and its key: ``name``.pem, ``name``.key."""
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-addext", "basicConstraints=critical,CA:TRUE",
         "-keyout", str(directory / f"{name}.key"), "-out", str(directory / f"{name}.pem")],
        check=True, capture_output=True, timeout=60,
    )
    for path in (directory / f"{name}.key", directory / f"{name}.pem"):
        path.chmod(0o644)  # the server may run as another user (mysql, when the tests run as root)
    return directory / f"{name}.pem"


@pytest.fixture(scope="module")
def maria_tls() -> Iterator[tuple[LocalNode, Path]]:
    """A MariaDB server of its own (no replicas) that offers TLS with a self-signed certificate
    for 127.0.0.1: the node, and the certificate (which is its own CA)."""
    certificates = Path(tempfile.mkdtemp(prefix="dbrouter-tls-"))
    certificates.chmod(0o755)
    certificate = make_certificate(certificates, "server")

    class TlsNode(MariaDBNode):
        def _argv(self) -> list[str]:
            return [*super()._argv(), f"--ssl-cert={certificate}", f"--ssl-key={certificates / 'server.key'}"]

    cluster = MariaDBCluster(replicas=0)
    cluster.node_class = TlsNode  # type: ignore[misc]  # this cluster only: not a subclass, which would register as the engine
    try:
        cluster.start()
        yield cluster.primary, certificate
    finally:
        cluster.destroy()
        shutil.rmtree(certificates, ignore_errors=True)


def test_tls_connections_share_one_context(maria_tls: tuple[LocalNode, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """The connector builds an SSLContext per connection, loading the system's CA certificates
    on the event loop (20 to 100 ms each); the adapter builds one, in a thread, for all its
    connections, and a TLS connect then holds the loop no more than 5 ms at a time. TLS is
    used whenever the server offers it (unless ``ssl_disabled``), verified with ``ssl_ca``
    (which the aio connection refuses without a client certificate: the adapter hands it to
    the context instead); a server whose certificate that CA did not sign is refused."""
    node, certificate = maria_tls
    verified_url = f"{node.url}?ssl_ca={certificate}&ssl_verify_cert=true"
    wrong_ca = make_certificate(certificate.parent, "other")

    async def session_cipher(adapter: AsyncMySQLAdapter, conn: Any) -> str:
        rows, _ = await adapter.execute(conn, "SHOW SESSION STATUS LIKE 'Ssl_cipher'")
        assert rows
        return str(rows[0][1])

    async def body() -> None:
        for url in (node.url, verified_url, verified_url + "&ssl_verify_identity=true"):
            adapter = adapter_for(url)
            conns = [await adapter.connect() for _ in range(3)]
            try:
                contexts = set()
                for conn in conns:
                    assert conn._ssl_active and await session_cipher(adapter, conn), url
                    contexts.add(id(conn._socket._writer.transport.get_extra_info("sslcontext")))
                assert len(contexts) == 1, url
            finally:
                for conn in conns:
                    await adapter.close(conn)
        plain = adapter_for(node.url + "?ssl_disabled=true")
        conn = await plain.connect()
        try:
            assert not conn._ssl_active and await session_cipher(plain, conn) == ""
        finally:
            await plain.close(conn)
        refused = adapter_for(f"{node.url}?ssl_ca={wrong_ca}&ssl_verify_cert=true", connect_timeout=3)
        error = await raised(refused.connect())
        assert isinstance(error, ConnectError) and f"127.0.0.1:{node.port}" in str(error), error
        assert "certificate verify failed" in str(error), error

    asyncio.run(body())

    adapter = adapter_for(verified_url)

    async def warm_up() -> None:
        # The first connect of the adapter builds its context, in a thread: its waits for the
        # GIL while that thread runs would count as blocking (see _SlowCallbacks).
        await adapter.close(await adapter.connect())

    async def measured() -> None:
        for _ in range(3):
            conn = await adapter.connect()
            await adapter.execute(conn, "SELECT 1")
            await adapter.close(conn)

    reports = slow_callbacks(monkeypatch, measured, warm_up)
    assert not reports, "\n".join(reports)
