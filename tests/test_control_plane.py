"""The control plane under faults: breakers, the monitor, events and sessions.

Each test names the bug it covers (issue: "control plane") and why it failed
before the fix. Everything runs against the shared real clusters, through the
public API, except the two breaker tests at the end (pure logic, a slow
in-memory pybreaker storage). Every test is bounded: worker threads are
daemons joined with timeouts, and a stall detector turns a deadlock into a
failure that shows every thread's stack.
"""

from __future__ import annotations

import itertools
import random
import signal
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from typing import Any, Iterator

import pybreaker
import pytest

import dbrouter
from dbrouter import NodeUnavailable, Router, WriteOutcomeUnknown
from dbrouter.config import BreakerPolicy
from dbrouter.faultproxy import FaultProxy
from dbrouter.resilience import NodeBreaker

from .conftest import backend_id, free_low_port, kill_session, port_sql, wait_until

# Breaker and monitor timings shared by the recovery tests: a node must be back
# within RESET + 2 x INTERVAL + SLACK seconds of the end of its fault.
RESET = 0.5
INTERVAL = 0.1
SLACK = 0.7


# -- helpers ----------------------------------------------------------------------


def dump_threads() -> str:
    """Every thread's stack, for a stall report."""
    names = {t.ident: t.name for t in threading.enumerate()}
    return "\n".join(
        f"--- {names.get(ident, ident)} ---\n" + "".join(traceback.format_stack(frame))
        for ident, frame in sys._current_frames().items()
    )


class StallDetector:
    """Records a stall (with every thread's stack) when no operation finishes for ``limit`` s."""

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self.report: str | None = None
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="stall-detector", daemon=True)

    def start(self) -> StallDetector:
        self._thread.start()
        return self

    def progress(self) -> None:
        self._last = time.monotonic()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _watch(self) -> None:
        while not self._stop.wait(0.1):
            idle = time.monotonic() - self._last
            if idle > self.limit:
                self.report = f"no operation finished for {idle:.1f}s; threads:\n{dump_threads()}"
                return


def close_within(router: Router, timeout: float = 10.0) -> bool:
    """Close ``router`` from a daemon thread: a deadlocked router must not hang the test."""
    closer = threading.Thread(target=router.close, kwargs={"timeout": 2.0}, name="router-close", daemon=True)
    closer.start()
    closer.join(timeout)
    return not closer.is_alive()


@contextmanager
def behind_proxy(node: Any) -> Iterator[tuple[FaultProxy, str]]:
    """A fault proxy in front of ``node`` and the node's URL through it. Faults injected
    here leave the shared cluster untouched."""
    with FaultProxy(upstream=("127.0.0.1", node.port), listen_port=free_low_port()) as proxy:
        yield proxy, node.url.replace(f":{node.port}/", f":{proxy.port}/")


def take_down(router: Router, proxy: FaultProxy, name: str, timeout: float = 10.0) -> None:
    """Refuse new connections and reset existing ones until node ``name``'s breaker opens."""
    opened = threading.Event()
    unsubscribe = router.on("breaker_open", lambda event: opened.set() if event.node == name else None)
    try:
        proxy.refuse()
        proxy.reset_connections()
        assert opened.wait(timeout), f"{name}'s breaker did not open: {router.stats()['nodes'][name]}"
        # pybreaker tells its listeners before it stores the new state: wait until stats() shows it.
        assert wait_until(lambda: breaker_of(router, name) != "closed", timeout=2), router.stats()["nodes"][name]
    finally:
        unsubscribe()


def acquire_soon(pool: Any, timeout: float = 5.0) -> Any:
    """A connection from ``pool``, retrying the connects that a fault just lifted can still
    fail (one begun while the proxy refused ends in "server closed the connection")."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return pool.acquire(timeout=max(0.1, deadline - time.monotonic()))
        except dbrouter.ConnectError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


def breaker_of(router: Router, name: str) -> str:
    return str(router.stats()["nodes"][name]["breaker"])


def assert_closed_by(router: Router, name: str, deadline: float) -> None:
    """Node ``name``'s breaker is closed by ``deadline`` (monotonic), judged from stats()
    alone: no traffic is sent that could close it as a side effect."""
    closed = wait_until(lambda: breaker_of(router, name) == "closed", timeout=max(0.0, deadline - time.monotonic()))
    assert closed, f"{name} still out of rotation after the fault ended: {router.stats()['nodes'][name]}"


def assert_serves_reads(router: Router, cluster: Any, port: int) -> None:
    """Reads reach the server listening on ``port`` again (the server says who answered)."""

    def answered() -> bool:
        return any(router.read(f"SELECT {port_sql(cluster)}")[0][0] == port for _ in range(6))

    assert wait_until(answered, timeout=1.0), f"no read reached port {port}: {router.stats()['nodes']}"


# -- bug 1: lock-order inversion --------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_breaker_trip_under_load_does_not_deadlock_with_the_monitor(cluster: Any, table: str) -> None:
    """Bug 1. A request thread that trips a breaker held the breaker's locks while
    pybreaker ran the router's listener, which took the topology lock; the monitor held
    the topology lock in apply() and called breaker.failure(), which takes the breaker's
    lock. Both waited forever and every thread that touched the node joined them.

    A replica is killed under 16 threads of reads and writes (fail_max=1, so the first
    failed request trips the breaker). A breaker_open listener (public API) sleeps
    0.2 s: it widens the window between the two lock acquisitions to two monitor
    rounds, so the monitor is inside apply() calling failure() on the same node while
    the tripping thread still holds the breaker's lock (pybreaker notifies before it
    stores the new state, so the monitor still sees the breaker closed, or half-open on
    a failed trial). Before the fix: no operation finished after the kill; the stall
    detector reports it with the stacks (Router._breaker_changed waiting in
    refresh_readable, the monitor in NodeBreaker.failure).
    """
    victim = cluster.replicas[0]
    router = Router(cluster.primary.url, [r.url for r in cluster.replicas], fail_max=1, reset_timeout=0.3,
                    health_interval=INTERVAL, connect_timeout=2, statement_timeout=2, min_size=1, max_size=16)
    victim_name = next(n.name for n in router.replicas if n.address.port == victim.port)
    opened: list[str | None] = []

    def slow_listener(event: dbrouter.Event) -> None:
        opened.append(event.node)
        time.sleep(0.2)

    router.on("breaker_open", slow_listener)
    stall = StallDetector(limit=10.0)
    stop = threading.Event()
    ids = itertools.count(1)
    done = itertools.count()

    def work(seed: int) -> None:
        rnd = random.Random(seed)
        while not stop.is_set():
            try:
                if rnd.random() < 0.3:
                    router.write(f"INSERT INTO {table} (id, port) VALUES (%s, 0)", (next(ids),))
                else:
                    router.read("SELECT 1")
            except Exception:  # noqa: BLE001 - the fault may cost operations; they must end, that is all
                pass
            next(done)
            stall.progress()

    workers = [threading.Thread(target=work, args=(i,), name=f"worker-{i}", daemon=True) for i in range(16)]
    killed = False
    try:
        stall.start()
        for worker in workers:
            worker.start()
        time.sleep(0.5)
        victim.kill()
        killed = True
        wait_until(lambda: stall.report is not None, timeout=4.0, interval=0.05)  # the node stays down 4 s
    finally:
        stop.set()
        if killed:
            victim.start()
            cluster.wait_replicated(timeout=30)
        # A deadlocked worker never ends: wait until all ended or the detector fired.
        wait_until(lambda: stall.report is not None or not any(w.is_alive() for w in workers),
                   timeout=stall.limit + 5, interval=0.05)
        stall.stop()
        closed = close_within(router, timeout=10.0 if stall.report is None else 1.0)
    if stall.report is not None:
        pytest.fail(f"deadlock: {stall.report}", pytrace=False)
    assert not any(w.is_alive() for w in workers), "workers did not stop, yet some operations kept finishing"
    assert closed, "router.close() did not return"
    assert victim_name in opened, f"the fault was not noticed: breaker_open for {opened}"
    assert next(done) > 100


# -- bug 2: a lost half-open trial keeps the node out ---------------------------------------


@pytest.mark.proxy
def test_trial_through_sqlalchemy_closes_the_breaker(cluster: Any) -> None:
    """Bug 2a. The half-open trial's connection came back through Pool.release (the
    SQLAlchemy integration), which never told the breaker; available() stayed False while
    a trial was outstanding, and routing asks available() first, so no read ever went
    there again. Before the fix: the breaker stayed "half-open" for good and the replica
    got no reads.
    """
    from sqlalchemy import text

    from dbrouter.integrations.sqlalchemy import create_engines

    replica, other = cluster.replicas
    with behind_proxy(replica) as (proxy, proxied):
        router = Router(cluster.primary.url, [{"url": proxied, "name": "target"}, other.url], fail_max=1,
                        reset_timeout=RESET, health_interval=INTERVAL, connect_timeout=2, min_size=1, max_size=4)
        try:
            engines = create_engines(router)
            target = next(n for n in router.replicas if n.name == "target")
            take_down(router, proxy, "target")
            proxy.pass_through()
            fixed_at = time.monotonic()

            def sqlalchemy_read() -> bool:
                try:
                    with engines.for_node(target).connect() as conn:
                        return bool(conn.execute(text(f"SELECT {port_sql(cluster)}")).scalar() == replica.port)
                except Exception:  # noqa: BLE001 - refused while the breaker is open: try again
                    return False

            # The first SQLAlchemy read that gets through is the half-open trial (or comes after
            # the breaker closed by itself); nothing else uses the node until it is back.
            assert wait_until(sqlalchemy_read, timeout=RESET + 3, interval=0.05)
            assert_closed_by(router, "target", fixed_at + RESET + 2 * INTERVAL + SLACK)
            assert_serves_reads(router, cluster, replica.port)
            engines.dispose()
        finally:
            assert close_within(router)


@pytest.mark.proxy
def test_trial_that_times_out_on_the_pool_does_not_strand_the_node(cluster: Any) -> None:
    """Bug 2b. The half-open trial's checkout hit PoolTimeout (max_size=1, the only
    connection held elsewhere): the trial was never reported, available() stayed False,
    and no read went there again. Before the fix: the breaker stayed "half-open" for good
    after the connection was given back.
    """
    replica, other = cluster.replicas
    with behind_proxy(replica) as (proxy, proxied):
        router = Router(cluster.primary.url, [{"url": proxied, "name": "target"}, other.url], fail_max=1,
                        reset_timeout=RESET, health_interval=INTERVAL, connect_timeout=2, min_size=1, max_size=1,
                        acquire_timeout=0.3)
        try:
            target = next(n for n in router.replicas if n.name == "target")
            exhausted = threading.Event()
            router.on("pool_exhausted", lambda event: exhausted.set() if event.node == "target" else None)
            take_down(router, proxy, "target")
            proxy.pass_through()
            held = acquire_soon(target.pool)  # by another user of the pool, outside the router
            try:
                deadline = time.monotonic() + RESET + 3
                while not exhausted.is_set() and time.monotonic() < deadline:
                    router.read("SELECT 1")  # the trial waits for the held connection and times out
                assert exhausted.is_set(), "no read tried the node while its only connection was held"
            finally:
                target.pool.release(held)
            released_at = time.monotonic()
            assert_closed_by(router, "target", released_at + RESET + 2 * INTERVAL + SLACK)
            assert_serves_reads(router, cluster, replica.port)
        finally:
            assert close_within(router)


@pytest.mark.proxy
@pytest.mark.parametrize("role", ["replica", "primary"])
def test_node_that_only_the_monitor_reaches_comes_back(cluster: Any, role: str) -> None:
    """Bug 2c. With no traffic of its own (a replica nobody reads from, a primary with no
    writes), only the monitor's probes reach the node, and a successful probe never
    reported success to the breaker. Before the fix: stats() kept showing the breaker
    "open" long after the node answered probes again.
    """
    node = cluster.replicas[0] if role == "replica" else cluster.primary
    with behind_proxy(node) as (proxy, proxied):
        target = {"url": proxied, "name": "target"}
        if role == "replica":
            router = Router(cluster.primary.url, [target, cluster.replicas[1].url], fail_max=1, reset_timeout=RESET,
                            health_interval=INTERVAL, connect_timeout=2, min_size=1, max_size=4)
        else:
            router = Router(target, [r.url for r in cluster.replicas], fail_max=1, reset_timeout=RESET,
                            health_interval=INTERVAL, connect_timeout=2, min_size=1, max_size=4)
        try:
            take_down(router, proxy, "target")
            proxy.pass_through()
            assert_closed_by(router, "target", time.monotonic() + RESET + 2 * INTERVAL + SLACK)
            if role == "replica":
                assert_serves_reads(router, cluster, node.port)
            else:
                with router.transaction() as tx:
                    tx.execute(f"SELECT {port_sql(cluster)}")
                    assert tx.fetchone()[0] == node.port  # type: ignore[index]
        finally:
            assert close_within(router)


@pytest.mark.proxy
def test_primary_back_on_the_same_node_takes_writes_before_its_breaker_timer(cluster: Any) -> None:
    """Issue 14, first bullet. A primary restarted in place (Patroni restarts a crashed
    PostgreSQL and promotes it again) answers probes again while its breaker is still open:
    writes were refused until reset_timeout. The probes that saw it down and now see it
    answer, writable, are the evidence: it takes writes within a couple of probe intervals.
    """
    long_reset = 60.0
    node = cluster.primary
    with behind_proxy(node) as (proxy, proxied):
        router = Router({"url": proxied, "name": "target"}, [r.url for r in cluster.replicas], fail_max=1,
                        reset_timeout=long_reset, health_interval=INTERVAL, connect_timeout=2, failover_wait=0.5,
                        min_size=1, max_size=4)
        try:
            take_down(router, proxy, "target")
            assert wait_until(lambda: not router.stats()["nodes"]["target"]["healthy"], timeout=5), \
                router.stats()["nodes"]["target"]
            proxy.pass_through()
            back = time.monotonic()

            def writes() -> bool:
                try:
                    with router.transaction() as tx:
                        tx.execute(f"SELECT {port_sql(cluster)}")
                        return tx.fetchone()[0] == node.port  # type: ignore[index,no-any-return]
                except dbrouter.NoPrimaryAvailable:
                    return False

            assert wait_until(writes, timeout=5.0), f"no write within 5 s: {router.stats()['nodes']['target']}"
            took = time.monotonic() - back
            assert took < 10 * INTERVAL + 2.0 < long_reset, took
            assert breaker_of(router, "target") == "closed"
        finally:
            assert close_within(router)


@pytest.mark.proxy
def test_callers_queued_on_a_node_seen_down_fail_at_once(cluster: Any) -> None:
    """Issue 17 (Django kill-primary-promote on MariaDB). A thread held the primary's only
    connection under one Django alias when the primary died, and asked for another under
    the other alias: new connections were refused, but one was still out, so the pool kept
    it waiting for that one the whole acquire_timeout (2 s), long after the probes had seen
    the node down and a replica had been promoted. A node seen down now fails its pool's
    queued callers with NodeUnavailable, and a writer goes on to the new primary.
    """
    node = cluster.primary
    with behind_proxy(node) as (proxy, proxied):
        router = Router({"url": proxied, "name": "target"}, [r.url for r in cluster.replicas],
                        health_interval=INTERVAL, connect_timeout=2, min_size=0, max_size=1, acquire_timeout=30)
        try:
            target = router.primary
            assert target.name == "target"
            held = acquire_soon(target.pool)  # the connection the same thread holds elsewhere
            outcome: list[BaseException | None] = []
            waiting = threading.Thread(target=lambda: outcome.append(_acquire_error(target.pool)), daemon=True)
            waiting.start()
            assert wait_until(lambda: target.pool.stats()["waiting"] == 1, timeout=5), target.pool.stats()
            proxy.refuse()  # the node goes down, as a killed server does: no new connection, the open ones cut;
            proxy.reset_connections()  # the held one is not used, so no call learns it: only the probes do
            waiting.join(10 * INTERVAL + 5)  # the probes see it in a few intervals; the pool would wait 30 s
            assert not waiting.is_alive(), f"the queued caller still waits: {target.pool.stats()}"
            assert isinstance(outcome[0], NodeUnavailable) and not isinstance(outcome[0], dbrouter.PoolTimeout), outcome
            assert "target" in str(outcome[0]) and "probe" in str(outcome[0]), outcome
            target.pool.release(held, broken=True)
            assert target.pool.stats()["in_use"] == 0
        finally:
            proxy.pass_through()
            assert close_within(router)


def _acquire_error(pool: Any) -> BaseException | None:
    try:
        pool.release(pool.acquire())
    except Exception as exc:  # noqa: BLE001 - the test looks at what it was
        return exc
    return None


# -- bug 3: failures charged to the wrong node ---------------------------------------------


@pytest.mark.proxy
def test_replica_failure_inside_a_transaction_is_not_charged_to_the_primary(cluster: Any, table: str) -> None:
    """Bug 3. Any NodeUnavailable raised inside a transaction() block counted as the loss
    of the primary's connection, even one from a replica, raised by a nested
    connection("read"). Before the fix: the primary's breaker counted a failure and (with
    fail_max=1) opened, its pool discarded its connections, and breaker_open named the
    primary.
    """
    replica = cluster.replicas[0]
    with behind_proxy(replica) as (proxy, proxied):
        # One replica; the monitor probes once at start-up, then stays out of the way, so
        # the replica is still in rotation when the nested read finds it unreachable.
        router = Router(cluster.primary.url, [{"url": proxied, "name": "target"}], fail_max=1, health_interval=60,
                        connect_timeout=2, min_size=0, max_size=4)
        try:
            wait_until(lambda: router.stats()["nodes"]["target"].get("probe_latency") is not None, timeout=5)
            events: list[dbrouter.Event] = []
            router.on("*", events.append)
            primary = router.stats()["primary"]
            discarded = router.stats()["nodes"][primary]["pool"]["discarded"]
            proxy.refuse()
            with pytest.raises(NodeUnavailable), router.transaction() as tx:
                tx.execute(f"INSERT INTO {table} (id, port) VALUES (1, 0)")
                with router.connection("read"):
                    pytest.fail("the replica refuses connections: the checkout should have failed")
            stats = router.stats()
            ours = stats["nodes"][primary]
            assert (ours["breaker"], ours["breaker_failures"]) == ("closed", 0), ours
            assert ours["pool"]["discarded"] == discarded, ours["pool"]
            assert [e for e in events if e.name.startswith("breaker_") and e.node == primary] == []
            assert stats["nodes"]["target"]["breaker"] == "open"  # charged to the node that failed
            # ... and it says why: the refused connect, in stats() and in the event.
            why = stats["nodes"]["target"]["breaker_last_failure"]
            assert why is not None and why.startswith("ConnectError: cannot connect to "), why
            expected = [f"circuit breaker closed -> open (last failure: {why})"]
            assert wait_until(lambda: [e.message for e in events if e.name == "breaker_open" and e.node == "target"]
                              == expected, timeout=5), events
            router.write(f"INSERT INTO {table} (id, port) VALUES (2, 0)")  # the primary takes writes at once
            assert cluster.primary.query(f"SELECT id FROM {table}") == [(2,)]  # the failed block rolled back
        finally:
            proxy.pass_through()
            assert close_within(router)


# -- bug 4: WriteOutcomeUnknown after a COMMIT that returned -------------------------------


def session_alive(cluster: Any, session_id: int) -> bool:
    if cluster.engine == "postgres":
        sql = "SELECT count(*) FROM pg_stat_activity WHERE pid = %s"
    else:
        sql = "SELECT count(*) FROM information_schema.PROCESSLIST WHERE ID = %s"
    return int(cluster.primary.query(sql, (session_id,))[0][0]) > 0


def test_session_commit_stands_when_reading_the_position_fails(cluster: Any, table: str,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Bug 4. After COMMIT a session reads the primary's replication position on the same
    connection; when that read failed with a connection error, the session raised
    WriteOutcomeUnknown although the COMMIT had returned. The failure is real: the
    position read first terminates its own server session from a side connection, then
    runs, and gets the driver's error. Before the fix: WriteOutcomeUnknown.
    """
    router = Router(cluster.primary.url, [r.url for r in cluster.replicas], health_interval=0.2,
                    connect_timeout=2, min_size=1, max_size=4)
    try:
        adapter = router.primary.adapter
        real_position = adapter.replication_position
        caller = threading.get_ident()  # the monitor's probes use the same adapter: leave them alone
        pending = [True]

        def position_after_losing_the_connection(conn: Any) -> str:
            if pending[0] and threading.get_ident() == caller:
                pending[0] = False
                session_id = backend_id(adapter, conn)
                kill_session(cluster, session_id)
                wait_until(lambda: not session_alive(cluster, session_id), timeout=5)
            return str(real_position(conn))

        monkeypatch.setattr(adapter, "replication_position", position_after_losing_the_connection)
        with router.session() as session:
            try:
                with session.transaction() as tx:
                    tx.execute(f"INSERT INTO {table} (id, port) VALUES (%s, 0)", (42,))
            except WriteOutcomeUnknown as exc:
                pytest.fail(f"WriteOutcomeUnknown after a COMMIT that returned: {exc}", pytrace=False)
            assert not pending[0], "the session did not read the position after the commit"
            assert cluster.primary.query(f"SELECT id FROM {table} WHERE id = 42") == [(42,)]
            assert session.read(f"SELECT id FROM {table} WHERE id = %s", (42,)) == [(42,)]
    finally:
        assert close_within(router)


# -- bug 5: user code and I/O under locks ----------------------------------------------------


@pytest.mark.proxy
def test_event_listener_does_not_hold_up_the_control_plane(cluster: Any, table: str) -> None:
    """Bug 5a. Monitor events were emitted (listeners and log handlers run) while the
    topology lock was held, so a slow listener stopped everything that needs the control
    plane. Here the primary goes down; its node_down listener starts a thread that reads
    stats() and makes a write with failover_wait=0.5 (which waits for a topology change),
    and waits up to 2 s for that thread to finish. Before the fix: the write was stuck
    on the topology lock until the listener gave up after 2 s.
    """
    with behind_proxy(cluster.primary) as (proxy, proxied):
        router = Router({"url": proxied, "name": "main"}, [r.url for r in cluster.replicas],
                        health_interval=INTERVAL, failover_wait=0.5, connect_timeout=2, min_size=1, max_size=4)
        outcome: dict[str, str] = {}
        finished = threading.Event()

        def use_the_control_plane() -> None:
            try:
                router.stats()
                router.write(f"INSERT INTO {table} (id, port) VALUES (1, 0)")
                outcome["write"] = "ok"
            except Exception as exc:  # noqa: BLE001 - NoPrimaryAvailable is expected: it must only end
                outcome["write"] = type(exc).__name__
            finally:
                finished.set()

        def on_node_down(event: dbrouter.Event) -> None:
            if event.node != "main" or "listener" in outcome:
                return
            outcome["listener"] = "waiting"
            threading.Thread(target=use_the_control_plane, name="control-plane-user", daemon=True).start()
            outcome["listener"] = "the write finished first" if finished.wait(2.0) else "gave up after 2 s"

        router.on("node_down", on_node_down)
        try:
            proxy.refuse()
            proxy.reset_connections()
            assert wait_until(lambda: outcome.get("listener", "waiting") != "waiting", timeout=10), outcome
            assert finished.wait(10), outcome
            assert outcome["listener"] == "the write finished first", outcome
        finally:
            proxy.pass_through()
            assert close_within(router)


class SlowStorage(pybreaker.CircuitMemoryStorage):
    """pybreaker's memory storage whose counter updates take ``delay`` seconds once
    ``slow`` is set, as a Redis round trip to a struggling server would."""

    def __init__(self, delay: float) -> None:
        super().__init__(pybreaker.STATE_CLOSED)
        self.delay = delay
        self.slow = False
        self.entered = threading.Event()
        self.entered_by: int | None = None

    def _round_trip(self) -> None:
        if self.slow:
            self.entered_by = threading.get_ident()
            self.entered.set()
            time.sleep(self.delay)

    def increment_counter(self) -> None:
        self._round_trip()
        super().increment_counter()

    def reset_counter(self) -> None:
        self._round_trip()
        super().reset_counter()


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_slow_shared_storage_does_not_block_other_threads() -> None:
    """Bug 5b. failure() ran pybreaker's storage round trips (Redis, for fleets) under
    the NodeBreaker lock, so one slow round trip stopped every thread that asked the
    breaker. Before the fix: allow() waited for the whole 1 s round trip of another
    thread's failure().
    """
    clock = Clock()
    storage = SlowStorage(delay=1.0)
    breaker = NodeBreaker("n1", BreakerPolicy(fail_max=1, reset_timeout=5.0), clock=clock, storage=storage)
    breaker.failure(OSError("refused"))
    assert breaker.state == "open"
    clock.now += 6.0
    assert breaker.allow()  # the half-open trial
    storage.slow = True
    failing = threading.Thread(target=breaker.failure, args=(OSError("trial refused"),), daemon=True)
    failing.start()
    try:
        assert storage.entered.wait(5), "failure() did not update the storage"
        started = time.monotonic()
        breaker.allow()
        allow_took = time.monotonic() - started
        started = time.monotonic()
        _ = breaker.state
        state_took = time.monotonic() - started
        assert allow_took < 0.5, f"allow() waited {allow_took:.2f}s for another thread's storage round trip"
        assert state_took < 0.5, f"state waited {state_took:.2f}s for another thread's storage round trip"
        assert failing.is_alive(), "the round trip ended before this thread was measured"
    finally:
        failing.join(5)
    assert not failing.is_alive()


def test_keyboard_interrupt_in_failure_is_not_swallowed() -> None:
    """Bug 5c. failure() swallowed every BaseException raised while recording the
    outcome, a KeyboardInterrupt included. A real SIGINT reaches the main thread while
    its failure() waits on a slow storage. Before the fix: failure() returned normally
    and the interrupt was lost.
    """
    storage = SlowStorage(delay=2.0)
    breaker = NodeBreaker("n1", BreakerPolicy(fail_max=3, reset_timeout=5.0), storage=storage)
    main = threading.main_thread().ident
    assert threading.get_ident() == main
    armed = False

    def interrupt(signum: int, frame: Any) -> None:
        # Only while failure() runs: a late signal must not interrupt the rest of the run.
        if armed:
            raise KeyboardInterrupt

    def send_when_inside() -> None:
        if storage.entered.wait(5) and storage.entered_by == main:
            signal.pthread_kill(main, signal.SIGINT)

    previous = signal.signal(signal.SIGINT, interrupt)
    sender = threading.Thread(target=send_when_inside, name="sigint-sender", daemon=True)
    try:
        storage.slow = True
        sender.start()
        started = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            armed = True
            try:
                breaker.failure(OSError("refused"))
            finally:
                armed = False
        # Not timed: after earlier tests loaded the drivers' C libraries, the signal is sometimes
        # handled only once the storage's sleep returns, still inside failure(); either way the
        # interrupt must come out of failure(), which the original swallowed.
        assert time.monotonic() - started < storage.delay + 1.0
    finally:
        sender.join(6)
        signal.signal(signal.SIGINT, previous)
    assert storage.entered_by == main, "failure() did not update the storage from the calling thread"
