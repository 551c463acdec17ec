"""Slow-replica ejection (issue 15, part 4) on real servers: one replica behind a fault
proxy that adds latency is taken out of rotation, under every balancing policy, and
comes back once its time out is over and it is fast again."""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Any, Iterator

import pytest

import dbrouter
from dbrouter import Router
from dbrouter.faultproxy import FaultProxy

from .conftest import free_low_port, port_sql, wait_until
from .test_control_plane import StallDetector, close_within


@contextlib.contextmanager
def proxied_pair(cluster: Any) -> Iterator[tuple[FaultProxy, list[dict[str, str]]]]:
    """Both replicas behind a proxy each, so that only the injected latency tells them apart:
    the slow one's proxy, and the replica entries ``fast`` and ``slow`` for a Router."""
    fast, slow = cluster.replicas
    with FaultProxy(upstream=("127.0.0.1", slow.port), listen_port=free_low_port()) as proxy, \
            FaultProxy(upstream=("127.0.0.1", fast.port), listen_port=free_low_port()) as twin:
        yield proxy, [{"url": fast.url.replace(f":{fast.port}/", f":{twin.port}/"), "name": "fast"},
                      {"url": slow.url.replace(f":{slow.port}/", f":{proxy.port}/"), "name": "slow"}]


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("policy", ["round_robin", "random", "least_outstanding", "latency"])
def test_a_slow_replica_is_ejected_and_comes_back_when_fast(pg_cluster: Any, policy: str) -> None:
    slow = pg_cluster.replicas[1]
    with proxied_pair(pg_cluster) as (proxy, replicas):
        router = Router(pg_cluster.primary.url, replicas,
                        policy=policy, slow_replica_ratio=3, slow_replica_ejection=1.0, health_interval=0.2)
        events: list[dbrouter.Event] = []
        router.on("*", lambda event: events.append(event) if event.name.startswith("slow_") else None)
        answers: list[tuple[float, int]] = []
        failures: list[BaseException] = []
        stop = threading.Event()
        stall = StallDetector(limit=10.0).start()

        def read() -> None:
            while not stop.is_set():
                try:
                    answers.append((time.monotonic(), int(router.read(f"SELECT {port_sql(pg_cluster)}")[0][0])))
                except Exception as exc:  # noqa: BLE001 - none is allowed
                    failures.append(exc)
                stall.progress()

        readers = [threading.Thread(target=read, daemon=True) for _ in range(4)]
        try:
            assert router.wait_for_probes(timeout=10)
            proxy.latency(0.05)
            for reader in readers:
                reader.start()
            assert wait_until(lambda: any(e.name == "slow_ejected" for e in events), timeout=15), router.stats()
            ejected = next(e for e in events if e.name == "slow_ejected")
            assert ejected.node == "slow" and ejected.data["latency"] > 3 * ejected.data["median"]
            assert router.stats()["nodes"]["slow"]["slow_ejected"]
            out_at = time.monotonic()
            time.sleep(0.5)
            late = [t for t, port in answers if port == slow.port and t > out_at + 0.3]
            assert not late, f"{len(late)} reads answered by the slow replica while it was out"

            proxy.pass_through()
            assert wait_until(lambda: any(e.name == "slow_restored" for e in events), timeout=15)
            back = time.monotonic()
            # Back in rotation and serving its share (on this shared 2-core machine a burst of
            # scheduling delays can still cost it another short time out, never for good).
            assert wait_until(lambda: sum(1 for t, port in answers if port == slow.port and t > back) >= 50
                              and router.stats()["nodes"]["slow"]["serving_reads"], timeout=15), router.stats()
        finally:
            stop.set()
            for reader in readers:
                reader.join(10)
            stall.stop()
            assert close_within(router)
        assert stall.report is None, stall.report
        assert not failures, failures[:3]


def test_the_options_are_checked() -> None:
    url = "postgresql://app@127.0.0.1:1/app"
    for options, message in [({"slow_replica_ratio": 1}, "slow_replica_ratio must be > 1 and <= 1000 or None"),
                             ({"slow_replica_ejection": 0}, "slow_replica_ejection must be > 0"),
                             ({"slow_replica_margin": -1}, "slow_replica_margin must be >= 0")]:
        with pytest.raises(dbrouter.ConfigurationError, match=message):
            Router(url, open=False, **options)


@pytest.mark.timeout(120)
def test_rare_stalls_do_not_eject_a_replica(pg_cluster: Any) -> None:
    """1 in 20 of one replica's replies 200 ms late: its median read time is unchanged and it
    stays in rotation (a moving average judged it 10x slower and ejected it); made 10x slower
    throughout, it goes."""
    with proxied_pair(pg_cluster) as (proxy, replicas):
        router = Router(pg_cluster.primary.url, replicas,
                        slow_replica_ratio=3, slow_replica_margin=0.001, health_interval=0.1)
        ejected: list[dbrouter.Event] = []
        router.on("slow_ejected", ejected.append)
        try:
            proxy.spikes(0.05, 0.2)
            until = time.monotonic() + 4.0  # 40 probe rounds
            while time.monotonic() < until:
                router.read("SELECT 1")
            assert ejected == [], [e.message for e in ejected]
            proxy.latency(0.005)  # every reply 5 ms late: many times the other's sub-ms reads
            assert wait_until(lambda: router.read("SELECT 1") is not None and bool(ejected), timeout=10), \
                router.stats()["nodes"]
            assert ejected[0].node == "slow"
        finally:
            proxy.pass_through()
            assert close_within(router)
