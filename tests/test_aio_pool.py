"""The asyncio pool on real servers: the sync pool's knobs and fairness, awaited."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable, TypeVar

import pytest

from dbrouter import ConfigurationError, PoolConfig, PoolTimeout
from dbrouter.adapters import make_async_adapter
from dbrouter.aio.pool import AsyncPool
from dbrouter.config import ConnectOptions
from dbrouter.errors import ConnectError, PoolClosed, TooManyWaiting
from dbrouter.url import parse_address

from .conftest import free_low_port

T = TypeVar("T")


def run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    """Run a test body on a fresh loop in debug mode."""
    async def main() -> T:
        return await coro_fn()

    return asyncio.run(main(), debug=True)


def pool_for(cluster: Any, **config: Any) -> AsyncPool:
    adapter = make_async_adapter(parse_address(cluster.primary.url), ConnectOptions(connect_timeout=2))
    return AsyncPool(adapter, PoolConfig(**config), name="t")


def test_checkout_return_reuse_and_stats(cluster: Any) -> None:
    async def body() -> None:
        pool = pool_for(cluster, min_size=1, max_size=3).open()
        try:
            first = await pool.borrow()
            rows, _ = await pool.adapter.execute(first.conn, "SELECT 1")
            assert rows == [(1,)]
            pool.give_back(first)
            again = await pool.borrow()
            assert again is first  # the warm one
            pool.give_back(again)
            stats = pool.stats()
            assert stats["acquired"] == 2 and stats["size"] >= 1 and stats["in_use"] == 0
        finally:
            await pool.aclose()
        assert pool.stats()["size"] == 0

    run(body)


def test_waiters_are_served_first_come_first_served(cluster: Any) -> None:
    async def body() -> None:
        pool = pool_for(cluster, min_size=1, max_size=1).open()
        try:
            held = await pool.borrow()
            order: list[int] = []

            async def wait(i: int) -> None:
                entry = await pool.borrow(timeout=10)
                order.append(i)
                await asyncio.sleep(0.001)
                pool.give_back(entry)

            tasks = []
            for i in range(20):
                tasks.append(asyncio.create_task(wait(i)))
                await asyncio.sleep(0)  # queue in this order
            await asyncio.sleep(0.05)
            pool.give_back(held)
            await asyncio.gather(*tasks)
            assert order == list(range(20))
            assert pool.stats()["waiting"] == 0
        finally:
            await pool.aclose()

    run(body)


def test_acquire_timeout_names_the_pool_and_max_waiting_refuses_at_once(cluster: Any) -> None:
    async def body() -> None:
        pool = pool_for(cluster, min_size=1, max_size=1, max_waiting=1).open()
        try:
            held = await pool.borrow()
            started = time.monotonic()
            waiting = asyncio.create_task(pool.borrow(timeout=0.3))
            await asyncio.sleep(0.01)
            with pytest.raises(TooManyWaiting, match="max_waiting 1"):
                await pool.borrow(timeout=5)
            with pytest.raises(PoolTimeout, match=r"pool t: no connection free after 0.3s \(size 1/1"):
                await waiting
            assert 0.25 <= time.monotonic() - started < 1.5
            pool.give_back(held)
            stats = pool.stats()
            assert stats["timeouts"] == 1 and stats["rejected"] == 1 and stats["waiting"] == 0
        finally:
            await pool.aclose()

    run(body)


def test_a_cancelled_waiter_leaves_no_trace_and_loses_no_connection(cluster: Any) -> None:
    async def body() -> None:
        pool = pool_for(cluster, min_size=1, max_size=1).open()
        try:
            held = await pool.borrow()
            waiter = asyncio.create_task(pool.borrow(timeout=5))
            await asyncio.sleep(0.01)
            waiter.cancel()
            pool.give_back(held)  # in the same step: the waiter may have just been served
            with pytest.raises(asyncio.CancelledError):
                await waiter
            entry = await pool.borrow(timeout=1)  # the connection came back to the pool
            pool.give_back(entry)
            assert pool.stats()["in_use"] == 0 and pool.stats()["waiting"] == 0
        finally:
            await pool.aclose()

    run(body)


def test_a_dirty_connection_is_reset_before_reuse(cluster: Any) -> None:
    async def body() -> None:
        pool = pool_for(cluster, min_size=1, max_size=1).open()
        try:
            entry = await pool.borrow()
            await pool.adapter.begin(entry.conn)
            pool.give_back(entry)  # a transaction open: reset (rollback) in a task
            again = await pool.borrow(timeout=2)
            assert pool.adapter.return_state(again.conn).value == "clean"
            pool.give_back(again)
        finally:
            await pool.aclose()

    run(body)


def test_invalidate_retires_idle_and_borrowed_connections(cluster: Any) -> None:
    async def body() -> None:
        pool = pool_for(cluster, min_size=2, max_size=2).open()
        try:
            await pool.wait_ready(5)
            held = await pool.borrow()
            assert pool.invalidate("test") == 1
            pool.give_back(held)  # of the old generation: closed, not kept
            fresh = await pool.borrow(timeout=5)
            assert fresh is not held
            pool.give_back(fresh)
            assert pool.stats()["discarded"] >= 2
        finally:
            await pool.aclose()

    run(body)


def test_leak_detection_reports_the_borrower(cluster: Any, caplog: pytest.LogCaptureFixture) -> None:
    events: list[tuple[str, str]] = []

    async def body() -> None:
        adapter = make_async_adapter(parse_address(cluster.primary.url), ConnectOptions(connect_timeout=2))
        pool = AsyncPool(adapter, PoolConfig(min_size=1, max_size=1, leak_threshold=0.1, maintenance_interval=0.05),
                         name="t", on_event=lambda event, message, **data: events.append((event, message)))
        pool.open()
        try:
            entry = await pool.borrow()  # the borrowing line: test_leak_detection_reports_the_borrower
            await asyncio.sleep(0.4)
            pool.give_back(entry)
        finally:
            await pool.aclose()

    with caplog.at_level(logging.WARNING, logger="dbrouter.pool"):
        run(body)
    assert [e for e, _ in events] == ["leak"], events
    assert "entry = await pool.borrow()" in events[0][1]


def test_a_refused_connect_fails_waiters_at_once(cluster: Any) -> None:
    async def body() -> None:
        address = parse_address(cluster.primary.url.replace(str(cluster.primary.port), str(free_low_port())))
        pool = AsyncPool(make_async_adapter(address, ConnectOptions(connect_timeout=2)), PoolConfig(min_size=0))
        pool.open()
        try:
            started = time.monotonic()
            with pytest.raises(ConnectError, match=f"{address.host}:{address.port}"):
                await pool.borrow(timeout=5)
            assert time.monotonic() - started < 2
        finally:
            await pool.aclose()
        with pytest.raises(PoolClosed):
            await pool.borrow()

    run(body)


def test_bad_timeout_is_a_configuration_error(cluster: Any) -> None:
    async def body() -> None:
        pool = pool_for(cluster).open()
        try:
            with pytest.raises(ConfigurationError):
                await pool.borrow(timeout=-1)
        finally:
            await pool.aclose()

    run(body)


@pytest.mark.postgres
def test_a_psycopg_login_runs_off_the_loop(pg_cluster: Any) -> None:
    """psycopg 3 logs in inside PQconnectPoll, and a SCRAM password login (the suite's
    clusters use one) computes PBKDF2 there: 4 ms of CPU or more. The adapter opens the
    connection on a thread, so the loop's own CPU over a whole connect stays small; on the
    loop, psycopg's ``AsyncConnection.connect`` used more than the 5 ms a step may take."""
    adapter = make_async_adapter(parse_address(pg_cluster.replicas[0].url.replace("postgresql://",
                                                                                   "postgresql+psycopg://")))

    async def connects() -> float:
        spent = 0.0
        for _ in range(5):
            before = time.thread_time()
            conn = await adapter.connect()
            spent = max(spent, time.thread_time() - before)
            assert (await adapter.execute(conn, "SELECT 1", None))[0] == [(1,)]
            await adapter.close(conn)
        return spent

    most = asyncio.run(connects())
    assert most < 0.002, f"a connect used {most * 1e3:.1f} ms of the loop thread's CPU"
