"""Breaker state shared by the processes of an application through a real Redis server."""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from contextlib import contextmanager
from typing import Any, Iterator

import pytest
import redis

from dbrouter import ConfigurationError, Router
from dbrouter.faultproxy import FaultProxy
from dbrouter.url import parse_address

from .conftest import wait_until
from .test_bad_input import free_port


@contextmanager
def running_redis(port: int, *options: str) -> Iterator[subprocess.Popen[bytes]]:
    """A Redis server of the test's own on ``port`` (loopback), keeping nothing on disk."""
    binary = shutil.which("redis-server")
    assert binary, "redis-server is not installed: run scripts/setup.sh"
    process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                                *options], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    answer = sock.recv(64)
                    if answer.startswith((b"+PONG", b"-NOAUTH")):
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline and process.poll() is None, "redis-server did not start"
            time.sleep(0.05)
        yield process
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    port = free_port()
    with running_redis(port):
        yield f"redis://127.0.0.1:{port}/0"


def unwarned_port() -> int:
    """A free port that no earlier test of this process named in a Redis-down warning: the
    warning is once per outage per process, and `free_port` gives every test the same ports
    (CI once saw no warning here because another module's test had warned about this port)."""
    from dbrouter import fleet

    return free_port(29100, skip=lambda port: ("down", f"127.0.0.1:{port}") in fleet._warned)


def shared_key(url: str, name: str) -> str:
    """The Redis key holding ``name`` (state, fail_counter, opened_at) of the node at ``url``."""
    address = parse_address(url)
    return f"dbrouter:{address.engine}:{address.name}/{address.database or ''}:pybreaker:{name}"


def behind(proxy: FaultProxy, node: Any) -> str:
    return str(node.url).replace(f":{node.port}/", f":{proxy.port}/")


PROCESS_A = textwrap.dedent("""
    import sys, time
    import dbrouter
    primary, replicas, url = sys.argv[1], sys.argv[2].split(","), sys.argv[3]
    router = dbrouter.Router(primary, replicas, breaker_redis_url=url, fail_max=2, reset_timeout=60,
                             health_interval=0.1, min_size=0, connect_timeout=2)
    deadline = time.monotonic() + 10
    proxied = router.replicas[0]
    while proxied.breaker.state != "open" and time.monotonic() < deadline:
        time.sleep(0.05)
    print("breaker", proxied.breaker.state, flush=True)
    router.close()
""")


def test_one_process_finding_a_node_down_spares_the_others(pg_cluster: Any, redis_url: str) -> None:
    hurt, healthy = pg_cluster.replicas
    with FaultProxy(upstream=("127.0.0.1", hurt.port)) as proxy:
        proxied = hurt.url.replace(f":{hurt.port}/", f":{proxy.port}/")
        replicas = [proxied, healthy.url]
        # Process B: slow probes, so that only the shared state can tell it the node is down.
        with Router(pg_cluster.primary.url, replicas, breaker_redis_url=redis_url, fail_max=2, reset_timeout=60,
                    health_interval=60, min_size=0, breaker_refresh=0.2) as router_b:
            assert router_b.wait_for_probes(1, timeout=10)
            node_b = next(n for n in router_b.replicas if n.address.port == proxy.port)
            assert node_b.breaker.state == "closed"
            proxy.refuse()
            done = subprocess.run([sys.executable, "-c", PROCESS_A, pg_cluster.primary.url, ",".join(replicas), redis_url],
                                  capture_output=True, text=True, timeout=60)
            assert "breaker open" in done.stdout, done.stdout + done.stderr
            time.sleep(0.3)  # more than breaker_refresh
            ports = {router_b.read("SELECT inet_server_port()")[0][0] for _ in range(20)}
            assert ports == {healthy.port}
            assert node_b.breaker.state == "open"
            assert node_b.pool.stats()["connect_errors"] == 0  # B never had to find out by itself
            assert router_b.stats()["nodes"][node_b.name]["breaker"] == "open"


def test_breaker_redis_url_is_validated() -> None:
    with pytest.raises(ConfigurationError, match="breaker_redis_url"):
        Router("postgresql://a@127.0.0.1/x", breaker_redis_url="http://127.0.0.1:6379")


def read_ports(router: Router, n: int = 10) -> set[int]:
    return {router.read("SELECT inet_server_port()")[0][0] for _ in range(n)}


@pytest.mark.parametrize(("name", "bad"), [("state", b"x"), ("fail_counter", b"many")])
def test_a_corrupt_shared_value_does_not_disable_the_breaker(pg_cluster: Any, redis_url: str, name: str, bad: bytes,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    """A bad value in Redis (corrupt, hostile, another program's) is ignored with one warning:
    the node's breaker still trips on this process's own count, and the value is overwritten
    with a valid one. Before: state ``x`` or a non-numeric ``fail_counter`` and a dead node
    never tripped, every failure logged a traceback, and the value stayed."""
    caplog.set_level(logging.WARNING)
    client = redis.Redis.from_url(redis_url)
    hurt, healthy = pg_cluster.replicas
    # The healthy node behind a proxy of its own too: keys of their own, warned about in this test only.
    with FaultProxy(upstream=("127.0.0.1", hurt.port)) as proxy, \
            FaultProxy(upstream=("127.0.0.1", healthy.port)) as other:
        replicas = [behind(proxy, hurt), behind(other, healthy)]
        bad_key, healthy_key = shared_key(replicas[0], name), shared_key(replicas[1], "state")
        with Router(pg_cluster.primary.url, replicas, breaker_redis_url=redis_url, fail_max=2, reset_timeout=60,
                    health_interval=0.1, breaker_refresh=0.1, min_size=0, connect_timeout=2) as router:
            assert router.wait_for_probes(1, timeout=10)
            node = next(n for n in router.replicas if n.address.port == proxy.port)
            client.set(bad_key, bad)
            client.set(healthy_key, b"x")  # and a healthy node's state: healed without any failure
            proxy.refuse()
            proxy.reset_connections()
            assert wait_until(lambda: node.breaker.state == "open", timeout=10), node.breaker
            assert read_ports(router) == {healthy.port}
            assert wait_until(lambda: client.get(healthy_key) == b"closed", timeout=5), client.get(healthy_key)
            time.sleep(0.5)  # more failed probes and refreshes: still one warning per key
        value = client.get(bad_key)
        assert value is not None and (value == b"open" if name == "state" else value.isdigit()), value
    for key in (bad_key, healthy_key):
        warnings = [r for r in caplog.records if key in r.getMessage()]
        assert len(warnings) == 1, [r.getMessage() for r in warnings]
        assert warnings[0].levelno == logging.WARNING
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


def test_a_process_does_not_half_open_a_node_early_after_another_opened_it(pg_cluster: Any, redis_url: str) -> None:
    """B opened a node's breaker once, another process closed it; when process A opens it again,
    B counts reset_timeout from A's opening (the shared state's), not from its own stale one.
    Before: B offered the node (and wrote half-open for everyone) as soon as it saw it open."""
    reset = 3.0
    client = redis.Redis.from_url(redis_url)
    hurt, healthy = pg_cluster.replicas
    with FaultProxy(upstream=("127.0.0.1", hurt.port)) as proxy:
        replicas = [behind(proxy, hurt), healthy.url]
        key = shared_key(replicas[0], "state")
        common: dict[str, Any] = dict(breaker_redis_url=redis_url, fail_max=1, reset_timeout=reset, min_size=0,
                                      breaker_refresh=0.1, connect_timeout=2)
        with Router(pg_cluster.primary.url, replicas, health_interval=60, **common) as router_b:
            assert router_b.wait_for_probes(1, timeout=10)
            node_b = next(n for n in router_b.replicas if n.address.port == proxy.port)
            proxy.refuse()
            proxy.reset_connections()
            assert wait_until(lambda: read_ports(router_b, 2) and node_b.breaker.state == "open", timeout=10)
            proxy.pass_through()
            with Router(pg_cluster.primary.url, replicas, health_interval=0.1, **common):
                # A's probes find the node answering: reset_timeout later A closes it for everyone.
                assert wait_until(lambda: client.get(key) == b"closed", timeout=reset + 5), client.get(key)
                proxy.refuse()
                proxy.reset_connections()
                assert wait_until(lambda: client.get(key) == b"open", timeout=5), client.get(key)
                opened = time.monotonic()
            # A is gone; B learns the node is open again from Redis, within breaker_refresh (its
            # copy is refreshed in the background: no caller of B's waits for Redis).
            assert wait_until(lambda: node_b.breaker.state == "open", timeout=1), node_b.breaker
            while time.monotonic() < opened + reset - 0.5:
                assert not node_b.breaker.available(), f"B offered the node {time.monotonic() - opened:.2f}s after A opened it"
                assert read_ports(router_b, 2) == {healthy.port}
                assert client.get(key) == b"open"
                time.sleep(0.05)
            # Not never: B offers the node for a trial once A's reset_timeout (rounded up) has passed.
            assert wait_until(node_b.breaker.available, timeout=3)


def test_redis_unreachable_at_construction_leaves_breakers_local(pg_cluster: Any, caplog: pytest.LogCaptureFixture) -> None:
    """Shared state is an optimisation, not a dependency: a Router whose Redis is down starts,
    warns once naming the server (never its password), trips a dead node on its own, and shares
    its state once Redis answers. Before: Router() raised redis's own ConnectionError."""
    caplog.set_level(logging.INFO)
    port = unwarned_port()
    url = f"redis://:s3cret@127.0.0.1:{port}/0"
    hurt, healthy = pg_cluster.replicas
    with FaultProxy(upstream=("127.0.0.1", hurt.port)) as proxy:
        replicas = [behind(proxy, hurt), healthy.url]
        started = time.monotonic()
        with Router(pg_cluster.primary.url, replicas, breaker_redis_url=url, fail_max=2, reset_timeout=60,
                    health_interval=0.1, breaker_refresh=0.1, min_size=0, connect_timeout=2) as router:
            assert router.wait_for_probes(1, timeout=10)
            assert time.monotonic() - started < 5
            node = next(n for n in router.replicas if n.address.port == proxy.port)
            proxy.refuse()
            proxy.reset_connections()
            assert wait_until(lambda: node.breaker.state == "open", timeout=10), node.breaker
            assert read_ports(router) == {healthy.port}
            def down() -> list[logging.LogRecord]:
                return [r for r in caplog.records if f"127.0.0.1:{port}" in r.getMessage() and r.levelno >= logging.WARNING]

            # The sharing thread finds Redis down and warns (the breakers only touch their copy).
            assert wait_until(lambda: down(), timeout=5), [r.getMessage() for r in caplog.records]
            assert len(down()) == 1, [r.getMessage() for r in down()]
            with running_redis(port, "--requirepass", "s3cret"):
                client = redis.Redis.from_url(url)
                # Redis is back (empty): this process publishes what it found on its own.
                key = shared_key(replicas[0], "state")
                assert wait_until(lambda: client.get(key) == b"open", timeout=5), client.get(key)
                assert read_ports(router) == {healthy.port}
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "s3cret" in m]
    assert any(f"127.0.0.1:{port}" in m and "again" in m for m in messages), messages
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
