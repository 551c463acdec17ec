"""Runtime membership: `Router.add_replica` and `Router.remove_replica` on real clusters.

Under a 16-thread read load: no read fails, an added replica serves within two health
intervals, a removed one gets no read that began after `remove_replica` returned, and
its pool closes once the reads in flight have given their connections back. A stall
detector turns a hang into a failure with every thread's stack.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

import dbrouter
from dbrouter import ConfigurationError, Router, UsageError

from .conftest import port_sql, wait_until
from .test_control_plane import StallDetector, close_within

INTERVAL = 0.5


class ReadLoad:
    """``threads`` readers asking which server answers; every read's start, end, server
    port and error are kept."""

    def __init__(self, router: Router, cluster: Any, threads: int = 16) -> None:
        self.router = router
        self.sql = f"SELECT {port_sql(cluster)}"
        self.reads: list[tuple[float, float, int | None, str | None]] = []
        self.stall = StallDetector(limit=10.0)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._read, name=f"reader-{i}", daemon=True) for i in range(threads)]

    def _read(self) -> None:
        while not self._stop.is_set():
            began = time.monotonic()
            port, error = None, None
            try:
                port = int(self.router.read(self.sql)[0][0])
            except Exception as exc:  # noqa: BLE001 - every failure is counted, and none is allowed
                error = f"{type(exc).__name__}: {exc}"
            with self._lock:
                self.reads.append((began, time.monotonic(), port, error))
            self.stall.progress()

    def __enter__(self) -> ReadLoad:
        self.stall.start()
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)
        self.stall.stop()
        assert not any(t.is_alive() for t in self._threads), "a reader did not stop"
        assert self.stall.report is None, self.stall.report

    def snapshot(self) -> list[tuple[float, float, int | None, str | None]]:
        with self._lock:
            return list(self.reads)

    def first_answer_from(self, port: int) -> float | None:
        return next((end for _, end, answered, _ in self.snapshot() if answered == port), None)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_add_and_remove_a_replica_under_a_16_thread_read_load(cluster: Any) -> None:
    first, late = cluster.replicas
    router = Router(cluster.primary.url, [{"url": first.url, "name": "first"}], health_interval=INTERVAL,
                    connect_timeout=3, min_size=1, max_size=16)
    try:
        assert router.wait_for_probes(timeout=10)
        events: list[dbrouter.Event] = []
        router.on("*", events.append)
        with ReadLoad(router, cluster) as load:
            time.sleep(0.5)
            node = router.add_replica(late.url, name="late")
            added = time.monotonic()
            assert node in router.replicas and router.stats()["nodes"]["late"]["role"] == "replica"
            assert wait_until(lambda: load.first_answer_from(late.port) is not None, timeout=10), router.stats()
            serving_after = load.first_answer_from(late.port) - added  # type: ignore[operator]
            assert serving_after <= 2 * INTERVAL, f"the new replica served {serving_after:.2f}s after add_replica"
            time.sleep(1.0)  # reads spread over all three servers, then the drain

            router.remove_replica("late", timeout=10)
            removed = time.monotonic()
            assert "late" not in router.stats()["nodes"]
            assert node.pool.closed and node.pool.stats()["size"] == 0, node.pool.stats()
            time.sleep(1.0)
        reads = load.snapshot()
        failed = [r for r in reads if r[3] is not None]
        assert not failed, f"{len(failed)} of {len(reads)} reads failed, e.g. {failed[:3]}"
        late_after = [r for r in reads if r[2] == late.port and r[0] >= removed]
        assert not late_after, f"{len(late_after)} reads began after remove_replica and went to the removed node"
        assert sum(1 for r in reads if r[2] == late.port) > 0
        assert sum(1 for r in reads if r[0] >= removed) > 100, "the load did not go on after the removal"
        names = [(e.name, e.node) for e in events if e.name in ("node_added", "node_removed")]
        assert names == [("node_added", "late"), ("node_removed", "late")]
    finally:
        assert close_within(router)


@pytest.mark.timeout(60)
def test_remove_replica_lets_a_read_in_flight_finish_then_closes_the_pool(cluster: Any) -> None:
    replica = cluster.replicas[0]
    sleep = "SELECT pg_sleep(1.0), 1" if cluster.engine == "postgres" else "SELECT SLEEP(1.0), 1"
    router = Router(cluster.primary.url, [{"url": replica.url, "name": "r"}], health_interval=INTERVAL,
                    min_size=0, max_size=4)
    try:
        assert router.wait_for_probes(timeout=10)
        result: list[Any] = []
        slow = threading.Thread(target=lambda: result.append(router.read(sleep, unchecked=True, idempotent=True)),
                                daemon=True)
        slow.start()
        assert wait_until(lambda: router.stats()["nodes"]["r"]["pool"]["in_use"] == 1, timeout=5)
        began = time.monotonic()
        router.remove_replica("r", timeout=10)
        waited = time.monotonic() - began
        slow.join(5)
        assert result and result[0][0][1] == 1, "the read in flight did not finish"
        assert 0.3 < waited < 5, f"remove_replica returned after {waited:.2f}s, not once the read was done"
        stats = router.stats()
        assert list(stats["nodes"]) == [router.primary.name]
        # No replica left: reads go to the primary (fallback_to_primary), and none fails.
        assert router.read(f"SELECT {port_sql(cluster)}")[0][0] == cluster.primary.port
    finally:
        assert close_within(router)


@pytest.mark.timeout(60)
def test_membership_errors_name_the_problem_and_change_nothing(cluster: Any) -> None:
    replica = cluster.replicas[0]
    router = Router(cluster.primary.url, [{"url": replica.url, "name": "r"}], health_interval=INTERVAL, open=False)
    with pytest.raises(UsageError, match="not open"):
        router.add_replica(cluster.replicas[1].url, name="x")
    router.open()
    try:
        with pytest.raises(ConfigurationError, match="already in the router"):
            router.add_replica(cluster.replicas[1].url, name="r")
        other = "mariadb://u:secretpw@127.0.0.1:3306/db" if cluster.engine == "postgres" else \
            "postgresql://u:secretpw@127.0.0.1:5432/db"
        with pytest.raises(ConfigurationError, match="one router serves one engine") as err:
            router.add_replica(other)
        assert "secretpw" not in str(err.value)
        with pytest.raises(ConfigurationError, match="no node called 'nope'.*nodes: "):
            router.remove_replica("nope")
        with pytest.raises(UsageError, match="is the primary"):
            router.remove_replica(router.primary.name)
        assert sorted(router.stats()["nodes"]) == sorted([router.primary.name, "r"])
        # A name can come back once it is gone.
        router.remove_replica("r")
        router.add_replica(replica.url, name="r")
        assert wait_until(lambda: router.stats()["nodes"]["r"]["serving_reads"], timeout=5), router.stats()
    finally:
        assert close_within(router)
    with pytest.raises(UsageError, match="closed"):
        router.add_replica(replica.url, name="y")


@pytest.mark.timeout(60)
def test_a_replica_added_while_down_takes_no_reads_and_fails_none(cluster: Any) -> None:
    from .conftest import free_low_port

    router = Router(cluster.primary.url, [{"url": cluster.replicas[0].url, "name": "r"}], health_interval=INTERVAL,
                    connect_timeout=2)
    try:
        assert router.wait_for_probes(timeout=10)
        dead = cluster.replicas[1].url.replace(f":{cluster.replicas[1].port}/", f":{free_low_port()}/")
        router.add_replica(dead, name="dead")
        for _ in range(200):
            assert router.read(f"SELECT {port_sql(cluster)}")[0][0] != 0
        assert wait_until(lambda: router.stats()["nodes"]["dead"]["last_error"] not in (None, "not probed yet"),
                          timeout=5)
        stats = router.stats()["nodes"]["dead"]
        assert not stats["healthy"] and not stats["serving_reads"], stats
    finally:
        assert close_within(router)
