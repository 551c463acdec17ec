"""Configuration validation (pure logic): every number bounded, every bad input named, no secret shown."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest

from dbrouter import ConfigurationError, Router
from dbrouter.config import FLAT_OPTIONS, SECTIONS, build_router_config, load_router_config

PRIMARY = "postgresql://app:Pw-4711-secret@127.0.0.1:5432/app"
SECRET = "Pw-4711-secret"

NUMERIC = sorted(
    f.name for cls in SECTIONS.values() for f in dataclasses.fields(cls)
    if any(t in str(f.type) for t in ("int", "float"))
)


def test_the_numeric_options_are_the_ones_expected() -> None:
    # A new numeric option must get a bound: this list makes it show up here.
    assert set(NUMERIC) == set(FLAT_OPTIONS) - {
        "application_name", "policy", "fallback_to_primary", "primary_discovery", "breaker_redis_url",
        "discovery", "discovery_endpoints", "discovery_nameservers", "driver",
    }


@pytest.mark.parametrize("name", NUMERIC)
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, 1e308, 10**30, -1, True, "5", [1]])
def test_every_numeric_option_refuses_absurd_values_naming_the_option_and_the_range(name: str, value: Any) -> None:
    with pytest.raises(ConfigurationError) as info:
        build_router_config(PRIMARY, (), {name: value})
    message = str(info.value)
    assert f".{name} must be" in message, message
    assert "<=" in message, message  # the allowed range, upper bound included


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"connect_timeout": math.inf}, "ConnectOptions.connect_timeout must be > 0 and <= 86400, got inf"),
        ({"statement_timeout": 1e308}, "statement_timeout must be >= 0.001 and <= 2147483.647 or None, got 1e+308"),
        # MariaDB would get max_statement_time = 0.000: no limit at all.
        ({"statement_timeout": 0.0001}, "statement_timeout must be >= 0.001"),
        ({"acquire_timeout": math.inf}, "PoolConfig.acquire_timeout must be > 0 and <= 86400, got inf"),
        ({"reset_timeout": math.inf}, "BreakerPolicy.reset_timeout must be > 0 and <= 86400, got inf"),
        ({"keepalive_count": 128}, "keepalive_count must be >= 1 and <= 127, got 128"),
        ({"keepalive_idle": 40000}, "keepalive_idle must be >= 1 and <= 32767"),
        ({"max_size": 10**6}, "max_size must be >= 1 and <= 100000"),
        ({"min_size": 10**5000}, "min_size must be >= 0 and <= 100000, got an integer of thousands of digits"),
        ({"retry_backoff": math.nan}, "retry_backoff must be a number >= 0 and <= 86400, got nan"),
        ({"fail_max": False}, "fail_max must be an integer >= 1 and <= 1000000, got False"),
        ({"max_lifetime": math.inf}, "max_lifetime must be > 0 and <= 31536000 or None, got inf"),
    ],
)
def test_messages_name_the_option_and_the_range(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message.replace("+", r"\+")):
        build_router_config(PRIMARY, (), options)


@pytest.mark.parametrize(
    "options",
    [
        {"connect_timeout": 86400, "statement_timeout": 2147483.647, "acquire_timeout": 86400.0},
        {"statement_timeout": 0.001, "keepalive_idle": 32767, "keepalive_count": 127, "max_size": 100000},
        {"max_lifetime": None, "max_idle": 31536000, "reset_timeout": 86400, "fail_max": 1000000},
    ],
)
def test_the_bounds_themselves_are_accepted(options: dict[str, Any]) -> None:
    build_router_config(PRIMARY, (), options)


@pytest.mark.parametrize("weight", [math.inf, math.nan, 0, -1, 1e7, True])
def test_a_replica_weight_names_the_node(weight: Any) -> None:
    replicas = [{"url": "postgresql://app@db3:5433/app", "weight": weight}, {"url": "postgresql://app@db4/app", "name": "db4"}]
    with pytest.raises(ConfigurationError, match=r"replica #1: replica.weight must be .*> 0 and <= 1000000 for replica db3:5433"):
        build_router_config(PRIMARY, replicas)
    replicas[1]["weight"] = weight
    replicas[0]["weight"] = 2
    with pytest.raises(ConfigurationError, match="replica #2: .* for replica db4"):
        build_router_config(PRIMARY, replicas)


@pytest.mark.parametrize(
    ("primary", "replicas", "message"),
    [
        (123, (), "primary must be a URL string .*got int"),
        (0, (), "primary must be a URL string .*got int"),
        (b"postgresql://db1/x", (), "primary must be a URL string .*got bytes"),
        ({"url": 123}, (), "primary must be a URL string .*got int"),
        ({"url": PRIMARY, "name": 5}, (), "primary name must be a non-empty string"),
        (PRIMARY, 123, "replicas must be a list .*got int"),
        (PRIMARY, {"url": PRIMARY}, "replicas must be a list .*got dict"),
        (PRIMARY, b"postgresql://db2/x", "replicas must be a list .*got bytes"),
        (PRIMARY, [123], "replica #1: a replica must be a URL or a table .*got int"),
        (PRIMARY, ["postgresql://db2/x", None], "replica #2: a replica must be a URL or a table .*got NoneType"),
        (PRIMARY, [{"weight": 2}], "replica #1: a replica table needs a url"),
        (PRIMARY, [{"url": 123}], "replica #1: replica URL must be a string, got int"),
        (PRIMARY, [{"url": "postgresql://db2/x", "name": ""}], "replica #1: replica name must be a non-empty string"),
        (PRIMARY, [{"url": "postgresql://db2/x", 7: 1}], "unknown option.*7"),
        ("postgresql://app@db1:0/app", (), "primary: the port in a database URL must be a number from 1 to 65535, got 0"),
        (PRIMARY, ["postgresql://app:x/y@db2/app"], "replica #1: malformed database URL: .*percent-encode"),
    ],
)
def test_wrong_types_and_shapes_are_configuration_errors(primary: Any, replicas: Any, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message) as info:
        build_router_config(primary, replicas)
    assert SECRET not in str(info.value)


def test_repr_and_str_of_the_config_show_no_password() -> None:
    redis = "redis://:Redis-pw-secret@localhost:6379/0"
    config = build_router_config(
        PRIMARY, [f"postgresql://app:{SECRET}@db2/app", {"url": f"postgresql://app:{SECRET}@db3/app", "name": "db3"}],
        {"breaker_redis_url": redis},
    )
    for text in (repr(config), str(config), repr(config.breaker), str(config.breaker), repr(config.replicas)):
        assert SECRET not in text and "Redis-pw-secret" not in text, text
    assert "redis://:***@localhost:6379/0" in repr(config)
    with pytest.raises(ConfigurationError) as info:
        build_router_config(PRIMARY, (), {"breaker_redis_url": "http://:Redis-pw-secret@localhost"})
    assert "Redis-pw-secret" not in str(info.value)


def test_router_repr_and_config_repr_show_no_password_with_open_false() -> None:
    # (No breaker_redis_url here: pybreaker's Redis storage talks to Redis at construction.)
    router = Router(PRIMARY, [f"postgresql://app:{SECRET}@127.0.0.2/app"], open=False)
    try:
        for text in (repr(router), repr(router.config), str(router.config)):
            assert SECRET not in text, text
    finally:
        router.close()


@pytest.mark.parametrize("value", [math.inf, math.nan, -1.0, 1e308, True, "5"], ids=repr)
def test_timeouts_of_calls_are_checked_before_anything_waits(value: Any) -> None:
    """Per-call timeouts (not options) are numbers of seconds up to a day: an infinite one
    used to raise OverflowError from deep in threading (or wait for ever)."""
    router = Router(PRIMARY, [], open=False)
    pool = router.topology.snapshot.primary.pool
    calls = [lambda: router.wait_for_probes(timeout=value), lambda: pool.acquire(timeout=value),
             lambda: pool.wait_ready(timeout=value), lambda: pool.close(timeout=value),
             lambda: router.close(timeout=value)]
    try:
        for call in calls:
            with pytest.raises(ConfigurationError, match=r"timeout must be .*86400"):
                call()
        with pytest.raises(ConfigurationError, match="rounds"):
            router.wait_for_probes(rounds=0, timeout=1)
    finally:
        router.close()


def test_dbrouter_replicas_keeps_commas_inside_passwords() -> None:
    env = {
        "DBROUTER_PRIMARY": PRIMARY,
        "DBROUTER_REPLICAS": "postgresql://app:a,b@db2/app, postgresql://app:c%2Cd,postgresql@db3/app,postgresql://db4/app",
    }
    config = load_router_config(None, env=env)
    assert [r.url for r in config.replicas] == [
        "postgresql://app:a,b@db2/app", "postgresql://app:c%2Cd,postgresql@db3/app", "postgresql://db4/app",
    ]
    keywords = load_router_config(None, env={"DBROUTER_PRIMARY": PRIMARY,
                                             "DBROUTER_REPLICAS": "host=db2 password=x,y,host=db3"})
    assert [r.url for r in keywords.replicas] == ["host=db2 password=x,y", "host=db3"]


@pytest.mark.parametrize(("key", "text"), [("DBROUTER_CONNECT_TIMEOUT", "inf"), ("DBROUTER_MAX_SIZE", "1e9"),
                                           ("DBROUTER_STATEMENT_TIMEOUT", "nan"), ("DBROUTER_WEIGHT", "2")])
def test_environment_numbers_are_checked_too(key: str, text: str) -> None:
    with pytest.raises(ConfigurationError):
        load_router_config(None, env={"DBROUTER_PRIMARY": PRIMARY, key: text})


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("postgresql://app@127.0.0.1:5433/x?connect_timeout=0", "'connect_timeout' of postgres node 127.0.0.1:5433: .*from 1 to 86400"),
        ("postgresql://app@127.0.0.1/x?connect_timeout=inf", "'connect_timeout' of postgres node"),
        ("postgresql://app@127.0.0.1/x?keepalives_count=1000", "from 1 to 127, got '1000'"),
        ("postgresql://app@127.0.0.1/x?tcp_user_timeout=99999999999", "from 0 to 2147483647"),
        ("mariadb://app@127.0.0.1:3307/x?read_timeout=0", "'read_timeout' of mysql node 127.0.0.1:3307: .*from 1 to 86400"),
        ("mariadb://app@127.0.0.1/x?write_timeout=99999999999999999999", "'write_timeout' of mysql node"),
    ],
)
def test_numeric_url_options_are_bounded_and_name_the_node(url: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        Router(url, open=False)


@pytest.mark.parametrize("url", ["redis://:Redis/pw-secret@localhost:6379/0", "redis://:Redis-pw-secret@localhost:6379/0?socket_timeout=soon",
                                 "unix://:Redis-pw-secret@/tmp/redis.sock?db=zz"])
def test_a_bad_redis_url_is_a_configuration_error_without_the_password(url: str) -> None:
    # Refused before pybreaker's storage would talk to Redis.
    with pytest.raises(ConfigurationError, match="breaker_redis_url is not a valid Redis URL") as info:
        Router(PRIMARY, open=False, breaker_redis_url=url)
    assert "pw-secret" not in str(info.value) and "Redis" not in str(info.value).replace("Redis URL", "")


def test_an_application_name_with_a_nul_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="application_name must be a string without NUL"):
        build_router_config(PRIMARY, (), {"application_name": "app\x00"})


# -- discovery ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"discovery": "consul"}, "DiscoveryConfig.discovery must be one of static, patroni, dns, mysql"),
        ({"discovery": object()}, "an object with members\\(\\) and close\\(\\).*got object"),
        ({"discovery": "patroni"}, "discovery_endpoints is empty: patroni discovery needs at least one"),
        ({"discovery": "dns", "discovery_endpoints": []}, "dns discovery needs at least one"),
        ({"discovery": "dns", "discovery_endpoints": ["ok", ""]}, "discovery_endpoints must be a list of non-empty"),
        ({"discovery_endpoints": [5]}, "discovery_endpoints must be a list of non-empty strings"),
        ({"discovery_interval": 0}, "discovery_interval must be >= 0.05 and <= 3600"),
    ],
)
def test_discovery_options_are_checked(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        build_router_config(PRIMARY, (), options)


def test_discovery_endpoints_from_toml_lists_and_environment_text_never_show_a_password() -> None:
    config = load_router_config({"primary": PRIMARY, "discovery": {
        "discovery": "patroni", "discovery_endpoints": [f"http://patroni:{SECRET}@10.0.0.5:8008", "http://10.0.0.6:8008"]}})
    assert config.discovery.discovery_endpoints == (f"http://patroni:{SECRET}@10.0.0.5:8008", "http://10.0.0.6:8008")
    assert SECRET not in repr(config) and "10.0.0.6" in repr(config)
    from_env = load_router_config(None, env={
        "DBROUTER_PRIMARY": PRIMARY, "DBROUTER_DISCOVERY": "dns",
        "DBROUTER_DISCOVERY_ENDPOINTS": "a.db.internal, _pg._tcp.db.internal:5433",
        "DBROUTER_DISCOVERY_NAMESERVERS": "127.0.0.1:5353"})
    assert from_env.discovery.discovery_endpoints == ("a.db.internal", "_pg._tcp.db.internal:5433")
    assert from_env.discovery.discovery_nameservers == ("127.0.0.1:5353",)


# -- the driver ----------------------------------------------------------------------------


def _drivers(router: Router) -> list[str]:
    return [node.adapter.driver for node in router.nodes]


REPLICA = "postgresql://app:Pw-4711-secret@127.0.0.1:5433/app"


def test_the_driver_is_the_schemes_else_the_options_else_psycopg2(tmp_path: Any) -> None:
    with Router(PRIMARY, [REPLICA], open=False) as router:
        assert _drivers(router) == ["psycopg2", "psycopg2"]
    psycopg_urls = [url.replace("postgresql://", "postgresql+psycopg://") for url in (PRIMARY, REPLICA)]
    with Router(psycopg_urls[0], psycopg_urls[1:], open=False) as router:
        assert _drivers(router) == ["psycopg", "psycopg"]
        assert router.config.connect.driver is None
    with Router(PRIMARY, [REPLICA], driver="psycopg", open=False) as router:
        assert _drivers(router) == ["psycopg", "psycopg"]
    with Router(psycopg_urls[0], psycopg_urls[1:], driver="psycopg", open=False) as router:  # the same: fine
        assert _drivers(router) == ["psycopg", "psycopg"]
    with Router(PRIMARY.replace("postgresql://", "postgres+psycopg2://"), driver="psycopg2", open=False) as router:
        assert _drivers(router) == ["psycopg2"]
    # The option from every source: a [connect] table, the top level, the environment.
    path = tmp_path / "dbrouter.toml"
    path.write_text(f'primary = "{PRIMARY}"\n[connect]\ndriver = "psycopg"\n')
    assert load_router_config(str(path)).connect.driver == "psycopg"
    assert load_router_config({"primary": PRIMARY, "driver": "psycopg"}).connect.driver == "psycopg"
    env = {"DBROUTER_PRIMARY": PRIMARY, "DBROUTER_DRIVER": "psycopg"}
    assert load_router_config(None, env=env).connect.driver == "psycopg"


@pytest.mark.parametrize(
    ("primary", "replicas", "options", "message"),
    [
        (PRIMARY.replace("postgresql://", "postgresql+psycopg://"), [], {"driver": "psycopg2"},
         r"node 127\.0\.0\.1:5432: its URL scheme postgresql\+psycopg:// names the driver 'psycopg' "
         r"but the driver option names 'psycopg2'"),
        (PRIMARY, [REPLICA.replace("postgresql://", "postgres+psycopg2://")], {"driver": "psycopg"},
         r"node 127\.0\.0\.1:5433: its URL scheme postgres\+psycopg2:// names the driver 'psycopg2' "
         r"but the driver option names 'psycopg'"),
        (PRIMARY.replace("postgresql://", "postgresql+psycopg://"), [REPLICA], {},
         "would use the psycopg2 driver but the primary .* uses psycopg: one router uses one driver"),
        (PRIMARY, [], {"driver": "psycopg3"}, r"driver must be one of mysql-connector, psycopg, psycopg2 or None .*'psycopg3' "
                                              r"\(did you mean 'psycopg'\?\)"),
        (PRIMARY, [], {"driver": "mysql-connector"}, "driver 'mysql-connector' does not serve postgres node"),
        ("mariadb://app:Pw-4711-secret@127.0.0.1:3306/app", [], {"driver": "psycopg"},
         "driver 'psycopg' does not serve mysql node 127.0.0.1:3306; its drivers: mysql-connector"),
        (PRIMARY, [], {"drivr": "psycopg"}, "unknown option 'drivr' \\(did you mean 'driver'\\?\\)"),
    ],
)
def test_a_driver_that_cannot_be_is_a_configuration_error(primary: str, replicas: list[str], options: dict[str, Any],
                                                           message: str) -> None:
    with pytest.raises(ConfigurationError, match=message) as info:
        Router(primary, replicas, open=False, **options)
    assert SECRET not in str(info.value)


@pytest.mark.parametrize(("driver", "extra"), [("psycopg", "psycopg"), ("psycopg2", "postgres")])
def test_a_driver_that_is_not_installed_says_what_to_install(monkeypatch: pytest.MonkeyPatch, driver: str,
                                                             extra: str) -> None:
    import sys

    module = "dbrouter.adapters." + ("psycopg" if driver == "psycopg" else "postgres")
    monkeypatch.delitem(sys.modules, module, raising=False)  # as if never imported
    monkeypatch.setitem(sys.modules, driver, None)  # and the driver absent: find_spec() finds nothing
    with pytest.raises(ConfigurationError) as info:
        Router(PRIMARY, driver=driver, open=False)
    assert str(info.value) == (f"postgres node 127.0.0.1:5432 uses the {driver} driver, which is not installed: "
                               f"pip install 'dbrouter[{extra}]'")
