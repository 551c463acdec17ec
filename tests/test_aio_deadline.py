"""Per-call deadlines on `AsyncRouter` (issue 16: the async router has `Router`'s options),
on real servers, for the async pairs of the conformance suite (async psycopg 3 on
PostgreSQL, mysql.connector.aio on MariaDB: the ``cluster`` fixture's two engines).

The same behaviour as tests/test_deadline.py: ``timeout=``, ``router.deadline()`` and
``call_timeout`` bound the pool wait, the liveness check, retries, the failover wait and
the statement; a statement running at the deadline is cut on the loop (its socket shut
down) and cancelled on the server from a thread, the node not blamed, and the call raises
`DeadlineExceeded` saying where the time went. Every router runs on a debug-mode loop
with the conformance suite's loop check (tests/_loopcheck.py); the tests whose calls are
cut report its findings rather than fail on them (see FAULT_PATHS there), the others fail.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any, Callable, Iterator

import pytest

import dbrouter
from dbrouter import DeadlineExceeded, DeadlineExceededAfterWrite, Router, WriteOutcomeUnknown
from dbrouter.cluster import LocalCluster
from dbrouter.deadline import current

from .conftest import wait_until
from .test_conformance import Client, Pair, close_checked
from .test_control_plane import StallDetector, behind_proxy
from .test_deadline import running, sleep_sql

ASYNC_PAIRS = {"postgres": Pair("psycopg-async", "postgres", True), "mysql": Pair("mysql-aio", "mysql", True)}


@pytest.fixture
def clients(cluster: LocalCluster) -> Iterator[Callable[..., Client]]:
    """Makes async clients (`tests.test_conformance.Client`) of the cluster's engine: an
    `AsyncRouter` on a debug-mode loop of its own thread. Closes them after the test, which
    fails when a loop check in "fail" mode reported a slow callback."""
    made: list[Client] = []
    pair = ASYNC_PAIRS["postgres" if cluster.engine == "postgres" else "mysql"]

    def make(primary: Any = None, replicas: list[Any] | None = None, **options: Any) -> Client:
        client = Client(pair, primary or cluster.primary.url, [] if replicas is None else replicas, **options)
        made.append(client)
        return client

    yield make
    close_checked(made)


def node_stats(client: Client, name: str) -> dict[str, Any]:
    return client.stats()["nodes"][name]  # type: ignore[no-any-return]


def probed(client: Client) -> None:
    """Until the first probe round is done (with ``health_interval=60`` the next is a minute
    away: no probe feeds a breaker or cuts a connection during the test)."""
    assert wait_until(lambda: all(n["probe_latency"] is not None for n in client.stats()["nodes"].values()),
                      timeout=10), client.stats()


def test_calls_with_time_to_spare_run_as_before(clients: Callable[..., Client], cluster: LocalCluster,
                                                table: str) -> None:
    """Steady state, the loop check failing on any report: every call under a deadline that
    does not run out (timeout=, a block's deadline, call_timeout) works as without one."""
    client = clients(call_timeout=30)
    router = client.router

    async def calls() -> None:
        assert await router.read("SELECT 1", timeout=5) == [(1,)]
        assert await router.write(f"INSERT INTO {table} (id, port) VALUES (1, 1)", timeout=5) == 1
        async with router.transaction(timeout=5) as tx:
            await tx.execute(f"INSERT INTO {table} (id, port) VALUES (2, 2)")

        async def body(tx: Any) -> int:
            return await tx.execute(f"INSERT INTO {table} (id, port) VALUES (3, 3)")  # type: ignore[no-any-return]

        assert await router.run_transaction(body, timeout=5) == 1
        assert await router.write_many(f"INSERT INTO {table} (id, port) VALUES (%s, %s)",
                                       [(i, i) for i in range(10, 20)], batch_size=5, timeout=5) == 10
        with router.deadline(5):
            assert await router.read("SELECT 1") == [(1,)]
            session = router.session()
            await session.write(f"INSERT INTO {table} (id, port) VALUES (4, 4)")
            assert await session.read(f"SELECT count(*) FROM {table}") == [(14,)]
        for _ in range(50):  # the hot path under call_timeout
            assert await router.read("SELECT 1") == [(1,)]

    client.call(calls())
    stats = client.stats()
    assert stats["deadline_exceeded"] == 0 and stats["write_outcome_unknown"] == 0, stats
    assert cluster.primary.query(f"SELECT count(*) FROM {table}")[0][0] == 14


def test_a_slow_statement_is_cut_at_the_deadline_and_cancelled_on_the_server(
        clients: Callable[..., Client], cluster: LocalCluster) -> None:
    client = clients(loop_check="report")
    router = client.router
    marker = "adl" + uuid.uuid4().hex[:10]
    stall = StallDetector(limit=10).start()
    try:
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded) as caught:
            client.call(router.read(sleep_sql(cluster, 30, marker), timeout=0.3))
        took = time.monotonic() - started
        stall.progress()
        assert took < 0.3 + 1.0, took  # not the statement's 30 s
        message = str(caught.value)
        assert "deadline of 0.3s exceeded in a statement on" in message and "statements on" in message, message
        assert "the server was asked to cancel it" in message, message
        assert caught.value.node == router.primary.name and not isinstance(caught.value, WriteOutcomeUnknown)
        assert wait_until(lambda: not running(cluster, marker), timeout=5), "the statement still runs on the server"
        stats = client.stats()
        assert stats["deadline_exceeded"] == 1
        node = stats["nodes"][router.primary.name]
        assert node["breaker"] == "closed" and node["breaker_failures"] == 0, node  # not the node's fault
        assert node["pool"]["in_use"] == 0, node
        assert client.read("SELECT 1", timeout=5) == [(1,)]  # the pool serves on
        assert stall.report is None, stall.report
    finally:
        stall.stop()


@pytest.mark.proxy
@pytest.mark.timeout(120)
def test_a_read_on_a_blackholed_replica_returns_at_its_deadline(clients: Callable[..., Client],
                                                               cluster: LocalCluster) -> None:
    """A replica that stops answering (packets swallowed, connections kept open): a read on
    it ends at its deadline, naming the node and where the time went, its connection is not
    leaked and its breaker is not fed (the caller ran out of time; the probes judge nodes)."""
    with behind_proxy(cluster.replicas[0]) as (proxy, proxied):
        client = clients(replicas=[{"url": proxied, "name": "target"}], health_interval=60, validation_bypass=60,
                         min_size=2, max_size=2, loop_check="report")
        stall = StallDetector(limit=10).start()
        try:
            probed(client)
            for _ in range(4):
                assert client.read("SELECT 1") == [(1,)]
            proxy.blackhole()
            errors = []
            for _ in range(3):
                started = time.monotonic()
                with pytest.raises(DeadlineExceeded) as caught:
                    client.read("SELECT 1", timeout=0.3)
                took = time.monotonic() - started
                stall.progress()
                assert took < 0.3 + 0.7, (took, caught.value)
                errors.append(caught.value)
            # The first two on the pooled connections, cut in their statement; the third waited for
            # a connection (the cut ones are discarded, and a new one cannot connect).
            assert "deadline of 0.3s exceeded in a statement on target, cut" in str(errors[0]), errors[0]
            for error in errors:
                assert error.node == "target", error
                assert "(time went to: " in str(error) and " on target " in str(error), error
            assert wait_until(lambda: node_stats(client, "target")["pool"]["in_use"] == 0, timeout=5), \
                node_stats(client, "target")
            node = node_stats(client, "target")
            assert node["breaker"] == "closed" and node["breaker_failures"] == 0, node
            assert client.stats()["deadline_exceeded"] == 3
            assert stall.report is None, stall.report
        finally:
            stall.stop()
            proxy.pass_through()


@pytest.mark.proxy
def test_the_liveness_check_of_a_pooled_connection_stops_at_the_deadline(clients: Callable[..., Client],
                                                                         cluster: LocalCluster) -> None:
    """An idle connection past validation_bypass is checked before use: on a node gone
    silent, the check is cut at the call's deadline (it used to run to connect_timeout)."""
    with behind_proxy(cluster.primary) as (proxy, proxied):
        client = clients(primary=proxied, health_interval=60, validation_bypass=0.05, min_size=2, max_size=2,
                         connect_timeout=5, loop_check="report")
        stall = StallDetector(limit=10).start()
        try:
            probed(client)
            client.read("SELECT 1")
            time.sleep(0.2)  # idle past the bypass window: the next checkout checks it
            proxy.blackhole()
            started = time.monotonic()
            with pytest.raises(DeadlineExceeded) as caught:
                client.read("SELECT 1", timeout=0.3)
            stall.progress()
            assert time.monotonic() - started < 0.3 + 0.7, caught.value
            assert "liveness check" in str(caught.value), caught.value
            assert stall.report is None, stall.report
        finally:
            stall.stop()
            proxy.pass_through()


@pytest.mark.proxy
def test_a_write_cut_after_it_was_sent_is_unknown_and_never_resent(clients: Callable[..., Client],
                                                                   cluster: LocalCluster, table: str) -> None:
    """The write reaches the server (and is applied) but its reply is held back: cut at the
    deadline, it raises DeadlineExceededAfterWrite, and is not sent again."""
    with behind_proxy(cluster.primary) as (proxy, proxied):
        client = clients(primary={"url": proxied, "name": "target"}, health_interval=60, validation_bypass=60,
                         min_size=1, max_size=1,
                         loop_check="report")
        stall = StallDetector(limit=10).start()
        try:
            probed(client)
            client.write(f"INSERT INTO {table} (id, port) VALUES (1, 1)")  # warms the pooled connection
            proxy.spikes(1.0, 1.0)  # every reply a second late
            started = time.monotonic()
            with pytest.raises(DeadlineExceededAfterWrite) as caught:
                client.write(f"INSERT INTO {table} (id, port) VALUES (2, 2)", timeout=0.3)
            stall.progress()
            assert time.monotonic() - started < 0.3 + 0.7
            error = caught.value
            assert isinstance(error, WriteOutcomeUnknown) and isinstance(error, DeadlineExceeded)
            assert "may or may not have been applied" in str(error) and error.node == "target", error
            proxy.pass_through()
            time.sleep(1.5)  # a resend, had there been one, would have landed by now
            assert cluster.primary.query(f"SELECT count(*) FROM {table} WHERE id = 2")[0][0] == 1
            stats = client.stats()
            assert stats["write_outcome_unknown"] == 1 and stats["deadline_exceeded"] == 1, stats
            assert stats["nodes"]["target"]["breaker_failures"] == 0, stats["nodes"]["target"]
            assert stall.report is None, stall.report
        finally:
            stall.stop()
            proxy.pass_through()


def test_a_transaction_cut_inside_its_block_is_rolled_back(clients: Callable[..., Client], cluster: LocalCluster,
                                                           table: str) -> None:
    client = clients(loop_check="report")
    router = client.router
    marker = "adl" + uuid.uuid4().hex[:10]

    async def block() -> None:
        async with router.transaction(timeout=0.3) as tx:
            await tx.execute(f"INSERT INTO {table} (id, port) VALUES (1, 1)")
            await tx.execute(sleep_sql(cluster, 30, marker))

    async def body(tx: Any) -> None:
        await tx.execute(f"INSERT INTO {table} (id, port) VALUES (2, 2)")
        await tx.execute(sleep_sql(cluster, 30, marker))

    for call in (block, lambda: router.run_transaction(body, timeout=0.3)):
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded) as caught:
            client.call(call())
        assert time.monotonic() - started < 0.3 + 1.0
        assert not isinstance(caught.value, WriteOutcomeUnknown), caught.value
    assert wait_until(lambda: not running(cluster, marker), timeout=5)
    assert cluster.primary.query(f"SELECT count(*) FROM {table}")[0][0] == 0
    assert client.stats()["deadline_exceeded"] == 2


def test_the_pool_wait_counts_against_the_deadline(clients: Callable[..., Client]) -> None:
    client = clients(min_size=1, max_size=1, acquire_timeout=30, loop_check="report")
    router = client.router

    async def starved() -> str:
        held = await router.lease("write")
        try:
            started = time.monotonic()
            with pytest.raises(DeadlineExceeded, match="waiting for a connection of") as caught:
                await router.write("SELECT 1", timeout=0.2)
            assert time.monotonic() - started < 1.0
            return str(caught.value)
        finally:
            held.release()

    assert "pool wait on" in client.call(starved())
    assert client.write("SELECT 1", timeout=1) is not None


def test_nested_deadlines_only_shorten_and_the_sync_api_sets_them_too(clients: Callable[..., Client],
                                                                     cluster: LocalCluster) -> None:
    client = clients(loop_check="report")
    router = client.router
    marker = "adl" + uuid.uuid4().hex[:10]
    sync_router = Router(cluster.primary.url, [], open=False)  # only for its deadline(): no I/O

    async def nested() -> float:
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded), router.deadline(0.5) as outer:
            await router.read(sleep_sql(cluster, 0.1, marker))  # within it
            with router.deadline(30) as inner:
                assert inner is outer and current() is outer  # later than the one around it: no change
                await router.read(sleep_sql(cluster, 0.1, marker), timeout=10)  # nor does a longer timeout
                await router.read(sleep_sql(cluster, 30, marker), timeout=10)  # cut at the outer deadline
        return time.monotonic() - started

    assert client.call(nested()) < 0.5 + 1.0
    assert client.stats()["deadline_exceeded"] == 1  # counted once, however many scopes it left

    async def set_by_the_sync_api() -> float:
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded), sync_router.deadline(0.3):
            await router.read(sleep_sql(cluster, 30, marker))
        return time.monotonic() - started

    assert client.call(set_by_the_sync_api()) < 0.3 + 1.0
    assert current() is None
    sync_router.close()


def test_call_timeout_is_every_calls_default(clients: Callable[..., Client], cluster: LocalCluster) -> None:
    client = clients(call_timeout=0.3, loop_check="report")  # refused with ConfigurationError before
    router = client.router
    marker = "adl" + uuid.uuid4().hex[:10]
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="deadline of 0.3s exceeded"):
        client.read(sleep_sql(cluster, 30, marker))
    assert time.monotonic() - started < 0.3 + 1.0
    with pytest.raises(DeadlineExceeded):
        client.write(sleep_sql(cluster, 30, marker), idempotent=True)
    assert client.read(sleep_sql(cluster, 0.5, marker), timeout=5)  # a call's own timeout wins

    async def in_a_block() -> Any:
        with router.deadline(5):
            return await router.read(sleep_sql(cluster, 0.5, marker))  # as does a block's deadline

    assert client.call(in_a_block())
    assert client.stats()["deadline_exceeded"] == 2


@pytest.mark.proxy
@pytest.mark.timeout(120)
def test_tasks_calling_a_blackholed_node_return_at_their_deadlines(clients: Callable[..., Client],
                                                                   cluster: LocalCluster) -> None:
    """Tasks reading and writing through a node that stops answering: every call ends at
    its deadline with a dbrouter error (cut in its statement, its pool wait, or refused once
    the probes see the node down), none waits for a driver's timeout, and nothing leaks."""
    with behind_proxy(cluster.primary) as (proxy, proxied):
        client = clients(primary={"url": proxied, "name": "target"}, health_interval=0.1, connect_timeout=1,
                         min_size=4, max_size=4, loop_check="report")
        router = client.router
        stall = StallDetector(limit=10).start()
        try:
            for _ in range(8):
                client.read("SELECT 1")
            proxy.blackhole()

            async def calls(write: bool) -> tuple[float, list[BaseException]]:
                slowest, errors = 0.0, []
                for _ in range(10):
                    started = time.monotonic()
                    try:
                        if write:
                            await router.write("SELECT 1", timeout=0.2)
                        else:
                            await router.read("SELECT 1", timeout=0.2)
                    except dbrouter.DbRouterError as exc:
                        errors.append(exc)
                    slowest = max(slowest, time.monotonic() - started)
                    stall.progress()
                return slowest, errors

            async def all_tasks() -> list[tuple[float, list[BaseException]]]:
                return list(await asyncio.gather(*(calls(i % 2 == 0) for i in range(8))))

            results = client.call(all_tasks())
            errors = [e for _, errs in results for e in errs]
            slowest = max(took for took, _ in results)
            assert stall.report is None, stall.report
            assert len(errors) == 80, errors[:3]  # nothing answered
            assert slowest < 0.2 + 1.0, slowest  # each ended at its deadline, not at a driver's timeout
            assert any(isinstance(e, DeadlineExceeded) for e in errors), errors[:3]
            proxy.pass_through()
            assert wait_until(lambda: node_stats(client, "target")["pool"]["in_use"] == 0, timeout=5), \
                node_stats(client, "target")
        finally:
            stall.stop()
            proxy.pass_through()
