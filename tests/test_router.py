"""Routing rules, proven by asking the server that answered who it is. Both engines."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from typing import Any

import pytest

import dbrouter
from dbrouter import ConfigurationError, NoReplicaAvailable, NotAReadStatement, Router, UsageError

from .conftest import both_drivers, port_sql, wait_until

FAST = {"health_interval": 0.2, "min_size": 1, "max_size": 6}


def make_router(cluster: Any, driver: str = "", **options: Any) -> Router:
    """A router on the cluster, on ``driver`` ("": the engine's default)."""
    settings = {**FAST, **options}
    router = Router(cluster.primary.url, [n.url for n in cluster.replicas], driver=driver, **settings)
    assert all(node.adapter.driver.startswith(driver) for node in router.nodes)
    return router


def replica_ports(cluster: Any) -> set[int]:
    return {n.port for n in cluster.replicas}


@both_drivers
def test_writes_land_on_the_primary_reads_on_replicas(cluster: Any, table: str, driver: str) -> None:
    with make_router(cluster, driver) as router:
        for i in range(10):
            assert router.write(f"INSERT INTO {table} (id, port) VALUES (%s, {port_sql(cluster)})", (i,)) == 1
        assert cluster.primary.query(f"SELECT DISTINCT port FROM {table}") == [(cluster.primary.port,)]
        ports = {router.read(f"SELECT {port_sql(cluster)}")[0][0] for _ in range(10)}
        assert ports == replica_ports(cluster)
        stats = router.stats()
        assert stats["reads"] == 10 and stats["writes"] == 10


def test_round_robin_visits_each_replica_in_turn(cluster: Any) -> None:
    with make_router(cluster, policy="round_robin") as router:
        ports = [router.read(f"SELECT {port_sql(cluster)}")[0][0] for _ in range(8)]
    assert set(ports[:2]) == replica_ports(cluster)
    assert ports == ports[:2] * 4


@pytest.mark.parametrize("policy", ["round_robin", "random"])
def test_weights_are_honoured_over_1000_reads(cluster: Any, policy: str) -> None:
    heavy, light = cluster.replicas
    replicas = [{"url": heavy.url, "weight": 3}, {"url": light.url, "weight": 1}]
    with Router(cluster.primary.url, replicas, policy=policy, **FAST) as router:
        counts = Counter(router.read(f"SELECT {port_sql(cluster)}")[0][0] for _ in range(1000))
    assert set(counts) <= replica_ports(cluster)
    share = counts[heavy.port] / 1000
    tolerance = 0.001 if policy == "round_robin" else 0.05
    assert abs(share - 0.75) <= tolerance, counts


def test_latency_policy_leans_on_weights_when_replicas_answer_alike(cluster: Any) -> None:
    """Latency-aware choice is not proportional (speed wins), but weights still tilt it."""
    heavy, light = cluster.replicas
    replicas = [{"url": heavy.url, "weight": 3}, {"url": light.url, "weight": 1}]
    with Router(cluster.primary.url, replicas, policy="latency", **FAST) as router:
        counts = Counter(router.read(f"SELECT {port_sql(cluster)}")[0][0] for _ in range(1000))
    assert set(counts) <= replica_ports(cluster)
    assert counts[heavy.port] > 9 / 16 * 1000 - 50, counts  # both draws heavy: 9/16 at least


def test_least_outstanding_avoids_a_busy_replica(cluster: Any) -> None:
    with make_router(cluster, policy="least_outstanding") as router:
        busy = router.replicas[0]
        held = [busy.pool.acquire() for _ in range(3)]
        try:
            ports = Counter(router.read(f"SELECT {port_sql(cluster)}")[0][0] for _ in range(30))
        finally:
            for conn in held:
                busy.pool.release(conn)
        idle_port = router.replicas[1].address.port
        assert ports == {idle_port: 30}


@both_drivers
def test_reads_in_a_transaction_go_to_the_primary(cluster: Any, table: str, driver: str) -> None:
    with make_router(cluster, driver) as router:
        with router.transaction() as tx:
            tx.execute(f"INSERT INTO {table} (id, port) VALUES (1, {port_sql(cluster)})")
            assert tx.read(f"SELECT {port_sql(cluster)}") == [(cluster.primary.port,)]
            tx.execute(f"SELECT id FROM {table}")
            assert tx.fetchone() == (1,)
            assert tx.fetchone() is None
        with pytest.raises(ZeroDivisionError):
            with router.transaction() as tx:
                tx.write(f"INSERT INTO {table} (id, port) VALUES (2, 0)")
                raise ZeroDivisionError
        assert cluster.primary.query(f"SELECT id FROM {table} ORDER BY id") == [(1,)]


LOCK_WAIT = 3.0  # statement_timeout: how long a write would wait for the transaction's lock without the check


def test_a_write_beside_an_open_transaction_raises_at_once(cluster: Any, table: str) -> None:
    """Issue 13, item 6. router.write() inside router.transaction() on a row the transaction had
    locked took a second connection of the primary, which waited for the first: forever on
    PostgreSQL, innodb_lock_wait_timeout (50 s) on MariaDB. Every call that would write on a
    connection of its own now raises UsageError before any I/O; other threads are not affected."""
    update = f"UPDATE {table} SET port = port + 1 WHERE id = %s"

    def nested_transaction() -> None:
        with router.transaction() as inner:
            inner.execute(update, (1,))

    def session_write() -> None:
        with router.session() as s:
            s.write(update, (1,))

    def session_transaction() -> None:
        with router.session() as s, s.transaction() as inner:
            inner.execute(update, (1,))

    with make_router(cluster, statement_timeout=LOCK_WAIT) as router:
        router.write(f"INSERT INTO {table} (id, port) VALUES (1, 0)")
        calls = {
            "router.write()": lambda: router.write(update, (1,)),
            "router.write_many()": lambda: router.write_many(update, [(1,)]),
            "router.transaction()": nested_transaction,
            "router.run_transaction()": lambda: router.run_transaction(lambda inner: inner.execute(update, (1,))),
            "session.write()": session_write,
            "session.transaction()": session_transaction,
        }
        with router.transaction() as tx:
            tx.execute(update, (1,))  # row 1 is locked by this transaction from here on
            for name, call in calls.items():
                start = time.monotonic()
                with pytest.raises(UsageError, match="tx.execute") as info:
                    call()
                assert time.monotonic() - start < 1.0, name
                assert str(info.value).startswith(name)
            other: list[Any] = []  # the check is per thread: another thread writes elsewhere at once
            worker = threading.Thread(target=lambda: other.append(router.write(
                f"INSERT INTO {table} (id, port) VALUES (2, 0)")))
            worker.start()
            worker.join(timeout=LOCK_WAIT * 2)
            assert other == [1]
            tx.execute(update, (1,))  # the transaction is still usable
        with pytest.raises(ZeroDivisionError), router.transaction():
            raise ZeroDivisionError
        assert router.write(update, (1,)) == 1  # no transaction open on this thread any more
        assert cluster.primary.query(f"SELECT id, port FROM {table} ORDER BY id") == [(1, 3), (2, 0)]


def test_outside_transaction_writes_on_a_connection_of_its_own(cluster: Any, table: str) -> None:
    """The opt-out: each call runs on its own connection and commits apart from the open
    transaction, which then rolls back alone."""
    insert = f"INSERT INTO {table} (id, port) VALUES (%s, 0)"
    with make_router(cluster, statement_timeout=LOCK_WAIT) as router:
        with pytest.raises(ZeroDivisionError), router.transaction() as tx:
            tx.execute(insert, (1,))
            assert router.write(insert, (2,), outside_transaction=True) == 1
            assert router.write_many(insert, [(3,), (4,)], outside_transaction=True) == 2
            with router.transaction(outside_transaction=True) as other:
                other.execute(insert, (5,))
            router.run_transaction(lambda other: other.execute(insert, (6,)), outside_transaction=True)
            with router.session() as s:
                s.write(insert, (7,), outside_transaction=True)
                with s.transaction(outside_transaction=True) as other:
                    other.execute(insert, (8,))
                assert s.read(f"SELECT count(*) FROM {table} WHERE id IN (7, 8)") == [(2,)]
            raise ZeroDivisionError
        assert cluster.primary.query(f"SELECT id FROM {table} ORDER BY id") == [(i,) for i in range(2, 9)]


def test_a_session_used_from_another_thread_raises(cluster: Any, table: str) -> None:
    """A session's position, confirmed replicas and fetchone() rows are one thread's state:
    another thread's calls raise UsageError naming both threads, and change nothing."""
    with make_router(cluster) as router, router.session() as s:
        s.write(f"INSERT INTO {table} (id, port) VALUES (1, 0)")
        position = s.position
        s.execute(f"SELECT id FROM {table}")
        errors: list[str] = []

        def intruder() -> None:
            def enter_transaction() -> None:
                with s.transaction() as tx:
                    tx.execute(f"INSERT INTO {table} (id, port) VALUES (3, 0)")

            calls = [lambda: s.read(f"SELECT id FROM {table}"),
                     lambda: s.write(f"INSERT INTO {table} (id, port) VALUES (2, 0)"),
                     lambda: s.execute(f"SELECT id FROM {table}"), s.fetchone, s.fetchall, enter_transaction]
            for call in calls:
                try:
                    call()
                except UsageError as exc:
                    errors.append(str(exc))

        thread = threading.Thread(target=intruder, name="intruder")
        thread.start()
        thread.join(timeout=30)
        assert len(errors) == 6, errors
        assert all("'MainThread'" in e and "'intruder'" in e for e in errors), errors[0]
        assert s.position == position
        assert s.fetchone() == (1,)  # the owner's rows were not taken
        assert s.read(f"SELECT id FROM {table}") == [(1,)]


@both_drivers
def test_connection_by_intent(cluster: Any, driver: str) -> None:
    with make_router(cluster, driver) as router:
        with router.connection("write") as conn:
            cur = conn.cursor()
            cur.execute(f"SELECT {port_sql(cluster)}")
            assert cur.fetchall()[0][0] == cluster.primary.port
            cur.close()
        with router.connection("read") as conn:
            cur = conn.cursor()
            cur.execute(f"SELECT {port_sql(cluster)}")
            assert cur.fetchall()[0][0] in replica_ports(cluster)
            cur.close()
        with pytest.raises(ConfigurationError, match="intent"):
            with router.connection("sideways"):
                pass


def test_no_replicas_reads_from_the_primary(cluster: Any) -> None:
    with Router(cluster.primary.url, **FAST) as router:
        assert router.read(f"SELECT {port_sql(cluster)}") == [(cluster.primary.port,)]
        assert router.stats()["fallbacks"] == 0


def test_read_refuses_what_is_not_one_read_statement_before_sending(cluster: Any, table: str) -> None:
    """Issue 13 item 3: read("SELECT 1; DELETE FROM t") deleted every row when it reached the
    primary (no replica, or the replicas down). Now nothing is sent: with or without replicas,
    through Router.read and Session.read."""
    cluster.primary.query(f"INSERT INTO {table} (id, port) VALUES (1, 0), (2, 0)")
    cluster.wait_replicated()
    refused: list[tuple[str, Any]] = [
        (f"SELECT 1; DELETE FROM {table}", None),
        (f"INSERT INTO {table} (id, port) VALUES (%s, 0) RETURNING id", (3,)),
        (f"SELECT id FROM {table} FOR UPDATE", None),
        (f"EXPLAIN ANALYZE DELETE FROM {table}", None),
        (f"WITH gone AS (DELETE FROM {table} RETURNING id) SELECT id FROM gone", None),
        (f"SELECT id FROM {table} WHERE port = '%s'", ("0; DELETE",)),  # the driver's quotes would end the literal
    ]
    with Router(cluster.primary.url, **FAST) as alone, make_router(cluster) as routed:
        for router in (alone, routed):
            for sql, params in refused:
                with pytest.raises(NotAReadStatement, match="nothing was sent") as info:
                    router.read(sql, params)
                assert isinstance(info.value, ValueError) and info.value.reason in str(info.value)
                with router.session() as session, pytest.raises(NotAReadStatement):
                    session.read(sql, params)
            assert router.stats()["reads"] == 0
    assert cluster.primary.query(f"SELECT id FROM {table} ORDER BY id") == [(1,), (2,)]


def test_read_unchecked_runs_a_read_the_rule_refuses_on_a_replica(cluster: Any) -> None:
    """The escape hatch: two reads in one text are refused, and run where a read goes when
    the caller says unchecked=True (MariaDB answers the first, PostgreSQL the last)."""
    sql = f"SELECT {port_sql(cluster)}; SELECT {port_sql(cluster)}"
    with make_router(cluster) as router:
        with pytest.raises(NotAReadStatement, match="2 statements"):
            router.read(sql)
        assert router.read(sql, unchecked=True)[0][0] in replica_ports(cluster)
        with router.session() as session:
            assert session.read(sql, unchecked=True, idempotent=True)[0][0] in replica_ports(cluster)
        assert router.stats()["reads"] == 2


def lag_until_excluded(router: Router, cluster: Any, table: str, replicas: list[Any], max_lag: float) -> float:
    """Pause replay on ``replicas``, write once, and return when the write happened."""
    for node in replicas:
        cluster.pause_replication(node)
    written = time.monotonic()
    router.write(f"INSERT INTO {table} (id, port) VALUES (%s, 0)", (int(written * 1000),))
    return written


def test_lagging_replica_gets_no_reads_until_it_catches_up(cluster: Any, table: str) -> None:
    max_lag, interval = 0.6, 0.2
    with make_router(cluster, max_replica_lag=max_lag, health_interval=interval) as router:
        lagging, healthy = cluster.replicas
        written = lag_until_excluded(router, cluster, table, [lagging], max_lag)
        # The lag passes max_lag at most max_lag after the write; two intervals later it is out.
        time.sleep(max(0.0, written + max_lag + 2 * interval + 0.05 - time.monotonic()))
        ports = Counter(router.read(f"SELECT {port_sql(cluster)}")[0][0] for _ in range(20))
        assert ports == {healthy.port: 20}
        node = next(n for n in router.replicas if n.address.port == lagging.port)
        assert node.lag_excluded and (node.lag is None or node.lag > max_lag)
        cluster.resume_replication(lagging)
        cluster.wait_replicated(timeout=10)
        caught_up = time.monotonic()
        assert router.wait_for_probes(2, timeout=5)
        assert time.monotonic() - caught_up < 2 * interval + 0.5
        ports = Counter(router.read(f"SELECT {port_sql(cluster)}")[0][0] for _ in range(20))
        assert ports == {healthy.port: 10, lagging.port: 10}


def test_a_lagging_replica_that_catches_up_while_the_primary_is_down_serves_again(cluster: Any, table: str) -> None:
    """While the primary is down no lag can be measured against it, so lag is not updated
    (it would only grow). But a replica kept out for lag that then replays all that the
    primary was seen to write is not behind: it serves again at once. Before, it stayed out
    for the whole primary outage (chaos seeds 4 and 6: a restarted replica that caught up
    while the primary was killed)."""
    max_lag, interval = 0.6, 0.2
    with make_router(cluster, max_replica_lag=max_lag, health_interval=interval) as router:
        lagging, healthy = cluster.replicas
        name = f"127.0.0.1:{lagging.port}"
        lag_until_excluded(router, cluster, table, [lagging], max_lag)
        assert wait_until(lambda: router.stats()["nodes"][name]["lag_excluded"], timeout=5)
        primary = cluster.primary
        primary.stop()  # a clean shutdown: the replicas have received all it wrote
        try:
            assert wait_until(lambda: not router.stats()["nodes"][f"127.0.0.1:{primary.port}"]["healthy"], timeout=5)
            cluster.resume_replication(lagging)
            assert wait_until(lambda: router.stats()["nodes"][name]["serving_reads"], timeout=5), router.stats()
            ports = {router.read(f"SELECT {port_sql(cluster)}")[0][0] for _ in range(20)}
            assert ports == {healthy.port, lagging.port}
        finally:
            primary.start()
            cluster.wait_replicated(timeout=30)


def test_fallback_to_primary_or_no_replica_available(cluster: Any, table: str) -> None:
    max_lag, interval = 0.5, 0.2
    events: list[str] = []
    with make_router(cluster, max_replica_lag=max_lag, health_interval=interval) as router, \
            make_router(cluster, max_replica_lag=max_lag, health_interval=interval, fallback_to_primary=False) as strict:
        router.on("*", lambda e: events.append(e.name))
        written = lag_until_excluded(router, cluster, table, cluster.replicas, max_lag)
        time.sleep(max(0.0, written + max_lag + 2 * interval + 0.05 - time.monotonic()))
        assert router.read(f"SELECT {port_sql(cluster)}") == [(cluster.primary.port,)]
        assert router.stats()["fallbacks"] == 1
        assert "fallback_to_primary" in events and "lag_excluded" in events
        with pytest.raises(NoReplicaAvailable) as info:
            strict.read("SELECT 1")
        for node in cluster.replicas:
            assert f"127.0.0.1:{node.port}" in str(info.value)
        assert "lag" in str(info.value)


@both_drivers
def test_read_your_writes_with_replay_paused_reads_from_the_primary(cluster: Any, table: str, driver: str) -> None:
    with make_router(cluster, driver, causal_wait=0.05) as router:
        for node in cluster.replicas:
            cluster.pause_replication(node)
        for i in range(20):
            with router.session() as s:
                s.write(f"INSERT INTO {table} (id, port) VALUES (%s, 0)", (i,))
                assert s.read(f"SELECT id, {port_sql(cluster)} FROM {table} WHERE id = %s", (i,)) == [(i, cluster.primary.port)]
        assert router.stats()["causal_primary_reads"] == 20
        # Outside a session the guarantee does not hold, and the test can see it.
        router.write(f"INSERT INTO {table} (id, port) VALUES (%s, 0)", (1000,))
        assert router.read(f"SELECT id FROM {table} WHERE id = %s", (1000,)) == []


@both_drivers
def test_read_your_writes_served_by_replicas_when_they_keep_up(cluster: Any, table: str, driver: str) -> None:
    pairs_per_thread, threads = 250, 4
    stale: list[int] = []
    served: Counter = Counter()
    errors: list[BaseException] = []
    with make_router(cluster, driver, causal_wait=2.0, max_size=8) as router:
        def worker(offset: int) -> None:
            try:
                for i in range(offset, offset + pairs_per_thread):
                    with router.session() as s:
                        s.write(f"INSERT INTO {table} (id, port) VALUES (%s, 0)", (i,))
                        rows = s.read(f"SELECT id, {port_sql(cluster)} FROM {table} WHERE id = %s", (i,))
                        if not rows:
                            stale.append(i)
                        else:
                            served[rows[0][1]] += 1
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        workers = [threading.Thread(target=worker, args=(t * 10_000,)) for t in range(threads)]
        for t in workers:
            t.start()
        for t in workers:
            t.join(timeout=120)
        assert errors == [] and stale == []
        assert sum(served.values()) == pairs_per_thread * threads
        assert set(served) <= replica_ports(cluster), served
        assert router.stats()["causal_primary_reads"] == 0


@both_drivers
def test_session_execute_and_fetch(cluster: Any, table: str, driver: str) -> None:
    with make_router(cluster, driver) as router, router.session() as s:
        assert s.execute(f"INSERT INTO {table} (id, port) VALUES (7, 0)") == 1
        assert s.execute(f"SELECT id FROM {table} WHERE id = 7") == 1
        assert s.fetchone() == (7,)
        assert s.fetchall() == []
        with s.transaction() as tx:
            tx.execute(f"INSERT INTO {table} (id, port) VALUES (8, 0)")
        assert s.read(f"SELECT id FROM {table} WHERE id = 8") == [(8,)]
        # Not one read statement: a write, on the primary, with the write rules.
        s.execute(f"SELECT 1 FROM {table}; DELETE FROM {table} WHERE id = 7")
        assert s.read(f"SELECT id FROM {table} ORDER BY id") == [(8,)]


def test_sticky_sessions_read_from_the_primary_after_a_write(cluster: Any, table: str) -> None:
    with make_router(cluster, sticky_seconds=0.5) as router:
        with router.session() as s:
            assert s.read(f"SELECT {port_sql(cluster)}")[0][0] in replica_ports(cluster)
            s.write(f"INSERT INTO {table} (id, port) VALUES (1, 0)")
            assert s.read(f"SELECT {port_sql(cluster)}") == [(cluster.primary.port,)]
            time.sleep(0.6)
            assert s.read(f"SELECT {port_sql(cluster)}")[0][0] in replica_ports(cluster)


@both_drivers
def test_write_many_stores_every_row_once_with_1_or_4_workers(cluster: Any, table: str, driver: str) -> None:
    """What parallel batches buy is measured in bench/ (the bulk phase), not timed here: a
    timed comparison on this shared 2-core machine failed whenever something else ran."""
    rows = [(i, i % 7) for i in range(20_000)]
    sql = f"INSERT INTO {table} (id, port) VALUES (%s, %s)"
    with make_router(cluster, driver, max_size=4) as router:
        for workers in (1, 4):
            router.write(f"DELETE FROM {table}")
            assert router.write_many(sql, rows, batch_size=2000, workers=workers) == 20_000
            assert cluster.primary.query(f"SELECT count(*), sum(id) FROM {table}")[0] == (20_000, sum(range(20_000)))
    cluster.wait_replicated(timeout=30)  # the next test's table waits 10 s for its replicas


def test_write_many_reports_the_failed_batch(cluster: Any, table: str) -> None:
    # Batch 2 holds id 105 twice, so it fails whatever order the two workers run the batches in
    # (a duplicate of an earlier batch's row could fail either batch, or wait for its lock).
    rows = [(i, 0) for i in range(100)] + [(105, 0)] + [(i, 0) for i in range(101, 201)]
    with make_router(cluster) as router:
        with pytest.raises(dbrouter.BulkWriteError) as info:
            router.write_many(f"INSERT INTO {table} (id, port) VALUES (%s, %s)", rows, batch_size=50, workers=2)
    error = info.value
    assert set(error.failures) == {2} and "batch 2" in str(error)
    assert error.rowcount == 151 and error.committed == [0, 1, 3, 4]  # 201 rows, batch 2 (50 rows) failed
    assert cluster.primary.query(f"SELECT count(*) FROM {table}") == [(151,)]


@pytest.mark.parametrize(
    ("args", "options", "message"),
    [
        (("",), {}, "primary URL is empty"),
        ((None,), {}, "primary URL is empty"),
        (("postgresql://a@127.0.0.1/x", ["mysql://a@127.0.0.1/x"]), {}, "one router serves one engine"),
        (("postgresql://a@127.0.0.1/x",), {"policy": "fastest"}, "policy must be one of"),
        (("postgresql://a@127.0.0.1/x",), {"acquire_timeout": -1}, "acquire_timeout must be > 0"),
        (("postgresql://a@127.0.0.1/x",), {"connect_timeout": -0.5}, "connect_timeout must be > 0"),
        (("postgresql://a@127.0.0.1/x",), {"max_replica_lag": -1}, "max_replica_lag must be >= 0"),
        (("postgresql://a@127.0.0.1/x",), {"max_sise": 3}, "did you mean 'max_size'"),
        (("postgresql://a@127.0.0.1/x", ["postgresql://a@127.0.0.1/x"]), {}, "listed twice"),
        (("postgresql://a@127.0.0.1/x", [{"url": "postgresql://a@127.0.0.2/x", "weight": -1}]), {}, "weight must be > 0"),
        (("postgresql://a@127.0.0.1/x", [{"url": "postgresql://a@127.0.0.2/x", "weight": "heavy"}]), {}, "weight must be a number"),
    ],
)
def test_bad_configuration_fails_at_construction(args: tuple, options: dict, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        Router(*args, **options)


@both_drivers
def test_from_config_dict_toml_and_env(cluster: Any, driver: str, tmp_path: Any) -> None:
    replicas = [n.url for n in cluster.replicas]
    mapping = {"primary": cluster.primary.url, "replicas": replicas, "pool": {"max_size": 3}, "routing": {"policy": "random"},
               "health_interval": 0.2, "driver": driver}
    toml = tmp_path / "dbrouter.toml"
    toml.write_text(
        f'primary = "{cluster.primary.url}"\nreplicas = [{", ".join(repr(u).replace(chr(39), chr(34)) for u in replicas)}]\n'
        "[pool]\nmax_size = 3\n[routing]\npolicy = \"random\"\n[monitor]\nhealth_interval = 0.2\n"
        f'[connect]\ndriver = "{driver}"\n'
    )
    env = {"DBROUTER_PRIMARY": cluster.primary.url, "DBROUTER_REPLICAS": ",".join(replicas),
           "DBROUTER_MAX_SIZE": "3", "DBROUTER_POLICY": "random", "DBROUTER_HEALTH_INTERVAL": "0.2",
           "DBROUTER_DRIVER": driver}
    configs = [dbrouter.config.load_router_config(mapping), dbrouter.config.load_router_config(toml),
               dbrouter.config.load_router_config(None, env=env)]
    assert configs[0] == configs[1] == configs[2]
    assert configs[0].connect.driver == (driver or None)
    with Router.from_config(toml, max_size=2) as router:
        assert router.config.pool.max_size == 2 and router.config.routing.policy == "random"
        assert router.read(f"SELECT {port_sql(cluster)}")[0][0] in replica_ports(cluster)
        assert all(node.adapter.driver.startswith(driver) for node in router.nodes)
    if cluster.engine == "postgres":  # an override names the other driver
        other = "psycopg2" if driver == "psycopg" else "psycopg"
        with Router.from_config(toml, driver=other) as router:
            assert [node.adapter.driver for node in router.nodes] == [other] * 3
            assert router.read(f"SELECT {port_sql(cluster)}")[0][0] in replica_ports(cluster)
    with pytest.raises(ConfigurationError, match="unknown config section"):
        dbrouter.config.load_router_config({"primary": cluster.primary.url, "poool": {"max_size": 3}})
    with pytest.raises(ConfigurationError, match="DBROUTER_MAX_SIZE"):
        dbrouter.config.load_router_config(None, env={**env, "DBROUTER_MAX_SIZE": "three"})


def test_a_parameter_the_driver_cannot_send_is_the_callers_error(cluster: Any) -> None:
    """A parameter of a type the driver cannot send fails the call with the driver's error, as
    it is: nothing was sent. The MySQL C extension reports it without an error number, like a
    lost connection, for which it was taken: a read was retried on every replica and charged to
    each one's breaker, a write reported as of unknown outcome, the connections discarded."""
    events: list[str] = []
    replicas = [n.url for n in cluster.replicas]
    with Router(cluster.primary.url, replicas, fail_max=2, **FAST) as router:
        router.on("*", lambda event: events.append(event.name))
        router.read("SELECT 1")
        for _ in range(3):  # more than fail_max, on every node
            with pytest.raises(Exception) as info:
                router.read("SELECT %s", ({"not": "sendable"},))
            assert not isinstance(info.value, dbrouter.DbRouterError), info.value
            with pytest.raises(Exception) as info:
                router.write("SELECT %s", ({"not": "sendable"},))
            assert not isinstance(info.value, dbrouter.DbRouterError), info.value
        assert router.read("SELECT 1")[0][0] == 1 and router.write("SELECT 1") >= 0
        stats = router.stats()
        assert stats["retries"] == 0 and stats["failovers"] == 0
        for name, node in stats["nodes"].items():
            assert node["breaker"] == "closed" and node["breaker_failures"] == 0 and node["healthy"], name
            assert node["pool"]["discarded"] == 0, name
    assert not {"breaker_open", "node_down", "failover"} & set(events), events


@pytest.mark.mysql
def test_mysql_secure_file_priv_refusal_is_the_callers_error_not_a_demotion(maria_cluster: Any,
                                                                           maria_file_url: str) -> None:
    """MariaDB refuses ``SELECT ... INTO OUTFILE`` to a path it may not write with error 1290,
    the number it also uses for a write on a read-only node. Taken for read-only, it opened the
    healthy primary's breaker and every write failed for reset_timeout; it is the caller's error,
    raised as it is, and the primary is left alone."""
    events: list[str] = []
    replicas = [n.url for n in maria_cluster.replicas]
    with Router(maria_file_url, replicas, reset_timeout=30, **FAST) as router:
        router.on("*", lambda event: events.append(event.name))
        primary = router.primary.name
        refused = f"/nonexistent-dbrouter-{uuid.uuid4().hex[:8]}/out.txt"
        with pytest.raises(Exception) as info:
            router.write(f"SELECT 1 INTO OUTFILE '{refused}'")
        assert not isinstance(info.value, dbrouter.DbRouterError)
        assert getattr(info.value, "errno", None) == 1290 and "--secure-file-priv" in str(info.value)
        assert router.write("DO 1") == 0
        with router.transaction() as tx:
            tx.execute("DO 1")
        stats = router.stats()
        node = stats["nodes"][primary]
        assert node["breaker"] == "closed" and node["breaker_failures"] == 0 and node["healthy"]
        assert stats["primary"] == primary and stats["retries"] == 0 and stats["failovers"] == 0
        assert node["pool"]["discarded"] == 0
    assert not {"breaker_open", "node_down", "failover"} & set(events), events


def test_from_config_with_overrides_keeps_the_names_given(cluster: Any, tmp_path: Any) -> None:
    """Issue 14: Router.from_config(path, **overrides) dropped the primary's name, so after a
    failover router.primary.name no longer matched the member names the user gave."""
    import json

    replicas = ", ".join(f'{{ url = {json.dumps(r.url)}, name = "member{i}" }}' for i, r in enumerate(cluster.replicas, 1))
    path = tmp_path / "dbrouter.toml"
    path.write_text(f"primary = {{ url = {json.dumps(cluster.primary.url)}, name = \"member0\" }}\n"
                    f"replicas = [{replicas}]\n")
    with Router.from_config(str(path), health_interval=0.5) as router:
        assert router.primary.name == "member0"
        assert sorted(n.name for n in router.replicas) == ["member1", "member2"]
        assert router.config.monitor.health_interval == 0.5
        assert set(router.stats()["nodes"]) == {"member0", "member1", "member2"}
