"""URL and keyword-string parsing (pure logic)."""

from __future__ import annotations

from urllib.parse import quote

import pytest

from dbrouter import ConfigurationError
from dbrouter.url import NodeAddress, mask_password, parse_address, resolve_driver


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


@pytest.mark.parametrize(
    ("url", "scheme", "driver"),
    [
        ("postgresql://app@db1/shop", "postgresql", ""),
        ("postgresql+psycopg://app@db1/shop", "postgresql+psycopg", "psycopg"),
        ("postgres+psycopg://app@db1/shop", "postgres+psycopg", "psycopg"),
        ("PostgreSQL+Psycopg2://app@db1/shop", "postgresql+psycopg2", "psycopg2"),
        ("postgres+psycopg2://app@db1/shop", "postgres+psycopg2", "psycopg2"),
        ("mariadb://app@db1/shop", "mariadb", ""),
    ],
)
def test_a_scheme_may_name_the_driver(url: str, scheme: str, driver: str) -> None:
    address = parse_address(url.replace("@", ":pw-secret@"))
    assert (address.scheme, address.driver, address.host, address.database) == (scheme, driver, "db1", "shop")
    assert address.engine == ("mysql" if scheme == "mariadb" else "postgres")
    assert address.redacted.startswith(f"{scheme}://app:***@db1:")  # shown as it was written


@pytest.mark.parametrize("url", ["postgresql+asyncpg://app@db1/x", "mysql+psycopg://app@db1/x", "postgresql+://app@db1/x"])
def test_a_scheme_naming_a_driver_dbrouter_has_no_adapter_for_is_refused(url: str) -> None:
    with pytest.raises(ConfigurationError, match="unknown URL scheme .*: use one of .*postgresql\\+psycopg, "):
        parse_address(url)


def test_resolve_driver() -> None:
    plain, named = parse_address("postgresql://app@db1/x"), parse_address("postgresql+psycopg://app@db1/x")
    assert [resolve_driver(plain), resolve_driver(plain, "psycopg"), resolve_driver(named), resolve_driver(named, "psycopg")] == [
        "psycopg2", "psycopg", "psycopg", "psycopg"]
    assert resolve_driver(parse_address("mysql://app@db1/x")) == "mysql-connector"
    with pytest.raises(ConfigurationError, match="names the driver 'psycopg' but the driver option names 'psycopg2'"):
        resolve_driver(named, "psycopg2")
    with pytest.raises(ConfigurationError, match="driver 'psycopg' does not serve mysql node db1:3306"):
        resolve_driver(parse_address("mysql://app@db1/x"), "psycopg")
    with pytest.raises(ConfigurationError, match="driver 'odbc' does not serve postgres node db2:5432"):
        resolve_driver(NodeAddress(engine="postgres", host="db2", port=5432, driver="odbc"))


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


# -- passwords with characters that end a part of a URL (issue 13, item 9) --------

SECRET = "Xy7-secret-pw"


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://app:4711/xyz@db1/app",  # the '/' ends the host part: host 'app', port 4711 before
        f"postgresql://app:{SECRET}/x@db1/app",
        f"postgresql://app:{SECRET}?x@db1/app",
        f"postgresql://app:{SECRET}#x@db1/app",
        f"mysql://app:a/{SECRET}@db1:3306/app?ssl_disabled=true",
        f"postgresql://app:x@{SECRET}/x@db1/app",
    ],
)
def test_an_unencoded_separator_in_a_password_is_refused_without_quoting_it(url: str) -> None:
    with pytest.raises(ConfigurationError, match="percent-encode") as info:
        parse_address(url)
    message = str(info.value)
    for fragment in ("4711", "xyz", SECRET, "db1"):
        assert fragment not in message, message


def test_an_unencoded_at_in_a_password_is_part_of_it() -> None:
    address = parse_address(f"postgresql://app:{SECRET}@x@db1:5433/app")
    assert (address.user, address.password, address.host, address.port, address.database) == (
        "app", f"{SECRET}@x", "db1", 5433, "app",
    )
    assert SECRET not in repr(address) and SECRET not in address.redacted


@pytest.mark.parametrize(
    "password", [f"{SECRET}/?#@:%&=+ ;[]", f"{SECRET}\u00e9\u4e2d\U0001f600", f"{SECRET}\uff20\uff0f\u2100", f"{SECRET}\t\n"],
)
def test_percent_encoded_passwords_round_trip(password: str) -> None:
    address = parse_address(f"postgresql://app:{quote(password, safe='')}@db1/app")
    assert (address.password, address.host, address.database) == (password, "db1", "app")


def test_characters_that_normalise_to_separators_are_not_echoed() -> None:
    # Python's urlsplit refuses these (NFKC gives '@' and '/') and quotes the whole netloc.
    address = parse_address(f"postgresql://app:{SECRET}\uff20\uff0f@db1/app")
    assert address.password == f"{SECRET}\uff20\uff0f"


@pytest.mark.parametrize(
    "url",
    [f"postgresql://app:{SECRET}\n@db1/app", f"postgresql://app:{SECRET}%ff@db1/app", f"postgresql://app:{SECRET}@db1:{SECRET}/x",
     f"postgresql://app:{SECRET}@db1/x?{SECRET}", f"postgresql://app:{SECRET}@[db1/x"],
)
def test_other_malformed_urls_do_not_quote_the_password(url: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        parse_address(url)
    assert SECRET not in str(info.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("postgresql://app@db1:0/app", "port in a database URL must be a number from 1 to 65535, got 0"),
        ("mysql://app@db1:65536/app", "from 1 to 65535, got 65536"),
        ("postgresql://app@db1:-1/app", "from 1 to 65535"),
        ("postgresql://app@db1:\u0665\u0664/app", "from 1 to 65535"),  # Arabic-Indic digits
        ("host=db1 port=0", "port in a connection string must be a number from 1 to 65535, got 0"),
        ("host=db1 port=70000", "got 70000"),
    ],
)
def test_port_zero_or_out_of_range_is_refused(text: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        parse_address(text)


def test_an_empty_port_is_the_default() -> None:
    assert parse_address("postgresql://app@db1:/app").port == 5432


def test_a_url_that_is_not_a_string_says_so() -> None:
    with pytest.raises(ConfigurationError, match="must be a string, got int"):
        parse_address(123)  # type: ignore[arg-type]


def test_keyword_string_errors_do_not_quote_values() -> None:
    with pytest.raises(ConfigurationError, match="after the value of 'password'") as info:
        parse_address(f"host=db1 password=abc {SECRET} dbname=x")
    assert SECRET not in str(info.value)


@pytest.mark.parametrize(
    "text",
    [
        f"postgresql://app:{SECRET}@x@db1/app",
        f"postgresql://app:a@{SECRET}/b@db1/app",
        f"redis://:{SECRET}@@redis1:6379/0",
        f"app:{SECRET}@x@redis1:6379",
        f"host=db1 password='{SECRET} x' user=app",
        f"postgresql://db1/app?password={SECRET}&sslmode=require",
    ],
)
def test_mask_password_hides_everything_up_to_the_last_at(text: str) -> None:
    masked = mask_password(text)
    assert SECRET not in masked, masked
    assert "***" in masked


@pytest.mark.parametrize(
    "text",
    ["postgresql://app:a%00b@db1/app", "mysql://a%00@db1/app", "postgresql://app@db1/x%00y", "postgresql://db1/x?sslmode=a%00",
     "host=db1 password=a\x00b"],
)
def test_a_nul_is_refused_when_parsed_not_at_every_connect(text: str) -> None:
    # psycopg2 and mysql-connector raise ValueError (embedded null character) at connect time.
    with pytest.raises(ConfigurationError, match="contains a NUL character"):
        parse_address(text)
