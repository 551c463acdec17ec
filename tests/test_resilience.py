"""Resilience against real failures: killed and promoted primaries, hung replicas,
cut connections, deadlocks, split brain. Both engines, 8 threads of mixed work.

Destructive tests get a cluster of their own; the rest use the shared ones.
"""

from __future__ import annotations

import threading
import time
import uuid
from contextlib import contextmanager
from typing import Any, Iterator

import pytest

from dbrouter import NoPrimaryAvailable, NotAReadStatement, Router, SplitBrain, WriteOutcomeUnknown
from dbrouter.cluster import make_cluster
from dbrouter.faultproxy import FaultProxy
from dbrouter.workload import Workload

from .conftest import ENGINES, ENGINES_AND_DRIVERS, kill_session, port_sql, wait_until

pytestmark = pytest.mark.slow


@contextmanager
def own_cluster(engine: str, *, sync: bool = False) -> Iterator[Any]:
    cluster = make_cluster("postgres" if engine == "postgres" else "mariadb", replicas=2, sync=sync).start()
    try:
        yield cluster
    finally:
        cluster.destroy()


def router_sessions(node: Any, tag: str, engine: str) -> int:
    """Server sessions opened by a router (tagged by application_name / user)."""
    if engine == "postgres":
        rows = node.query(f"SELECT count(*) FROM pg_stat_activity WHERE application_name = '{tag}'")
    else:
        rows = node.query("SELECT count(*) FROM information_schema.PROCESSLIST WHERE USER = 'dbrouter'")
    return int(rows[0][0])


def kill_then_promote(cluster: Any, workload: Workload, outage: float) -> tuple[float, float, float, float, Any]:
    """Run ``workload`` for 1 s, SIGKILL the primary, wait ``outage`` seconds, promote the most
    advanced replica. Returns (kill started, kill done, promotion started, promotion done, new primary)."""
    workload.prepare()
    cluster.wait_replicated()
    workload.start()
    time.sleep(1.0)
    kill_started = time.monotonic()
    cluster.primary.kill()
    killed_at = time.monotonic()  # the server and its backends are gone
    time.sleep(outage)
    new_primary = cluster.most_advanced()
    promoting_at = time.monotonic()
    cluster.promote(new_primary)
    return kill_started, killed_at, promoting_at, time.monotonic(), new_primary


@pytest.mark.parametrize("engine", ENGINES)
def test_breaker_does_not_serialise_queries(engine: str, request: pytest.FixtureRequest) -> None:
    cluster = request.getfixturevalue("pg_cluster" if engine == "postgres" else "maria_cluster")
    sleep_sql = "SELECT pg_sleep(0.3)" if engine == "postgres" else "SELECT SLEEP(0.3)"
    with Router(cluster.primary.url, min_size=8, max_size=8, health_interval=5) as router:
        router.primary.pool.wait_ready(10)
        threads = [threading.Thread(target=router.read, args=(sleep_sql,)) for _ in range(8)]
        start = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=10)
        elapsed = time.monotonic() - start
    # One at a time would take 8 x 0.3 s; in parallel it takes a little over 0.3 s.
    assert elapsed < 0.9, elapsed


@pytest.mark.parametrize("engine", ENGINES)
def test_killed_primary_reads_survive_writes_fail_fast_then_promotion_heals(engine: str) -> None:
    interval, connect_timeout = 0.3, 2.0
    tag = "dbr" + uuid.uuid4().hex[:8]
    with own_cluster(engine) as cluster:
        events: list[str] = []
        router = Router(cluster.primary.url, [n.url for n in cluster.replicas], health_interval=interval,
                        connect_timeout=connect_timeout, statement_timeout=2.0, fail_max=3, reset_timeout=1.0,
                        min_size=2, max_size=8, application_name=tag)
        router.on("*", lambda e: events.append(e.name))
        workload = Workload(router, threads=8, write_ratio=0.3, duration=60)
        old_primary = cluster.primary
        times = kill_then_promote(cluster, workload, outage=2.0)
        kill_started, killed_at, promoting_at, promoted_at, new_primary = times
        assert wait_until(lambda: router.primary.address.port == new_primary.port, timeout=5)
        time.sleep(1.5)
        assert workload.stop(timeout=15), "a worker thread hung"
        ops = workload.snapshot()

        reads = [op for op in ops if op.kind == "read"]
        assert reads and all(op.ok for op in reads), {op.error for op in reads if not op.ok}

        outage = [op for op in ops if op.kind == "write" and killed_at <= op.start < promoting_at]
        assert outage, "no write was attempted during the outage"
        for op in outage:
            assert op.error in ("NoPrimaryAvailable", "WriteOutcomeUnknown"), (op, op.start - killed_at)
            assert op.latency < connect_timeout + 0.5, op  # fails within a connect attempt, never hangs
        in_flight = [op for op in ops if op.kind == "write" and op.error == "WriteOutcomeUnknown"]
        assert all(op.end >= kill_started and op.start < killed_at + 0.5 for op in in_flight), in_flight

        healed = [op for op in ops if op.kind == "write" and op.ok and op.start >= promoted_at]
        assert healed, "writes did not resume after the promotion"
        assert min(op.end for op in healed) - promoted_at <= 2 * interval + 0.3

        ports = {router.read(f"SELECT {port_sql(cluster)}")[0][0] for _ in range(30)}
        assert new_primary.port not in ports and ports, ports
        assert router.stats()["failovers"] == 1 and events.count("failover") == 1

        rows = new_primary.query(f"SELECT id FROM {workload.table}")
        _lost, duplicated = workload.check_writes(rows)
        assert duplicated == []
        live = [n for n in cluster.nodes if n is not old_primary]
        assert all(router_sessions(n, tag, engine) <= 8 + 1 for n in live)
        router.close()
        assert all(wait_until(lambda n=n: router_sessions(n, tag, engine) == 0, timeout=5) for n in live)


@pytest.mark.parametrize("engine", ENGINES)
def test_failover_wait_holds_writes_until_a_promotion_and_loses_nothing(engine: str) -> None:
    with own_cluster(engine, sync=True) as cluster:
        router = Router(cluster.primary.url, [n.url for n in cluster.replicas], health_interval=0.2,
                        connect_timeout=2, statement_timeout=3, failover_wait=10, fail_max=3, min_size=2, max_size=8)
        workload = Workload(router, threads=8, write_ratio=0.5, duration=60)
        kill_started, killed_at, promoting_at, _promoted_at, new_primary = kill_then_promote(cluster, workload, outage=1.5)
        time.sleep(2.0)
        assert workload.stop(timeout=20), "a worker thread hung"
        ops = workload.snapshot()
        writes = [op for op in ops if op.kind == "write"]
        # Every worker soon sits in a write that waits for the new primary, then succeeds.
        waited = [op for op in writes if op.ok and killed_at <= op.start and op.end >= promoting_at]
        assert len(waited) >= 4, "writes did not wait through the outage"
        assert all(op.latency > 1.0 for op in waited if op.start < killed_at + 0.3)
        errors = {op.error for op in writes if not op.ok}
        assert errors <= {"WriteOutcomeUnknown"}, errors
        assert all(op.end >= kill_started and op.start < killed_at + 0.5 for op in writes if not op.ok)
        rows = new_primary.query(f"SELECT id FROM {workload.table}")
        lost, duplicated = workload.check_writes(rows)
        assert lost == [] and duplicated == []
        assert all(op.ok for op in ops if op.kind == "read")
        router.close()


@pytest.mark.parametrize("engine", ENGINES_AND_DRIVERS)
def test_blackholed_replica_costs_less_than_the_statement_timeout(engine: str, driver: str,
                                                                  request: pytest.FixtureRequest) -> None:
    """A replica that stops answering: PostgreSQL's statements on it are aborted by the watchdog
    (libpq, under either driver, has no read timeout), MySQL's end at their read timeout."""
    cluster = request.getfixturevalue("pg_cluster" if engine.startswith("postgres") else "maria_cluster")
    statement_timeout, reset_timeout, interval = 0.5, 1.0, 0.2
    hung_node, other = cluster.replicas
    with FaultProxy(upstream=("127.0.0.1", hung_node.port)) as proxy:
        proxied = hung_node.url.replace(f":{hung_node.port}/", f":{proxy.port}/")
        events: list[str] = []
        router = Router(cluster.primary.url, [proxied, other.url], statement_timeout=statement_timeout,
                        connect_timeout=2, fail_max=3, reset_timeout=reset_timeout, health_interval=interval,
                        min_size=2, max_size=8, driver=driver)
        assert all(node.adapter.driver.startswith(driver) for node in router.nodes)
        router.on("*", lambda e: events.append(e.name))
        proxied_node = next(n for n in router.replicas if n.address.port == proxy.port)
        workload = Workload(router, threads=8, write_ratio=0.0, duration=60)
        workload.table = "dbr_blackhole_" + uuid.uuid4().hex[:6]
        cluster.primary.query(f"CREATE TABLE {workload.table} (id bigint NOT NULL, worker int NOT NULL)")
        cluster.wait_replicated()
        try:
            workload.start()
            time.sleep(1.0)
            fault_at = time.monotonic()
            proxy.blackhole()
            time.sleep(2.5)
            assert proxied_node.breaker.trips >= 1 and "breaker_open" in events
            fixed_at = time.monotonic()
            proxy.pass_through()

            def replica_serves_again() -> bool:
                return any(router.read(f"SELECT {port_sql(cluster)}")[0][0] == hung_node.port for _ in range(4))

            assert wait_until(replica_serves_again, timeout=reset_timeout + interval + 3.0, interval=0.01)
            back_after = time.monotonic() - fixed_at
            time.sleep(0.5)
            assert workload.stop(timeout=15)
        finally:
            router.close()
            cluster.primary.query(f"DROP TABLE IF EXISTS {workload.table}")
        ops = workload.snapshot()
        assert all(op.ok for op in ops), {op.error for op in ops if not op.ok}
        during = sorted(op.latency for op in ops if fault_at <= op.start < fixed_at)
        assert len(during) > 200
        p99 = during[int(0.99 * (len(during) - 1))]
        assert p99 < statement_timeout, (p99, during[-10:])
        assert back_after <= reset_timeout + interval + 1.0, back_after
        assert proxied_node.breaker.state == "closed"


@pytest.mark.parametrize("engine", ENGINES)
def test_write_cut_after_sending_is_outcome_unknown_and_never_resent(engine: str, request: pytest.FixtureRequest) -> None:
    cluster = request.getfixturevalue("pg_cluster" if engine == "postgres" else "maria_cluster")
    table = "dbr_cut_" + uuid.uuid4().hex[:8]
    cluster.primary.query(f"CREATE TABLE {table} (v int)")  # no key: a second insert would show
    with FaultProxy(upstream=("127.0.0.1", cluster.primary.port)) as proxy:
        url = cluster.primary.url.replace(f":{cluster.primary.port}/", f":{proxy.port}/")
        with Router(url, health_interval=60, min_size=1, max_size=1, validation_bypass=60) as router:
            assert router.wait_for_probes(1, timeout=10)
            router.write(f"INSERT INTO {table} VALUES (0)")  # warms the pooled connection
            proxy.cut_after_client_sends()
            with pytest.raises(WriteOutcomeUnknown) as info:
                router.write(f"INSERT INTO {table} VALUES (1)")
            assert "may or may not" in str(info.value) and info.value.__cause__ is not None
            assert router.stats()["write_outcome_unknown"] == 1
            assert wait_until(lambda: cluster.primary.query(f"SELECT count(*) FROM {table} WHERE v = 1") == [(1,)], 3)
            time.sleep(0.3)
            assert cluster.primary.query(f"SELECT count(*) FROM {table} WHERE v = 1") == [(1,)]
            # Marked idempotent, the same failure is retried: the row then arrives twice.
            proxy.cut_after_client_sends()
            router.write(f"INSERT INTO {table} VALUES (2)", idempotent=True)
            assert cluster.primary.query(f"SELECT count(*) FROM {table} WHERE v = 2") == [(2,)]
    cluster.primary.query(f"DROP TABLE {table}")


@pytest.mark.parametrize("engine", ENGINES)
def test_read_cut_after_sending_is_run_again_only_when_it_is_a_read(engine: str, request: pytest.FixtureRequest) -> None:
    """Issue 13 item 3: read("INSERT ... RETURNING") cut after it was sent was retried (the retry
    excludes the failed node, then falls back to the primary anyway) and inserted two rows."""
    cluster = request.getfixturevalue("pg_cluster" if engine == "postgres" else "maria_cluster")
    table = "dbr_rcut_" + uuid.uuid4().hex[:8]
    cluster.primary.query(f"CREATE TABLE {table} (v int)")  # no key: a second insert would show
    insert = f"INSERT INTO {table} VALUES (%s) RETURNING v"

    def count(v: int) -> int:
        return int(cluster.primary.query(f"SELECT count(*) FROM {table} WHERE v = {v}")[0][0])

    def cut_next_statement(router: Router, proxy: FaultProxy) -> None:
        # The pool's one connection open and idle first: a refill after the last cut must
        # not be the connection that the cut hits.
        router.primary.pool.wait_ready(5)
        assert router.read("SELECT 1") == [(1,)]
        proxy.cut_after_client_sends()

    with FaultProxy(upstream=("127.0.0.1", cluster.primary.port)) as proxy:
        url = cluster.primary.url.replace(f":{cluster.primary.port}/", f":{proxy.port}/")
        with Router(url, health_interval=60, min_size=1, max_size=1, validation_bypass=60) as router:
            assert router.wait_for_probes(1, timeout=10)
            cut_next_statement(router, proxy)
            with pytest.raises(NotAReadStatement):
                router.read(insert, (1,))
            # Nothing was sent: the cut is still armed, and a real read it cuts runs again.
            assert router.read("SELECT 2") == [(2,)]
            assert proxy.mode == "pass_through" and router.stats()["retries"] == 1
            # Unchecked: sent once, never again.
            cut_next_statement(router, proxy)
            with pytest.raises(WriteOutcomeUnknown, match="unchecked=True") as info:
                router.read(insert, (2,), unchecked=True)
            assert "idempotent=True" in str(info.value) and info.value.__cause__ is not None
            assert wait_until(lambda: count(2) == 1, 3)
            # Unchecked and idempotent: run again like a read, as the caller allowed.
            cut_next_statement(router, proxy)
            assert router.read(insert, (3,), unchecked=True, idempotent=True) == [(3,)]
            assert wait_until(lambda: count(3) == 2, 3)
            time.sleep(0.3)
            assert (count(1), count(2), count(3)) == (0, 1, 2)
    cluster.primary.query(f"DROP TABLE {table}")


@pytest.mark.parametrize("engine", ENGINES)
def test_deadlocked_transaction_function_is_retried_and_commits(engine: str, request: pytest.FixtureRequest) -> None:
    cluster = request.getfixturevalue("pg_cluster" if engine == "postgres" else "maria_cluster")
    table = "dbr_dl_" + uuid.uuid4().hex[:8]
    cluster.primary.query(f"CREATE TABLE {table} (id int primary key, v int)")
    cluster.primary.query(f"INSERT INTO {table} VALUES (1, 0), (2, 0)")
    barrier = threading.Barrier(2, timeout=10)
    attempts: list[int] = []
    results: list[Any] = []

    with Router(cluster.primary.url, max_size=4, retry_attempts=5) as router:
        def transfer(first: int, second: int) -> None:
            def fn(tx: Any) -> str:
                attempts.append(first)
                tx.execute(f"UPDATE {table} SET v = v + 1 WHERE id = %s", (first,))
                if attempts.count(first) == 1:
                    barrier.wait()  # both hold one row lock, then cross: a real deadlock
                tx.execute(f"UPDATE {table} SET v = v + 1 WHERE id = %s", (second,))
                return "committed"
            try:
                results.append(router.run_transaction(fn))
            except BaseException as exc:  # noqa: BLE001
                results.append(exc)

        threads = [threading.Thread(target=transfer, args=(1, 2)), threading.Thread(target=transfer, args=(2, 1))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert results == ["committed", "committed"]
        assert len(attempts) == 3  # one of the two ran twice
        assert router.stats()["retries"] >= 1
    assert cluster.primary.query(f"SELECT id, v FROM {table} ORDER BY id") == [(1, 2), (2, 2)]
    cluster.primary.query(f"DROP TABLE {table}")


@pytest.mark.parametrize("engine", ENGINES)
def test_split_brain_stops_writes_until_resolved(engine: str) -> None:
    with own_cluster(engine) as cluster:
        events: list[str] = []
        with Router(cluster.primary.url, [n.url for n in cluster.replicas], health_interval=0.2,
                    connect_timeout=2, fail_max=2) as router:
            router.on("*", lambda e: events.append(e.name))
            router.write("CREATE TABLE sb (v int)")
            cluster.wait_replicated()
            old = cluster.primary
            old.kill()
            new = cluster.replicas[0]
            cluster.promote(new)
            assert wait_until(lambda: router.primary.address.port == new.port, timeout=5)
            router.write("INSERT INTO sb VALUES (1)")
            old.start()  # comes back writable: two primaries
            assert wait_until(lambda: "split_brain" in events, timeout=5)
            with pytest.raises(SplitBrain, match="accept writes"):
                router.write("INSERT INTO sb VALUES (2)")
            assert router.read("SELECT 1") == [(1,)]  # reads still work
            cluster.rejoin(old)
            assert wait_until(lambda: "split_brain_resolved" in events, timeout=10)
            assert router.write("INSERT INTO sb VALUES (3)") == 1
            assert router.primary.address.port == new.port


def test_no_primary_error_names_the_node_and_why(pg_cluster: Any) -> None:
    from .test_bad_input import free_port

    dead = f"postgresql://dbrouter:pw@127.0.0.1:{free_port()}/dbrouter"
    with Router(dead, [pg_cluster.replicas[0].url], health_interval=0.2, min_size=0) as router:
        with pytest.raises(NoPrimaryAvailable) as info:
            router.write("SELECT 1")
        assert "127.0.0.1:" in str(info.value) and ("refused" in str(info.value) or "down" in str(info.value))
        assert router.read(f"SELECT {port_sql(pg_cluster)}") == [(pg_cluster.replicas[0].port,)]


def test_primary_discovery_auto_finds_the_writable_node_and_static_does_not(cluster: Any) -> None:
    """Configured with a replica as the primary: auto discovery corrects it, static keeps it."""
    replica, real_primary = cluster.replicas[0], cluster.primary
    table = "dbr_disc_" + uuid.uuid4().hex[:8]
    events: list[str] = []
    with Router(replica.url, [real_primary.url], health_interval=0.2) as auto:
        auto.on("failover", lambda e: events.append(e.node))
        assert wait_until(lambda: auto.primary.address.port == real_primary.port, timeout=5)
        assert auto.write(f"CREATE TABLE {table} (v int)") in (0, -1)
        # Events are told after the snapshot is published, from the control thread: wait for it.
        assert wait_until(lambda: events == [f"127.0.0.1:{real_primary.port}"], timeout=2), events
    real_primary.query(f"DROP TABLE {table}")
    with Router(replica.url, [real_primary.url], health_interval=0.2, primary_discovery="static") as static:
        assert static.wait_for_probes(3, timeout=10)
        assert static.primary.address.port == replica.port
        with pytest.raises(NoPrimaryAvailable, match="read-only|read only|--read-only|1290"):
            static.write(f"CREATE TABLE {table} (v int)")
        assert static.stats()["failovers"] == 0


@pytest.mark.parametrize("engine", ENGINES)
def test_connection_killed_before_commit_is_outcome_unknown(engine: str, request: pytest.FixtureRequest) -> None:
    """The COMMIT of a transaction whose session was killed meets a dead connection: the outcome
    is unknown, on both engines. (mysql-connector's C extension raises its own, unwrapped
    MySQLInterfaceError from commit(); it was taken for a caller's error and raised as is.)"""
    cluster = request.getfixturevalue("pg_cluster" if engine == "postgres" else "maria_cluster")
    session_sql = "SELECT pg_backend_pid()" if engine == "postgres" else "SELECT CONNECTION_ID()"
    table = "dbr_kc_" + uuid.uuid4().hex[:8]
    cluster.primary.query(f"CREATE TABLE {table} (v int)")
    try:
        with Router(cluster.primary.url, health_interval=60) as router:
            with pytest.raises(WriteOutcomeUnknown) as info, router.transaction() as tx:
                tx.execute(f"INSERT INTO {table} VALUES (1)")
                session = tx.read(session_sql)[0][0]
                kill_session(cluster, session)
                count_sql = (f"SELECT count(*) FROM pg_stat_activity WHERE pid = {session}" if engine == "postgres"
                             else f"SELECT count(*) FROM information_schema.PROCESSLIST WHERE ID = {session}")
                assert wait_until(lambda: cluster.primary.query(count_sql) == [(0,)], 5)
            assert "during COMMIT" in str(info.value)
            assert router.stats()["write_outcome_unknown"] == 1
            assert router.write(f"INSERT INTO {table} VALUES (2)") == 1  # the pool replaced the connection
    finally:
        cluster.primary.query(f"DROP TABLE {table}")
