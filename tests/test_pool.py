"""The per-node pool against real servers, both engines."""

from __future__ import annotations

import logging
import signal
import threading
import time

import pytest

import dbrouter
from dbrouter import ConnectError, Pool, PoolConfig, PoolTimeout, Router, connect_pool
from dbrouter.adapters import make_adapter
from dbrouter.url import parse_address

from .conftest import ENGINES, Tagged, backend_id, kill_session, wait_until


def make_pool(tagged: Tagged, **config: object) -> Pool:
    return connect_pool(tagged.url, pool=PoolConfig(**config), connect=tagged.connect_options)


def test_max_waiting_refuses_the_next_caller_at_once_and_serves_the_queued_ones(tagged: Tagged) -> None:
    """Load shedding (issue 15): with max_waiting callers queued, one more is refused with
    TooManyWaiting without waiting for acquire_timeout; the queued ones are served in turn."""
    pool = make_pool(tagged, min_size=1, max_size=1, acquire_timeout=10, max_waiting=2)
    try:
        held = pool.acquire()
        served: list[int] = []
        queued = [threading.Thread(target=lambda i=i: (pool.release(pool.acquire()), served.append(i)), daemon=True)
                  for i in range(2)]
        for thread in queued:
            thread.start()
        assert wait_until(lambda: pool.stats()["waiting"] == 2, timeout=5)
        began = time.monotonic()
        with pytest.raises(dbrouter.TooManyWaiting, match=r"2 callers already waiting .*max_waiting 2") as refused:
            pool.acquire()
        assert time.monotonic() - began < 1.0, "refused only after waiting"
        assert isinstance(refused.value, PoolTimeout) and refused.value.node == pool.name
        assert pool.stats()["rejected"] == 1 and pool.stats()["timeouts"] == 0
        pool.release(held)
        for thread in queued:
            thread.join(5)
        assert sorted(served) == [0, 1]
    finally:
        pool.close()


def test_exhaustion_64_threads_on_4(tagged: Tagged) -> None:
    """Every caller gets a connection or a PoolTimeout after the timeout; sessions stay <= max_size."""
    timeout = 0.4
    pool = make_pool(tagged, min_size=0, max_size=4, acquire_timeout=timeout)
    outcomes: list[tuple[str, float]] = []
    lock = threading.Lock()
    peak = [0]
    stop_sampling = threading.Event()

    def sample() -> None:
        while not stop_sampling.is_set():
            peak[0] = max(peak[0], tagged.sessions())
            time.sleep(0.01)

    def worker() -> None:
        start = time.monotonic()
        try:
            with pool.connection() as conn:
                pool.adapter.execute(conn, "SELECT 1")
                time.sleep(0.1)
            kind = "ok"
        except PoolTimeout as exc:
            assert tagged.node.name in str(exc) or str(tagged.node.port) in str(exc)
            assert "waiting" in str(exc) and "4" in str(exc)
            kind = "timeout"
        with lock:
            outcomes.append((kind, time.monotonic() - start))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    stop_sampling.set()
    sampler.join(timeout=5)
    assert not any(t.is_alive() for t in threads), "a thread is stuck: deadlock"
    assert len(outcomes) == 64
    oks = [d for k, d in outcomes if k == "ok"]
    timeouts = [d for k, d in outcomes if k == "timeout"]
    assert oks and timeouts, outcomes
    for waited in timeouts:
        assert timeout - 0.01 <= waited < timeout + 0.3, waited
    stats = pool.stats()
    assert stats["timeouts"] == len(timeouts)
    assert stats["acquired"] == len(oks)
    assert stats["size"] <= 4
    assert 0 < peak[0] <= 4
    pool.close()
    assert wait_until(lambda: tagged.sessions() == 0)


def test_fifo_no_starvation(tagged: Tagged) -> None:
    """Waiters are served in arrival order: with one connection, threads finish in the order they queued."""
    pool = make_pool(tagged, min_size=1, max_size=1, acquire_timeout=5)
    pool.wait_ready(5)
    order: list[int] = []
    holder = pool.acquire()
    threads = []
    for i in range(8):
        def worker(i: int = i) -> None:
            with pool.connection():
                order.append(i)
        t = threading.Thread(target=worker, daemon=True)
        t.start()
        threads.append(t)
        assert wait_until(lambda: pool.stats()["waiting"] == i + 1, timeout=2)
    pool.release(holder)
    for t in threads:
        t.join(timeout=5)
    assert order == list(range(8))
    pool.close()


def test_killed_connection_is_discarded_on_checkout(cluster, tagged: Tagged) -> None:
    """A session killed server-side fails the liveness check and is replaced."""
    pool = make_pool(tagged, min_size=1, max_size=1, validation_bypass=0.0)
    with pool.connection() as conn:
        first = backend_id(pool.adapter, conn)
    kill_session(cluster, first)
    time.sleep(0.1)
    with pool.connection() as conn:
        second = backend_id(pool.adapter, conn)
    assert second != first
    assert pool.stats()["discarded"] == 1
    pool.close()


def test_killed_connection_failing_a_query_is_never_reused(cluster, tagged: Tagged) -> None:
    """Inside the bypass window there is no ping: the query fails, and the connection is dropped."""
    pool = make_pool(tagged, min_size=1, max_size=1, validation_bypass=60.0)
    with pool.connection() as conn:
        first = backend_id(pool.adapter, conn)
    kill_session(cluster, first)
    time.sleep(0.1)
    with pytest.raises(Exception) as info:
        with pool.connection() as conn:
            backend_id(pool.adapter, conn)
    assert pool.adapter.classify(info.value) is dbrouter.adapters.ErrorKind.UNREACHABLE
    with pool.connection() as conn:
        assert backend_id(pool.adapter, conn) != first
    assert pool.stats()["discarded"] == 1
    pool.close()


def test_max_lifetime_retires_connections(tagged: Tagged) -> None:
    pool = make_pool(tagged, min_size=1, max_size=2, max_lifetime=0.5, maintenance_interval=0.05)
    with pool.connection() as conn:
        first = backend_id(pool.adapter, conn)
    time.sleep(0.8)
    with pool.connection() as conn:
        second = backend_id(pool.adapter, conn)
    assert second != first
    assert pool.stats()["closed"] >= 1
    pool.close()


def test_idle_connections_above_min_are_pruned(tagged: Tagged) -> None:
    pool = make_pool(tagged, min_size=1, max_size=4, max_idle=0.3, maintenance_interval=0.05)
    held = [pool.acquire() for _ in range(4)]
    for conn in held:
        pool.release(conn)
    assert pool.stats()["size"] == 4
    assert wait_until(lambda: pool.stats()["size"] == 1, timeout=3)
    assert wait_until(lambda: tagged.sessions() == 1)
    pool.close()


def test_leak_is_reported_with_borrower_stack(tagged: Tagged, caplog: pytest.LogCaptureFixture) -> None:
    pool = make_pool(tagged, min_size=0, max_size=2, leak_threshold=0.2, maintenance_interval=0.05)

    def leaky_borrower() -> object:
        return pool.acquire()

    def reported() -> list[str]:
        return [r.getMessage() for r in caplog.records if "held for" in r.getMessage()]

    with caplog.at_level(logging.WARNING, logger="dbrouter.pool"):
        conn = leaky_borrower()
        assert wait_until(lambda: reported(), timeout=3)  # logged just after it is counted
        time.sleep(0.3)  # several more housekeeping rounds: still reported once
    messages = reported()
    assert pool.stats()["leaks"] == 1
    assert len(messages) == 1
    assert "leaky_borrower" in messages[0] and "test_pool.py" in messages[0]
    pool.release(conn)
    pool.close()


def test_open_transaction_is_rolled_back_on_return(cluster, tagged: Tagged) -> None:
    table = f"{tagged.tag}_tx"
    pool = make_pool(tagged, min_size=1, max_size=1)
    adapter = pool.adapter
    with pool.connection() as conn:
        adapter.execute(conn, f"CREATE TABLE {table} (id int primary key)")
    try:
        with pool.connection() as conn:
            adapter.begin(conn)
            adapter.execute(conn, f"INSERT INTO {table} VALUES (1)")
        with pool.connection() as conn:
            assert adapter.return_state(conn) is dbrouter.adapters.ReturnState.CLEAN
            rows, _ = adapter.execute(conn, f"SELECT count(*) FROM {table}")
            assert rows[0][0] == 0
            # autocommit is back on: this insert is visible from another session.
            adapter.execute(conn, f"INSERT INTO {table} VALUES (2)")
        other = make_adapter(parse_address(tagged.url), tagged.connect_options)
        conn2 = other.connect()
        try:
            rows, _ = other.execute(conn2, f"SELECT id FROM {table}")
            assert rows == [(2,)]
        finally:
            other.close(conn2)
    finally:
        with pool.connection() as conn:
            adapter.execute(conn, f"DROP TABLE {table}")
        pool.close()


def test_close_leaves_no_server_session(tagged: Tagged) -> None:
    pool = make_pool(tagged, min_size=3, max_size=6)
    pool.wait_ready(10)
    held = [pool.acquire() for _ in range(5)]
    assert tagged.sessions() == 5
    closer = threading.Thread(target=pool.close, kwargs={"timeout": 5})
    closer.start()
    time.sleep(0.1)
    for conn in held:
        pool.release(conn)
    closer.join(timeout=10)
    assert not closer.is_alive()
    assert wait_until(lambda: tagged.sessions() == 0)
    with pytest.raises(dbrouter.PoolClosed):
        pool.acquire()


def test_stress_32_threads_500_checkouts_pool_of_8(tagged: Tagged) -> None:
    pool = make_pool(tagged, min_size=2, max_size=8, acquire_timeout=30)
    errors: list[BaseException] = []
    peak = [0]

    def worker() -> None:
        try:
            for _ in range(500):
                with pool.connection() as conn:
                    rows, _ = pool.adapter.execute(conn, "SELECT 1")
                    assert rows == [(1,)]
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(32)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        peak[0] = max(peak[0], pool.stats()["size"])
        time.sleep(0.05)
    assert errors == []
    stats = pool.stats()
    assert stats["acquired"] == 32 * 500
    assert stats["timeouts"] == 0 and stats["discarded"] == 0
    assert peak[0] <= 8 and stats["size"] <= 8
    assert stats["acquire_wait_p99"] >= stats["acquire_wait_p50"] >= 0
    assert tagged.sessions() <= 8
    pool.close()
    assert wait_until(lambda: tagged.sessions() == 0)


def test_lock_free_paths_race_invalidate_housekeeping_and_close(tagged: Tagged) -> None:
    """Checkouts and returns take no lock: hammer them while the pool is invalidated, pruned
    and finally closed. No connection is ever held by two threads, the bookkeeping adds up,
    and nothing is left open on the server."""
    pool = make_pool(tagged, min_size=2, max_size=6, acquire_timeout=10, max_idle=0.01,
                     maintenance_interval=0.01)
    pool.wait_ready(10)
    held: set[int] = set()
    held_lock = threading.Lock()
    errors: list[BaseException] = []
    closing = threading.Event()
    done = [0]

    def worker() -> None:
        while not closing.is_set():  # stop after the op under way: returns race close()
            try:
                with pool.connection() as conn:
                    with held_lock:
                        assert id(conn) not in held, "one connection handed to two threads"
                        held.add(id(conn))
                    pool.adapter.execute(conn, "SELECT 1")
                    with held_lock:
                        held.discard(id(conn))
                        done[0] += 1
            except dbrouter.PoolClosed:
                assert closing.is_set()
                return
            except BaseException as exc:  # noqa: BLE001 - collected and asserted below
                errors.append(exc)
                return

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(12)]
    for t in threads:
        t.start()
    deadline, limit = time.monotonic() + 1.5, time.monotonic() + 15
    # At least 1.5 s and 100 checkouts raced (a loaded machine takes longer to make them).
    while time.monotonic() < deadline or (done[0] <= 100 and time.monotonic() < limit):
        pool.invalidate("test")
        time.sleep(0.02)
    with pool._lock:  # every open connection is idle, borrowed, or moving between the two
        size, idle, in_use = pool._open, len(pool._idle), len(pool._in_use)
    assert idle + in_use <= size <= idle + in_use + len(threads)
    closing.set()
    pool.close(timeout=5)
    for t in threads:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in threads), "a thread is stuck"
    assert errors == []
    assert done[0] > 100
    assert pool.stats()["size"] == 0
    assert wait_until(lambda: tagged.sessions() == 0)


def test_pool_dropped_without_close_closes_its_connections(tagged: Tagged) -> None:
    """No close(), no gc.collect(): the last reference going is enough."""
    pool = make_pool(tagged, min_size=3, max_size=3)
    pool.wait_ready(10)
    assert tagged.sessions() == 3
    del pool
    assert wait_until(lambda: tagged.sessions() == 0, timeout=2)


def test_interrupted_wait_leaves_the_queue(tagged: Tagged) -> None:
    """Ctrl-C while waiting for a connection: the next return is not handed to the dead waiter."""
    pool = make_pool(tagged, min_size=1, max_size=1, acquire_timeout=5)
    pool.wait_ready(10)
    held = pool.acquire()
    # A real SIGINT to this (the main) thread: it cuts the blocked wait short, as Ctrl-C does.
    # Python's own handler is installed for it: a process started in the background by a
    # shell inherits SIGINT ignored, and Python then leaves it so.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    interrupter = threading.Timer(0.2, signal.pthread_kill, args=(threading.main_thread().ident, signal.SIGINT))
    interrupter.start()
    started = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            pool.acquire()
    finally:
        interrupter.join()
        signal.signal(signal.SIGINT, previous)
    assert time.monotonic() - started < 2  # interrupted, not timed out
    assert pool.stats()["waiting"] == 0
    pool.release(held)
    again = pool.acquire(timeout=1)  # would time out if the dead waiter had been served
    pool.release(again)
    assert pool.stats()["in_use"] == 0
    pool.close()


def test_release_twice_is_an_error(tagged: Tagged) -> None:
    pool = make_pool(tagged, min_size=0, max_size=1)
    conn = pool.acquire()
    pool.release(conn)
    with pytest.raises(dbrouter.PoolError, match="returned twice"):
        pool.release(conn)
    pool.close()


def test_unreachable_node_fails_fast_not_after_acquire_timeout(cluster) -> None:
    """With no connection to wait for, a refused connect is reported at once."""
    from .test_bad_input import free_port

    url = f"{'postgresql' if cluster.engine == 'postgres' else 'mariadb'}://u:pw@127.0.0.1:{free_port()}/db"
    pool = connect_pool(url, pool=PoolConfig(min_size=0, acquire_timeout=20))
    start = time.monotonic()
    with pytest.raises(ConnectError):
        pool.acquire()
    assert time.monotonic() - start < 5
    assert pool.stats()["connect_errors"] == 1
    pool.close()


@pytest.mark.parametrize("cluster", [ENGINES[1]], indirect=True)
def test_pure_python_connector_gives_every_connection_back(tagged: Tagged) -> None:
    """mysql-connector's pure-Python connection (what an application gets when the C
    extension fails to load) has no ``_server_status``: every return raised, no connection
    came back, and after max_size calls every call was a PoolTimeout. Every kind of call,
    four times over, on a pool of 3: no timeout, no connection lost, no server session left."""
    from mysql.connector.connection import MySQLConnection

    max_size = 3
    url = tagged.url + "?use_pure=true"
    with Router(url, min_size=0, max_size=max_size, acquire_timeout=2, health_interval=60,
                connect_timeout=3, application_name=tagged.tag) as router:
        router.write("CREATE TABLE pure_t (id int primary key, v int)")
        for i in range(4 * max_size):
            assert router.read("SELECT 1") == [(1,)]
            assert router.write("INSERT INTO pure_t VALUES (%s, 0)", (i,)) == 1
            with router.transaction() as tx:
                tx.execute("UPDATE pure_t SET v = v + 1 WHERE id = %s", (i,))
            assert router.write_many("INSERT INTO pure_t VALUES (%s, %s)", [(1000 + 2 * i, 0), (1001 + 2 * i, 0)]) == 2
            with router.session() as session:
                session.write("UPDATE pure_t SET v = v + 1 WHERE id = %s", (i,))
                assert session.read("SELECT v FROM pure_t WHERE id = %s", (i,)) == [(2,)]
            with router.connection("write") as conn:
                assert isinstance(conn, MySQLConnection)
                cur = conn.cursor()
                cur.execute("SELECT count(*) FROM pure_t")
                assert cur.fetchall() == [(i + 1 + 2 * (i + 1),)]
                cur.close()
            assert tagged.sessions() <= max_size
        info = router.stats()["nodes"][router.primary.name]
        assert info["driver"] == "mysql-connector (pure Python)"
        pool = info["pool"]
        assert pool["timeouts"] == 0 and pool["discarded"] == 0 and pool["in_use"] == 0, pool
        assert 1 <= pool["opened"] <= max_size, pool
    assert wait_until(lambda: tagged.sessions() == 0, timeout=5)


def test_connection_whose_state_cannot_be_read_is_discarded_not_kept(tagged: Tagged,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """An adapter that fails to classify a returned connection (as the MySQL adapter once did
    on every pure-Python connection) costs a reconnect per call, never a connection kept out
    of the pool forever and, after max_size calls, a PoolTimeout for everyone."""
    adapter = make_adapter(parse_address(tagged.url), tagged.connect_options)

    def unreadable(conn: object) -> dbrouter.adapters.ReturnState:
        raise AttributeError("no _server_status")

    adapter.return_state = unreadable  # type: ignore[method-assign]
    pool = Pool(adapter, PoolConfig(min_size=0, max_size=2, acquire_timeout=1))
    try:
        for _ in range(5):
            with pool.connection() as conn:
                pool.adapter.execute(conn, "SELECT 1")
        stats = pool.stats()
        assert stats["timeouts"] == 0 and stats["discarded"] == 5 and stats["size"] == 0, stats
        assert wait_until(lambda: tagged.sessions() == 0, timeout=5)
        assert "cannot tell the state of a returned connection" in caplog.text
    finally:
        pool.close()
