"""Failover drills: every built-in scenario on both engines, shell commands, limits, bad input, the demo.

Each drill starts its own local cluster. The test checks the report against
what it observes itself: it reads the written ids back from the primary
before the cluster is torn down.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from dbrouter.cli import write_router_config
from dbrouter.cluster import make_cluster
from dbrouter.drill import SCENARIOS, Drill, DrillOptions
from dbrouter.drill.chart import render_html

pytestmark = pytest.mark.slow

# The scenarios of a local replication cluster (the patroni-* ones are tests/test_patroni.py's).
BUILT_IN = sorted(name for name, scenario in SCENARIOS.items() if name != "shell" and "postgres" in scenario.engines)
CLI = [sys.executable, "-m", "dbrouter.cli"]


def servers_under(path: Path) -> set[int]:
    """PIDs of the postgres / mariadbd processes whose command line names ``path`` (a drill's
    own TMPDIR, so that servers other work on the machine starts are not counted)."""
    pids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                comm = Path(f"/proc/{entry}/comm").read_text().strip()
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if comm in ("postgres", "mariadbd") and str(path) in cmdline:
                pids.add(int(entry))
    return pids


def primary_ids(drill: Drill) -> list[tuple[Any, ...]]:
    """The drill table on the cluster's current primary, read directly (not through the router)."""
    cluster = drill.cluster
    deadline = time.monotonic() + 20
    while True:
        writable = []
        for node in cluster.nodes:
            if not node.running:
                continue
            try:
                if node.query("SELECT pg_is_in_recovery()" if cluster.engine == "postgres" else "SELECT @@read_only") in ([(False,)], [(0,)]):
                    writable.append(node)
            except Exception:  # noqa: BLE001 - a node still restarting
                pass
        if len(writable) == 1:
            return writable[0].query(f"SELECT id FROM {drill.options.table}")
        assert time.monotonic() < deadline, "no single writable node after the drill"
        time.sleep(0.2)


def run(engine: str, scenario: str, tmp_path: Path, **overrides: Any) -> tuple[Any, Drill, list[tuple[Any, ...]]]:
    options = DrillOptions(scenario=scenario, local=engine, duration=4.0, fault_at=1.0, recover_after=1.5,
                           promote_after=0.7, threads=4, out=tmp_path, live=False, latency=0.03)
    for key, value in overrides.items():
        setattr(options, key, value)
    options.validate()
    drill = Drill(options, io.StringIO())
    try:
        report = drill.run()
        rows = primary_ids(drill)
    finally:
        drill.tear_down()
    return report, drill, rows


@pytest.mark.parametrize("engine", ["postgres", "mariadb"])
@pytest.mark.parametrize("scenario", BUILT_IN)
def test_each_scenario_reports_what_the_application_saw(engine: str, scenario: str, tmp_path: Path) -> None:
    # A hang is seen after the statement timeout, lag once it passes max_replica_lag (1 s in
    # drills, measured at each 0.5 s probe): give those faults time to be seen.
    longer = {"duration": 6.0, "recover_after": 3.5} if scenario in ("blackhole-replica", "pause-replication") else {}
    report, drill, rows = run(engine, scenario, tmp_path, **longer)
    results = report.results
    ops = drill.workload.snapshot()
    # The test's own reading of the data agrees with the report.
    lost, duplicated = drill.workload.check_writes(rows)
    assert results["lost_writes"] == len(lost) and results["duplicated_writes"] == len(duplicated) == 0
    assert results["acknowledged_writes"] == len(drill.workload.acknowledged) > 0
    reads = [op for op in ops if op.kind == "read"]
    assert results["read_availability"] == pytest.approx(100.0 * sum(op.ok for op in reads) / len(reads))
    assert results["operations"] == len(ops)
    assert sum(slot["ops"] for slot in report.timeline) == len(ops)
    # What each fault should and should not do.
    assert results["read_availability"] == 100.0, results["errors_by_kind"]
    if scenario.startswith("kill-primary"):
        assert results["write_unavailability"] > 0.3
        assert set(results["errors_by_kind"]) <= {"NoPrimaryAvailable", "WriteOutcomeUnknown"}
        assert results["time_to_detect"] is not None and results["time_to_detect"] < 2.0
        assert any(e["name"] == "failover" for e in report.events) == (scenario == "kill-primary-promote")
    else:
        assert results["write_unavailability"] == 0.0 and results["errors_by_kind"] == {}
        assert lost == []
    if scenario == "pause-replication":
        assert any(e["name"] == "lag_excluded" for e in report.events)
    if scenario in ("blackhole-replica", "stop-replica"):
        assert any(e["name"] in ("node_down", "breaker_open") for e in report.events)
    saved = json.loads((tmp_path / f"dbrouter-drill-{scenario}.json").read_text()) if (tmp_path / f"dbrouter-drill-{scenario}.json").exists() else None
    assert saved is None  # Drill.run alone writes nothing; run_drill writes the files (see the CLI tests)


@pytest.mark.parametrize("engine", ["postgres", "mariadb"])
def test_synchronous_replication_loses_no_acknowledged_write(engine: str, tmp_path: Path) -> None:
    report, drill, rows = run(engine, "kill-primary-promote", tmp_path, sync=True, threads=8, write_ratio=0.5)
    lost, duplicated = drill.workload.check_writes(rows)
    assert lost == [] and duplicated == []
    assert report.results["lost_writes"] == 0
    assert report.results["acknowledged_writes"] > 100


def test_shell_inject_and_recover_against_a_configured_cluster(tmp_path: Path) -> None:
    cluster = make_cluster("postgres", replicas=2).start()
    try:
        state = tmp_path / "state.json"
        cluster.save_state(state)
        config = tmp_path / "dbrouter.toml"
        write_router_config(cluster, config)
        target = cluster.replicas[0]
        control = "from dbrouter.cluster import LocalCluster; c = LocalCluster.load_state({!r}); c.node({!r}).{}()"
        stop = f"{sys.executable} -c \"{control.format(str(state), target.name, 'stop')}\""
        start = f"{sys.executable} -c \"{control.format(str(state), target.name, 'start')}\""
        done = subprocess.run([*CLI, "drill", "--config", str(config), "--scenario", "shell", "--inject", stop,
                               "--recover", start, "--duration", "6s", "--fault-at", "1.5s", "--recover-after", "2s",
                               "--threads", "4", "--out", str(tmp_path), "--min-read-availability", "100"],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        report = json.loads((tmp_path / "dbrouter-drill-shell.json").read_text())
        assert any(note.startswith("inject:") for note in report["notes"])
        assert any(note.startswith("recover:") for note in report["notes"])
        name = f"127.0.0.1:{target.port}"
        down = [e["t"] for e in report["events"] if e["name"] == "node_down" and e["node"] == name]
        # The inject command is a Python process of its own: on a busy machine it takes seconds
        # to start, so the node goes down after the fault time, not within a fixed bound of it.
        assert down and 1.5 <= down[0] < report["duration"], report["events"]
        assert target.running
        assert report["results"]["read_availability"] == 100.0
    finally:
        cluster.destroy()


def test_a_violated_limit_exits_non_zero_and_names_it(tmp_path: Path) -> None:
    done = subprocess.run([*CLI, "drill", "--local", "postgres", "--scenario", "kill-primary", "--no-recover",
                           "--duration", "3s", "--fault-at", "1s", "--threads", "2", "--quiet",
                           "--max-write-downtime", "0.5s", "--min-read-availability", "99", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "limit violated: --max-write-downtime 0.5s: measured" in done.stderr
    measured = json.loads((tmp_path / "dbrouter-drill-kill-primary.json").read_text())["limits"]
    assert measured[0]["name"] == "max-write-downtime" and measured[0]["measured"] > 0.5 and not measured[0]["ok"]
    assert measured[1]["ok"]  # reads survived


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--local", "postgres", "--scenario", "meteor-strike"], "unknown scenario 'meteor-strike'"),
        (["--local", "postgres", "--duration", "0"], "--duration must be > 0"),
        (["--config", "{config}", "--scenario", "shell", "--inject", "true"], "cluster not reachable"),
        (["--config", "{config}", "--scenario", "kill-primary"], "acts on a local cluster"),
        (["--local", "postgres", "--scenario", "shell"], "needs --inject"),
        (["--local", "postgres", "--asyncio-debug"], "--asyncio-debug needs --async"),
        (["--async", "--config", "{config}", "--scenario", "shell", "--inject", "true"], "cluster not reachable"),
    ],
)
def test_bad_input_fails_before_any_fault_and_leaves_nothing_running(args: list[str], message: str, tmp_path: Path) -> None:
    config = tmp_path / "unreachable.toml"
    config.write_text('primary = "postgresql://dbrouter:pw@127.0.0.1:1/dbrouter"\n[connect]\nconnect_timeout = 2\n')
    clusters = tmp_path / "tmp"  # where a local cluster would go (TMPDIR): only this drill's
    clusters.mkdir()
    done = subprocess.run([*CLI, "drill", *[a.format(config=config) for a in args], "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "TMPDIR": str(clusters)})
    assert done.returncode == 1, done.stdout + done.stderr
    assert message in done.stderr
    assert "inject:" not in done.stdout
    assert not list(tmp_path.glob("dbrouter-drill-*"))
    assert not servers_under(clusters) and not list(clusters.glob("dbrouter-*"))


def test_demo_shows_the_live_view_and_writes_a_chart_with_the_fault(tmp_path: Path) -> None:
    done = subprocess.run([*CLI, "demo", "--duration", "7s", "--fault-at", "2s", "--promote-after", "1s",
                           "--recover-after", "3s"],
                          capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("ops/s") >= 5 and "<<< fault: kill-primary-promote" in done.stdout
    assert "read availability" in done.stdout
    report = json.loads((tmp_path / "dbrouter-drill-kill-primary-promote.json").read_text())
    assert report["results"]["read_availability"] == 100.0
    page = (tmp_path / "dbrouter-drill-kill-primary-promote.html").read_text()

    class Check(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.svgs, self.markers, self.lines = 0, [], 0

        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            values = dict(attrs)
            self.svgs += tag == "svg"
            self.lines += tag == "polyline"
            if tag == "line" and "marker" in (values.get("class") or ""):
                self.markers.append(values["class"])

    check = Check()
    check.feed(page)
    assert check.svgs == 3 and check.lines >= 6
    assert check.markers.count("marker fault") == 3 and check.markers.count("marker recovery") == 3


def test_chart_renders_without_a_fault_recovery(tmp_path: Path) -> None:
    from dbrouter.drill.report import DrillReport

    report = DrillReport(scenario="x", engine="postgres", settings={}, fault_at=1.0, recover_at=None, duration=2.0,
                         timeline=[{"t": 0.1 * i, "ops": 1, "reads": 1, "writes": 0, "errors": {}, "p50": 0.001,
                                    "p99": 0.002, "max": 0.003} for i in range(20)],
                         results={"operations": 20}, events=[])
    page = render_html(report)
    assert page.count("marker fault") == 3 and "marker recovery" not in page


def test_results_table_shows_units_not_raw_floats() -> None:
    """Issue 14: the HTML table showed 81.30959279355213 and 0.0732368700000281 without units."""
    from dbrouter.drill.report import DrillReport

    results = {"read_availability": 81.30959279355213, "max_latency": 0.0732368700000281, "time_to_detect": None,
               "write_unavailability": 1.234567, "write_outages": [[5.0, 6.25]], "errors_by_kind": {"NoPrimaryAvailable": 3}}
    report = DrillReport(scenario="x", engine="postgres", settings={}, fault_at=1.0, recover_at=None, duration=2.0,
                         timeline=[], results=results, events=[])
    page = render_html(report)
    for shown in ("81.310 %", "73.2 ms", "1.23 s", "5.00 s to 6.25 s", "NoPrimaryAvailable: 3", "time to detect</td><td>none"):
        assert shown in page, shown
    assert "81.30959279355213" not in page and "0.0732368700000281" not in page


def test_chart_marks_the_router_events() -> None:
    """Issue 14: the chart did not mark the events it knows (breaker close, node down/up)."""
    from dbrouter.drill.report import DrillReport

    events = [{"t": 1.2, "name": name, "node": "pg1", "message": ""}
              for name in ("node_down", "breaker_open", "failover", "breaker_closed", "node_up", "lag_excluded")]
    report = DrillReport(scenario="x", engine="postgres", settings={}, fault_at=1.0, recover_at=None, duration=2.0,
                         timeline=[{"t": 0.1 * i, "ops": 1, "reads": 1, "writes": 0, "errors": {}, "p50": 0.001,
                                    "p99": 0.002, "max": 0.003} for i in range(20)],
                         results={"operations": 20}, events=events)
    page = render_html(report)
    for name in ("node_down", "breaker_open", "failover", "breaker_closed", "node_up"):
        assert page.count(f'class="event {name}"') == 3, name  # on each of the three panels
        assert f"{name} pg1 at 1.20s" in page
    assert "event lag_excluded" not in page


@pytest.mark.parametrize(("flag", "used"), [([], 7.0), (["--failover-wait", "0"], 0.0), (["--failover-wait", "2s"], 2.0)])
def test_failover_wait_flag_overrides_the_config_file_and_the_report_says_what_was_used(
        pg_cluster: Any, flag: list[str], used: float, tmp_path: Path) -> None:
    """Issue 14: --failover-wait 0 could not override a failover_wait from the config file,
    while the report recorded 0."""
    config = tmp_path / "dbrouter.toml"
    write_router_config(pg_cluster, config)
    config.write_text(config.read_text() + "\n[routing]\nfailover_wait = 7.0\n")
    done = subprocess.run([*CLI, "drill", "--config", str(config), "--scenario", "shell", "--inject", "true",
                           "--no-recover", "--duration", "2s", "--fault-at", "0.5s", "--threads", "2", "--quiet",
                           "--out", str(tmp_path), *flag], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "dbrouter-drill-shell.json").read_text())
    assert report["settings"]["failover_wait"] == used


def test_a_failing_recover_command_still_writes_the_report(pg_cluster: Any, tmp_path: Path) -> None:
    """Issue 14: a failing --recover aborted the drill with exit 1 and no report, although
    the fault phase ran. Now the report is written, says so, and the exit code is 1; and
    with no --recover at all, nothing claims a recovery time."""
    config = tmp_path / "dbrouter.toml"
    write_router_config(pg_cluster, config)
    common = [*CLI, "drill", "--config", str(config), "--scenario", "shell", "--inject", "true", "--duration", "3s",
              "--fault-at", "0.5s", "--recover-after", "1s", "--threads", "2", "--quiet"]
    failed = subprocess.run([*common, "--recover", "exit 3", "--out", str(tmp_path / "a")],
                            capture_output=True, text=True, timeout=120)
    assert failed.returncode == 1, failed.stdout[-3000:] + failed.stderr[-3000:]
    assert "--recover command failed with exit code 3" in failed.stderr
    report = json.loads((tmp_path / "a" / "dbrouter-drill-shell.json").read_text())
    assert report["errors"] and "exit code 3" in report["errors"][0]
    assert report["results"]["operations"] > 0
    plain = subprocess.run([*common, "--out", str(tmp_path / "b")], capture_output=True, text=True, timeout=120)
    assert plain.returncode == 0, plain.stdout[-3000:] + plain.stderr[-3000:]
    report = json.loads((tmp_path / "b" / "dbrouter-drill-shell.json").read_text())
    assert report["recover_at"] is None and report["errors"] == []
    assert "recovery at" not in (tmp_path / "b" / "dbrouter-drill-shell.html").read_text()


def test_writes_waiting_for_a_primary_do_not_starve_the_reads(pg_cluster: Any) -> None:
    """Issue 14: readers and writers shared threads; with a failover wait every thread ended up
    blocked in a write, no read ran, and the report said 100% read availability."""
    from dbrouter import Router
    from dbrouter.workload import Workload

    from .test_bad_input import free_port

    table = "dbrouter_drill_starve"
    pg_cluster.primary.query(f"DROP TABLE IF EXISTS {table}")
    pg_cluster.primary.query(f"CREATE TABLE {table} (id bigint NOT NULL, worker int NOT NULL)")
    pg_cluster.wait_replicated(timeout=20)
    nowhere = pg_cluster.primary.url.replace(f":{pg_cluster.primary.port}/", f":{free_port()}/")
    with Router(nowhere, [r.url for r in pg_cluster.replicas], failover_wait=3.0, connect_timeout=2,
                health_interval=0.2) as router:
        workload = Workload(router, threads=4, write_ratio=0.5, duration=2.5, table=table)
        workload.start()
        time.sleep(2.5)
        assert workload.stop(timeout=10)
        ops = workload.snapshot()
    late_reads = [op for op in ops if op.kind == "read" and op.ok and op.start > workload.started_at + 1.5]
    assert len(late_reads) > 20, f"{len(late_reads)} reads in the last second"
    assert all(not op.ok for op in ops if op.kind == "write")
    assert workload.writers == 2


# -- --async: the workload as asyncio tasks through AsyncRouter ---------------------------------------

ASYNC_DRIVERS = {"postgres": "psycopg (async)", "mariadb": "mysql-connector (asyncio)"}
WRITE_ERRORS = {"NoPrimaryAvailable", "WriteOutcomeUnknown"}  # what a write raises while there is no primary


class _FlakyRouter:
    """Stands in for an AsyncRouter: every third write raises, one read never returns, and
    every read blocks the loop for 20 ms (as a callback that computes would), the first with a
    blocking connect too."""

    def __init__(self) -> None:
        self.writes = 0
        self.reads = 0
        self.opened = self.closed = False

    async def open(self) -> None:
        self.opened = True

    async def close(self, timeout: float = 5.0) -> None:
        self.closed = True

    async def write(self, sql: str, params: Any = None) -> int:
        import asyncio

        self.writes += 1
        await asyncio.sleep(0.001)
        if self.writes % 3 == 0:
            raise RuntimeError(f"write {self.writes} failed\nsecond line")
        return 1

    async def read(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        import asyncio

        self.reads += 1
        if self.reads == 1:  # a blocking connect on the loop (refused at once: loopback's port 9)
            import contextlib
            import socket

            with socket.socket() as sock, contextlib.suppress(OSError):
                sock.connect(("127.0.0.1", 9))
        time.sleep(0.02)  # on the loop: asyncio's debug mode reports it
        if self.reads == 5:
            await asyncio.Event().wait()  # hangs until cancelled
        await asyncio.sleep(0.001)
        return [(0,)]


def test_async_workload_records_every_failure_and_stops_within_its_bounds() -> None:
    """An exception in a task is that operation's error; a task stuck in an operation is
    cancelled at stop's timeout and the operation recorded as cancelled; the loop's thread
    ends with close; asyncio debug mode's slow-callback reports are counted, not printed."""
    import threading

    from dbrouter.workload import AsyncWorkload

    router = _FlakyRouter()
    workload = AsyncWorkload(router, threads=2, write_ratio=0.5, duration=30.0, debug=True)  # type: ignore[arg-type]
    workload.open(timeout=10)
    assert router.opened
    workload.start()
    time.sleep(0.5)
    began = time.monotonic()
    assert not workload.stop(timeout=0.3)  # the hung read is cancelled
    assert time.monotonic() - began < 5
    assert workload.close(timeout=5) and router.closed
    assert not any(t.name == "dbrouter-workload-loop" for t in threading.enumerate())
    ops = workload.snapshot()
    writes = [op for op in ops if op.kind == "write"]
    failed = [op for op in writes if not op.ok]
    assert len(writes) == router.writes and len(failed) == router.writes // 3
    assert {op.error for op in failed} == {"RuntimeError"} and failed[0].detail == "write 3 failed"
    assert [op.error for op in ops if op.kind == "read" and not op.ok] == ["CancelledError"]
    assert workload.failures == []
    assert workload.acknowledged == [op.row_id for op in writes if op.ok]
    assert workload.slow_callbacks >= 1 and "took" in workload.slow_callback_reports[0]
    # The first read's connect on the loop is a blocking call (its audit event says so); the
    # others' time.sleep is a wait (Python 3.11 does not audit it); none is computation.
    assert workload.slow_blocking >= 1 and workload.slow_waited >= 1, workload.slow_callback_reports
    assert workload.slow_computed == 0, workload.slow_callback_reports
    assert any("blocking calls: socket.connect" in report for report in workload.slow_callback_reports)


def _reads_during(report: dict[str, Any], spans: list[list[float]]) -> tuple[int, int]:
    """(reads, at most this many of them failed) in the timeline slots within ``spans``: every
    error of a kind a write raises without a primary is a write's, any other counted as a read's."""
    reads = failed = 0
    for slot in report["timeline"]:
        if any(begin <= slot["t"] < end for begin, end in spans):
            reads += slot["reads"]
            failed += sum(n for kind, n in slot["errors"].items() if kind not in WRITE_ERRORS)
    return reads, failed


@pytest.mark.parametrize("engine", [pytest.param("postgres", marks=pytest.mark.postgres, id="postgres"),
                                    pytest.param("mariadb", marks=pytest.mark.mysql, id="mariadb")])
def test_async_drill_with_synchronous_replication_loses_no_acknowledged_write(engine: str, tmp_path: Path) -> None:
    """``drill --async``: the workload as asyncio tasks through AsyncRouter, with PostgreSQL
    in asyncio's debug mode (its slow callbacks are printed, not judged: on this loaded
    machine most are preemption, see tests/_loopcheck.py)."""
    debug = ["--asyncio-debug"] if engine == "postgres" else []
    done = subprocess.run([*CLI, "drill", "--async", *debug, "--local", engine, "--scenario", "kill-primary-promote",
                           "--sync", "--duration", "10s", "--fault-at", "3s", "--promote-after", "1.5s", "--no-recover",
                           "--threads", "8", "--quiet", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"workload           asyncio, 8 tasks on one event loop; driver {ASYNC_DRIVERS[engine]}" in done.stdout
    report = json.loads((tmp_path / "dbrouter-drill-kill-primary-promote.json").read_text())
    settings, results = report["settings"], report["results"]
    assert settings["workload"] == "asyncio" and settings["driver"] == ASYNC_DRIVERS[engine]
    assert results["lost_writes"] == 0 and results["duplicated_writes"] == 0, results
    assert results["acknowledged_writes"] > 50
    assert not [note for note in report["notes"] if "failed outside an operation" in note]
    # Reads went on through the outage, nearly all answered.
    outages = results["write_outages"]
    assert outages, results
    reads, failed = _reads_during(report, outages)
    assert reads > 0 and failed <= 0.1 * reads, (reads, failed, outages)
    assert results["read_availability"] >= 99.0, results["errors_by_kind"]
    # Writes came back after the promotion: acknowledged, with no error, from the end of the
    # last outage to the end of the drill.
    failover = [e["t"] for e in report["events"] if e["name"] == "failover"]
    assert failover, report["events"]
    back = outages[-1][1]
    assert failover[0] - 1.0 <= back < report["duration"] - 1.0, (failover, outages)
    after = [slot for slot in report["timeline"] if slot["t"] >= back]
    assert sum(slot["writes"] for slot in after) > 10
    assert not [slot for slot in after if set(slot["errors"]) & WRITE_ERRORS]
    if debug:
        assert isinstance(results["slow_callbacks"], int)
        print(f"asyncio debug mode: {results['slow_callbacks']} slow callbacks (5 ms or more) on the workload's loop")
    else:
        assert "slow_callbacks" not in results
