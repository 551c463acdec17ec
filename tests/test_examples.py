"""The scripts in examples/: each one runs against the suite's clusters and prints what it claims.

Every example except the Flask app runs as a subprocess, exactly as a user would run
it, with DBROUTER_PRIMARY / DBROUTER_REPLICAS pointing at the session cluster; the
Flask app is driven in-process through Flask's test client. The tests check the
printed lines against what they know of the cluster (which port is the primary,
which are replicas, how many rows were written), and that each example dropped
the tables it created.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from dbrouter.cluster import LocalCluster

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TIMEOUT = 90  # seconds per example run: a hang fails the test instead of stalling the suite


def cluster_env(cluster: LocalCluster | None) -> dict[str, str]:
    """This process's environment without DBROUTER_* settings, plus the cluster's URLs."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("DBROUTER_")}
    if cluster is not None:
        env["DBROUTER_PRIMARY"] = cluster.primary.url
        env["DBROUTER_REPLICAS"] = ",".join(node.url for node in cluster.replicas)
    return env


def run_example(script: str, *args: str, cluster: LocalCluster | None) -> str:
    """Run examples/<script> and return its stdout; fail with its output unless it exits 0."""
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        cwd=EXAMPLES.parent, env=cluster_env(cluster), capture_output=True, text=True, timeout=TIMEOUT,
    )
    assert proc.returncode == 0, f"{script} exited {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    return proc.stdout


def line(output: str, pattern: str) -> re.Match[str]:
    """The first line of ``output`` matching ``pattern`` (a regex searched in each line)."""
    for text in output.splitlines():
        found = re.search(pattern, text)
        if found:
            return found
    raise AssertionError(f"no line matches {pattern!r} in:\n{output}")


def tables(cluster: LocalCluster) -> set[str]:
    """The application tables on the primary (to check that an example dropped its own)."""
    if cluster.engine == "postgres":
        rows = cluster.primary.query("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    else:
        rows = cluster.primary.query("SHOW TABLES")
    return {str(row[0]) for row in rows}


@pytest.fixture
def leaves_no_tables(cluster: LocalCluster) -> Any:
    before = tables(cluster)
    yield
    assert tables(cluster) == before, "the example left tables behind"


def ports(cluster: LocalCluster) -> tuple[int, set[int]]:
    return cluster.primary.port, {node.port for node in cluster.replicas}


# -- subprocess examples, both engines ---------------------------------------------------


def test_examples_readme_lists_every_example() -> None:
    listed = (EXAMPLES / "README.md").read_text()
    scripts = sorted(p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_"))
    assert scripts, "no examples found"
    for name in scripts:
        assert f"examples/{name}" in listed, f"examples/README.md does not mention {name}"


def test_quickstart(cluster: LocalCluster, leaves_no_tables: None) -> None:
    out = run_example("quickstart.py", cluster=cluster)
    primary, replicas = ports(cluster)
    assert "starting a local" not in out  # it used the cluster it was given
    assert "wrote 3 rows on the primary" in out
    assert line(out, r"^read 3 rows from a replica: ")
    assert line(out, r"^session: wrote 1 row, read it back at once: 4 rows$")
    assert int(line(out, r"writes served by port (\d+) \(primary\)")[1]) == primary
    served = {int(p) for p in line(out, r"^reads served by port\(s\) ([\d, ]+) \(replicas\)$")[1].split(", ")}
    assert served and served <= replicas, f"reads served by {served}, replicas are {replicas}"
    stats = line(out, r"^stats: reads=(\d+) writes=(\d+) retries=(\d+) fallbacks=(\d+) primary=(\S+)$")
    assert int(stats[1]) >= 8 and int(stats[2]) == 7 and int(stats[4]) == 0
    assert stats[5] == f"127.0.0.1:{primary}"


@pytest.mark.slow
@pytest.mark.postgres
def test_quickstart_starts_its_own_cluster_without_environment() -> None:
    out = run_example("quickstart.py", cluster=None)
    assert "DBROUTER_PRIMARY is not set: starting a local postgres primary + 2 replicas" in out
    primary = int(line(out, r"writes served by port (\d+) \(primary\)")[1])
    served = {int(p) for p in line(out, r"^reads served by port\(s\) ([\d, ]+) \(replicas\)$")[1].split(", ")}
    assert primary not in served


@pytest.mark.slow
def test_bulk_insert(cluster: LocalCluster, leaves_no_tables: None) -> None:
    out = run_example("bulk_insert.py", "--rows", "50000", "--batch-size", "2000", "--threaded-rows", "2000",
                      cluster=cluster)
    assert line(out, r"^write_many: 50000 rows in [\d.]+s \([\d,]+ rows/s, batches of 2000, 4 workers\)$")
    assert line(out, r"^thread pool: 2000 rows by 8 workers, one router\.write each")
    assert line(out, r"^total on the primary: 52000 rows \(expected 52000\)$")
    pool = line(out, r"^primary pool: (\d+) connections open \(max (\d+)\), (\d+) checkouts, (\d+) timeouts$")
    assert int(pool[1]) <= int(pool[2]) and int(pool[4]) == 0
    # 25 write_many batches + 2,000 single writes + CREATE + the check, at least
    assert int(pool[3]) >= 25 + 2000 + 2


def test_read_your_writes(cluster: LocalCluster, leaves_no_tables: None) -> None:
    out = run_example("read_your_writes.py", "--rounds", "100", cluster=cluster)
    primary, replicas = ports(cluster)
    assert line(out, r"^outside a session: \d+ of 100 reads missed the write just made")
    assert line(out, r"^inside router\.session\(\): stale reads: 0 of 100$")
    served = {int(m[1]): (m[2], int(m[3])) for m in re.finditer(r"served by port (\d+) \((\w+)\): (\d+) reads", out)}
    assert sum(count for _role, count in served.values()) == 100
    for port, (role, _count) in served.items():
        assert (port == primary and role == "primary") or (port in replicas and role == "replica"), served


def test_prometheus_metrics(cluster: LocalCluster, leaves_no_tables: None) -> None:
    out = run_example("prometheus_metrics.py", cluster=cluster)
    primary, replicas = ports(cluster)
    assert line(out, r"^metrics at http://127\.0\.0\.1:\d+/metrics$")
    acquired = {int(m[1]): float(m[2]) for m in
                re.finditer(r'^dbrouter_pool_acquired_total\{node="127\.0\.0\.1:(\d+)",router="default"\} (\S+)$', out, re.M)}
    assert set(acquired) == {primary, *replicas}
    assert acquired[primary] >= 7  # CREATE, 5 INSERTs, DROP
    assert sum(acquired[p] for p in replicas) >= 20
    assert float(line(out, r'^dbrouter_reads_total\{router="default"\} (\S+)$')[1]) == 20
    assert float(line(out, r'^dbrouter_writes_total\{router="default"\} (\S+)$')[1]) == 7
    assert float(line(out, rf'^dbrouter_node_primary\{{node="127\.0\.0\.1:{primary}",router="default"\}} (\S+)$')[1]) == 1


# -- the Flask app, in-process -------------------------------------------------------------


def load_flask_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("example_flask_app", EXAMPLES / "flask_app.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flask_app(cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch, leaves_no_tables: None) -> None:
    for key, value in cluster_env(cluster).items():
        if key.startswith("DBROUTER_"):
            monkeypatch.setenv(key, value)
    module = load_flask_example()
    table = f"flask_items_{uuid.uuid4().hex[:8]}"
    app = module.create_app(table=table)
    router = app.extensions["dbrouter"]
    try:
        client = app.test_client()
        primary, _replicas = ports(cluster)

        assert client.post("/items", json={}).status_code == 400
        created = client.post("/items", json={"name": "pen"})
        assert created.status_code == 201
        pen = created.get_json()
        assert pen["name"] == "pen" and len(pen["id"]) == 32

        # echo=1 reads the row back from the database in a session: never missing.
        echoed = client.post("/items?echo=1", json={"name": "ink"})
        assert echoed.status_code == 201
        ink = echoed.get_json()
        assert ink["name"] == "ink"

        # Right after the write: a replica may lag, the primary is asked before a 404.
        got = client.get(f"/items/{ink['id']}")
        assert got.status_code == 200 and got.get_json() == ink
        assert client.get("/items/no-such-item").status_code == 404

        # The list comes from a replica: eventually it has both.
        deadline = time.monotonic() + 10
        while True:
            listed = client.get("/items")
            assert listed.status_code == 200
            if listed.get_json() == [ink, pen]:
                break
            assert time.monotonic() < deadline, f"replica list never caught up: {listed.get_json()}"
            time.sleep(0.02)

        health = client.get("/healthz")
        assert health.status_code == 200
        body = health.get_json()
        assert body["ok"] is True and body["primary"] == f"127.0.0.1:{primary}"
        assert {node["role"] for node in body["nodes"].values()} == {"primary", "replica"}
        assert body["writes"] >= 3 and body["reads"] >= 3

        metrics = client.get("/metrics")
        assert metrics.status_code == 200 and metrics.content_type.startswith("text/plain")
        text = metrics.get_data(as_text=True)
        assert re.search(r'^dbrouter_writes_total\{router="default"\} [1-9]', text, re.M)
        assert re.search(rf'^dbrouter_pool_acquired_total\{{node="127\.0\.0\.1:{primary}",router="default"\}} [1-9]', text, re.M)
    finally:
        router.write(f"DROP TABLE IF EXISTS {table}")
        router.close()


# -- the failover drill: its own cluster, PostgreSQL only --------------------------------------


@pytest.mark.slow
@pytest.mark.postgres
def test_failover_drill(tmp_path: Path) -> None:
    out = run_example("failover_drill.py", "--engine", "postgres", "--duration", "6", "--out", str(tmp_path),
                      cluster=None)
    json_path = tmp_path / "dbrouter-drill-kill-primary-promote.json"
    html_path = tmp_path / "dbrouter-drill-kill-primary-promote.html"
    assert line(out, r"^JSON report: (.+)$")[1] == str(json_path)
    assert line(out, r"^HTML chart: (.+)$")[1] == str(html_path)
    assert json_path.is_file() and html_path.is_file()
    assert "<html" in html_path.read_text().lower()
    results = json.loads(json_path.read_text())["results"]

    # Killing the primary must not cost a single read: the replicas keep serving.
    assert line(out, r"^read availability: ([\d.]+)%")[1] == "100.0"
    assert results["read_availability"] == 100.0
    # The printed headline numbers are the report's.
    assert float(line(out, r"^write downtime: ([\d.]+)s")[1]) == pytest.approx(results["write_unavailability"], abs=0.005)
    assert 0 < results["write_unavailability"] < 6
    assert int(line(out, r"^lost writes: (\d+)")[1]) == results["lost_writes"]
    assert results["writes"] > 0 and results["acknowledged_writes"] > 0
