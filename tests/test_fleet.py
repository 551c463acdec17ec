"""Breaker state shared by the processes of an application through a real Redis server."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import textwrap
import time
from typing import Any, Iterator

import pytest

from dbrouter import ConfigurationError, Router
from dbrouter.faultproxy import FaultProxy

from .test_bad_input import free_port


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """A Redis server of the test's own, on a free loopback port, keeping nothing on disk."""
    binary = shutil.which("redis-server")
    assert binary, "redis-server is not installed: run scripts/setup.sh"
    port = free_port()
    process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline and process.poll() is None, "redis-server did not start"
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(timeout=10)


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
