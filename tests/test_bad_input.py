"""Bad input: each mistake gives a dbrouter error naming the problem and the node, never a password."""

from __future__ import annotations

import contextlib
import logging
import socket
from typing import Callable

import pytest

import dbrouter
from dbrouter import ConfigurationError, ConnectError, PoolConfig, connect_pool
from dbrouter.faultproxy import FaultProxy
from dbrouter.url import parse_address

from .conftest import both_drivers, wait_until

SECRET = "s3cr3t-Pa55"


def free_port(start: int = 29000, skip: Callable[[int], bool] = lambda port: False) -> int:
    """A loopback port below the ephemeral range that nothing listens on (from ``start``,
    and not one ``skip`` refuses)."""
    for port in range(start, 29500):
        if skip(port):
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


def scheme(cluster, driver: str = "") -> str:
    """The cluster's URL scheme, naming ``driver`` when one is given (``postgresql+psycopg``)."""
    if cluster.engine != "postgres":
        return "mariadb"
    return f"postgresql+{driver}" if driver else "postgresql"


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        assert SECRET not in text, text


def test_unknown_scheme() -> None:
    with pytest.raises(ConfigurationError, match="unknown URL scheme 'oracle'") as info:
        parse_address(f"oracle://app:{SECRET}@db1:1521/x")
    assert_no_secret(str(info.value))


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://app:{SECRET}@db1:notaport/x",
        f"mysql://app:{SECRET}@:3306/x",
        f"just-a-host-with-{SECRET}",
        "",
    ],
)
def test_malformed_url(url: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        connect_pool(url)
    assert_no_secret(str(info.value))


@both_drivers
def test_wrong_password(cluster, driver: str, caplog: pytest.LogCaptureFixture) -> None:
    node = cluster.primary
    url = f"{scheme(cluster, driver)}://{cluster.user}:{SECRET}@127.0.0.1:{node.port}/{cluster.database}"
    with caplog.at_level(logging.DEBUG, logger="dbrouter"):
        pool = connect_pool(url, pool=PoolConfig(min_size=0))
        with pytest.raises(ConnectError) as info:
            pool.acquire()
        pool.close()
    message = str(info.value)
    assert f"127.0.0.1:{node.port}" in message
    assert ("password" in message.lower()) or ("access denied" in message.lower())
    assert info.value.node == f"127.0.0.1:{node.port}"
    assert_no_secret(message, repr(pool), repr(pool.adapter), repr(pool.adapter.address), str(pool.adapter.address))
    assert_no_secret(*(r.getMessage() for r in caplog.records))
    assert info.value.__cause__ is None and info.value.__context__ is None or SECRET not in str(info.value.__context__)
    assert pool.adapter.driver.startswith(driver)


@pytest.mark.parametrize("alias", ["localhost", "proxy"])
def test_one_server_named_twice_is_a_configuration_error(cluster, alias: str) -> None:
    """Issue 13 item 7: 127.0.0.1:port as primary and localhost:port as replica was accepted,
    and then every write raised SplitBrain. The server behind each probe connection is
    identified (PostgreSQL: system identifier, port, postmaster start; MariaDB: server id,
    host name, port, data directory), so a second name (another host name, or a TCP proxy
    in front of a replica) is a ConfigurationError naming both nodes."""
    primary, replica = cluster.primary, cluster.replicas[0]
    password = parse_address(primary.url).password
    with contextlib.ExitStack() as stack:
        if alias == "localhost":
            twice, second = primary, primary.url.replace("@127.0.0.1:", "@localhost:")
        else:
            proxy = stack.enter_context(FaultProxy(upstream=("127.0.0.1", replica.port)))
            twice, second = replica, replica.url.replace(f":{replica.port}/", f":{proxy.port}/")
        assert second != twice.url
        seen: list[dbrouter.Event] = []
        router = stack.enter_context(dbrouter.Router(
            primary.url, [second, *(n.url for n in cluster.replicas)], health_interval=0.1, open=False))
        router.on("same_server", seen.append)
        router.open()
        # The nodes, in order: primary, second, the replicas: the pair is (primary, second) or (second, replica 0).
        pair = router.nodes[0:2] if twice is primary else router.nodes[1:3]
        names = sorted(n.name for n in pair)
        with pytest.raises(ConfigurationError) as info:
            router.wait_for_probes(2, timeout=10)
        message = str(info.value)
        assert len(names) == 2 and all(name in message for name in names), (names, message)
        assert "one server" in message and password not in message
        with pytest.raises(ConfigurationError, match="one server"):  # not SplitBrain, and nothing sent
            router.write("INSERT INTO nowhere VALUES (1)")
        assert [sorted(group) for group in router.stats()["same_server"]] == [names]
        assert wait_until(lambda: len(seen) == 1) and sorted(seen[0].data["nodes"][0]) == names
        assert router.read("SELECT 1") == [(1,)]  # reads go on
    # Distinct servers are fine; with static discovery the addresses are someone else's to manage.
    with dbrouter.Router(primary.url, [n.url for n in cluster.replicas], health_interval=0.1) as router:
        assert router.wait_for_probes(2, timeout=10) and router.stats()["same_server"] == []
    with dbrouter.Router(primary.url, [primary.url.replace("@127.0.0.1:", "@localhost:")],
                         health_interval=0.1, primary_discovery="static") as router:
        assert router.wait_for_probes(2, timeout=10)
        assert router.write("SELECT 1") in (-1, 0, 1)


@both_drivers
def test_unreachable_port(cluster, driver: str) -> None:
    port = free_port()
    pool = connect_pool(f"{scheme(cluster, driver)}://app:{SECRET}@127.0.0.1:{port}/x", pool=PoolConfig(min_size=0))
    with pytest.raises(ConnectError) as info:
        pool.acquire()
    pool.close()
    assert f"127.0.0.1:{port}" in str(info.value)
    assert "refused" in str(info.value).lower() or "can't connect" in str(info.value).lower()
    assert_no_secret(str(info.value))


@pytest.mark.parametrize(
    ("url", "option"),
    [
        (f"postgresql://app:{SECRET}@127.0.0.1:5432/x?sslmod=require", "sslmod"),
        (f"postgresql+psycopg://app:{SECRET}@127.0.0.1:5432/x?sslmod=require", "sslmod"),
        (f"postgresql+psycopg://app:{SECRET}@127.0.0.1:5432/x?keepalives=2", "keepalives"),
        (f"mariadb://app:{SECRET}@127.0.0.1:3306/x?ssl_ca_path=/x", "ssl_ca_path"),
        (f"mariadb://app:{SECRET}@127.0.0.1:3306/x?ssl_disabled=maybe", "ssl_disabled"),
    ],
)
def test_invalid_option(url: str, option: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        connect_pool(url)
    assert option in str(info.value)
    assert "127.0.0.1" in str(info.value)
    assert_no_secret(str(info.value))


@pytest.mark.parametrize(
    "config",
    [
        {"min_size": -1},
        {"max_size": 0},
        {"min_size": 5, "max_size": 2},
        {"acquire_timeout": -1.0},
        {"max_lifetime": 0},
        {"leak_threshold": "soon"},
    ],
)
def test_invalid_pool_config_names_the_field(config: dict) -> None:
    with pytest.raises(ConfigurationError) as info:
        PoolConfig(**config)
    assert next(iter(config)) in str(info.value)


def test_unknown_pool_option_is_rejected() -> None:
    with pytest.raises(TypeError, match="max_sise"):
        PoolConfig(max_sise=3)  # type: ignore[call-arg]


def test_redaction_everywhere() -> None:
    address = parse_address(f"postgresql://app:{SECRET}@db1:5433/shop?sslmode=require&sslpassword={SECRET}")
    assert_no_secret(repr(address), str(address), address.redacted)
    assert address.redacted == "postgresql://app:***@db1:5433/shop?sslmode=require"
    keywords = parse_address(f"host=db1 port=5433 user=app password='{SECRET}' dbname=shop")
    assert keywords.password == SECRET
    assert_no_secret(repr(keywords), keywords.redacted)


def test_errors_belong_to_dbrouter() -> None:
    for name in ("ConfigurationError", "ConnectError", "PoolTimeout", "PoolClosed", "WriteOutcomeUnknown"):
        cls = getattr(dbrouter, name)
        assert cls.__module__ == "dbrouter"
        assert issubclass(cls, dbrouter.DbRouterError)
