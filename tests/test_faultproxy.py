"""FaultProxy against real servers: a threaded echo server for byte-level behaviour, and
the primaries of the PostgreSQL and MariaDB clusters the suite starts, for what the
drivers see. Every test is bounded in time and checks that no proxy thread is left.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from typing import Callable, Iterator

import pytest

import dbrouter  # noqa: F401 - loads the mysql C extension before anything imports ssl
from dbrouter.errors import ConfigurationError
from dbrouter.faultproxy import (
    ACCEPTED,
    ACTIVE,
    BYTES_DOWN,
    BYTES_UP,
    MODE_BLACKHOLE,
    MODE_CUT,
    MODE_LATENCY,
    MODE_PASS,
    MODE_REFUSE,
    RESETS,
    UPSTREAM_ERRORS,
    FaultProxy,
)

import mysql.connector  # noqa: E402 - after dbrouter, see above
import psycopg2  # noqa: E402

pytestmark = [pytest.mark.proxy, pytest.mark.timeout(20)]

PG = ("127.0.0.1", 5432)  # only for configuration checks; nothing connects to it


def proxy_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("dbrouter-proxy")]


class EchoServer:
    """A loopback echo server (one thread per connection) that records what it received."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.received: list[bytes] = []
        self.resets = 0
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._acceptor = threading.Thread(target=self._accept, name="echo-accept", daemon=True)
        self._acceptor.start()

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def data(self) -> bytes:
        with self._lock:
            return b"".join(self.received)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(0.2)
            t = threading.Thread(target=self._echo, args=(conn,), name="echo-conn", daemon=True)
            with self._lock:
                self._conns.append(conn)
                self._threads.append(t)
            t.start()

    def _echo(self, conn: socket.socket) -> None:
        with conn:
            while not self._stop.is_set():
                try:
                    data = conn.recv(65536)
                except TimeoutError:
                    continue
                except ConnectionResetError:
                    with self._lock:
                        self.resets += 1
                    return
                except OSError:
                    return
                if not data:
                    return
                with self._lock:
                    self.received.append(data)
                try:
                    conn.sendall(data)
                except OSError:
                    return

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        self._acceptor.join(2)
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.join(2)


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture
def proxy(echo: EchoServer) -> Iterator[FaultProxy]:
    p = FaultProxy(upstream=echo.address, listen_port=0).start()
    yield p
    started = time.monotonic()
    p.stop()
    assert time.monotonic() - started < 3
    assert proxy_threads() == []


def connect(p: FaultProxy, timeout: float = 2.0) -> socket.socket:
    return socket.create_connection((p.host, p.port), timeout=timeout)


def recv_exactly(sock: socket.socket, n: int, timeout: float = 2.0) -> bytes:
    sock.settimeout(timeout)
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def roundtrip(sock: socket.socket, data: bytes, timeout: float = 2.0) -> bytes:
    sock.sendall(data)
    return recv_exactly(sock, len(data), timeout)


def wait_for(predicate: Callable[[], bool], timeout: float = 2.0) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` passes (bounded, never a bare sleep)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return bool(predicate())


# -- echo server: byte-level behaviour ------------------------------------------------


def test_pass_through_forwards_and_counts(proxy: FaultProxy) -> None:
    assert proxy.mode == MODE_PASS
    assert proxy.address == f"127.0.0.1:{proxy.port}"
    assert proxy_threads() == [f"dbrouter-proxy-{proxy.port}"]
    with connect(proxy) as s:
        assert roundtrip(s, b"hello") == b"hello"
        assert roundtrip(s, b"x" * 10) == b"x" * 10
        stats = proxy.stats()
        assert stats[ACCEPTED] == 1
        assert stats[ACTIVE] == 1
        assert stats[BYTES_UP] == 15
        assert stats[BYTES_DOWN] == 15
    # The client's close travels through, the echo server closes, the link is dropped.
    assert wait_for(lambda: proxy.stats()[ACTIVE] == 0)


def test_many_concurrent_connections_and_large_payload(proxy: FaultProxy) -> None:
    socks = [connect(proxy) for _ in range(100)]
    try:
        for i, s in enumerate(socks):
            s.sendall(f"conn-{i:03d};".encode() * 20)
        for i, s in enumerate(socks):
            assert recv_exactly(s, 180) == f"conn-{i:03d};".encode() * 20
        assert proxy.stats()[ACTIVE] == 100
        # More than the proxy's buffers and the kernel's: exercises partial writes and backpressure.
        big = bytes(range(256)) * (3 * 4096)  # 3 MiB
        got = bytearray()

        def reader() -> None:
            got.extend(recv_exactly(socks[0], len(big), timeout=10))

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        socks[0].sendall(big)
        t.join(10)
        assert bytes(got) == big
    finally:
        for s in socks:
            s.close()
    assert wait_for(lambda: proxy.stats()[ACTIVE] == 0, timeout=5)


def test_refuse_keeps_existing_and_reopens_same_port(proxy: FaultProxy) -> None:
    port = proxy.port
    with connect(proxy) as existing:
        proxy.refuse()
        assert proxy.mode == MODE_REFUSE
        started = time.monotonic()
        with pytest.raises(ConnectionRefusedError):
            connect(proxy)
        assert time.monotonic() - started < 1
        assert roundtrip(existing, b"still here") == b"still here"
        proxy.pass_through()
        assert proxy.port == port
        with connect(proxy) as fresh:
            assert roundtrip(fresh, b"back") == b"back"
        assert roundtrip(existing, b"and here") == b"and here"


def test_blackhole_freezes_existing_and_new_then_resumes(proxy: FaultProxy, echo: EchoServer) -> None:
    with connect(proxy) as existing:
        assert roundtrip(existing, b"warm") == b"warm"
        proxy.blackhole()
        assert proxy.mode == MODE_BLACKHOLE
        existing.sendall(b"stuck")
        existing.settimeout(0.5)
        with pytest.raises(TimeoutError):
            existing.recv(100)
        # A new connection completes its handshake but gets no answer either.
        with connect(proxy) as fresh:
            fresh.sendall(b"fresh")
            fresh.settimeout(0.5)
            with pytest.raises(TimeoutError):
                fresh.recv(100)
            assert b"stuck" not in echo.data() and b"fresh" not in echo.data()
            proxy.pass_through()
            assert recv_exactly(existing, 5) == b"stuck"
            assert recv_exactly(fresh, 5) == b"fresh"
            assert roundtrip(existing, b"again") == b"again"


def test_blackhole_drops_clients_that_went_away(proxy: FaultProxy) -> None:
    proxy.blackhole()
    for _ in range(5):
        connect(proxy).close()
    assert wait_for(lambda: proxy.stats()[ACCEPTED] == 5)
    assert wait_for(lambda: proxy.stats()[ACTIVE] == 0, timeout=3)


def test_latency_delays_each_direction_and_keeps_order(proxy: FaultProxy) -> None:
    with connect(proxy) as s:
        proxy.latency(0.2)
        assert proxy.mode == MODE_LATENCY
        started = time.monotonic()
        assert roundtrip(s, b"slow") == b"slow"
        elapsed = time.monotonic() - started
        assert 0.4 <= elapsed < 1.0, elapsed  # 0.2 s up, then 0.2 s down
        # Many small writes come back whole and in order.
        parts = [f"{i:04d}".encode() for i in range(50)]
        for part in parts:
            s.sendall(part)
        assert recv_exactly(s, 200) == b"".join(parts)
        proxy.pass_through()
        started = time.monotonic()
        assert roundtrip(s, b"fast") == b"fast"
        assert time.monotonic() - started < 0.1


def test_spikes_delay_that_share_of_the_replies(proxy: FaultProxy) -> None:
    with connect(proxy) as s:
        proxy.spikes(1.0, 0.2)  # every reply
        started = time.monotonic()
        assert roundtrip(s, b"slow") == b"slow"
        assert 0.2 <= time.monotonic() - started < 1.0
        proxy.spikes(0.0, 5.0)  # none
        started = time.monotonic()
        assert roundtrip(s, b"fast") == b"fast"
        assert time.monotonic() - started < 0.5
        proxy.spikes(0.5, 0.05)  # about half of 40 round trips
        slow = 0
        for i in range(40):
            started = time.monotonic()
            assert roundtrip(s, b"%02d" % i) == b"%02d" % i
            slow += time.monotonic() - started >= 0.05
        assert 5 <= slow <= 35, slow
    with pytest.raises(ConfigurationError):
        proxy.spikes(1.5, 0.1)


def test_flaky_resets_that_share_of_the_requests(proxy: FaultProxy) -> None:
    proxy.flaky(0.0)
    with connect(proxy) as s:
        assert roundtrip(s, b"ok") == b"ok"
    proxy.flaky(1.0)
    with connect(proxy) as s:
        s.settimeout(2)
        s.sendall(b"lost")
        with pytest.raises((ConnectionResetError, ConnectionAbortedError)):
            if not s.recv(10):
                raise ConnectionResetError("closed")
    resets = 0
    proxy.flaky(0.5)
    for _ in range(30):
        with connect(proxy) as s:
            s.settimeout(2)
            try:
                assert roundtrip(s, b"x") == b"x"
            except (ConnectionResetError, ConnectionAbortedError, AssertionError):
                resets += 1
    assert 3 <= resets <= 27, resets
    with pytest.raises(ConfigurationError):
        proxy.flaky(-0.1)


def test_reset_connections_sends_rst_both_ways(proxy: FaultProxy, echo: EchoServer) -> None:
    with connect(proxy) as a, connect(proxy) as b:
        assert roundtrip(a, b"a") == b"a"
        assert roundtrip(b, b"b") == b"b"
        assert proxy.reset_connections() == 2
        assert proxy.mode == MODE_PASS
        a.settimeout(1)
        with pytest.raises(ConnectionResetError):
            a.recv(10)
        assert wait_for(lambda: echo.resets == 2)
        assert proxy.stats()[RESETS] == 2
        assert proxy.stats()[ACTIVE] == 0
    with connect(proxy) as c:
        assert roundtrip(c, b"new") == b"new"


def test_cut_after_client_sends(proxy: FaultProxy, echo: EchoServer) -> None:
    with connect(proxy) as bystander, connect(proxy) as s:
        assert roundtrip(s, b"hello") == b"hello"
        assert roundtrip(bystander, b"hi") == b"hi"
        proxy.cut_after_client_sends()
        assert proxy.mode == MODE_CUT
        s.sendall(b"write-42")
        s.settimeout(1)
        # The client sees a reset and not one byte of the reply...
        with pytest.raises(ConnectionResetError):
            s.recv(100)
        # ...although the server got the whole write.
        assert wait_for(lambda: b"write-42" in echo.data())
        assert proxy.mode == MODE_PASS  # one shot
        assert proxy.stats()[RESETS] == 1
        assert roundtrip(bystander, b"unaffected") == b"unaffected"


def test_cut_waits_for_n_bytes(proxy: FaultProxy, echo: EchoServer) -> None:
    with connect(proxy) as s:
        proxy.cut_after_client_sends(n_bytes=10)
        assert roundtrip(s, b"12345") == b"12345"  # below the threshold: forwarded
        s.sendall(b"67890")
        s.settimeout(1)
        with pytest.raises(ConnectionResetError):
            s.recv(100)
        assert wait_for(lambda: echo.data().endswith(b"1234567890"))


def test_stop_is_bounded_with_blackholed_clients(echo: EchoServer) -> None:
    p = FaultProxy(upstream=echo.address).start()
    port = p.port
    socks = [connect(p) for _ in range(20)]
    try:
        assert roundtrip(socks[0], b"up") == b"up"
        p.blackhole()
        for s in socks:
            s.sendall(b"waiting for an answer")
        started = time.monotonic()
        p.stop()
        assert time.monotonic() - started < 3
        assert proxy_threads() == []
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=1)
        p.stop()  # idempotent
        # Closed, not left hanging: EOF, or RST since the proxy closed with our bytes unread.
        socks[0].settimeout(1)
        try:
            assert socks[0].recv(100) == b""
        except ConnectionResetError:
            pass
    finally:
        for s in socks:
            s.close()
    with pytest.raises(RuntimeError):
        p.start()


def test_mode_set_before_start_and_context_manager(echo: EchoServer) -> None:
    p = FaultProxy(upstream=echo.address)
    p.refuse()
    with p:
        assert p.port > 0
        with pytest.raises(ConnectionRefusedError):
            connect(p)
        p.pass_through()
        with connect(p) as s:
            assert roundtrip(s, b"ok") == b"ok"
    assert proxy_threads() == []


def test_upstream_down_resets_client() -> None:
    with socket.create_server(("127.0.0.1", 0)) as placeholder:
        dead_port = placeholder.getsockname()[1]
    with FaultProxy(upstream=("127.0.0.1", dead_port)) as p:
        # The reset can arrive while connect() is still returning, or on the first read.
        with pytest.raises(ConnectionResetError):
            with connect(p) as s:
                s.settimeout(2)
                s.recv(10)
        assert wait_for(lambda: p.stats()[UPSTREAM_ERRORS] == 1)
    assert proxy_threads() == []


def test_bad_configuration_is_rejected() -> None:
    with pytest.raises(ConfigurationError, match="loopback"):
        FaultProxy(upstream=("192.0.2.1", 5432))
    with pytest.raises(ConfigurationError, match="port"):
        FaultProxy(upstream=("127.0.0.1", 0))
    p = FaultProxy(upstream=PG)
    with pytest.raises(ConfigurationError, match="latency"):
        p.latency(-1)
    with pytest.raises(ConfigurationError, match="n_bytes"):
        p.cut_after_client_sends(0)


# -- PostgreSQL through the proxy ---------------------------------------------------


@pytest.fixture
def pg_proxy(pg_cluster) -> Iterator[FaultProxy]:  # type: ignore[no-untyped-def]
    with FaultProxy(upstream=("127.0.0.1", pg_cluster.primary.port)) as p:
        p.cluster = pg_cluster  # type: ignore[attr-defined]
        yield p
    assert proxy_threads() == []


def pg_connect(p: FaultProxy, timeout: int = 2, *, direct: bool = False) -> psycopg2.extensions.connection:
    cluster = p.cluster  # type: ignore[attr-defined]
    port = cluster.primary.port if direct else p.port
    return psycopg2.connect(
        host="127.0.0.1", port=port, user=cluster.user, password=cluster.password,
        dbname=cluster.database, connect_timeout=timeout,
    )


@pytest.mark.postgres
def test_pg_pass_through(pg_proxy: FaultProxy) -> None:
    conn = pg_connect(pg_proxy)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT inet_server_port()")
            assert cur.fetchone() == (pg_proxy.cluster.primary.port,)  # type: ignore[attr-defined]
    finally:
        conn.close()


@pytest.mark.postgres
def test_pg_refuse_then_pass_through(pg_proxy: FaultProxy) -> None:
    pg_proxy.refuse()
    started = time.monotonic()
    with pytest.raises(psycopg2.OperationalError, match="(?i)refused"):
        pg_connect(pg_proxy)
    assert time.monotonic() - started < 1
    pg_proxy.pass_through()
    conn = pg_connect(pg_proxy)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
            assert cur.fetchone() == (1,)
    finally:
        conn.close()


@pytest.mark.postgres
def test_pg_blackhole_connect_times_out(pg_proxy: FaultProxy) -> None:
    pg_proxy.blackhole()
    started = time.monotonic()
    with pytest.raises(psycopg2.OperationalError, match="timeout"):
        pg_connect(pg_proxy, timeout=2)
    assert 1.5 <= time.monotonic() - started < 4


@pytest.mark.postgres
def test_pg_reset_breaks_open_connection(pg_proxy: FaultProxy) -> None:
    conn = pg_connect(pg_proxy)
    try:
        pg_proxy.reset_connections()
        with pytest.raises(psycopg2.OperationalError):
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
        assert conn.closed
    finally:
        conn.close()


@pytest.mark.postgres
def test_pg_cut_write_reaches_server_answer_lost(pg_proxy: FaultProxy) -> None:
    table = "faultproxy_" + uuid.uuid4().hex[:10]
    direct = pg_connect(pg_proxy, direct=True)
    direct.autocommit = True
    conn = pg_connect(pg_proxy)
    conn.autocommit = True
    try:
        with direct.cursor() as cur:
            cur.execute(f"CREATE TABLE {table} (v int)")
        pg_proxy.cut_after_client_sends()
        with pytest.raises(psycopg2.OperationalError):
            with conn.cursor() as cur:
                cur.execute(f"INSERT INTO {table} VALUES (42)")

        def committed() -> bool:
            with direct.cursor() as cur:
                cur.execute(f"SELECT count(*) FROM {table}")
                return bool(cur.fetchone() == (1,))

        assert wait_for(committed, timeout=3)
    finally:
        conn.close()
        with direct.cursor() as cur:
            cur.execute(f"DROP TABLE IF EXISTS {table}")
        direct.close()


# -- MariaDB through the proxy --------------------------------------------------------


@pytest.fixture
def maria_proxy(maria_cluster) -> Iterator[FaultProxy]:  # type: ignore[no-untyped-def]
    with FaultProxy(upstream=("127.0.0.1", maria_cluster.primary.port)) as p:
        p.cluster = maria_cluster  # type: ignore[attr-defined]
        yield p
    assert proxy_threads() == []


def maria_connect(p: FaultProxy, timeout: int = 2) -> object:
    cluster = p.cluster  # type: ignore[attr-defined]
    return mysql.connector.connect(
        host=p.host, port=p.port, user=cluster.user, password=cluster.password,
        collation="utf8mb4_general_ci", connection_timeout=timeout,
    )


@pytest.mark.mysql
def test_maria_pass_through(maria_proxy: FaultProxy) -> None:
    conn = maria_connect(maria_proxy)
    try:
        cur = conn.cursor()  # type: ignore[attr-defined]
        cur.execute("SELECT @@port")
        assert cur.fetchone() == (maria_proxy.cluster.primary.port,)  # type: ignore[attr-defined]
    finally:
        conn.close()  # type: ignore[attr-defined]


@pytest.mark.mysql
def test_maria_refuse_then_pass_through(maria_proxy: FaultProxy) -> None:
    maria_proxy.refuse()
    started = time.monotonic()
    with pytest.raises((mysql.connector.InterfaceError, mysql.connector.DatabaseError)) as info:
        maria_connect(maria_proxy)
    assert info.value.errno == 2003
    assert time.monotonic() - started < 1
    maria_proxy.pass_through()
    conn = maria_connect(maria_proxy)
    try:
        cur = conn.cursor()  # type: ignore[attr-defined]
        cur.execute("SELECT 1")
        assert cur.fetchone() == (1,)
    finally:
        conn.close()  # type: ignore[attr-defined]


@pytest.mark.mysql
def test_maria_blackhole_connect_times_out(maria_proxy: FaultProxy) -> None:
    maria_proxy.blackhole()
    started = time.monotonic()
    with pytest.raises(mysql.connector.Error) as info:
        maria_connect(maria_proxy, timeout=1)
    assert info.value.errno in (2003, 2013, 3024), info.value
    assert time.monotonic() - started < 4


@pytest.mark.mysql
def test_maria_reset_breaks_open_connection(maria_proxy: FaultProxy) -> None:
    conn = maria_connect(maria_proxy)
    try:
        cur = conn.cursor()  # type: ignore[attr-defined]
        cur.execute("SELECT 1")
        cur.fetchall()
        maria_proxy.reset_connections()
        with pytest.raises(mysql.connector.Error) as info:
            cur.execute("SELECT 1")
            cur.fetchall()
        assert info.value.errno in (2006, 2013, 2055), info.value
    finally:
        try:
            conn.close()  # type: ignore[attr-defined]
        except mysql.connector.Error:
            pass
