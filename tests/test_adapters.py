"""One adapter suite, run against both engines' real replication clusters."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from dbrouter import ConfigurationError, ConnectError, ConnectOptions
from dbrouter.adapters import Adapter, ErrorKind, ReturnState, make_adapter
from dbrouter.faultproxy import FaultProxy
from dbrouter.url import parse_address

from .conftest import backend_id, both_drivers, kill_session, wait_until
from .test_bad_input import free_port


def adapter_for(node: Any, url: str | None = None, driver: str = "", **options: Any) -> Adapter:
    return make_adapter(parse_address(url or node.url), ConnectOptions(driver=driver, **options))


class Opened:
    """An adapter (on ``driver``: "" is the engine's default) and one open connection (to ``url``,
    by default the node's), closed at the end of the test."""

    def __init__(self, node: Any, url: str | None = None, driver: str = "", **options: Any) -> None:
        self.adapter = adapter_for(node, url, driver, **options)
        assert self.adapter.driver.startswith(driver)  # the driver under test, not the default
        self.conn = self.adapter.connect()

    def run(self, sql: str, params: Any = None) -> list[tuple[Any, ...]] | None:
        rows, _ = self.adapter.execute(self.conn, sql, params)
        return rows

    def close(self) -> None:
        self.adapter.close(self.conn)


@both_drivers
def test_each_node_says_who_it_is_and_its_role(cluster, driver: str) -> None:
    """Replication works: node 0 is writable, the replicas are in recovery / read-only."""
    for node in cluster.nodes:
        opened = Opened(node, driver=driver)
        try:
            assert opened.adapter.server_port(opened.conn) == node.port
            assert opened.adapter.is_writable(opened.conn) is (node is cluster.primary)
        finally:
            opened.close()


@both_drivers
def test_rows_replicate_and_positions_advance(cluster, table: str, driver: str) -> None:
    primary = Opened(cluster.primary, driver=driver)
    replicas = [Opened(node, driver=driver) for node in cluster.replicas]
    try:
        before = primary.adapter.replication_position(primary.conn)
        primary.run(f"INSERT INTO {table} VALUES (1, 10)")
        after = primary.adapter.replication_position(primary.conn)
        assert after != before
        assert primary.adapter.has_replayed(primary.conn, after)
        for replica in replicas:
            assert replica.adapter.has_replayed(replica.conn, after, timeout=10)
            assert replica.run(f"SELECT port FROM {table} WHERE id = 1") == [(10,)]
            assert replica.adapter.replica_lag(replica.conn, after) == 0.0
        assert primary.adapter.replica_lag(primary.conn) == 0.0
    finally:
        for opened in [primary, *replicas]:
            opened.close()


@both_drivers
def test_paused_replica_has_not_replayed_and_lags(cluster, table: str, driver: str) -> None:
    paused = cluster.replicas[0]
    cluster.pause_replication(paused)
    primary = Opened(cluster.primary, driver=driver)
    replica = Opened(paused, driver=driver)
    try:
        primary.run(f"INSERT INTO {table} VALUES (2, 20)")
        position = primary.adapter.replication_position(primary.conn)
        start = time.monotonic()
        assert not replica.adapter.has_replayed(replica.conn, position, timeout=0.3)
        assert time.monotonic() - start >= 0.25
        assert replica.run(f"SELECT port FROM {table} WHERE id = 2") == []
        time.sleep(1.1)
        lag = replica.adapter.replica_lag(replica.conn, position)
        assert lag is None or lag > 0.0
        cluster.resume_replication(paused)
        assert replica.adapter.has_replayed(replica.conn, position, timeout=10)
        assert replica.run(f"SELECT port FROM {table} WHERE id = 2") == [(20,)]
    finally:
        cluster.resume_replication(paused)
        primary.close()
        replica.close()


@both_drivers
def test_write_on_replica_is_classified_read_only(cluster, table: str, driver: str) -> None:
    replica = Opened(cluster.replicas[0], driver=driver)
    try:
        with pytest.raises(Exception) as info:
            replica.run(f"INSERT INTO {table} VALUES (3, 30)")
        assert replica.adapter.classify(info.value) is ErrorKind.READ_ONLY
    finally:
        replica.close()


@pytest.mark.mysql
def test_mysql_1290_is_read_only_only_when_it_names_read_only(maria_cluster, maria_file_url: str) -> None:
    """MariaDB answers 1290 (ER_OPTION_PREVENTS_STATEMENT) both for a write on a read-only node
    and for an INTO OUTFILE path refused by --secure-file-priv: only the first says anything
    about the node. (Taken for read-only, the second opened a healthy primary's breaker.)"""
    primary, replica = Opened(maria_cluster.primary, maria_file_url), Opened(maria_cluster.replicas[0])
    try:
        refused = f"/nonexistent-dbrouter-{uuid.uuid4().hex[:8]}/out.txt"
        with pytest.raises(Exception) as info:
            primary.run(f"SELECT 1 INTO OUTFILE '{refused}'")
        assert getattr(info.value, "errno", None) == 1290 and "--secure-file-priv" in str(info.value)
        assert primary.adapter.classify(info.value) is ErrorKind.CALLER
        assert primary.adapter.return_state(primary.conn) is ReturnState.CLEAN
        with pytest.raises(Exception) as info:
            replica.run(f"CREATE TABLE dbr_ro_{uuid.uuid4().hex[:8]} (v int)")
        assert getattr(info.value, "errno", None) == 1290 and "--read-only" in str(info.value)
        assert replica.adapter.classify(info.value) is ErrorKind.READ_ONLY
    finally:
        primary.close()
        replica.close()


@pytest.mark.mysql
@pytest.mark.parametrize(("message", "kind"), [
    ("The MySQL server is running with the --super-read-only option so it cannot execute this statement",
     ErrorKind.READ_ONLY),
    ("The MySQL server is running with the --read-only option so it cannot execute this statement", ErrorKind.READ_ONLY),
    ("Der Server läuft mit der Option --read-only und kann diese Anweisung deswegen nicht ausführen",
     ErrorKind.READ_ONLY),  # lc_messages translates the text, never the option's name
    ("The MySQL server is running with the --secure-file-priv option so it cannot execute this statement",
     ErrorKind.CALLER),
    ("The MariaDB server is running with the --skip-grant-tables option so it cannot execute this statement",
     ErrorKind.CALLER),
], ids=["mysql-super-read-only", "mysql-read-only", "localized-read-only", "secure-file-priv", "skip-grant-tables"])
def test_mysql_1290_messages_servers_send(message: str, kind: ErrorKind) -> None:
    """The 1290 texts MySQL 8 and other setups send, which the local MariaDB cannot produce."""
    from mysql.connector import errors

    adapter = make_adapter(parse_address("mysql://app@127.0.0.1:3306/x"))
    assert adapter.classify(errors.DatabaseError(msg=message, errno=1290, sqlstate="HY000")) is kind


class _Unsendable:
    """A parameter type no driver knows how to send."""


@both_drivers
def test_caller_errors_are_never_node_failures(cluster, table: str, driver: str) -> None:
    primary = Opened(cluster.primary, driver=driver)
    try:
        primary.run(f"INSERT INTO {table} VALUES (4, 40)")
        # The last: a client-side error without an error number (on MySQL with or without the
        # C extension: without it, such errors were classified as a lost connection).
        # And a parameter the driver cannot send (the MySQL C extension says so without an error
        # number too: it was taken for a lost connection, and a write for one of unknown outcome).
        for bad, params in ((f"INSERT INTO {table} VALUES (4, 41)", None), ("SELEC 1", None),
                            ("SELECT * FROM no_such_table_x", None), ("SELECT %s, %s", (1,)),
                            ("SELECT %s", (_Unsendable(),)), (f"INSERT INTO {table} VALUES (5, %s)", ({"k": 1},))):
            with pytest.raises(Exception) as info:
                primary.run(bad, params)
            assert primary.adapter.classify(info.value) is ErrorKind.CALLER, bad
            assert primary.adapter.return_state(primary.conn) is ReturnState.CLEAN
        assert primary.adapter.classify(ValueError("not a driver error")) is ErrorKind.CALLER
    finally:
        primary.close()


@both_drivers
def test_killed_session_is_classified_unreachable(cluster, driver: str) -> None:
    opened = Opened(cluster.primary, driver=driver)
    try:
        kill_session(cluster, backend_id(opened.adapter, opened.conn))
        time.sleep(0.1)
        with pytest.raises(Exception) as info:
            opened.run("SELECT 1")
        assert opened.adapter.classify(info.value) is ErrorKind.UNREACHABLE
    finally:
        opened.close()


@both_drivers
def test_statement_timeout_is_classified(cluster, driver: str) -> None:
    opened = Opened(cluster.primary, statement_timeout=0.2, driver=driver)
    try:
        sql = "SELECT pg_sleep(2)" if cluster.engine == "postgres" else "SELECT SLEEP(2) FROM dual WHERE 1 = 1"
        start = time.monotonic()
        try:
            rows = opened.run(sql)
        except Exception as exc:  # noqa: BLE001 - the kind is what is tested
            assert opened.adapter.classify(exc) is ErrorKind.TIMEOUT
        else:
            # MariaDB interrupts SLEEP() itself and returns 1 instead of raising.
            assert cluster.engine != "postgres" and rows == [(1,)]
        assert time.monotonic() - start < 1.5
    finally:
        opened.close()


@both_drivers
def test_deadlock_is_classified_conflict(cluster, table: str, driver: str) -> None:
    cluster.primary.query(f"INSERT INTO {table} VALUES (10, 0), (11, 0)")
    a, b = Opened(cluster.primary, driver=driver), Opened(cluster.primary, driver=driver)
    errors: list[BaseException] = []
    try:
        a.adapter.begin(a.conn)
        b.adapter.begin(b.conn)
        a.run(f"UPDATE {table} SET port = 1 WHERE id = 10")
        b.run(f"UPDATE {table} SET port = 1 WHERE id = 11")

        def cross(opened: Opened, row: int) -> None:
            try:
                opened.run(f"UPDATE {table} SET port = 2 WHERE id = {row}")
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)
                opened.adapter.rollback(opened.conn)

        t = threading.Thread(target=cross, args=(a, 11))
        t.start()
        time.sleep(0.2)
        cross(b, 10)
        t.join(timeout=10)
        assert len(errors) == 1
        assert a.adapter.classify(errors[0]) is ErrorKind.CONFLICT
    finally:
        for opened in (a, b):
            opened.adapter.reset(opened.conn)
            opened.close()


@both_drivers
def test_return_state_and_reset(cluster, table: str, driver: str) -> None:
    opened = Opened(cluster.primary, driver=driver)
    try:
        assert opened.adapter.return_state(opened.conn) is ReturnState.CLEAN
        opened.adapter.begin(opened.conn)
        opened.run(f"INSERT INTO {table} VALUES (5, 50)")
        assert opened.adapter.return_state(opened.conn) is ReturnState.DIRTY
        opened.adapter.reset(opened.conn)
        assert opened.adapter.return_state(opened.conn) is ReturnState.CLEAN
        assert opened.run(f"SELECT count(*) FROM {table} WHERE id = 5") == [(0,)]
        opened.adapter.begin(opened.conn)
        opened.run(f"INSERT INTO {table} VALUES (6, 60)")
        opened.adapter.commit(opened.conn)
        assert opened.adapter.return_state(opened.conn) is ReturnState.CLEAN
        opened.adapter.close(opened.conn)
        assert opened.adapter.return_state(opened.conn) is ReturnState.BROKEN
    finally:
        opened.close()
    assert cluster.primary.query(f"SELECT port FROM {table} WHERE id = 6") == [(60,)]


@both_drivers
def test_ping(cluster, driver: str) -> None:
    opened = Opened(cluster.primary, driver=driver)
    try:
        opened.adapter.ping(opened.conn)
        kill_session(cluster, backend_id(opened.adapter, opened.conn))
        time.sleep(0.1)
        with pytest.raises(Exception) as info:
            opened.adapter.ping(opened.conn)
        assert opened.adapter.classify(info.value) is ErrorKind.UNREACHABLE
    finally:
        opened.close()


@both_drivers
def test_refused_connect(cluster, driver: str) -> None:
    node = cluster.primary
    url = node.url.replace(f":{node.port}/", f":{free_port()}/")
    adapter = make_adapter(parse_address(url), ConnectOptions(connect_timeout=2, driver=driver))
    with pytest.raises(ConnectError) as info:
        adapter.connect()
    assert adapter.classify(info.value) is ErrorKind.UNREACHABLE
    assert info.value.node == f"127.0.0.1:{parse_address(url).port}" and info.value.node in str(info.value)
    assert cluster.password not in str(info.value)


def with_option(url: str, option: str) -> str:
    return url + ("&" if "?" in url else "?") + option


@pytest.mark.mysql
def test_mysql_connection_is_the_implementation_under_test(maria_cluster, mysql_pure: bool) -> None:
    """The C extension's connection in the default run, the pure-Python one with
    --mysql-pure: otherwise the run would silently test the other one."""
    from mysql.connector.connection import MySQLConnection

    from dbrouter.adapters.mysql import DRIVER_C, DRIVER_PURE, HAVE_C_EXTENSION

    opened = Opened(maria_cluster.primary)
    try:
        if mysql_pure:
            assert not HAVE_C_EXTENSION and "_mysql_connector" not in sys.modules
            assert isinstance(opened.conn, MySQLConnection)
            assert type(opened.conn).__mro__[1] is MySQLConnection  # dbrouter's subclass keeps the status flags
            assert opened.adapter.driver == DRIVER_PURE
        else:
            assert HAVE_C_EXTENSION
            assert type(opened.conn).__name__ == "CMySQLConnection"
            assert not isinstance(opened.conn, MySQLConnection)
            assert opened.adapter.driver == DRIVER_C
        assert opened.run("SELECT @@collation_connection") == [("utf8mb4_general_ci",)]
        assert opened.adapter.is_mariadb is True
    finally:
        opened.close()


@pytest.mark.mysql
def test_mysql_use_pure_url_option_chooses_the_implementation(maria_cluster, mysql_pure: bool) -> None:
    """use_pure=true: pure Python in either run; use_pure=false: the C extension, or a
    ConfigurationError that says why it is not available."""
    from mysql.connector.connection import MySQLConnection

    from dbrouter.adapters.mysql import DRIVER_C, DRIVER_PURE

    node = maria_cluster.primary
    pure = make_adapter(parse_address(with_option(node.url, "use_pure=true")))
    conn = pure.connect()
    try:
        assert isinstance(conn, MySQLConnection) and pure.driver == DRIVER_PURE
        rows, _ = pure.execute(conn, "SELECT @@port")
        assert rows == [(node.port,)]
    finally:
        pure.close(conn)
    if mysql_pure:
        with pytest.raises(ConfigurationError, match="use_pure=false.*blocked by the test suite"):
            make_adapter(parse_address(with_option(node.url, "use_pure=false")))
    else:
        c_ext = make_adapter(parse_address(with_option(node.url, "use_pure=false")))
        conn = c_ext.connect()
        try:
            assert type(conn).__name__ == "CMySQLConnection" and c_ext.driver == DRIVER_C
        finally:
            c_ext.close(conn)


@pytest.mark.mysql
@pytest.mark.parametrize("name", ["dbrouter", "app-" + "x" * 300])
def test_mysql_pure_python_connection_attributes_fit(maria_cluster, name: str) -> None:
    """The connector's Python code sends the connection attributes' total length in one byte:
    dbrouter's pure-Python connection drops and cuts attributes until they fit, each connection
    in a dict of its own. (Under the asyncio connection's name for that dict, every pure-Python
    connect failed, in both runs: use_pure=true.)"""
    url = with_option(maria_cluster.primary.url, "use_pure=true")
    adapter = make_adapter(parse_address(url), ConnectOptions(application_name=name))
    conns = [adapter.connect() for _ in range(2)]
    try:
        first, second = (conn._conn_attrs for conn in conns)
        assert first is not second and first == second
        assert sum(2 + len(k.encode()) + len(str(v or "").encode()) for k, v in first.items()) <= 250
        assert first["program_name"] == (name if len(name) < 32 else name[:32])
        assert adapter._params["conn_attrs"] == {"program_name": name}  # type: ignore[attr-defined]
        for conn in conns:
            assert adapter.execute(conn, "SELECT %s", (name,)) == ([(name,)], 1)
    finally:
        for conn in conns:
            adapter.close(conn)


@pytest.mark.mysql
def test_mysql_statement_with_parameters_is_the_first_thing_sent(maria_cluster) -> None:
    """The pure-Python connection asked the server for its sql_mode (a ping, then a SELECT) at
    its first statement with parameters, before sending it: two more round trips, and a cut
    after the first bytes sent lost a statement that had never gone out (a write reported as of
    unknown outcome for nothing). Cut right after the first bytes that follow connect: they are
    the statement's, and its row is there."""
    node = maria_cluster.primary
    table = "dbr_first_" + uuid.uuid4().hex[:8]
    node.query(f"CREATE TABLE {table} (v int)")
    try:
        with FaultProxy(upstream=("127.0.0.1", node.port)) as proxy:
            opened = Opened(node, node.url.replace(f":{node.port}/", f":{proxy.port}/"))
            try:
                proxy.cut_after_client_sends()
                with pytest.raises(Exception) as info:
                    opened.run(f"INSERT INTO {table} VALUES (%s)", (1,))
                assert opened.adapter.classify(info.value) is ErrorKind.UNREACHABLE, info.value
            finally:
                opened.close()
        assert wait_until(lambda: node.query(f"SELECT count(*) FROM {table}") == [(1,)], 3)
    finally:
        node.query(f"DROP TABLE {table}")


@pytest.mark.mysql
def test_mysql_statement_while_results_are_unread_is_refused_not_answered_wrongly(maria_cluster) -> None:
    """A multi-statement leaves its later results unread until the reset on return. Another
    statement on the connection before that (a session reads the replication position right
    after its write) is refused with 2014 "Commands out of sync" by the C extension; the
    pure-Python connection sent it and read the previous statement's result as its answer, and
    from then on every statement got the answer of the one before."""
    opened = Opened(maria_cluster.primary)
    try:
        assert opened.run("SELECT 1; SELECT 2") == [(1,)]
        for refused in (lambda: opened.run("SELECT 3"), lambda: opened.adapter.replication_position(opened.conn),
                        lambda: opened.adapter.commit(opened.conn)):
            with pytest.raises(Exception) as info:
                refused()
            assert getattr(info.value, "errno", None) == 2014, info.value
            assert opened.adapter.classify(info.value) is ErrorKind.CALLER
        assert opened.adapter.return_state(opened.conn) is ReturnState.DIRTY
        opened.adapter.reset(opened.conn)
        assert opened.adapter.return_state(opened.conn) is ReturnState.CLEAN
        assert opened.run("SELECT 4") == [(4,)]
        assert opened.run("SELECT 5") == [(5,)]
    finally:
        opened.close()


@pytest.mark.mysql
def test_mysql_autocommit_switched_off_by_sql_is_seen_and_reset(maria_cluster) -> None:
    """``SET autocommit = 0`` sent as SQL leaves no transaction open, only a server flag: the
    connection must still come back dirty and be reset, or the next borrower's writes would
    never commit. (The pure-Python connection does not keep that flag; dbrouter's subclass does.)"""
    opened = Opened(maria_cluster.primary)
    try:
        assert opened.adapter.return_state(opened.conn) is ReturnState.CLEAN
        opened.run("SET autocommit = 0")
        assert opened.adapter.return_state(opened.conn) is ReturnState.DIRTY
        opened.adapter.reset(opened.conn)
        assert opened.adapter.return_state(opened.conn) is ReturnState.CLEAN
        assert opened.run("SELECT @@session.autocommit") == [(1,)]
    finally:
        opened.close()


_FALLBACK_SCRIPT = """
import logging, sys
sys.path.insert(0, {root!r})
from tests import _mysql_mode
_mysql_mode.block_c_extension()
import ssl  # what applications do before dbrouter; here the block stands in for the libssl clash
import dbrouter
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
with dbrouter.Router({primary!r}, [{replica!r}], min_size=1, max_size=2, health_interval=5) as router:
    for _ in range(5):
        router.read("SELECT 1")
        router.write("SELECT 1")
    print("drivers", sorted({{info["driver"] for info in router.stats()["nodes"].values()}}))
"""


@pytest.mark.mysql
def test_mysql_fallback_to_pure_python_is_logged_once_with_its_cause(maria_cluster) -> None:
    """An application whose C extension failed to load: every call works, the stats say pure
    Python, and one warning (for all nodes) names the ImportError."""
    root = str(Path(__file__).resolve().parent.parent)
    script = _FALLBACK_SCRIPT.format(root=root, primary=maria_cluster.primary.url, replica=maria_cluster.replicas[0].url)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=root)
    assert done.returncode == 0, done.stderr
    assert "drivers ['mysql-connector (pure Python)']" in done.stdout
    warnings = [line for line in done.stderr.splitlines() if line.startswith("WARNING dbrouter.adapters.mysql")]
    assert len(warnings) == 1, done.stderr
    assert "C extension is not in use" in warnings[0] and "OPENSSL_3.2.0" in warnings[0]
    assert maria_cluster.password not in done.stderr


@pytest.mark.postgres
def test_postgres_connection_settings(pg_cluster, pg_driver: str) -> None:
    opened = Opened(pg_cluster.primary, driver=pg_driver, statement_timeout=1.5, application_name="dbr-test")
    try:
        assert opened.conn.autocommit is True
        assert opened.run("SHOW statement_timeout") == [("1500ms",)]
        assert opened.run("SELECT current_setting('application_name')") == [("dbr-test",)]
        # Keepalives are the client socket's options: read them off the socket itself.
        sock = socket.socket(fileno=os.dup(opened.conn.fileno()))
        try:
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 30
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 10
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3
            # A statement never acknowledged (packets dropped) gives up as keepalives would: 60 s.
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 60000
        finally:
            sock.close()
    finally:
        opened.close()
    url = pg_cluster.primary.url + "?tcp_user_timeout=5000"
    adapter = make_adapter(parse_address(url), ConnectOptions(driver=pg_driver))
    conn = adapter.connect()
    try:
        sock = socket.socket(fileno=os.dup(conn.fileno()))
        try:
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 5000  # the URL's own
        finally:
            sock.close()
    finally:
        adapter.close(conn)


@both_drivers
def test_multi_statement_leaves_the_connection_usable(cluster, driver: str) -> None:
    """Results nobody read (a multi-statement, a procedure) make the connection dirty, and the
    reset reads them: otherwise every later statement on it fails ("Commands out of sync")."""
    opened = Opened(cluster.primary, driver=driver)
    try:
        # What each driver returns: psycopg2 the last statement's rows, the others the first's.
        first_or_last = [(2,)] if opened.adapter.driver == "psycopg2" else [(1,)]
        assert opened.run("SELECT 1; SELECT 2") == first_or_last
        if opened.adapter.return_state(opened.conn) is ReturnState.DIRTY:
            opened.adapter.reset(opened.conn)
        assert opened.adapter.return_state(opened.conn) is ReturnState.CLEAN
        assert opened.run("SELECT 3") == [(3,)]
    finally:
        opened.close()


@pytest.mark.postgres
def test_kept_cursor_lets_go_of_large_statements_and_results(pg_cluster, pg_driver: str) -> None:
    """The statement cursor kept per connection never holds a batch, a big result or a long statement."""
    opened = Opened(pg_cluster.primary, driver=pg_driver)

    def fresh(cursor: Any) -> bool:  # has run nothing yet
        return cursor.query is None if pg_driver == "psycopg2" else cursor.pgresult is None

    table = "kept_cursor_" + uuid.uuid4().hex[:8]
    opened.run(f"CREATE TEMPORARY TABLE {table} (id int, port int)")
    try:
        kept = opened.conn.statement_cursor
        opened.run("SELECT 1")
        assert opened.conn.statement_cursor is kept  # small statements reuse it
        opened.adapter.execute_many(opened.conn, f"INSERT INTO {table} (id, port) VALUES (%s, %s)",
                                    [(i, i) for i in range(2000)])
        assert opened.conn.statement_cursor is not kept and fresh(opened.conn.statement_cursor)
        assert kept.closed
        kept = opened.conn.statement_cursor
        assert len(opened.run(f"SELECT id FROM {table}")) == 2000
        assert opened.conn.statement_cursor is not kept and kept.closed
        kept = opened.conn.statement_cursor
        assert opened.run("SELECT length(%s::text)", ("x" * 100_000,)) == [(100_000,)]
        assert opened.conn.statement_cursor is not kept and kept.closed
    finally:
        opened.close()


@pytest.mark.postgres
def test_abort_wakes_a_statement_on_a_hung_node(pg_cluster, pg_driver: str) -> None:
    """libpq has no read timeout: a statement sent to a node that stopped answering waits until
    `abort` (the watchdog's hook) shuts the socket down from another thread."""
    node = pg_cluster.primary
    with FaultProxy(upstream=("127.0.0.1", node.port)) as proxy:
        opened = Opened(node, node.url.replace(f":{node.port}/", f":{proxy.port}/"), driver=pg_driver)
        try:
            assert opened.adapter.needs_watchdog
            assert opened.run("SELECT 1") == [(1,)]
            proxy.blackhole()
            outcome: list[BaseException | None] = []

            def hang() -> None:
                try:
                    opened.run("SELECT 2")
                except BaseException as exc:  # noqa: BLE001 - handed to the test
                    outcome.append(exc)
                else:
                    outcome.append(None)

            worker = threading.Thread(target=hang, daemon=True)
            worker.start()
            time.sleep(0.5)
            assert worker.is_alive() and not outcome  # waiting for an answer that will not come
            started = time.monotonic()
            opened.adapter.abort(opened.conn)
            worker.join(timeout=5)
            assert not worker.is_alive() and time.monotonic() - started < 2
            assert isinstance(outcome[0], Exception), outcome
            assert opened.adapter.classify(outcome[0]) is ErrorKind.UNREACHABLE
            assert opened.adapter.return_state(opened.conn) is ReturnState.BROKEN
        finally:
            proxy.pass_through()
            opened.close()


@pytest.mark.postgres
def test_a_batch_of_more_parameters_than_a_statement_takes_is_one_atomic_write(pg_cluster, pg_driver: str) -> None:
    """psycopg 3 binds parameters on the server, at most 65535 per statement: a bigger
    multi-row INSERT goes in several statements, in one transaction (a failure in the last
    leaves none of the rows, as psycopg2's single statement would)."""
    opened = Opened(pg_cluster.primary, driver=pg_driver)
    table = "many_params_" + uuid.uuid4().hex[:8]
    opened.run(f"CREATE TEMPORARY TABLE {table} (id int PRIMARY KEY, a int, b text)")
    try:
        insert = f"INSERT INTO {table} (id, a, b) VALUES (%s, %s, %s)"
        rows = [(i, i, "x") for i in range(30_000)]  # 90,000 parameters
        assert opened.adapter.execute_many(opened.conn, insert, rows) == 30_000
        assert opened.run(f"SELECT count(*), sum(a) FROM {table}") == [(30_000, sum(range(30_000)))]
        opened.run(f"TRUNCATE {table}")
        with pytest.raises(Exception) as info:
            opened.adapter.execute_many(opened.conn, insert, [*rows, (0, 0, "again")])  # the last row's key is taken
        assert opened.adapter.classify(info.value) is ErrorKind.CALLER
        assert opened.adapter.return_state(opened.conn) is ReturnState.CLEAN
        assert opened.run(f"SELECT count(*) FROM {table}") == [(0,)]
    finally:
        opened.close()


@pytest.mark.postgres
def test_psycopg_prepares_no_statement_unless_the_url_asks(pg_cluster) -> None:
    """psycopg 3 prepares a statement run 5 times on a connection; dbrouter turns that off (a
    prepared statement is gone behind PgBouncer's transaction pooling) unless the URL sets
    prepare_threshold. A borrower that changes it, or the row factory, leaves the connection dirty."""
    node = pg_cluster.primary
    prepared = "SELECT count(*) FROM pg_prepared_statements"
    opened = Opened(node, driver="psycopg")
    try:
        for _ in range(10):
            opened.run("SELECT 1 WHERE 1 = %s", (1,))
        assert opened.run(prepared) == [(0,)]
        from psycopg.rows import dict_row

        opened.conn.row_factory = dict_row
        assert opened.adapter.return_state(opened.conn) is ReturnState.DIRTY
        opened.conn.row_factory = opened.conn.statement_cursor.row_factory
        opened.conn.prepare_threshold = 0
        assert opened.adapter.return_state(opened.conn) is ReturnState.DIRTY
        opened.adapter.reset(opened.conn)
        assert opened.adapter.return_state(opened.conn) is ReturnState.CLEAN and opened.conn.prepare_threshold is None
        with opened.conn.cursor() as cur:
            cur.execute("SELECT 1")
            assert cur.fetchone() == (1,)  # a tuple again
    finally:
        opened.close()
    opened = Opened(node, with_option(node.url, "prepare_threshold=2"), driver="psycopg")
    try:
        for _ in range(3):
            opened.run("SELECT 1 WHERE 1 = %s", (1,))
        assert opened.run(prepared) == [(1,)]
    finally:
        opened.close()
    with pytest.raises(ConfigurationError, match=r"'prepare_threshold' of postgres node 127\.0\.0\.1:\d+: .*got 'soon'"):
        adapter_for(node, with_option(node.url, "prepare_threshold=soon"), "psycopg")
    with pytest.raises(ConfigurationError, match="invalid option for postgres node .*prepare_threshold"):
        adapter_for(node, with_option(node.url, "prepare_threshold=2"), "psycopg2")  # a psycopg 3 option only
