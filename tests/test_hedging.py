"""Budgeted hedged reads (issue: overload and tail latency, item 5) on real replicas.

One replica is made slow for the test's reads only: the statement sleeps on that server
(its port decides), so the other replica answers at once. A read that went to the slow
one first is hedged on the other after ``hedge_after``: it returns the fast answer, the slow
statement is cut and cancelled on its server, and neither node is blamed.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
import warnings
from typing import Any, Iterator

import pytest

from dbrouter import Router
from dbrouter.adapters._waker import Overtaken

from .conftest import both_drivers, free_low_port, port_sql, wait_until
from .test_control_plane import StallDetector, close_within


def slow_on(cluster: Any, port: int, seconds: float, marker: str) -> str:
    """A read that sleeps ``seconds`` on the server listening on ``port``, at once elsewhere,
    and says which port answered."""
    if cluster.engine == "postgres":
        return (f"SELECT {port_sql(cluster)}, '{marker}' FROM pg_sleep(CASE WHEN {port_sql(cluster)} = {port} "
                f"THEN {seconds} ELSE 0 END)")
    return f"SELECT {port_sql(cluster)}, '{marker}', SLEEP(IF({port_sql(cluster)} = {port}, {seconds}, 0))"


def running_on(cluster: Any, node: Any, marker: str) -> bool:
    if cluster.engine == "postgres":
        # An idle session shows its last statement too: only a running one counts.
        sql = ("SELECT count(*) FROM pg_stat_activity WHERE query LIKE %s AND state = 'active' "
               "AND pid <> pg_backend_pid()")
    else:
        sql = "SELECT count(*) FROM information_schema.PROCESSLIST WHERE INFO LIKE %s AND ID <> CONNECTION_ID()"
    return int(node.query(sql, (f"%{marker}%",))[0][0]) > 0


def running_flights(hedger: Any) -> list[Any]:
    """The reads the hedger still watches (a flight whose claim nobody popped)."""
    return [slot.flight for slot in hedger._slots if slot.flight is not None and slot.flight.claim]


def hedging_router(cluster: Any, **options: Any) -> Router:
    options = {"health_interval": 0.1, "hedge_after": 0.05, "policy": "round_robin", **options}
    router = Router(cluster.primary.url, [r.url for r in cluster.replicas], **options)
    assert router.wait_for_probes(2)
    return router


@both_drivers
def test_a_read_on_a_slow_replica_is_answered_by_the_other(cluster: Any, driver: str) -> None:
    slow, fast = cluster.replicas
    marker = "hg" + uuid.uuid4().hex[:10]
    # Every read may be hedged: the race is under test.
    router = hedging_router(cluster, hedge_budget=1.0, **({"driver": driver} if driver else {}))
    slow_pool = next(n for n in router.replicas if n.name.endswith(f":{slow.port}")).pool
    opened = slow_pool.stats()["opened"]
    try:
        for i in range(8):  # round robin: half of them go to the slow one first
            started = time.monotonic()
            # The last ones with a deadline: a read through a lease (`Hedger.read_leased`).
            rows = router.read(slow_on(cluster, slow.port, 30, marker), timeout=10 if i >= 4 else None)
            assert rows[0][0] == fast.port, rows  # the slow replica never answers first
            assert time.monotonic() - started < 3.0  # not its 30 s
            # A driver that overtakes: a loser's connection drains (up to the drain limit), and
            # reads avoid a replica whose connections all are out draining: let it come back.
            assert wait_until(lambda: not slow_pool.draining, timeout=3), "the drain did not end"
        stats = router.stats()
        assert stats["hedges"] >= 4 and stats["hedges_won"] >= 4, stats
        # The losers were cancelled: nothing sleeps on the slow server for 30 s.
        assert wait_until(lambda: not running_on(cluster, slow, marker), timeout=5), "a losing read still runs"
        for node in router.replicas:
            assert stats["nodes"][node.name]["breaker"] == "closed", stats["nodes"][node.name]
            assert wait_until(lambda n=node: n.pool.stats()["in_use"] == 0, timeout=2), node.pool.stats()
        assert stats["deadline_exceeded"] == 0
        # Cut and replaced; or, on a driver that overtakes (psycopg 3, pure-Python MySQL), ended
        # without a cut and drained, then cut at the drain limit since it runs on for 30 s.
        pool = slow_pool.stats()
        assert pool["discarded"] >= 1 and pool["opened"] > opened, pool
        assert router.read(f"SELECT {port_sql(cluster)}")
    finally:
        assert close_within(router)


def test_fast_reads_are_not_hedged_and_writes_never(cluster: Any, table: str) -> None:
    slow, _ = cluster.replicas
    marker = "hg" + uuid.uuid4().hex[:10]
    router = hedging_router(cluster, hedge_after=0.5)
    try:
        for _ in range(10):
            router.read("SELECT 1")
        assert router.stats()["hedges"] == 0
        # Statements that are not plain reads are never hedged, however slow.
        router.read(slow_on(cluster, slow.port, 1, marker), unchecked=True)
        router.read(slow_on(cluster, slow.port, 1, marker), unchecked=True)
        sleep = "pg_sleep(1)" if cluster.engine == "postgres" else "SLEEP(1)"
        router.write(f"INSERT INTO {table} (id, port) SELECT 1, 2 FROM (SELECT {sleep}) AS s")
        with router.transaction() as tx:
            tx.execute(f"SELECT {sleep}")
        assert router.stats()["hedges"] == 0
    finally:
        assert close_within(router)


def test_the_budget_caps_the_extra_reads(cluster: Any) -> None:
    slow, fast = cluster.replicas
    marker = "hg" + uuid.uuid4().hex[:10]
    # Connections to spare: a replica whose connections all are out draining losers (a driver
    # that overtakes) gets no reads meanwhile, and the budget would not be reached.
    router = hedging_router(cluster, hedge_after=0.01, hedge_budget=0.05, min_size=6, max_size=6)
    try:
        started = time.monotonic()
        reads = 0
        for _ in range(40):
            router.read(slow_on(cluster, slow.port, 0.15, marker))
            reads += 1
        elapsed = time.monotonic() - started
        stats = router.stats()
        # 5% of the reads of the last 10 s, plus one a second (the floor), and the first.
        assert stats["hedges"] <= 0.05 * stats["reads"] + elapsed + 1, (stats["hedges"], stats["reads"], elapsed)
        assert stats["hedges_refused"] > 0, stats
        assert stats["hedges"] > 0, stats
    finally:
        assert close_within(router)


@pytest.mark.parametrize("bad", ["fast", -1, 0, float("nan")])
def test_hedge_after_is_seconds_or_auto(bad: Any) -> None:
    from dbrouter import ConfigurationError

    with pytest.raises(ConfigurationError, match="hedge_after"):
        Router("postgresql://app@127.0.0.1:1/app", hedge_after=bad, open=False)
    with pytest.raises(ConfigurationError, match="hedge_budget"):
        Router("postgresql://app@127.0.0.1:1/app", hedge_after="auto", hedge_budget=0, open=False)


def test_auto_threshold_follows_the_replicas_own_read_times(cluster: Any) -> None:
    slow, fast = cluster.replicas
    marker = "hg" + uuid.uuid4().hex[:10]
    router = hedging_router(cluster, hedge_after="auto", hedge_budget=1.0, min_size=6, max_size=6)  # as above
    try:
        router.read(slow_on(cluster, slow.port, 2, marker))  # no p95 known yet: not hedged, it waits
        assert router.stats()["hedges"] == 0
        for _ in range(80):  # each replica's p95 is then a few milliseconds
            router.read("SELECT 1")
        for _ in range(4):
            started = time.monotonic()
            assert router.read(slow_on(cluster, slow.port, 30, marker))[0][0] == fast.port
            assert time.monotonic() - started < 3.0
        assert router.stats()["hedges_won"] >= 2
    finally:
        assert close_within(router)


def test_reads_ending_at_their_threshold_race_the_watcher_and_lose_nothing(cluster: Any, request: Any) -> None:
    """A threshold about as long as a read: reads and the watcher settle flights at the same
    moments from 8 threads. Every read returns its own answer, every connection comes back,
    no node is blamed, and the watcher lets go of every flight."""
    import threading

    from .test_control_plane import StallDetector

    if cluster.engine != "postgres":
        # Known bug, open in issue 15: CI once saw a MariaDB replica's breaker opened (5 failures)
        # by this race, and no run since reproduced it (60 rounds of this race, both connector
        # modes). Not a loser's KILL QUERY reaching the next statement: MariaDB drops a KILL
        # QUERY that finds its session idle. A likely cause is fixed: a cut could reach another
        # connection that took over the loser's descriptor number (`Adapter.abort` now checks
        # the socket's inode). Kept as xfail until CI runs show it gone; it warns with its reason.
        request.applymarker(pytest.mark.xfail(reason="issue 15: a MariaDB breaker opened once in CI under this race",
                                              strict=False))
    router = hedging_router(cluster, hedge_after=0.0005, hedge_budget=1.0)
    stall = StallDetector(limit=30.0)
    failures: list[BaseException] = []

    def reader(n: int) -> None:
        try:
            for i in range(150):
                value = n * 1000 + i
                assert router.read("SELECT %s", (value,)) == [(value,)]
                stall.progress()
        except BaseException as exc:  # noqa: BLE001 - reported on the test's thread
            failures.append(exc)

    threads = [threading.Thread(target=reader, args=(n,), daemon=True) for n in range(8)]
    stall.start()
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        stall.stop()
        assert stall.report is None, stall.report
        assert not failures, failures[:3]
        stats = router.stats()
        assert stats["hedges"] > 0, stats  # the race did happen
        assert stats["reads"] == 1200
        hedger = router.hedger
        assert hedger is not None
        assert wait_until(lambda: not running_flights(hedger), timeout=5), running_flights(hedger)
        for node in router.replicas:
            assert stats["nodes"][node.name]["breaker"] == "closed", stats["nodes"][node.name]
            pool = node.pool
            assert wait_until(lambda p=pool: p.stats()["in_use"] == 0, timeout=5), pool.stats()
    except AssertionError as exc:
        # An xfail's message is not in the run's output (MariaDB's case): a warning's is.
        warnings.warn(f"hedging race on {cluster.engine}: {str(exc)[:2000]}", stacklevel=1)
        raise
    finally:
        stall.stop()
        assert close_within(router)


def test_reads_that_end_before_their_threshold_leave_no_flight_behind(cluster: Any) -> None:
    router = hedging_router(cluster, hedge_after=0.2)
    try:
        for _ in range(300):
            router.read("SELECT 1")
        hedger = router.hedger
        assert hedger is not None
        assert wait_until(lambda: not running_flights(hedger), timeout=2), running_flights(hedger)
        assert router.stats()["hedges"] == 0
        # One slot per thread that read; those of threads that ended are dropped.
        import threading

        readers = [threading.Thread(target=router.read, args=("SELECT 1",)) for _ in range(5)]
        for t in readers:
            t.start()
        for t in readers:
            t.join(10)
        assert wait_until(lambda: router.read("SELECT 1") == [(1,)] and len(hedger._slots) == 1, timeout=5), \
            len(hedger._slots)
    finally:
        assert close_within(router)


# -- psycopg 3: a loser's wait is ended, its connection drained (dbrouter.adapters._waker) -----------


OVERTAKING = [pytest.param("postgres+psycopg", marks=pytest.mark.postgres, id="postgres-psycopg"),
              pytest.param("mysql", marks=pytest.mark.mysql, id="mariadb-pure")]


@contextlib.contextmanager
def overtaking_router(cluster: Any, **options: Any) -> Iterator[tuple[Router, Any, Any, StallDetector]]:
    """A router on the driver whose reads a hedge can overtake (psycopg 3 on PostgreSQL, the
    pure-Python connector on MariaDB), its replicas ``direct`` and ``behind`` (through a fault
    proxy), hedging every read past 50 ms: (router, the proxy, behind's pool, a stall detector
    that fails the test when no read finished for 5 s)."""
    from dbrouter.faultproxy import FaultProxy

    def url(node: Any, port: int | None = None) -> str:
        text = node.url if port is None else node.url.replace(f":{node.port}/", f":{port}/")
        if cluster.engine == "postgres":
            return text.replace("postgresql://", "postgresql+psycopg://", 1)
        return text + ("&" if "?" in text else "?") + "use_pure=true"

    direct, behind = cluster.replicas
    detector = StallDetector(5.0).start()
    with FaultProxy(upstream=("127.0.0.1", behind.port), listen_port=free_low_port()) as proxy:
        replicas = [{"url": url(direct), "name": "direct"}, {"url": url(behind, proxy.port), "name": "behind"}]
        router = Router(url(cluster.primary), replicas, min_size=1, hedge_after=0.05, hedge_budget=1.0,
                        policy="round_robin", **options)
        try:
            assert router.wait_for_probes(1)
            assert all(node.adapter.overtakes for node in router.replicas)
            yield router, proxy, next(n for n in router.replicas if n.name == "behind").pool, detector
        finally:
            proxy.pass_through()
            assert close_within(router)
            detector.stop()
    assert detector.report is None, detector.report


@pytest.mark.parametrize("cluster", OVERTAKING, indirect=True)
@pytest.mark.timeout(60)
def test_an_overtaken_read_drains_while_reads_go_elsewhere(cluster: Any) -> None:
    """A hedge beat a read whose answer is held in the network (psycopg 3, pure-Python MySQL).
    The read returns the hedge's rows at once; its connection stays out, draining, until the
    answer arrives, then is pooled again (no new connection). Meanwhile reads do not queue
    behind it: with one connection per replica, they go to the other replica."""
    direct, behind = cluster.replicas
    port = f"SELECT {port_sql(cluster)}"
    with overtaking_router(cluster, health_interval=0.2, max_size=1) as (router, proxy, behind_pool, detector):
        for _ in range(4):
            router.read("SELECT 1")
        proxy.latency(0.4)  # each way: its answers come 0.8 s after the question
        overtaken = False
        for _ in range(4):  # round robin: one of the first two reads goes there
            started = time.monotonic()
            assert router.read(port)[0][0] == direct.port
            detector.progress()
            assert time.monotonic() - started < 0.5
            if behind_pool.draining:
                overtaken = True
                break
        assert overtaken, router.stats()
        # Its one connection is out draining: the next reads do not wait for it.
        for _ in range(6):
            started = time.monotonic()
            assert router.read(port)[0][0] == direct.port
            assert time.monotonic() - started < 0.3, "a read queued behind a draining connection"
            detector.progress()
        proxy.pass_through()
        assert wait_until(lambda: not behind_pool.draining, timeout=3), "the drain did not end"
        detector.progress()
        pool = behind_pool.stats()
        assert pool["discarded"] == 0 and pool["opened"] == 1 and pool["in_use"] == 0, pool
        assert {router.read(port)[0][0] for _ in range(4)} == {direct.port, behind.port}
        node = router.stats()["nodes"]["behind"]
        assert node["breaker"] == "closed" and node["healthy"], node


@pytest.mark.parametrize("cluster", OVERTAKING, indirect=True)
@pytest.mark.timeout(60)
def test_an_overtaken_read_that_does_not_end_is_discarded(cluster: Any, monkeypatch: Any) -> None:
    """A loser whose answer does not come within the drain limit is discarded, not pooled,
    and the node not blamed."""
    import dbrouter.lease

    monkeypatch.setattr(dbrouter.lease, "_DRAIN_LIMIT", 0.3)
    direct = cluster.replicas[0]
    with overtaking_router(cluster, health_interval=2, max_size=2) as (router, proxy, behind_pool, detector):
        proxy.latency(1.0)
        for _ in range(2):
            assert router.read(f"SELECT {port_sql(cluster)}")[0][0] == direct.port
            detector.progress()
        assert router.stats()["hedges_won"] >= 1
        assert wait_until(lambda: behind_pool.stats()["discarded"] >= 1, timeout=3), behind_pool.stats()
        detector.progress()
        assert wait_until(lambda: not behind_pool.draining and behind_pool.stats()["in_use"] == 0, timeout=3)
        node = router.stats()["nodes"]["behind"]
        assert node["breaker"] == "closed" and node["breaker_failures"] == 0, node


def test_a_wake_up_meant_for_an_earlier_read_is_ignored() -> None:
    from dbrouter.adapters._waker import thread_waker

    waker = thread_waker()
    assert thread_waker() is waker  # one per thread
    first, second = object(), object()
    waker.arm(first)
    waker.fire(first)
    waker.arm(second)  # the first read ended; the firing meant for it is forgotten
    assert not waker.meant_for_armed()
    waker.fire(first)  # a race decided late, for the read that ended
    assert not waker.meant_for_armed()
    waker.fire(second)
    assert waker.meant_for_armed()


@pytest.mark.postgres
def test_a_stale_wake_up_does_not_end_a_psycopg_read(pg_cluster: Any) -> None:
    from dbrouter.adapters import make_adapter
    from dbrouter.adapters._waker import thread_waker
    from dbrouter.url import parse_address

    adapter = make_adapter(parse_address(pg_cluster.replicas[0].url.replace("postgresql://", "postgresql+psycopg://")))
    assert adapter.overtakes
    conn = adapter.connect()
    try:
        waker = thread_waker()
        current = object()
        waker.arm(current)
        conn.dbrouter_waker = waker
        threading.Timer(0.1, waker.fire, args=(object(),)).start()  # for another read
        assert adapter.execute(conn, "SELECT 7 FROM pg_sleep(0.3)")[0] == [(7,)]
        threading.Timer(0.1, waker.fire, args=(current,)).start()
        with pytest.raises(Overtaken):
            adapter.execute(conn, "SELECT 8 FROM pg_sleep(0.5)")
        assert conn.dbrouter_pending is not None and conn.dbrouter_waker is None
        assert adapter.drain(conn, 2.0)  # its answer came: idle again
        assert adapter.execute(conn, "SELECT 9")[0] == [(9,)]
        waker.arm(current)
        adapter.watch(conn, waker)
        threading.Timer(0.1, waker.fire, args=(current,)).start()
        with pytest.raises(Overtaken):
            adapter.execute(conn, "SELECT 10 FROM pg_sleep(5)")
        started = time.monotonic()
        assert not adapter.drain(conn, 0.3)  # still running: to be discarded
        assert time.monotonic() - started < 1.0
    finally:
        adapter.close(conn)


def test_a_forked_child_has_its_own_waker() -> None:
    import os

    from dbrouter.adapters._waker import thread_waker

    parent = thread_waker()
    pid = os.fork()
    if pid == 0:  # the child: exit status says whether it got a pipe of its own
        os._exit(0 if thread_waker() is not parent and thread_waker().fd != parent.fd else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
