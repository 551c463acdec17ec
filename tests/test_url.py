"""URL and keyword-string parsing (pure logic)."""

from __future__ import annotations

import pytest

from dbrouter import ConfigurationError
from dbrouter.url import parse_address


@pytest.mark.parametrize(
    ("url", "engine", "port"),
    [
        ("postgresql://app@db1/shop", "postgres", 5432),
        ("postgres://app@db1:6432/shop", "postgres", 6432),
        ("mysql://app@db1/shop", "mysql", 3306),
        ("mariadb://app@db1:3307/shop", "mysql", 3307),
        ("MySQL://app@db1/shop", "mysql", 3306),
    ],
)
def test_schemes(url: str, engine: str, port: int) -> None:
    address = parse_address(url)
    assert (address.engine, address.host, address.port, address.user, address.database) == (
        engine, "db1", port, "app", "shop",
    )


def test_url_details() -> None:
    address = parse_address("postgresql://a%40b:p%2Fw@[::1]:5433/my%20db?sslmode=verify-full&connect_timeout=3")
    assert address.user == "a@b"
    assert address.password == "p/w"
    assert address.host == "::1"
    assert address.name == "[::1]:5433"
    assert address.database == "my db"
    assert dict(address.options) == {"sslmode": "verify-full", "connect_timeout": "3"}


def test_libpq_keywords() -> None:
    address = parse_address("host=db2 port=5433 dbname=shop user=app password='it\\'s' application_name='my app'")
    assert address.engine == "postgres"
    assert (address.host, address.port, address.database, address.user) == ("db2", 5433, "shop", "app")
    assert address.password == "it's"
    assert dict(address.options) == {"application_name": "my app"}


def test_engine_mismatch() -> None:
    with pytest.raises(ConfigurationError, match="is a mysql URL, expected postgres"):
        parse_address("mysql://app@db1/x", engine="postgres")


@pytest.mark.parametrize("text", ["", "   ", "postgresql://", "postgresql://app@/x", "host='unterminated"])
def test_rejected(text: str) -> None:
    with pytest.raises(ConfigurationError):
        parse_address(text)
