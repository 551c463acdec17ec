"""Topology providers on real clusters: the router adds the members a provider reports,
drains the ones it stops reporting, and changes nothing while the provider fails.

A provider here is the documented interface (`dbrouter.discovery.Provider`): a
hand-made one in Python, MySQL/MariaDB replica discovery (``SHOW SLAVE HOSTS``) and DNS
discovery through a nameserver the test runs (see ``dns_server``); Patroni's is
tested with the Patroni cluster (tests/test_patroni.py).
"""

from __future__ import annotations

import threading
import uuid
from typing import Any, Sequence

import pytest

import dbrouter
from dbrouter import Router
from dbrouter.discovery import DiscoveryError, Member

from .conftest import port_sql, wait_until
from .test_control_plane import close_within
from .test_membership import ReadLoad

INTERVAL = 0.2


class ListProvider:
    """A provider whose answer the test sets: a list of members, or an error."""

    source = "the test's list"

    def __init__(self, members: Sequence[Member]) -> None:
        self.answer: list[Member] | Exception = list(members)
        self.asked = 0
        self.closed = False

    def members(self, timeout: float) -> list[Member]:
        self.asked += 1
        if isinstance(self.answer, Exception):
            raise self.answer
        return list(self.answer)

    def close(self) -> None:
        self.closed = True


def member(node: Any, name: str, role: str | None = None) -> Member:
    return Member(name, "127.0.0.1", node.port, role)


def serving(router: Router) -> list[str]:
    return sorted(name for name, n in router.stats()["nodes"].items() if n["serving_reads"])


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_provider_adds_and_drains_members_under_read_load_and_keeps_them_while_it_fails(cluster: Any) -> None:
    primary, one, two = cluster.primary, *cluster.replicas
    provider = ListProvider([member(primary, "p", "primary"), member(one, "one")])
    # The URL lends user, password and database; its host and port are not a node here.
    template = primary.url.replace(f":{primary.port}/", ":1/")
    router = Router(template, discovery=provider, discovery_interval=INTERVAL, health_interval=INTERVAL)
    events: list[dbrouter.Event] = []
    router.on("*", events.append)
    try:
        assert router.wait_for_probes(timeout=10)
        assert router.primary.name == "p" and [n.name for n in router.replicas] == ["one"]
        with ReadLoad(router, cluster) as load:
            provider.answer = [member(primary, "p", "primary"), member(one, "one"), member(two, "two")]
            assert wait_until(lambda: load.first_answer_from(two.port) is not None, timeout=5), router.stats()

            provider.answer = DiscoveryError("the test's list: connection refused")
            asked = provider.asked
            assert wait_until(lambda: provider.asked >= asked + 3, timeout=5)
            assert serving(router) == ["one", "two"], "a failing provider must change nothing"
            assert router.stats()["discovery"]["failing"] == "the test's list: connection refused"

            provider.answer = [member(primary, "p", "primary"), member(one, "one")]
            assert wait_until(lambda: "two" not in router.stats()["nodes"], timeout=5), router.stats()
        failed = [r for r in load.snapshot() if r[3] is not None]
        assert not failed, failed[:3]
        kinds = [(e.name, e.node) for e in events if e.name.startswith(("node_added", "node_removed", "discovery"))]
        assert kinds == [("node_added", "two"), ("discovery_failed", None), ("discovery_restored", None),
                         ("node_removed", "two")], kinds
    finally:
        assert close_within(router)
    assert provider.closed


def test_the_first_answer_is_needed_to_start_and_its_failure_names_the_source() -> None:
    provider = ListProvider([])
    provider.answer = DiscoveryError("the test's list: connection refused")
    with pytest.raises(DiscoveryError, match="connection refused"):
        Router("postgresql://app:Secret-1@127.0.0.1:1/app", discovery=provider)
    assert provider.closed
    empty = ListProvider([])
    with pytest.raises(DiscoveryError, match="the test's list: no members reported"):
        Router("postgresql://app:Secret-1@127.0.0.1:1/app", discovery=empty)


@pytest.mark.timeout(60)
def test_a_new_primary_reported_by_the_provider_wakes_the_probes(pg_cluster: Any) -> None:
    """A provider's role is a hint: it wakes the probes, which decide (here the provider is
    wrong, and the probes keep the real primary)."""
    primary, one, _ = pg_cluster.primary, *pg_cluster.replicas
    provider = ListProvider([member(primary, "p", "primary"), member(one, "one")])
    router = Router(pg_cluster.primary.url, discovery=provider, discovery_interval=INTERVAL, health_interval=30)
    try:
        assert router.wait_for_probes(timeout=10)
        rounds = router.topology.rounds
        provider.answer = [member(primary, "p"), member(one, "one", "primary")]
        assert wait_until(lambda: router.topology.rounds > rounds, timeout=3), "the probes were not woken"
        assert router.primary.name == "p"
    finally:
        assert close_within(router)


@pytest.mark.mysql
@pytest.mark.timeout(120)
def test_mysql_discovery_finds_the_replicas_from_the_primary_and_follows_a_disconnect(maria_cluster: Any) -> None:
    primary, one, two = maria_cluster.primary, *maria_cluster.replicas
    with pytest.raises(DiscoveryError, match=r"SHOW SLAVE HOSTS failed: 1227.*REPLICATION MASTER ADMIN"):
        Router(primary.url, discovery="mysql")  # the cluster's application user may not ask
    user, password = "d" + uuid.uuid4().hex[:10], uuid.uuid4().hex
    account = f"'{user}'@'127.0.0.1'"
    primary.query(f"CREATE USER {account} IDENTIFIED BY %s", (password,))
    primary.query(f"GRANT REPLICATION MASTER ADMIN, SLAVE MONITOR ON *.* TO {account}")
    primary.query(f"GRANT SELECT ON `{maria_cluster.database}`.* TO {account}")
    maria_cluster.wait_replicated(timeout=10)
    url = f"mariadb://{user}:{password}@127.0.0.1:{primary.port}/{maria_cluster.database}"
    router = Router(url, discovery="mysql", discovery_interval=INTERVAL, health_interval=INTERVAL)
    try:
        assert router.wait_for_probes(timeout=10)
        names = sorted(router.stats()["nodes"])
        assert names == sorted([router.primary.name, f"127.0.0.1:{one.port}", f"127.0.0.1:{two.port}"]), names
        ports = {router.read(f"SELECT {port_sql(maria_cluster)}")[0][0] for _ in range(40)}
        assert ports == {one.port, two.port}

        two.query("STOP SLAVE IO_THREAD")  # no longer connected: the primary stops listing it...
        primary.query("FLUSH BINARY LOGS")  # ...once its dump thread tries to send it something
        try:
            assert wait_until(lambda: f"127.0.0.1:{two.port}" not in router.stats()["nodes"], timeout=20)
        finally:
            two.query("START SLAVE IO_THREAD")
        assert wait_until(lambda: f"127.0.0.1:{two.port}" in serving(router), timeout=10), router.stats()
    finally:
        assert close_within(router)
        primary.query(f"DROP USER IF EXISTS {account}")


@pytest.mark.timeout(120)
def test_dns_discovery_follows_srv_records_from_a_nameserver_the_test_runs(pg_cluster: Any, dns_server: Any) -> None:
    primary, one, two = pg_cluster.primary, *pg_cluster.replicas
    dns_server.set("n1.db.test.", "A", ["127.0.0.1"])
    dns_server.set("n2.db.test.", "A", ["127.0.0.1"])
    dns_server.set("_postgresql._tcp.db.test.", "SRV", [(0, 1, one.port, "n1.db.test.")])
    router = Router(primary.url, discovery="dns", discovery_endpoints=["_postgresql._tcp.db.test"],
                    discovery_nameservers=[f"127.0.0.1:{dns_server.port}"], discovery_interval=INTERVAL,
                    health_interval=INTERVAL)
    try:
        assert router.wait_for_probes(timeout=10)
        assert [n.name for n in router.replicas] == [f"n1.db.test:{one.port}"]
        with ReadLoad(router, pg_cluster, threads=8) as load:
            dns_server.set("_postgresql._tcp.db.test.", "SRV",
                           [(0, 1, one.port, "n1.db.test."), (0, 1, two.port, "n2.db.test.")])
            assert wait_until(lambda: load.first_answer_from(two.port) is not None, timeout=5), router.stats()
            dns_server.set("_postgresql._tcp.db.test.", "SRV", [(0, 1, two.port, "n2.db.test.")])
            assert wait_until(lambda: f"n1.db.test:{one.port}" not in router.stats()["nodes"], timeout=5)
        assert not [r for r in load.snapshot() if r[3] is not None]
        # A name that stops existing is a failed answer: the nodes stay.
        dns_server.delete("_postgresql._tcp.db.test.")
        failed = threading.Event()
        router.on("discovery_failed", lambda event: failed.set())
        assert failed.wait(5)
        assert "NXDOMAIN" in router.stats()["discovery"]["failing"]
        assert [n.name for n in router.replicas] == [f"n2.db.test:{two.port}"]
    finally:
        assert close_within(router)


@pytest.mark.timeout(60)
def test_dns_discovery_reads_a_records_on_the_port_given(pg_cluster: Any, dns_server: Any) -> None:
    one = pg_cluster.replicas[0]
    dns_server.set("replicas.db.test.", "A", ["127.0.0.1"])
    router = Router(pg_cluster.primary.url, discovery="dns", discovery_endpoints=[f"replicas.db.test:{one.port}"],
                    discovery_nameservers=[f"127.0.0.1:{dns_server.port}"], health_interval=INTERVAL)
    try:
        assert [n.name for n in router.replicas] == [f"127.0.0.1:{one.port}"]
        assert wait_until(lambda: serving(router) == [f"127.0.0.1:{one.port}"], timeout=5)
    finally:
        assert close_within(router)
