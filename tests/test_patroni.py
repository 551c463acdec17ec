"""Patroni: the local Patroni cluster, the Patroni topology provider, and the Patroni drills.

The cluster tests share one session cluster (``patroni_cluster``: etcd and three
Patroni-managed PostgreSQL 15 nodes with ``synchronous_mode: true``); each heals it
first (every member's Patroni running, one leader, the others streaming) instead of
rebuilding it. The drills run through the command line's code path (its parser and
options, `run_drill`) on that cluster, guarded by the suite's stall detector, and
are checked against the acceptance of issue 14: reads >= 99.9% available (readers
that never write), dbrouter's write unavailability at most Patroni's own (from its
REST API in the same run) + 0.5 s, no duplicated write and, synchronous, no lost one.
Patroni missing is a failure (``scripts/setup.sh`` installs it), never a skip.

The provider's unit tests run against small HTTP servers on loopback.
"""

from __future__ import annotations

import base64
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest

from dbrouter.cli import _drill_options, build_parser
from dbrouter.cluster import PatroniCluster, PatroniNode, PatroniTimeline
from dbrouter.cluster.patroni import Sample
from dbrouter.discovery import DiscoveryError, Member, Provider
from dbrouter.discovery.patroni import PatroniProvider, request_json
from dbrouter.drill import run_drill
from dbrouter.errors import ConfigurationError
from dbrouter.workload import Workload

from .conftest import free_low_port
from .test_control_plane import StallDetector

# What a drill may add to Patroni's own write unavailability (issue 14's acceptance).
SLACK = 0.5
STALL = 15.0  # seconds without any finished operation (readers never wait on a failover)


@pytest.fixture
def patroni(patroni_cluster: PatroniCluster) -> PatroniCluster:
    """The shared Patroni cluster, healed: what an earlier test killed runs again."""
    patroni_cluster.heal(timeout=120)
    return patroni_cluster


# -- the cluster and the provider against it -----------------------------------------------


@pytest.mark.patroni
def test_members_from_the_rest_api(patroni: PatroniCluster) -> None:
    members = patroni.members()
    assert [m.name for m in members] == [n.name for n in patroni.nodes]
    by_name = {m.name: m for m in members}
    leaders = [m for m in members if m.role == "leader"]
    assert len(leaders) == 1 and leaders[0].name == patroni.primary.name
    assert sum(m.role == "sync_standby" for m in members) == 1  # synchronous_mode: true
    for node in patroni.patroni_nodes:
        member = by_name[node.name]
        assert (member.host, member.port, member.state) == (node.host, node.port, "running")
        assert member.api_url == f"{node.api_url}/patroni"
    status, config = request_json(patroni.nodes[0].api_url + "/config", timeout=5)
    assert status == 200 and config["synchronous_mode"] is True
    assert (config["ttl"], config["loop_wait"], config["retry_timeout"]) == (10, 1, 5)
    # PostgreSQL's own word: the leader is the one not in recovery.
    assert [row["name"] for row in patroni.status() if row["role"] == "primary"] == [leaders[0].name]


@pytest.mark.patroni
def test_provider_reads_members_and_survives_the_death_of_its_configured_member(patroni: PatroniCluster) -> None:
    configured = next(n for n in patroni.patroni_nodes if n is not patroni.primary)
    provider = PatroniProvider([configured.api_url], username="dbrouter", password=patroni.api_password)
    assert isinstance(provider, Provider)
    members = provider.members(timeout=5)
    assert members == [Member(n.name, n.host, n.port, "primary" if n is patroni.primary else "replica", "running")
                       for n in patroni.nodes]
    assert provider.source == f"patroni at {configured.api_url}"

    configured.kill_patroni()  # the configured member dies: Patroni and its server
    configured.kill()
    after = provider.members(timeout=5)
    assert {m.name for m in after} >= {n.name for n in patroni.nodes if n is not configured}
    assert provider.candidates()[0] != configured.api_url  # the member that answered is asked first now
    assert {m.name: m.role for m in after}[patroni.primary.name] == "primary"

    alone = PatroniProvider([configured.api_url], username="dbrouter", password=patroni.api_password)
    with pytest.raises(DiscoveryError) as caught:
        alone.members(timeout=2)
    message = str(caught.value)
    assert configured.api_url in message
    assert "refused" in message.lower() and patroni.api_password not in message


# -- the drills ------------------------------------------------------------------------------------


def drill(patroni: PatroniCluster, scenario: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
          *args: str) -> Any:
    """``dbrouter drill --local patroni --sync --scenario S --failover-wait 30s ...`` on the shared
    cluster, through the command's parser and options; fails with every thread's stack when no
    operation finishes for STALL seconds."""
    parsed = build_parser().parse_args(["drill", "--local", "patroni", "--sync", "--scenario", scenario,
                                        "--failover-wait", "30s", "--fault-at", "2s", "--threads", "8",
                                        "--quiet", "--out", str(tmp_path), *args])
    options = _drill_options(parsed)
    stall = StallDetector(limit=STALL)
    record = Workload._record

    def progress(self: Workload, op: Any) -> None:
        stall.progress()
        record(self, op)

    monkeypatch.setattr(Workload, "_record", progress)
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["report"] = run_drill(options, io.StringIO(), cluster=patroni)
        except BaseException as exc:  # noqa: BLE001 - re-raised on the test's thread
            outcome["error"] = exc

    runner = threading.Thread(target=run, name="patroni-drill", daemon=True)
    stall.start()
    runner.start()
    while runner.is_alive() and stall.report is None:
        runner.join(0.2)
    stall.stop()
    if stall.report is not None:
        pytest.fail(f"stall in the {scenario} drill: {stall.report}", pytrace=False)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["report"]


def assert_acceptance(report: Any, tmp_path: Path) -> None:
    r, p = report.results, report.patroni
    summary = report.human()
    print(summary)  # the numbers, for -rA / -s
    assert p is not None and p["write_unavailability"] > 0, summary
    assert r["read_availability"] >= 99.9, summary
    assert r["write_unavailability"] <= p["write_unavailability"] + SLACK, summary
    assert r["duplicated_writes"] == 0 and r["lost_writes"] == 0, summary  # synchronous_mode: true
    assert r["acknowledged_writes"] > 100, summary
    assert report.settings["failover_wait"] == 30.0 and report.settings["sync"] is True
    saved = json.loads((tmp_path / f"dbrouter-drill-{report.scenario}.json").read_text())
    assert saved["patroni"]["write_unavailability"] == p["write_unavailability"]
    page = (tmp_path / f"dbrouter-drill-{report.scenario}.html").read_text()
    assert "dbrouter and Patroni" in page and page.count('class="patroni-outage"') == 3 * len(p["write_outages"])
    assert "Patroni's downtime" in summary and "Patroni's leader" in summary


@pytest.mark.patroni
@pytest.mark.slow
def test_switchover_drill(patroni: PatroniCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = patroni.primary.name
    report = drill(patroni, "patroni-switchover", tmp_path, monkeypatch, "--duration", "8s")
    assert_acceptance(report, tmp_path)
    leaders = [c["leader"] for c in report.patroni["leader_changes"]]
    assert leaders[0] == old and leaders[-1] not in (old, None), leaders
    assert [e["node"] for e in report.events if e["name"] == "failover"] == [leaders[-1]]


@pytest.mark.patroni
@pytest.mark.slow
def test_crash_drill(patroni: PatroniCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = patroni.primary.name
    report = drill(patroni, "patroni-crash", tmp_path, monkeypatch, "--duration", "14s")
    assert_acceptance(report, tmp_path)
    leaders = [c["leader"] for c in report.patroni["leader_changes"]]
    assert leaders == [old, None, old], leaders  # restarted in place: no election
    assert not any(e["name"] == "failover" for e in report.events)


@pytest.mark.patroni
@pytest.mark.slow
def test_lose_leader_drill(patroni: PatroniCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = patroni.primary.name
    report = drill(patroni, "patroni-lose-leader", tmp_path, monkeypatch, "--duration", "16s", "--recover-after", "5s")
    assert_acceptance(report, tmp_path)
    leaders = [c["leader"] for c in report.patroni["leader_changes"]]
    assert leaders[0] == old and leaders[1] is None and leaders[-1] not in (old, None), leaders
    assert report.patroni["write_unavailability"] > 5  # the leader key had to expire (ttl 10 s)
    assert any("rejoins as a replica" in note for note in report.notes), report.notes
    assert report.errors == []
    old_node = patroni.node(old)
    assert isinstance(old_node, PatroniNode) and old_node.patroni_running


@pytest.mark.patroni
@pytest.mark.timeout(400)
def test_a_router_given_one_rest_address_follows_two_switchovers_and_a_member_patroni_adds(
        patroni: PatroniCluster) -> None:
    """``discovery = "patroni"`` with one member's REST address: the router finds the three
    members by their names, follows two switchovers (writes on the new leader each time)
    and takes reads on a fourth member once Patroni adds it. Last of the cluster tests: the
    cluster keeps its fourth member."""
    import uuid

    from dbrouter import Router

    from .conftest import wait_until

    table = "p" + uuid.uuid4().hex[:10]
    patroni.primary.query(f"CREATE TABLE {table} (id int primary key, port int)")
    template = patroni.primary.url.replace(f":{patroni.primary.port}/", ":1/")  # only its credentials count
    router = Router(template, discovery="patroni", discovery_endpoints=[patroni.nodes[0].api_url],
                    discovery_interval=0.3, health_interval=0.2, failover_wait=30)
    try:
        assert sorted(router.stats()["nodes"]) == sorted(n.name for n in patroni.nodes)
        assert router.primary.name == patroni.primary.name
        ids = iter(range(1, 1000))
        for _ in range(2):
            patroni.wait_healthy(timeout=60)  # a synchronous standby again: Patroni allows a switchover
            old = router.primary.name
            new = patroni.switchover().name
            assert new != old
            router.write(f"INSERT INTO {table} (id, port) VALUES (%s, inet_server_port())", (next(ids),))
            assert router.primary.name == new, router.stats()
            assert router.stats()["discovery"]["failing"] is None

        provider = PatroniProvider([patroni.nodes[0].api_url])
        before = {m.name for m in provider.members(timeout=5)}
        added = patroni.add_member()
        assert added.name not in before
        found = {m.name: m for m in provider.members(timeout=5)}
        assert found[added.name] == Member(added.name, added.host, added.port, "replica", "running")
        assert added.query("SELECT pg_is_in_recovery()") == [(True,)]

        assert wait_until(lambda: router.stats()["nodes"].get(added.name, {}).get("serving_reads"), timeout=30), \
            router.stats()
        ports = {router.read("SELECT inet_server_port()")[0][0] for _ in range(60)}
        assert added.port in ports
        rows = router.read(f"SELECT count(*) FROM {table}")
        assert rows[0][0] in (1, 2)  # a replica may not have replayed the last one yet
    finally:
        router.close()
        patroni.wait_leader().query(f"DROP TABLE IF EXISTS {table}")


# -- the provider and the timeline alone ---------------------------------------------------------


class FakePatroni:
    """A REST API on loopback answering ``GET /cluster`` with ``document`` (and ``status``),
    recording each request's path and Authorization header."""

    def __init__(self, document: Any, status: int = 200) -> None:
        self.document, self.status = document, status
        self.requests: list[tuple[str, str | None]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                fake.requests.append((self.path, self.headers.get("Authorization")))
                body = fake.document if isinstance(fake.document, bytes) else json.dumps(fake.document).encode()
                self.send_response(fake.status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_low_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def cluster_document(*members: tuple[str, str, int, str]) -> dict[str, Any]:
    return {"members": [{"name": name, "role": role, "state": "running", "host": "127.0.0.1", "port": port,
                         "api_url": api, "timeline": 2, **({} if role == "leader" else {"lag": 0})}
                        for name, role, port, api in members]}


@pytest.fixture
def fakes() -> Iterator[list[FakePatroni]]:
    made: list[FakePatroni] = []
    yield made
    for fake in made:
        fake.close()


def test_provider_maps_roles_and_sends_basic_auth(fakes: list[FakePatroni]) -> None:
    fake = FakePatroni({})
    fakes.append(fake)
    fake.document = cluster_document(("db1", "leader", 5432, f"{fake.url}/patroni"),
                                     ("db2", "sync_standby", 5433, "http://127.0.0.1:1/patroni"),
                                     ("db3", "replica", 5434, "http://127.0.0.1:2/patroni"),
                                     ("db4", "standby_leader", 5435, "http://127.0.0.1:3/patroni"),
                                     ("db5", "something new", 5436, "http://127.0.0.1:4/patroni"))
    provider = PatroniProvider(fake.url.replace("http://", "http://ops:s3cret%2F@"))
    assert [(m.name, m.role) for m in provider.members(timeout=2)] == [
        ("db1", "primary"), ("db2", "replica"), ("db3", "replica"), ("db4", "primary"), ("db5", None)]
    assert fake.requests[-1] == ("/cluster", "Basic " + base64.b64encode(b"ops:s3cret/").decode())
    assert "s3cret" not in repr(provider) + provider.source
    plain = PatroniProvider([fake.url])
    plain.members(timeout=2)
    assert fake.requests[-1] == ("/cluster", None)


def test_provider_errors_name_the_source_and_never_the_password(fakes: list[FakePatroni]) -> None:
    refused = f"http://127.0.0.1:{free_low_port()}"
    secret = "pw-" + "x" * 20
    with pytest.raises(DiscoveryError) as caught:
        PatroniProvider([refused], username="ops", password=secret).members(timeout=2)
    assert refused in str(caught.value) and "refused" in str(caught.value).lower()
    for document, status, problem in ((b"<html>no</html>", 200, "not a Patroni cluster document"),
                                      ({"members": []}, 200, "no member with a PostgreSQL address"),
                                      ({"error": secret}, 401, "HTTP 401")):
        fake = FakePatroni(document, status)
        fakes.append(fake)
        with pytest.raises(DiscoveryError) as caught:
            PatroniProvider([fake.url], username="ops", password=secret).members(timeout=2)
        assert problem in str(caught.value) and fake.url in str(caught.value), caught.value
        assert secret not in str(caught.value)
    for bad in ("ftp://db1:8008", "", "http://db1:99999"):
        with pytest.raises(ConfigurationError):
            PatroniProvider([bad])


def test_provider_falls_back_to_members_it_has_seen_and_asks_the_last_good_one_first(fakes: list[FakePatroni]) -> None:
    first, second = FakePatroni({}), FakePatroni({})
    fakes += [first, second]
    document = cluster_document(("db1", "leader", 5432, f"{first.url}/patroni"),
                                ("db2", "replica", 5433, f"{second.url}/patroni"))
    first.document = second.document = document
    provider = PatroniProvider([first.url])
    assert len(provider.members(timeout=2)) == 2 and len(first.requests) == 1
    first.status = 503  # the configured member stops answering usefully
    assert [m.name for m in provider.members(timeout=2)] == ["db1", "db2"]
    assert len(second.requests) == 1 and provider.candidates()[0] == second.url
    first.status = 200
    provider.members(timeout=2)
    assert len(second.requests) == 2 and len(first.requests) == 2  # the last good one was asked first


def test_timeline_outages_and_leader_changes_from_samples() -> None:
    timeline = PatroniTimeline({"a": "http://a", "b": "http://b"})
    timeline.samples = [Sample(0.0, "b", "replica", "running"), Sample(0.1, "a", "master", "running"),
                        Sample(2.0, "a", "master", "unknown"), Sample(2.5, "a", "master", "crashed"),
                        Sample(3.2, "b", "master", "running"), Sample(4.0, "a", None, "unreachable"),
                        Sample(5.0, "b", "replica", "stopping"), Sample(5.5, "a", "master", "running")]
    assert timeline.leader_changes() == [(0.1, "a"), (2.0, None), (3.2, "b"), (5.0, None), (5.5, "a")]
    assert timeline.write_outages() == [(2.0, 3.2), (5.0, 5.5)]
    summary = timeline.summary(origin=0.0)
    assert summary["write_unavailability"] == pytest.approx(1.7)
    assert [c["state"] for c in summary["member_changes"] if c["member"] == "a"] == [
        "running", "unknown", "crashed", "unreachable", "running"]
    assert PatroniTimeline({"a": "x"}).write_outages() == []


@pytest.mark.parametrize(("local", "scenario", "message"), [
    ("postgres", "patroni-crash", "scenario patroni-crash does not run on --local postgres (it runs on --local patroni)"),
    ("patroni", "kill-primary", "scenario kill-primary does not run on --local patroni"),
    (None, "patroni-switchover", "acts on a local cluster"),
])
def test_patroni_scenarios_run_on_a_patroni_cluster_only(local: str | None, scenario: str, message: str) -> None:
    from dbrouter.drill import DrillOptions

    options = DrillOptions(scenario=scenario, local=local, config=None if local else "nowhere.toml")
    with pytest.raises(ConfigurationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        options.validate()
    DrillOptions(scenario="patroni-lose-leader", local="patroni").validate()
