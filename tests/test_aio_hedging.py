"""Budgeted hedged reads on `AsyncRouter` (issue 16), on real replicas, for the async pairs
of the conformance suite (async psycopg 3, mysql.connector.aio: the ``cluster`` fixture's
engines), as tests/test_hedging.py checks them for `Router`.

One replica is made slow for the test's reads only (the statement sleeps on that server,
`tests.test_hedging.slow_on`), or its replies are held back by the fault proxy
(``spikes``). A read that went to it first is hedged on the other after ``hedge_after``
as a task: the fast answer wins, the slow read is cut (its connection discarded, not
pooled) and cancelled on its server, and neither node is blamed. Every router runs on a
debug-mode loop with the loop check; the races cut connections, so they report it.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Callable, Iterator

import pytest

from dbrouter.cluster import LocalCluster

from .conftest import port_sql, wait_until
from .test_aio_deadline import ASYNC_PAIRS
from .test_conformance import Client, close_checked
from .test_control_plane import StallDetector, behind_proxy
from .test_hedging import running_on, slow_on


@pytest.fixture
def hedging(cluster: LocalCluster) -> Iterator[Callable[..., Client]]:
    """Makes async clients with hedged reads over the cluster's replicas (round robin: half
    the reads go to the slow one first); closed after the test, failing it on a slow
    callback when the loop check is in "fail" mode."""
    made: list[Client] = []
    pair = ASYNC_PAIRS["postgres" if cluster.engine == "postgres" else "mysql"]

    def make(replicas: list[Any] | None = None, **options: Any) -> Client:
        options = {"health_interval": 0.1, "hedge_after": 0.05, "policy": "round_robin", "loop_check": "report",
                   **options}
        client = Client(pair, cluster.primary.url, replicas or [r.url for r in cluster.replicas], **options)
        made.append(client)
        assert client.wait_for_probes(2)
        return client

    yield make
    close_checked(made)


def pools(client: Client) -> dict[str, dict[str, Any]]:
    return {name: node["pool"] for name, node in client.stats()["nodes"].items()}


def test_a_read_on_a_slow_replica_is_answered_by_the_other(hedging: Callable[..., Client],
                                                           cluster: LocalCluster) -> None:
    slow, fast = cluster.replicas
    marker = "ahg" + uuid.uuid4().hex[:10]
    client = hedging(hedge_budget=1.0, min_size=2, max_size=4)  # every read may be hedged: the race is under test
    router = client.router
    slow_name = next(n.name for n in router.replicas if n.address.port == slow.port)
    discarded_before = pools(client)[slow_name]["discarded"]
    stall = StallDetector(limit=10).start()
    try:
        for _ in range(6):  # round robin: half of them go to the slow one first
            started = time.monotonic()
            rows = client.read(slow_on(cluster, slow.port, 30, marker))
            stall.progress()
            assert rows[0][0] == fast.port, rows  # the slow replica never answers first
            assert time.monotonic() - started < 1.0  # not its 30 s
        stats = client.stats()
        assert stats["hedges"] >= 3 and stats["hedges_won"] >= 3, stats
        # The losers were cut and cancelled: nothing sleeps on the slow server for 30 s.
        assert wait_until(lambda: not running_on(cluster, slow, marker), timeout=5), "a cut read still runs"
        for node in router.replicas:
            assert stats["nodes"][node.name]["breaker"] == "closed", stats["nodes"][node.name]
            assert stats["nodes"][node.name]["breaker_failures"] == 0, stats["nodes"][node.name]
        # Each loser's connection was discarded, not pooled; the pools are back to full.
        assert pools(client)[slow_name]["discarded"] - discarded_before >= stats["hedges_won"], pools(client)
        for name in pools(client):
            assert wait_until(lambda n=name: pools(client)[n]["in_use"] == 0 and pools(client)[n]["size"] >= 2,
                              timeout=5), pools(client)[name]
        assert stats["deadline_exceeded"] == 0
        assert client.read("SELECT 1") == [(1,)]
        assert stall.report is None, stall.report
    finally:
        stall.stop()


@pytest.mark.proxy
def test_a_replica_whose_replies_spike_is_hedged(hedging: Callable[..., Client], cluster: LocalCluster) -> None:
    spiky, other = cluster.replicas
    with behind_proxy(spiky) as (proxy, proxied):
        # Warm connections, used without a liveness check: a read waiting for a connection (a
        # new one takes several late replies) or for its check is not hedged (timed from the
        # statement's start, as for Router).
        client = hedging(replicas=[{"url": proxied, "name": "spiky"}, other.url], hedge_budget=1.0, min_size=4,
                         max_size=8, validation_bypass=60, connect_timeout=5)
        stall = StallDetector(limit=10).start()
        try:
            assert wait_until(lambda: pools(client)["spiky"]["idle"] >= 4, timeout=10), pools(client)["spiky"]
            proxy.spikes(1.0, 0.8)  # every reply of that replica 0.8 s late
            for _ in range(6):
                started = time.monotonic()
                rows = client.read(f"SELECT {port_sql(cluster)}")
                stall.progress()
                assert rows == [(other.port,)], rows  # the other replica answers first
                assert time.monotonic() - started < 0.6
            stats = client.stats()
            assert stats["hedges"] >= 3 and stats["hedges_won"] >= 3, stats
            assert stats["nodes"]["spiky"]["breaker_failures"] == 0, stats["nodes"]["spiky"]
            proxy.pass_through()
            assert wait_until(lambda: pools(client)["spiky"]["in_use"] == 0, timeout=5), pools(client)["spiky"]
            assert stall.report is None, stall.report
        finally:
            stall.stop()
            proxy.pass_through()


def test_the_budget_caps_the_extra_reads(hedging: Callable[..., Client], cluster: LocalCluster) -> None:
    slow, _ = cluster.replicas
    marker = "ahg" + uuid.uuid4().hex[:10]
    client = hedging(hedge_after=0.01, hedge_budget=0.05)
    started = time.monotonic()
    for _ in range(40):
        client.read(slow_on(cluster, slow.port, 0.15, marker))
    elapsed = time.monotonic() - started
    stats = client.stats()
    # 5% of the reads of the last 10 s, plus one a second (the floor), and the first.
    assert stats["hedges"] <= 0.05 * stats["reads"] + elapsed + 1, (stats["hedges"], stats["reads"], elapsed)
    assert stats["hedges_refused"] > 0, stats
    assert stats["hedges"] > 0, stats


def test_fast_reads_are_not_hedged_nor_writes_transactions_or_sessions(
        hedging: Callable[..., Client], cluster: LocalCluster, table: str) -> None:
    slow, _ = cluster.replicas
    marker = "ahg" + uuid.uuid4().hex[:10]
    client = hedging(hedge_after=0.3, loop_check="fail")  # nothing is cut: the steady state
    router = client.router
    sleep = "pg_sleep(0.5)" if cluster.engine == "postgres" else "SLEEP(0.5)"

    async def calls() -> None:
        for _ in range(10):
            await router.read("SELECT 1")
        assert client.stats()["hedges"] == 0
        # Statements that are not plain reads are never hedged, however slow.
        await router.read(slow_on(cluster, slow.port, 0.5, marker), unchecked=True)
        await router.read(slow_on(cluster, slow.port, 0.5, marker), unchecked=True)
        await router.write(f"INSERT INTO {table} (id, port) SELECT 1, 2 FROM (SELECT {sleep}) AS s")
        async with router.transaction() as tx:
            await tx.execute(f"SELECT {sleep}")
        session = router.session()
        await session.write(f"INSERT INTO {table} (id, port) VALUES (2, 2)")
        for _ in range(2):  # after its write, a session reads where its writes are: not hedged
            await session.read(slow_on(cluster, slow.port, 0.5, marker))

    client.call(calls())
    assert client.stats()["hedges"] == 0
