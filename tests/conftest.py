"""Session fixtures: one PostgreSQL and one MariaDB replication cluster for the whole run.

The clusters are real servers started from the installed binaries (primary +
2 replicas each). Tests reset what they change (tables they create, paused
replication) instead of rebuilding clusters. A missing binary fails the run.

``pytest --mysql-pure`` runs every test on mysql-connector's pure-Python connection
instead of its C extension (see ``tests/_mysql_mode.py``); CI runs the
``mysql``-marked tests both ways.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import pytest

import dbrouter  # loads the mysql C extension before anything imports ssl
from dbrouter.cluster import LocalCluster, LocalNode, MariaDBCluster, PatroniCluster, PostgresCluster, make_cluster
from dbrouter.cluster._base import allocate_ports
from dbrouter.url import parse_address

from . import _mysql_mode
from .dnsserver import DNSServer


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        _mysql_mode.OPTION, action="store_true",
        help="run on mysql-connector's pure-Python connection: its C extension is made to fail to load, "
             "as it does when ssl is imported first on a system with an older libssl",
    )


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption(_mysql_mode.OPTION):
        _mysql_mode.block_c_extension()  # before any test module imports mysql.connector


def pytest_report_header() -> str:
    return _mysql_mode.describe()


@pytest.fixture(scope="session")
def mysql_pure(pytestconfig: pytest.Config) -> bool:
    """True when this run tests mysql-connector's pure-Python connection (``--mysql-pure``)."""
    return bool(pytestconfig.getoption(_mysql_mode.OPTION))


ENGINES = [
    pytest.param("postgres", marks=pytest.mark.postgres, id="postgres"),
    pytest.param("mysql", marks=pytest.mark.mysql, id="mariadb"),
]
# ENGINES, with PostgreSQL on each of its drivers: "postgres" is psycopg2 (the default),
# "postgres+psycopg" psycopg 3. A test about the driver takes `cluster` with these
# (`both_drivers`) and its `driver` fixture, which it passes as the driver option.
ENGINES_AND_DRIVERS = [
    pytest.param("postgres", marks=pytest.mark.postgres, id="postgres"),
    pytest.param("postgres+psycopg", marks=pytest.mark.postgres, id="postgres-psycopg"),
    pytest.param("mysql", marks=pytest.mark.mysql, id="mariadb"),
]
both_drivers = pytest.mark.parametrize("cluster", ENGINES_AND_DRIVERS, indirect=True)
PG_DRIVERS = ["psycopg2", "psycopg"]


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[LocalCluster]:
    cluster = PostgresCluster(replicas=2).start()
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture(scope="session")
def maria_cluster() -> Iterator[LocalCluster]:
    cluster = MariaDBCluster(replicas=2).start()
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture(scope="session")
def patroni_cluster() -> Iterator[PatroniCluster]:
    """etcd and three Patroni members (PostgreSQL 15) with ``synchronous_mode: true``, made as
    ``dbrouter drill --local patroni --sync`` makes its cluster; shared by every Patroni test
    (each heals it first: see ``tests/test_patroni.py``). Missing packages fail the run."""
    cluster = make_cluster("patroni", replicas=2, sync=True).start()
    assert isinstance(cluster, PatroniCluster)
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture(params=ENGINES)
def cluster(request: pytest.FixtureRequest) -> LocalCluster:
    """The running cluster of each engine in turn, with replication running."""
    name = "pg_cluster" if request.param.startswith("postgres") else "maria_cluster"
    found: LocalCluster = request.getfixturevalue(name)
    for replica in found.replicas:
        found.resume_replication(replica)
    return found


@pytest.fixture
def driver(request: pytest.FixtureRequest) -> str:
    """The driver option for a test run on `both_drivers` (or with ``engine`` from
    ENGINES_AND_DRIVERS): "psycopg" on its postgres-psycopg run, "" (the engine's default)
    on the others. Not installed, psycopg fails the run (ConfigurationError): never a skip."""
    callspec = getattr(request.node, "callspec", None)
    params = callspec.params if callspec is not None else {}
    param = params.get("cluster", params.get("engine", ""))
    return str(param).partition("+")[2]


@pytest.fixture(params=PG_DRIVERS)
def pg_driver(request: pytest.FixtureRequest) -> str:
    """Each PostgreSQL driver in turn, for the PostgreSQL-only tests about the driver."""
    return str(request.param)


@dataclass
class Tagged:
    """A URL whose server sessions can be counted: PostgreSQL by application_name,
    MariaDB by the session's current database (MariaDB does not show connection
    attributes in its process list)."""

    url: str
    tag: str
    node: LocalNode
    engine: str

    @property
    def connect_options(self) -> dbrouter.ConnectOptions:
        return dbrouter.ConnectOptions(application_name=self.tag, connect_timeout=3)

    def sessions(self) -> int:
        if self.engine == "postgres":
            rows = self.node.query(
                f"SELECT count(*) FROM pg_stat_activity WHERE application_name = '{self.tag}'"
            )
        else:
            rows = self.node.query(
                f"SELECT count(*) FROM information_schema.PROCESSLIST WHERE DB = '{self.tag}'"
            )
        return int(rows[0][0])


@pytest.fixture
def tagged(cluster: LocalCluster) -> Iterator[Tagged]:
    """The primary's URL, marked so that the test can count its server sessions."""
    tag = "t" + uuid.uuid4().hex[:12]
    node = cluster.primary
    url = node.url
    if cluster.engine == "mariadb":
        cluster.create_database(tag)  # the application user's, as the cluster's own database
        address = parse_address(url)
        url = url.rsplit("/", 1)[0] + f"/{tag}"
        assert parse_address(url).port == address.port
    yield Tagged(url=url, tag=tag, node=node, engine="postgres" if cluster.engine == "postgres" else "mysql")
    if cluster.engine == "mariadb":
        node.query(f"DROP DATABASE IF EXISTS {tag}")


@pytest.fixture
def maria_file_url(maria_cluster: LocalCluster) -> Iterator[str]:
    """The MariaDB primary's URL for a user of its own with the FILE privilege (``SELECT ...
    INTO OUTFILE``), which the cluster's application user lacks; dropped afterwards."""
    user, password = "f" + uuid.uuid4().hex[:10], uuid.uuid4().hex
    account = f"'{user}'@'127.0.0.1'"
    primary = maria_cluster.primary
    primary.query(f"CREATE USER {account} IDENTIFIED BY %s", (password,))
    primary.query(f"GRANT FILE ON *.* TO {account}")
    primary.query(f"GRANT SELECT ON `{maria_cluster.database}`.* TO {account}")
    try:
        yield f"mariadb://{user}:{password}@127.0.0.1:{primary.port}/{maria_cluster.database}"
    finally:
        primary.query(f"DROP USER IF EXISTS {account}")


def engine_of(cluster: LocalCluster) -> str:
    return "postgres" if cluster.engine == "postgres" else "mysql"


def backend_id(adapter: Any, conn: Any) -> int:
    """The server's id for this session: pg_backend_pid() or CONNECTION_ID()."""
    sql = "SELECT pg_backend_pid()" if adapter.engine == "postgres" else "SELECT CONNECTION_ID()"
    rows, _ = adapter.execute(conn, sql)
    return int(rows[0][0])


def kill_session(cluster: LocalCluster, session_id: int) -> None:
    """Terminate a server session from the outside, as an operator or a failover would."""
    if cluster.engine == "postgres":
        cluster.primary.query(f"SELECT pg_terminate_backend({session_id})")
    else:
        cluster.primary.query(f"KILL {session_id}")


def port_sql(cluster: Any) -> str:
    """The expression that makes a server say which port it listens on: who answered."""
    return "inet_server_port()" if cluster.engine == "postgres" else "@@port"


def free_low_port() -> int:
    """A free loopback port below the ephemeral range: while a proxy refuses, its closed
    listening port must not be taken by an outgoing connection (see NOTES.md). Held for
    the rest of the run against other processes (`allocate_ports`' lock files): a chaos
    run or another test run on the machine does not take it while it is closed, nor do
    we take one of theirs."""
    return allocate_ports(1)[0]


def wait_until(predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.02) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` passes; returns its last verdict."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


@pytest.fixture
def table(cluster: LocalCluster) -> Iterator[str]:
    """A fresh ``(id, port)`` table on the primary, replicated everywhere; dropped afterwards."""
    name = "t" + uuid.uuid4().hex[:10]
    cluster.primary.query(f"CREATE TABLE {name} (id bigint primary key, port int)")
    cluster.wait_replicated(timeout=10)
    yield name
    for replica in cluster.replicas:
        cluster.resume_replication(replica)
    cluster.primary.query(f"DROP TABLE IF EXISTS {name}")


@pytest.fixture
def dns_server() -> Iterator[DNSServer]:
    """A DNS server of the test's own on 127.0.0.1 (UDP and TCP, ``dns_server.port``), with an
    empty record table: ``dns_server.set("db.test.", "A", ["127.0.0.1"])``. Stopped afterwards;
    an error while answering fails the test."""
    server = DNSServer().start()
    try:
        yield server
    finally:
        server.stop()
    assert not server.errors, server.errors
