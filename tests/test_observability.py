"""Statistics, events, the Prometheus exporter and `dbrouter status`, against real clusters."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dbrouter import PoolTimeout, Router
from dbrouter.cli import write_router_config
from dbrouter.cluster import make_cluster
from dbrouter.metrics import start_http_server
from dbrouter.status import node_rows, render_table
from dbrouter.workload import Workload

from .conftest import ENGINES, both_drivers, wait_until

PASSWORD = "observed-pw-4242"  # the password of the clusters this module starts: must never show up


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """name + sorted labels -> value, from a real HTTP scrape."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert PASSWORD not in text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    key = (name, tuple(sorted({"router": "default", **labels}.items())))
    return samples[key]


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_exporter_numbers_move_through_a_workload_and_two_failovers(engine: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="dbrouter")
    cluster = make_cluster("postgres" if engine == "postgres" else "mariadb", replicas=2, password=PASSWORD).start()
    events: list[str] = []
    try:
        router = Router(cluster.primary.url, [n.url for n in cluster.replicas], health_interval=0.2,
                        connect_timeout=2, fail_max=2, reset_timeout=30, min_size=1, max_size=4)
        router.on("*", lambda e: events.append(f"{e.name}:{e.node}"))
        server = start_http_server(router, port=0)
        workload = Workload(router, threads=4, write_ratio=0.3, duration=60)
        workload.prepare()
        cluster.wait_replicated()
        names = {n.address.port: n.name for n in router.nodes}
        first = scrape(server.port)
        workload.start()
        time.sleep(1.0)
        second = scrape(server.port)
        old = cluster.primary
        for node_name in names.values():
            assert value(second, "dbrouter_pool_acquired_total", node=node_name) >= value(first, "dbrouter_pool_acquired_total", node=node_name)
        total = lambda s: sum(value(s, "dbrouter_pool_acquired_total", node=n) for n in names.values())  # noqa: E731
        assert total(second) > total(first) + 50
        assert value(second, "dbrouter_reads_total") > value(first, "dbrouter_reads_total")
        assert value(second, "dbrouter_acquire_seconds_count", node=names[old.port]) > 0
        assert value(second, "dbrouter_breaker_state", node=names[old.port]) == 0
        assert value(second, "dbrouter_failovers_total") == 0

        for expected_failovers in (1, 2):
            old = cluster.primary
            old.kill()
            def seen_down() -> bool:
                samples = scrape(server.port)
                return (value(samples, "dbrouter_breaker_state", node=names[old.port]) == 1
                        and value(samples, "dbrouter_node_up", node=names[old.port]) == 0)
            assert wait_until(seen_down, 5)
            new = cluster.most_advanced()  # a replica ahead of the new primary could not follow it
            cluster.promote(new)
            assert wait_until(lambda: value(scrape(server.port), "dbrouter_node_primary", node=names[new.port]) == 1, 5)
            time.sleep(0.5)
            after = scrape(server.port)
            assert value(after, "dbrouter_failovers_total") == expected_failovers
            assert value(after, "dbrouter_breaker_state", node=names[old.port]) == 1
            assert value(after, "dbrouter_node_primary", node=names[old.port]) == 0
        assert workload.stop(timeout=15)
        assert value(scrape(server.port), "dbrouter_writes_total") > 0
        assert events.count(f"failover:{names[cluster.primary.port]}") == 1
        assert sum(e.startswith("failover:") for e in events) == 2
        assert any(e.startswith("breaker_open:") for e in events)
    finally:
        server.stop()
        router.close()
        cluster.destroy()
    dbrouter_logs = [r for r in caplog.records if r.name.startswith("dbrouter")]
    assert any("failover" in r.getMessage() for r in dbrouter_logs)
    assert all(PASSWORD not in r.getMessage() for r in caplog.records)


@both_drivers
def test_stats_snapshot_has_every_number(cluster: Any, driver: str, mysql_pure: bool) -> None:
    option = driver
    if cluster.engine == "postgres":
        driver = driver or "psycopg2"
    else:
        driver = "mysql-connector (pure Python)" if mysql_pure else "mysql-connector (C extension)"
    with Router(cluster.primary.url, [n.url for n in cluster.replicas], health_interval=0.2, driver=option) as router:
        router.read("SELECT 1")
        router.write("SELECT 1")
        router.wait_for_probes(1)
        stats = router.stats()
        assert {"reads", "writes", "retries", "fallbacks", "failovers", "write_outcome_unknown", "primary", "nodes"} <= set(stats)
        assert stats["reads"] == 1 and stats["writes"] == 1
        for info in stats["nodes"].values():
            assert {"role", "healthy", "breaker", "lag", "latency", "pool"} <= set(info)
            assert {"size", "idle", "in_use", "waiting", "acquired", "timeouts", "connect_errors", "opened", "closed",
                    "discarded", "acquire_wait_p50", "acquire_wait_p99"} <= set(info["pool"])
            assert info["healthy"] and info["breaker"] == "closed"
            assert info["driver"] == driver
        assert cluster.password not in repr(router) and cluster.password not in json.dumps(stats, default=str)
        rows = node_rows(router)  # what `dbrouter status` prints
        assert [row["driver"] for row in rows] == [driver] * len(rows)
        assert render_table(rows).splitlines()[-1] == f"driver: {driver}"


def test_pool_exhaustion_and_leak_events(cluster: Any) -> None:
    events: list[Any] = []
    with Router(cluster.primary.url, max_size=1, min_size=0, acquire_timeout=0.2, leak_threshold=0.2,
                maintenance_interval=0.05, health_interval=5) as router:
        router.on("pool_exhausted", events.append)
        router.on("leak", events.append)
        with router.connection("write"):
            with pytest.raises(PoolTimeout):
                router.write("SELECT 1")
            assert wait_until(lambda: any(e.name == "leak" for e in events), 3)
        exhausted = [e for e in events if e.name == "pool_exhausted"]
        assert len(exhausted) == 1 and exhausted[0].node == router.primary.name
        leak = next(e for e in events if e.name == "leak")
        assert "test_observability.py" in leak.message


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_status_command_shows_roles_before_and_after_a_promotion(engine: str, tmp_path: Path) -> None:
    cluster = make_cluster("postgres" if engine == "postgres" else "mariadb", replicas=2, password=PASSWORD).start()
    try:
        config = tmp_path / "dbrouter.toml"
        write_router_config(cluster, config)

        def status(*extra: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "dbrouter.cli", "status", "--config", str(config), *extra],
                                  capture_output=True, text=True, timeout=60)

        before = status("--json")
        assert before.returncode == 0, before.stderr
        doc = json.loads(before.stdout)
        roles = {row["node"]: row["role"] for row in doc["nodes"]}
        primary_name = f"127.0.0.1:{cluster.primary.port}"
        assert roles[primary_name] == "primary" and list(roles.values()).count("replica") == 2
        assert all(row["reachable"] for row in doc["nodes"])
        assert all(row["driver"] for row in doc["nodes"])
        table = status()
        assert table.returncode == 0 and "primary" in table.stdout and PASSWORD not in table.stdout
        assert "driver: " in table.stdout

        old = cluster.primary
        old.kill()
        new = cluster.replicas[1]
        cluster.promote(new)
        after = status("--json")
        assert after.returncode == 3  # a node is unreachable
        doc = json.loads(after.stdout)
        rows = {row["node"]: row for row in doc["nodes"]}
        assert rows[f"127.0.0.1:{new.port}"]["role"] == "primary"
        assert doc["primary"] == f"127.0.0.1:{new.port}"
        assert rows[f"127.0.0.1:{old.port}"]["reachable"] is False
        watch = status("--watch", "0.2", "--count", "2")
        assert watch.stdout.count("node  ") == 2 and "NO" in watch.stdout
    finally:
        cluster.destroy()
