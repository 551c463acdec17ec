"""Per-call deadlines (issue: overload and tail latency, item 1) on real servers.

``timeout=`` on a call, ``router.deadline()`` around several and the ``call_timeout``
option bound a call's breaker admission, pool wait, retries, failover wait and statements:
a statement still running at the deadline is cut (its socket shut down) and cancelled on
the server, the node is not blamed, and the call raises `DeadlineExceeded` saying where the
time went. These tests check the behaviour, with bounds far from the timings (the
timings are bench/'s "adversity" section).
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import pytest

import dbrouter
from dbrouter import DeadlineExceeded, DeadlineExceededAfterWrite, Router, WriteOutcomeUnknown
from dbrouter.deadline import current, within

from .conftest import wait_until
from .test_control_plane import StallDetector, behind_proxy, close_within, take_down


def sleep_sql(cluster: Any, seconds: float, marker: str) -> str:
    if cluster.engine == "postgres":
        return f"SELECT pg_sleep({seconds}), '{marker}'"
    return f"SELECT SLEEP({seconds}), '{marker}'"


def running(cluster: Any, marker: str) -> bool:
    """Whether a statement with ``marker`` in its text still runs on the primary."""
    if cluster.engine == "postgres":
        rows = cluster.primary.query(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE %s AND pid <> pg_backend_pid()",
            (f"%{marker}%",))
    else:
        rows = cluster.primary.query(
            "SELECT count(*) FROM information_schema.PROCESSLIST WHERE INFO LIKE %s AND ID <> CONNECTION_ID()",
            (f"%{marker}%",))
    return int(rows[0][0]) > 0


def router_on(cluster: Any, **options: Any) -> Router:
    options.setdefault("health_interval", 0.1)
    return Router(cluster.primary.url, [], **options)


def test_timeout_validation() -> None:
    for bad in (0, -1, float("nan"), float("inf"), "1", True):
        with pytest.raises(dbrouter.ConfigurationError, match="timeout must be a number of seconds"):
            with within(bad):
                pass
    with pytest.raises(dbrouter.ConfigurationError, match="call_timeout"):
        Router("postgresql://app@127.0.0.1:1/app", call_timeout=0, open=False)


def test_nested_deadlines_only_shorten() -> None:
    assert current() is None
    with within(10) as outer:
        assert current() is outer
        with within(100) as inner:
            assert inner is outer  # later than the one around it: nothing changes
        with within(0.5) as inner:
            assert inner is not outer and inner is not None and inner.at < outer.at  # type: ignore[union-attr]
            assert current() is inner
        assert current() is outer
    assert current() is None


def test_slow_statement_is_cut_at_the_deadline_and_cancelled_on_the_server(cluster: Any) -> None:
    router = router_on(cluster)
    marker = "dl" + uuid.uuid4().hex[:10]
    try:
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded) as caught:
            router.read(sleep_sql(cluster, 30, marker), timeout=0.3)
        took = time.monotonic() - started
        assert took < 3.0, took  # not the statement's 30 s
        message = str(caught.value)
        assert "deadline of 0.3s exceeded in a statement on" in message and "statements on" in message, message
        assert "the server was asked to cancel it" in message, message
        assert caught.value.node is not None and not isinstance(caught.value, WriteOutcomeUnknown)
        # The server was asked to cancel it: it does not sleep on for 30 s.
        assert wait_until(lambda: not running(cluster, marker), timeout=5), "the statement still runs on the server"
        stats = router.stats()
        assert stats["deadline_exceeded"] == 1
        node = stats["nodes"][router.primary.name]
        assert node["breaker"] == "closed", node  # the node is not blamed for the caller's deadline
        assert node["pool"]["in_use"] == 0, node
        assert router.read("SELECT 1", timeout=5) == [(1,)]  # the pool serves on
    finally:
        assert close_within(router)


def test_cancels_reuse_one_kept_connection_closed_with_the_router(cluster: Any) -> None:
    """A cancel runs on a connection kept per node for the next one: a cancel is one statement,
    not a login. Closing the router closes it."""
    from dbrouter.deadline import CANCELLER

    router = router_on(cluster)
    marker = "dk" + uuid.uuid4().hex[:10]
    adapter = router.primary.adapter
    try:
        sessions = set()
        for _ in range(3):
            with pytest.raises(DeadlineExceeded, match="the server was asked to cancel it"):
                router.read(sleep_sql(cluster, 30, marker), timeout=0.2)
            assert wait_until(lambda: not running(cluster, marker), timeout=5), "the statement still runs"
            assert wait_until(lambda: id(adapter) in CANCELLER._kept, timeout=5), "no connection kept"
            sessions.add(adapter.session_id(CANCELLER._kept[id(adapter)][1]))
        assert len(sessions) == 1, sessions  # the same server session cancelled all three
        kept = CANCELLER._kept[id(adapter)][1]
    finally:
        assert close_within(router)
    assert id(adapter) not in CANCELLER._kept
    assert adapter.return_state(kept).value == "broken"  # closed with the router


def test_write_cut_at_the_deadline_is_unknown_and_rolled_back(cluster: Any, table: str) -> None:
    router = router_on(cluster)
    marker = uuid.uuid4().int % 10**9
    if cluster.engine == "postgres":
        sql = f"INSERT INTO {table} (id, port) SELECT {marker}, 1 FROM pg_sleep(30)"
    else:
        sql = f"INSERT INTO {table} (id, port) SELECT {marker}, SLEEP(30)"
    try:
        with pytest.raises(DeadlineExceededAfterWrite) as caught:
            router.write(sql, timeout=0.3)
        assert isinstance(caught.value, WriteOutcomeUnknown) and isinstance(caught.value, DeadlineExceeded)
        assert "may or may not have been applied" in str(caught.value)
        assert wait_until(lambda: not running(cluster, str(marker)), timeout=5)
        assert cluster.primary.query(f"SELECT count(*) FROM {table} WHERE id = {marker}")[0][0] == 0
        # In a transaction: cut inside the block, the server rolls it back; nothing is unknown.
        with pytest.raises(DeadlineExceeded) as caught:
            with router.transaction(timeout=0.3) as tx:
                tx.execute(f"INSERT INTO {table} (id, port) VALUES ({marker + 1}, 2)")
                tx.execute(sleep_sql(cluster, 30, str(marker)))
        assert not isinstance(caught.value, WriteOutcomeUnknown), caught.value
        assert cluster.primary.query(f"SELECT count(*) FROM {table} WHERE id = {marker + 1}")[0][0] == 0
        assert router.stats()["deadline_exceeded"] == 2
    finally:
        assert close_within(router)


def test_pool_wait_counts_against_the_deadline(cluster: Any) -> None:
    router = router_on(cluster, min_size=1, max_size=1, acquire_timeout=30)
    try:
        held = router.primary.pool.acquire()
        try:
            started = time.monotonic()
            with pytest.raises(DeadlineExceeded, match="waiting for a connection of") as caught:
                router.read("SELECT 1", timeout=0.2)
            assert time.monotonic() - started < 3.0
            assert "pool wait on" in str(caught.value)
        finally:
            router.primary.pool.release(held)
        assert router.read("SELECT 1", timeout=1) == [(1,)]
    finally:
        assert close_within(router)


def test_a_full_queue_under_a_deadline_sends_the_read_elsewhere_at_once(cluster: Any) -> None:
    """A replica whose queue is full refuses at once (`TooManyWaiting`): with time left on the
    call's deadline that is load shed, not the deadline passing, and the read goes to another
    node (here the primary, by fallback_to_primary) instead of raising `DeadlineExceeded`."""
    from .conftest import port_sql

    replica = cluster.replicas[0]
    router = Router(cluster.primary.url, [replica.url], health_interval=0.1, min_size=1, max_size=1,
                    max_waiting=1, acquire_timeout=30)
    queued: list[Any] = []
    try:
        assert router.wait_for_probes(2)
        with router.connection("read"):  # the replica's only connection
            waiter = threading.Thread(target=lambda: queued.append(router.read("SELECT 1")), daemon=True)
            waiter.start()  # the replica's queue: full
            pool = router.replicas[0].pool
            assert wait_until(lambda: pool.stats()["waiting"] == 1, timeout=5), pool.stats()
            started = time.monotonic()
            rows = router.read(f"SELECT {port_sql(cluster)}", timeout=5)
            assert rows == [(cluster.primary.port,)]
            assert time.monotonic() - started < 2.0  # not the 5 s of the deadline, nor the 30 s of a wait
        waiter.join(10)
        assert queued == [[(1,)]]
        stats = router.stats()
        assert stats["deadline_exceeded"] == 0 and stats["fallbacks"] >= 1, stats
    finally:
        assert close_within(router)


def test_router_deadline_bounds_every_call_in_the_block(cluster: Any) -> None:
    router = router_on(cluster)
    marker = "dl" + uuid.uuid4().hex[:10]
    try:
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            with router.deadline(0.5):
                router.read(sleep_sql(cluster, 0.1, marker))  # within it
                router.read(sleep_sql(cluster, 0.1, marker), timeout=10)  # a longer timeout changes nothing
                router.read(sleep_sql(cluster, 30, marker), timeout=10)  # cut at the block's deadline
        assert time.monotonic() - started < 3.0
        assert router.stats()["deadline_exceeded"] == 1
    finally:
        assert close_within(router)


def test_call_timeout_option_is_the_default(cluster: Any) -> None:
    router = router_on(cluster, call_timeout=0.3)
    marker = "dl" + uuid.uuid4().hex[:10]
    try:
        with pytest.raises(DeadlineExceeded):
            router.read(sleep_sql(cluster, 30, marker))
        assert router.read(sleep_sql(cluster, 0.5, marker), timeout=5)  # a call's own timeout wins
        with router.deadline(5):
            assert router.read(sleep_sql(cluster, 0.5, marker))  # as does a block's deadline
    finally:
        assert close_within(router)


@pytest.mark.proxy
def test_write_waiting_for_a_primary_stops_at_the_deadline(cluster: Any) -> None:
    with behind_proxy(cluster.primary) as (proxy, proxied):
        router = Router({"url": proxied, "name": "target"}, [r.url for r in cluster.replicas], health_interval=0.1,
                        failover_wait=30, connect_timeout=1, fail_max=1)
        try:
            router.write("SELECT 1")
            take_down(router, proxy, "target")  # refused, its connections cut, its breaker open
            started = time.monotonic()
            with pytest.raises(DeadlineExceeded) as caught:
                router.write("SELECT 1", timeout=0.5)
            assert time.monotonic() - started < 3.0  # not failover_wait's 30 s
            assert not isinstance(caught.value, WriteOutcomeUnknown)  # nothing was sent
        finally:
            proxy.pass_through()
            assert close_within(router)


@pytest.mark.proxy
@pytest.mark.timeout(120)
def test_calls_to_a_blackholed_node_return_at_their_deadline(cluster: Any) -> None:
    """Threads reading and writing through a node that stops answering (packets swallowed,
    connections kept open): every call ends at its deadline, with a dbrouter error; nothing
    leaks afterwards."""
    with behind_proxy(cluster.primary) as (proxy, proxied):
        router = Router({"url": proxied, "name": "target"}, [], health_interval=0.1, connect_timeout=1,
                        min_size=4, max_size=4)
        stall = StallDetector(limit=10).start()
        try:
            for _ in range(8):
                router.read("SELECT 1")
            threads_before = threading.active_count()
            proxy.blackhole()
            slowest = [0.0]
            errors: list[BaseException] = []
            lock = threading.Lock()

            def calls(write: bool) -> None:
                for _ in range(10):
                    started = time.monotonic()
                    try:
                        if write:
                            router.write("SELECT 1", timeout=0.2)
                        else:
                            router.read("SELECT 1", timeout=0.2)
                    except dbrouter.DbRouterError as exc:
                        with lock:
                            errors.append(exc)
                    with lock:
                        slowest[0] = max(slowest[0], time.monotonic() - started)
                    stall.progress()

            workers = [threading.Thread(target=calls, args=(i % 2 == 0,), daemon=True) for i in range(4)]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join(60)
            assert stall.report is None, stall.report
            assert not any(worker.is_alive() for worker in workers)
            assert len(errors) == 40, errors[:3]  # nothing answered
            assert slowest[0] < 2.0, slowest  # each ended at its deadline (0.2 s), not at a TCP timeout
            assert any(isinstance(e, DeadlineExceeded) for e in errors), errors[:3]
            proxy.pass_through()
            # Nothing leaked: no connection stays borrowed, and the threads return to what they were.
            assert wait_until(lambda: router.primary.pool.stats()["in_use"] == 0, timeout=5), router.primary.pool.stats()
            assert wait_until(lambda: threading.active_count() <= threads_before + 2, timeout=10), threading.enumerate()
        finally:
            stall.stop()
            proxy.pass_through()
            assert close_within(router)


@pytest.mark.proxy
@pytest.mark.timeout(120)
def test_with_default_options_a_blackholed_primary_costs_a_call_a_bounded_time(cluster: Any) -> None:
    """No timeout option at all (no statement_timeout, no call_timeout): a write and a read
    in flight on a primary that stops answering end when its probe runs out of time
    (probe_timeout, max(1 s, connect_timeout), plus a health interval: 6 s by default, the
    README's bound), not at the driver's timeouts (none on MySQL; TCP's on PostgreSQL)."""
    with behind_proxy(cluster.primary) as (proxy, proxied):
        router = Router({"url": proxied, "name": "target"}, [])
        config = router.config
        assert config.connect.statement_timeout is None and config.routing.call_timeout is None
        bound = max(1.0, config.connect.connect_timeout) + config.monitor.health_interval
        try:
            router.read("SELECT 1")
            router.write("SELECT 1")
            outcomes: dict[str, tuple[float, BaseException | None]] = {}

            def call(kind: str) -> None:
                started = time.monotonic()
                try:
                    if kind == "write":
                        router.write("SELECT 1")
                    else:
                        router.read("SELECT 1")
                    outcomes[kind] = (time.monotonic() - started, None)
                except BaseException as exc:  # noqa: BLE001 - looked at below
                    outcomes[kind] = (time.monotonic() - started, exc)

            proxy.blackhole()
            workers = [threading.Thread(target=call, args=(kind,), daemon=True) for kind in ("write", "read")]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join(bound + 20)
            assert not any(worker.is_alive() for worker in workers), f"a call still waits after {bound + 20:.0f} s"
            for kind, (took, error) in outcomes.items():
                assert isinstance(error, dbrouter.DbRouterError), (kind, error)
                assert took <= bound + 2.0, (kind, took, error)  # 2 s: probe scheduling and a loaded machine
            assert isinstance(outcomes["write"][1], WriteOutcomeUnknown), outcomes["write"]
            # Later calls fail at once: the node is down.
            started = time.monotonic()
            with pytest.raises(dbrouter.DbRouterError):
                router.write("SELECT 1")
            assert time.monotonic() - started < 1.0
        finally:
            proxy.pass_through()
            assert close_within(router)


@pytest.mark.proxy
def test_the_liveness_check_of_a_pooled_connection_stops_at_the_deadline(cluster: Any) -> None:
    """A call that starts as the node goes silent borrows an idle connection that is checked
    first (idle past validation_bypass): the check ran to connect_timeout (5 s), or, on MySQL,
    until the probes cut it, before it counted against the call's deadline."""
    with behind_proxy(cluster.primary) as (proxy, proxied):
        router = Router({"url": proxied, "name": "target"}, [], health_interval=0.1, validation_bypass=0.05,
                        min_size=2, max_size=2)
        try:
            router.read("SELECT 1")
            time.sleep(0.2)  # idle past the bypass window: the next checkout checks it
            proxy.blackhole()
            started = time.monotonic()
            with pytest.raises(DeadlineExceeded) as caught:
                router.read("SELECT 1", timeout=0.3)
            assert time.monotonic() - started < 1.5, caught.value
            assert "liveness check" in str(caught.value), caught.value
        finally:
            proxy.pass_through()
            assert close_within(router)
