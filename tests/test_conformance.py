"""One conformance suite for every (router, driver) pair, on real clusters.

Each test runs its body once per pair through `Client`, which gives the sync
`Router` and the asyncio `AsyncRouter` one face: the body calls ``client.read(...)``
and the like, and for an async pair each call is a coroutine run on an event loop of
the client's own thread. That loop runs in debug mode with
``slow_callback_duration = 0.005``: a callback that used 5 ms of CPU on the loop, a
blocking call made on the loop, or a wait of its own there over 0.5 s fails the test
(`tests._loopcheck.LoopCheck` says why those and not every slow report).

The pairs: sync psycopg2, sync psycopg 3, async psycopg 3, sync mysql-connector and
async mysql.connector.aio. The sync mysql-connector pair is the C extension in the
main run and pure Python in the ``--mysql-pure`` run (see ``tests/_mysql_mode.py``).
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
import warnings
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterator, TypeVar

import pytest

import dbrouter
from dbrouter import NotAReadStatement, Router, WriteOutcomeUnknown
from dbrouter.cluster import LocalCluster, make_cluster
from dbrouter.faultproxy import FaultProxy

from ._loopcheck import BUSY, LoopCheck
from .conftest import port_sql

T = TypeVar("T")

FAST = {"health_interval": 0.2, "min_size": 1, "max_size": 6, "connect_timeout": 2}
# Every test fails on a loop-check report, the fault tests too. They once reported 7 to 41 ms
# steps on failure paths: garbage collections of the test process's heap and asyncio's debug
# mode reading source files, which tests/_loopcheck.py leaves out, and psycopg 3's login (SCRAM's
# PBKDF2 in PQconnectPoll), which the adapter now runs on a thread. ``loop_check="report"``
# (warn instead) is left for a test that needs it, with its reason.
FAULT_PATHS = "a failure path held the event loop (reported, not failed):"
CALL_TIMEOUT = 60.0  # no single call of a test waits this long: a stuck loop fails, not hangs
SLOW_CALLBACK = 0.005


@dataclass(frozen=True)
class Pair:
    name: str
    engine: str  # the cluster fixture: "postgres" or "mysql"
    asynchronous: bool
    options: tuple[tuple[str, Any], ...] = ()


PAIRS = [
    pytest.param(Pair("psycopg2", "postgres", False, (("driver", "psycopg2"),)), marks=pytest.mark.postgres,
                 id="sync-psycopg2"),
    pytest.param(Pair("psycopg", "postgres", False, (("driver", "psycopg"),)), marks=pytest.mark.postgres,
                 id="sync-psycopg"),
    pytest.param(Pair("psycopg-async", "postgres", True), marks=pytest.mark.postgres, id="async-psycopg"),
    pytest.param(Pair("mysql-connector", "mysql", False), marks=pytest.mark.mysql, id="sync-mysql"),
    pytest.param(Pair("mysql-aio", "mysql", True), marks=pytest.mark.mysql, id="async-mysql-aio"),
]


class _Loop:
    """An event loop in a thread of its own, in debug mode, for an async pair."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.check = LoopCheck(SLOW_CALLBACK)
        self._thread = threading.Thread(target=self.loop.run_forever, name="conformance-loop", daemon=True)
        self._thread.start()
        self.run(self._install())

    async def _install(self) -> None:
        self.check.install(asyncio.get_running_loop())

    def run(self, coro: Awaitable[T], timeout: float = CALL_TIMEOUT) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[arg-type]
        return future.result(timeout)

    def close(self) -> list[str]:
        """Stop the loop; what its check found (reported, not returned, when the machine
        was overloaded: see `tests._loopcheck`)."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()
        self.check.uninstall()
        problems = self.check.problems
        if problems and self.check.overloaded:
            warnings.warn(f"every core was {BUSY:.0%} busy or more: {len(problems)} slow-callback report(s) not "
                          f"counted, the first: {problems[0][:300]}", stacklevel=1)
            return []
        return problems


class Client:
    """A router of one pair, called the same way whatever the pair."""

    def __init__(self, pair: Pair, primary: str, replicas: list[str], *, loop_check: str = "fail",
                 **options: Any) -> None:
        self.pair = pair
        self.loop_check = loop_check  # "fail", or "report" (warn) for the fault tests: see FAULT_PATHS
        settings = {**FAST, **dict(pair.options), **options}
        self._loop: _Loop | None = None
        if pair.asynchronous:
            self._loop = _Loop()
            from dbrouter.aio import AsyncRouter

            # Built here, opened on the loop: building imports the driver and parses options,
            # which an application does at start-up, not in a request.
            self.router: Any = AsyncRouter(primary, replicas, **settings)
            try:
                self._loop.run(self.router.open())
            except BaseException:
                self._loop.close()
                raise
        else:
            self.router = Router(primary, replicas, **settings)

    @classmethod
    def of(cls, pair: Pair, cluster: LocalCluster, *, loop_check: str = "fail", **options: Any) -> Client:
        return cls(pair, cluster.primary.url, [n.url for n in cluster.replicas], loop_check=loop_check, **options)

    def call(self, result: Any) -> Any:
        """A sync router's result as it is; an async router's coroutine, awaited on the loop."""
        if self._loop is None:
            return result
        return self._loop.run(result)

    def read(self, sql: str, params: Any = None, **kw: Any) -> list[tuple[Any, ...]]:
        return self.call(self.router.read(sql, params, **kw))  # type: ignore[no-any-return]

    def write(self, sql: str, params: Any = None, **kw: Any) -> int:
        return self.call(self.router.write(sql, params, **kw))  # type: ignore[no-any-return]

    def in_transaction(self, statements: list[tuple[str, Any]], fail: BaseException | None = None) -> list[Any]:
        """Run ``statements`` in one transaction (each one's rows, or rowcount), raising ``fail``
        inside it at the end when given."""
        if self._loop is None:
            out = []
            with self.router.transaction() as tx:
                for sql, params in statements:
                    count = tx.execute(sql, params)
                    out.append(tx.fetchall() or count)
                if fail is not None:
                    raise fail
            return out

        async def run() -> list[Any]:
            out = []
            async with self.router.transaction() as tx:
                for sql, params in statements:
                    count = await tx.execute(sql, params)
                    out.append(tx.fetchall() or count)
                if fail is not None:
                    raise fail
            return out

        return self.call(run())  # type: ignore[no-any-return]

    def session_pairs(self, statements: Callable[[int], tuple[tuple[str, Any], tuple[str, Any]]], n: int) -> list[Any]:
        """For i in range(n), in one session: write ``statements(i)[0]``, then read
        ``statements(i)[1]``; returns each read's first row."""
        if self._loop is None:
            seen = []
            with self.router.session() as session:
                for i in range(n):
                    (wsql, wparams), (rsql, rparams) = statements(i)
                    session.write(wsql, wparams)
                    seen.append(session.read(rsql, rparams)[0])
            return seen

        async def run() -> list[Any]:
            seen = []
            session = self.router.session()
            for i in range(n):
                (wsql, wparams), (rsql, rparams) = statements(i)
                await session.write(wsql, wparams)
                seen.append((await session.read(rsql, rparams))[0])
            return seen

        return self._loop.run(run(), timeout=CALL_TIMEOUT * 5)

    def stats(self) -> dict[str, Any]:
        return self.router.stats()  # type: ignore[no-any-return]

    def write_many(self, sql: str, rows: Any, **kw: Any) -> int:
        return self.call(self.router.write_many(sql, rows, **kw))  # type: ignore[no-any-return]

    def wait_for_probes(self, rounds: int = 1, timeout: float = 10.0) -> bool:
        return self.call(self.router.wait_for_probes(rounds, timeout))  # type: ignore[no-any-return]

    def close(self) -> list[str]:
        """Close the router; the loop's slow-callback reports, for an async pair."""
        if self._loop is None:
            self.router.close()
            return []
        try:
            self._loop.run(self.router.close())
        finally:
            reports = self._loop.close()
        if reports and self.loop_check == "report":
            warnings.warn(f"{FAULT_PATHS} {len(reports)} report(s), the first: {reports[0][:300]}", stacklevel=1)
            return []
        return reports


@pytest.fixture(params=PAIRS)
def pair(request: pytest.FixtureRequest) -> Pair:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def pair_cluster(pair: Pair, request: pytest.FixtureRequest) -> LocalCluster:
    found: LocalCluster = request.getfixturevalue("pg_cluster" if pair.engine == "postgres" else "maria_cluster")
    for replica in found.replicas:
        found.resume_replication(replica)
    return found


def close_checked(clients: list[Client]) -> None:
    """Close every client; fail when an async one's loop check (in "fail" mode) reported a
    slow callback."""
    slow: list[str] = []
    for client in clients:
        slow += client.close()
    assert not slow, f"callbacks held the event loop over {SLOW_CALLBACK * 1000:.0f} ms:\n" + "\n".join(slow[:10])


@pytest.fixture
def client_factory(pair: Pair, pair_cluster: LocalCluster) -> Iterator[Callable[..., Client]]:
    """Makes clients of the test's pair; closes them after the test and fails it when an
    async pair's loop reported a slow callback."""
    made: list[Client] = []

    def make(cluster: LocalCluster | None = None, **options: Any) -> Client:
        client = Client.of(pair, cluster or pair_cluster, **options)
        made.append(client)
        return client

    yield make
    close_checked(made)


@pytest.fixture
def client(client_factory: Callable[..., Client]) -> Client:
    return client_factory()


@pytest.fixture
def pair_table(pair_cluster: LocalCluster) -> Iterator[str]:
    name = "conf_" + uuid.uuid4().hex[:10]
    pair_cluster.primary.query(f"CREATE TABLE {name} (id bigint PRIMARY KEY, port int, note varchar(40))",
                               database=pair_cluster.database)
    pair_cluster.wait_replicated()
    try:
        yield name
    finally:
        pair_cluster.primary.query(f"DROP TABLE IF EXISTS {name}", database=pair_cluster.database)


# -- the suite -------------------------------------------------------------------------------


def test_driver_is_the_pairs(client: Client, pair: Pair) -> None:
    drivers = {node["driver"] for node in client.stats()["nodes"].values()}
    expected = {
        "psycopg2": {"psycopg2"}, "psycopg": {"psycopg"}, "psycopg-async": {"psycopg (async)"},
        "mysql-connector": {"mysql-connector (C extension)", "mysql-connector (pure Python)"},
        "mysql-aio": {"mysql-connector (asyncio)"},
    }[pair.name]
    assert len(drivers) == 1 and drivers <= expected, drivers


def test_writes_go_to_the_primary_and_reads_to_replicas_by_server_identity(
        client: Client, pair_cluster: LocalCluster, pair_table: str) -> None:
    port = port_sql(pair_cluster)
    for i in range(10):
        assert client.write(f"INSERT INTO {pair_table} (id, port) VALUES (%s, {port})", (i,)) == 1
    assert pair_cluster.primary.query(f"SELECT DISTINCT port FROM {pair_table}",
                                      database=pair_cluster.database) == [(pair_cluster.primary.port,)]
    ports = {client.read(f"SELECT {port}")[0][0] for _ in range(10)}
    assert ports == {n.port for n in pair_cluster.replicas}
    # Reads inside a transaction run where it runs: the primary.
    rows = client.in_transaction([(f"SELECT {port}", None)])
    assert rows[0][0][0] == pair_cluster.primary.port
    stats = client.stats()
    assert stats["reads"] == 10 and stats["writes"] >= 11


def test_a_transaction_commits_together_or_not_at_all(client: Client, pair_cluster: LocalCluster,
                                                      pair_table: str) -> None:
    insert = f"INSERT INTO {pair_table} (id, note) VALUES (%s, %s)"
    client.in_transaction([(insert, (1, "a")), (insert, (2, "b"))])
    with pytest.raises(RuntimeError, match="changed my mind"):
        client.in_transaction([(insert, (3, "c"))], fail=RuntimeError("changed my mind"))
    rows = pair_cluster.primary.query(f"SELECT id FROM {pair_table} ORDER BY id", database=pair_cluster.database)
    assert rows == [(1,), (2,)]


def test_a_lagging_replica_gets_no_reads_until_it_catches_up(client_factory: Callable[..., Client],
                                                              pair_cluster: LocalCluster, pair_table: str) -> None:
    """Replay paused on one replica past ``max_replica_lag``: within two probe intervals every
    read goes to the other (by server identity); replay resumed, it serves again."""
    max_lag, interval = 0.6, 0.2
    client = client_factory(max_replica_lag=max_lag, health_interval=interval)
    assert client.wait_for_probes(1, timeout=10)
    lagging, healthy = pair_cluster.replicas
    port = port_sql(pair_cluster)
    pair_cluster.pause_replication(lagging)
    try:
        written = time.monotonic()
        client.write(f"INSERT INTO {pair_table} (id, port) VALUES (%s, 0)", (1,))
        # The lag passes max_lag at most max_lag after the write; two intervals later it is out.
        time.sleep(max(0.0, written + max_lag + 2 * interval + 0.05 - time.monotonic()))
        ports = [client.read(f"SELECT {port}")[0][0] for _ in range(20)]
        assert set(ports) == {healthy.port}, ports
    finally:
        pair_cluster.resume_replication(lagging)
    pair_cluster.wait_replicated(timeout=10)
    assert client.wait_for_probes(2, timeout=5)
    ports = [client.read(f"SELECT {port}")[0][0] for _ in range(20)]
    assert set(ports) == {healthy.port, lagging.port}, ports


def test_read_refuses_a_write_before_sending_it(client: Client, pair_table: str) -> None:
    with pytest.raises(NotAReadStatement):
        client.read(f"DELETE FROM {pair_table}")
    with pytest.raises(NotAReadStatement):
        client.read("SELECT 1; DELETE FROM " + pair_table)


def test_read_your_writes_with_replay_paused_over_1000_session_pairs(
        client_factory: Callable[..., Client], pair_cluster: LocalCluster, pair_table: str) -> None:
    """Replay pauses on every replica for 1 s at a time while a session writes a row and
    reads it back, 1,000 times: every read sees its row, and replicas still serve some."""
    client = client_factory(causal_wait=0.02)
    stop = threading.Event()

    def pause_replay() -> None:
        while not stop.is_set():
            for replica in pair_cluster.replicas:
                pair_cluster.pause_replication(replica)
            stop.wait(1.0)
            for replica in pair_cluster.replicas:
                pair_cluster.resume_replication(replica)
            stop.wait(0.3)

    pauser = threading.Thread(target=pause_replay, daemon=True)
    pauser.start()
    try:
        seen = client.session_pairs(lambda i: ((f"INSERT INTO {pair_table} (id) VALUES (%s)", (i,)),
                                               (f"SELECT count(*) FROM {pair_table} WHERE id = %s", (i,))), 1000)
    finally:
        stop.set()
        pauser.join(10)
        for replica in pair_cluster.replicas:
            pair_cluster.resume_replication(replica)
    stale = [i for i, row in enumerate(seen) if row[0] != 1]
    assert not stale, f"{len(stale)} stale reads of 1000, the first: {stale[:10]}"
    stats = client.stats()
    assert stats["causal_primary_reads"] < 1000, stats  # replicas that had replayed served the rest


def test_a_refused_login_names_the_node_and_hides_the_password(pair: Pair, pair_cluster: LocalCluster) -> None:
    secret = "s3cret-" + uuid.uuid4().hex[:6]
    scheme = "postgresql" if pair.engine == "postgres" else "mysql"
    node = pair_cluster.primary
    bad = f"{scheme}://nobody_{uuid.uuid4().hex[:6]}:{secret}@127.0.0.1:{node.port}/{pair_cluster.database}"
    started = time.monotonic()
    broken = Client(pair, bad, [], fail_max=1, failover_wait=0)
    try:
        with pytest.raises(dbrouter.DbRouterError) as caught:
            broken.write("SELECT 1")
    finally:
        slow = broken.close()
    message = f"{caught.value} {caught.value.__cause__!r}"
    assert secret not in message
    assert f"127.0.0.1:{node.port}" in message, message
    assert time.monotonic() - started < 10
    assert not slow, slow


@pytest.mark.slow
def test_kill_primary_then_promote(pair: Pair) -> None:
    """Reads go on; writes come back within 2 health intervals of the promotion."""
    with make_cluster("postgres" if pair.engine == "postgres" else "mariadb", replicas=2) as own:
        client = Client.of(pair, own, health_interval=0.2, failover_wait=5)
        try:
            table = "conf_failover"
            own.primary.query(f"CREATE TABLE {table} (id bigint PRIMARY KEY)", database=own.database)
            own.wait_replicated()
            client.write(f"INSERT INTO {table} (id) VALUES (0)")
            old = own.primary
            old.kill()
            reads_ok = sum(1 for _ in range(20) if client.read("SELECT 1") == [(1,)])
            new = own.most_advanced()
            own.promote(new)
            promoted = time.monotonic()
            back = None
            deadline = promoted + 10
            i = 1
            while time.monotonic() < deadline:
                try:
                    client.write(f"INSERT INTO {table} (id) VALUES (%s)", (i,))
                    back = time.monotonic() - promoted
                    break
                except dbrouter.DbRouterError:
                    i += 1
                    time.sleep(0.02)
            assert reads_ok == 20
            assert back is not None and back <= 2 * 0.2 + 0.5, back
            assert client.stats()["primary"] == f"127.0.0.1:{new.port}"
        finally:
            slow = client.close()
        assert not slow, slow


def test_a_write_cut_after_it_was_sent_is_outcome_unknown_and_never_resent(
        pair: Pair, pair_cluster: LocalCluster) -> None:
    table = "conf_cut_" + uuid.uuid4().hex[:8]
    primary = pair_cluster.primary
    primary.query(f"CREATE TABLE {table} (v int)", database=pair_cluster.database)  # no key: a resend would show

    def count(v: int) -> int:
        return int(primary.query(f"SELECT count(*) FROM {table} WHERE v = {v}", database=pair_cluster.database)[0][0])

    try:
        with FaultProxy(upstream=("127.0.0.1", primary.port)) as proxy:
            url = primary.url.replace(f":{primary.port}/", f":{proxy.port}/")
            client = Client(pair, url, [], health_interval=60, min_size=1, max_size=1, validation_bypass=60)
            try:
                # The first probe round done (later ones are a minute apart: a probe must not
                # be the statement the proxy cuts).
                deadline = time.monotonic() + 10
                while any(n["probe_latency"] is None for n in client.stats()["nodes"].values()):
                    assert time.monotonic() < deadline, client.stats()
                    time.sleep(0.02)
                client.write(f"INSERT INTO {table} VALUES (0)")  # warms the pooled connection
                proxy.cut_after_client_sends()
                with pytest.raises(WriteOutcomeUnknown, match="may or may not"):
                    client.write(f"INSERT INTO {table} VALUES (1)")
                assert client.stats()["write_outcome_unknown"] == 1
                deadline = time.monotonic() + 3
                while count(1) != 1 and time.monotonic() < deadline:
                    time.sleep(0.02)
                time.sleep(0.3)
                assert count(1) == 1  # applied once, not sent again
                proxy.cut_after_client_sends()  # marked idempotent, the same failure is retried
                client.write(f"INSERT INTO {table} VALUES (2)", idempotent=True)
                assert count(2) == 2
            finally:
                slow = client.close()
            assert not slow, slow
    finally:
        primary.query(f"DROP TABLE IF EXISTS {table}", database=pair_cluster.database)


def test_a_blackholed_replica_costs_a_read_no_more_than_its_timeouts(
        pair: Pair, pair_cluster: LocalCluster) -> None:
    """A replica stops answering: no read fails, none waits past the statement guard or a
    connect's timeout (then another node serves it), and its breaker opens."""
    hung, other = pair_cluster.replicas
    with FaultProxy(upstream=("127.0.0.1", hung.port)) as proxy:
        proxied = hung.url.replace(f":{hung.port}/", f":{proxy.port}/")
        client = Client(pair, pair_cluster.primary.url, [proxied, other.url], statement_timeout=0.5,
                        fail_max=3, reset_timeout=30, min_size=2, max_size=8)
        try:
            assert client.wait_for_probes(1, timeout=10)
            for _ in range(10):
                client.read("SELECT 1")
            proxy.blackhole()
            latencies = []
            until = time.monotonic() + 5.0
            while time.monotonic() < until:
                started = time.monotonic()
                assert client.read("SELECT 1") == [(1,)]
                latencies.append(time.monotonic() - started)
            breaker = next(n for n in client.stats()["nodes"].values() if n["pool"] and n["breaker"] != "closed")
        finally:
            proxy.pass_through()
            slow = client.close()
    assert breaker["breaker"] == "open"
    # A read cut by the guard (statement timeout plus grace), or one that waited for a
    # connect to the hung node (connect_timeout) before going to another node; no more.
    bound = 0.5 + 0.125 + FAST["connect_timeout"] + 1.0
    assert max(latencies) < bound, sorted(latencies)[-5:]
    assert len(latencies) > 20 and sorted(latencies)[len(latencies) // 2] < 0.1, latencies  # then the breaker keeps it out
    assert not slow, slow


def test_stats_status_table_and_prometheus_see_the_same_nodes(client: Client, pair_cluster: LocalCluster) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from dbrouter.metrics import RouterCollector
    from dbrouter.status import node_rows, render_table

    assert client.wait_for_probes(1, timeout=10)
    client.read("SELECT 1")
    rows = node_rows(client.router)
    assert {row["role"] for row in rows} == {"primary", "replica"} and len(rows) == 3
    assert all(row["reachable"] for row in rows)
    table = render_table(rows)
    assert all(f"127.0.0.1:{node.port}" in table for node in pair_cluster.nodes)
    registry = CollectorRegistry()
    registry.register(RouterCollector(client.router))
    text = generate_latest(registry).decode()
    acquired = [line for line in text.splitlines()
                if line.startswith("dbrouter_pool_acquired_total{") and not line.endswith(" 0.0")]
    assert acquired, text[:2000]  # the read's and the probes' checkouts are counted, per node
    assert f"127.0.0.1:{pair_cluster.primary.port}" in text


def test_write_many_writes_every_row_once_in_batches(client_factory: Callable[..., Client],
                                                     pair_cluster: LocalCluster, pair_table: str) -> None:
    client = client_factory()
    reports: list[Any] = []
    total = client.write_many(f"INSERT INTO {pair_table} (id, note) VALUES (%s, %s)",
                              ((i, f"row {i}") for i in range(5000)), batch_size=500, workers=3,
                              progress=reports.append)
    assert total == 5000
    assert sorted(r.index for r in reports) == list(range(10)) and {r.status for r in reports} == {"committed"}
    rows = pair_cluster.primary.query(f"SELECT count(*), count(DISTINCT id), min(id), max(id) FROM {pair_table}",
                                      database=pair_cluster.database)
    assert [tuple(int(v) for v in rows[0])] == [(5000, 5000, 0, 4999)]
    with pytest.raises(dbrouter.BulkWriteError) as failed:  # batch 1 repeats an id: it alone fails
        client.write_many(f"INSERT INTO {pair_table} (id) VALUES (%s)", [(10_000 + i,) for i in range(10)]
                          + [(0,)] + [(20_000 + i,) for i in range(9)], batch_size=10, workers=2)
    assert failed.value.committed == [0] and failed.value.failed == [1] and failed.value.rowcount == 10
