"""`AsyncRouter` with ``breaker_redis_url``: breaker state shared with other routers through a
real Redis server, and no Redis I/O on the event loop (`dbrouter.fleet`'s sharing thread does
it all), so a Redis that dies mid-load costs the loop nothing. The loop runs in debug mode
under `tests._loopcheck.LoopCheck` (a 5 ms step or a blocking call fails the test), and a
stall detector turns a hang into a failure.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable

import pytest
import redis

from dbrouter import Router
from dbrouter.aio import AsyncRouter
from dbrouter.faultproxy import FaultProxy

from .test_aio_membership import MAX_SIZE, AsyncReadLoad, Read, run_checked, until
from .test_bad_input import free_port
from .test_fleet import behind, running_redis, shared_key


async def until_in_thread(predicate: Callable[[], Any], timeout: float = 5.0) -> bool:
    """`until`, for a predicate that does I/O (the test's own Redis client): run in a thread."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await asyncio.to_thread(predicate):
            return True
        await asyncio.sleep(0.05)
    return False


@pytest.mark.timeout(120)
def test_a_breaker_opened_by_an_async_router_is_seen_open_by_a_sync_and_an_async_router(pg_cluster: Any) -> None:
    hurt, healthy = pg_cluster.replicas
    port = free_port()
    with running_redis(port), FaultProxy(upstream=("127.0.0.1", hurt.port)) as proxy:
        url = f"redis://127.0.0.1:{port}/0"
        replicas = [behind(proxy, hurt), healthy.url]
        common: dict[str, Any] = dict(breaker_redis_url=url, fail_max=2, reset_timeout=60, min_size=0,
                                      breaker_refresh=0.1, connect_timeout=2)
        # A probes often and finds the node down; B (sync) and C (async) probe once a minute:
        # only the shared state can tell them.
        finder = AsyncRouter(pg_cluster.primary.url, replicas, health_interval=0.1, **common)
        watcher = AsyncRouter(pg_cluster.primary.url, replicas, health_interval=60, **common)
        with Router(pg_cluster.primary.url, replicas, health_interval=60, **common) as sync_router:
            assert sync_router.wait_for_probes(1, timeout=10)
            sync_node = next(n for n in sync_router.replicas if n.address.port == proxy.port)

            async def main() -> None:
                async with finder, watcher:
                    # Together: the watcher's first probe round is its only one for a minute.
                    assert all(await asyncio.gather(finder.wait_for_probes(1, timeout=10),
                                                    watcher.wait_for_probes(1, timeout=10)))
                    found = next(n for n in finder.replicas if n.address.port == proxy.port)
                    watched = next(n for n in watcher.replicas if n.address.port == proxy.port)
                    assert watched.breaker.state == "closed"
                    proxy.refuse()
                    proxy.reset_connections()
                    assert await until(lambda: found.breaker.state == "open", timeout=10), found.breaker
                    assert await until(lambda: watched.breaker.state == "open" and sync_node.breaker.state == "open",
                                       timeout=2), (watched.breaker, sync_node.breaker)
                    ports = {(await watcher.read("SELECT inet_server_port()"))[0][0] for _ in range(20)}
                    assert ports == {healthy.port}
                    assert watched.pool.stats()["connect_errors"] == 0  # the watcher never had to find out

            run_checked(main)
            ports = {sync_router.read("SELECT inet_server_port()")[0][0] for _ in range(20)}
            assert ports == {healthy.port}
            assert sync_node.pool.stats()["connect_errors"] == 0


@pytest.mark.timeout(120)
def test_redis_killed_mid_load_costs_the_loop_nothing_and_sharing_resumes_when_it_is_back(
        pg_cluster: Any, caplog: pytest.LogCaptureFixture) -> None:
    """Before: AsyncRouter refused breaker_redis_url, its breakers' Redis round trips (up to 1 s
    socket timeouts) being made on the caller's thread, here the event loop."""
    caplog.set_level(logging.INFO)
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    address = f"127.0.0.1:{port}"
    replicas = [n.url for n in pg_cluster.replicas]
    router = AsyncRouter(pg_cluster.primary.url, replicas, breaker_redis_url=url, fail_max=2, reset_timeout=60,
                         health_interval=0.2, breaker_refresh=0.1, min_size=1, max_size=MAX_SIZE, connect_timeout=2)
    first = pg_cluster.replicas[0]
    state_key = shared_key(replicas[0], "state")
    with running_redis(port) as server:
        client = redis.Redis.from_url(url)

        async def main() -> list[Read]:
            async with router:
                assert await router.wait_for_probes(1, timeout=10)
                node = next(n for n in router.replicas if n.address.port == first.port)
                # Shared: the router fills in the keys Redis lacks from its own copy.
                assert await until_in_thread(lambda: client.get(state_key) == b"closed"), "state never written"
                async with AsyncReadLoad(router, pg_cluster) as load:
                    await asyncio.sleep(0.5)
                    server.kill()  # by its PID: the test's own redis-server
                    await asyncio.to_thread(server.wait, 5)
                    killed = time.monotonic()
                    await asyncio.sleep(1.5)  # refreshes and probe outcomes meet a dead Redis
                    during = [r for r in load.reads if r[0] >= killed]
                    assert len(during) > 100, f"only {len(during)} reads in the 1.5 s after Redis died"
                    down = [r for r in caplog.records if address in r.getMessage() and r.levelno >= logging.WARNING]
                    assert len(down) == 1, [r.getMessage() for r in down]  # one outage, one warning
                    back = running_redis(port)  # started and stopped off the loop: a process and sockets
                    await asyncio.to_thread(back.__enter__)
                    try:
                        # Back, empty: this process publishes its copy, and reads what others write.
                        assert await until_in_thread(lambda: client.get(state_key) == b"closed"), "not published"
                        # As another process opening the node's breaker:
                        await asyncio.to_thread(client.set, state_key, b"open")
                        assert await until(lambda: node.breaker.state == "open", timeout=2), node.breaker
                        await asyncio.sleep(0.3)
                        after = len(load.reads)
                        await asyncio.sleep(0.5)
                        late = [r for r in load.reads[after:] if r[2] == first.port]
                        assert not late, f"{len(late)} reads went to a node another process opened"
                    finally:
                        await asyncio.to_thread(back.__exit__, None, None, None)
            return load.reads

        reads = run_checked(main)  # judged off the loop: the test's own computing is not the router's
    failed = [r for r in reads if r[3] is not None]
    assert not failed, f"{len(failed)} of {len(reads)} reads failed, e.g. {failed[:3]}"
    assert any(address in r.getMessage() and "again" in r.getMessage() for r in caplog.records)
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
