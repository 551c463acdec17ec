"""Parse node addresses: URLs and libpq keyword strings.

A parsed `NodeAddress` keeps the password out of ``repr``, ``str`` and every
error message: `NodeAddress.redacted` is the only form that is ever shown.

The rule for passwords (and user names) in a URL: percent-encode them
(``urllib.parse.quote(password, safe="")``). Unencoded, a ``/``, ``?`` or
``#`` ends the host part early, so the rest of the password would be read as
a host, port, database or option and show up in logs. dbrouter refuses such a
URL instead of guessing: a ``#`` anywhere, or an ``@`` after the host part, is
a `ConfigurationError` that says to percent-encode, and never quotes the URL.
An unencoded ``@`` inside the password is taken as part of it (the last ``@``
before the host ends the user information, as Python's ``urlsplit`` reads it;
libpq would stop at the first). A ``%`` always starts a percent-escape. So an
``@`` in a database name or an option value must be written ``%40``.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping
from urllib.parse import parse_qsl, quote, unquote

from .errors import ConfigurationError

__all__ = ["DRIVERS", "NodeAddress", "mask_password", "parse_address", "resolve_driver"]

# URL scheme -> engine. MariaDB speaks the MySQL protocol, so one adapter serves both.
# ``<scheme>+<driver>`` (SQLAlchemy's spelling) also names the driver.
SCHEMES: Mapping[str, str] = MappingProxyType(
    {
        "postgresql": "postgres",
        "postgres": "postgres",
        "postgresql+psycopg2": "postgres",
        "postgres+psycopg2": "postgres",
        "postgresql+psycopg": "postgres",
        "postgres+psycopg": "postgres",
        "mysql": "mysql",
        "mariadb": "mysql",
    }
)
DRIVERS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {"postgres": ("psycopg2", "psycopg"), "mysql": ("mysql-connector",)}
)
"""Engine -> the drivers dbrouter has an adapter for, its default first."""
DEFAULT_PORTS: Mapping[str, int] = MappingProxyType({"postgres": 5432, "mysql": 3306})
PORT_RANGE = (1, 65535)

_KEYWORD = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*")
_SCHEME_SHAPE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]{0,19}\Z")
_ENCODE_HINT = "percent-encode the user name and password, e.g. urllib.parse.quote(password, safe='')"


@dataclass(frozen=True)
class NodeAddress:
    """Where a node is and how to log in; `options` are passed to the driver."""

    engine: str
    host: str
    port: int
    user: str | None = None
    password: str | None = field(default=None, repr=False, compare=False)
    database: str | None = None
    options: Mapping[str, str] = field(default_factory=dict)
    scheme: str = ""
    driver: str = ""
    """The driver the URL's scheme names (``postgresql+psycopg://``); "": none, the ``driver``
    option or the engine's default decides (see `resolve_driver`)."""

    def __post_init__(self) -> None:
        # The drivers pass every part as a C string: a NUL would fail each connect (psycopg2 and
        # mysql-connector raise ValueError) instead of the configuration, once.
        parts = [("host", self.host), ("user name", self.user), ("password", self.password),
                 ("database name", self.database)]
        parts += [("options", f"{key}={value}") for key, value in self.options.items()]
        for what, value in parts:
            if value is not None and "\x00" in value:
                raise ConfigurationError(f"the {what} of a database address contains a NUL character (%00)")

    @property
    def name(self) -> str:
        """Short node name for logs and errors: ``host:port``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def redacted(self) -> str:
        """The URL with the password replaced by ``***``: safe to log."""
        auth = ""
        if self.user:
            auth = quote(self.user, safe="")
            if self.password is not None:
                auth += ":***"
            auth += "@"
        db = f"/{quote(self.database, safe='')}" if self.database else ""
        shown = {k: v for k, v in self.options.items() if not _is_secret(k)}
        query = "&".join(f"{k}={quote(str(v), safe='')}" for k, v in sorted(shown.items()))
        scheme = self.scheme or ("postgresql" if self.engine == "postgres" else "mysql")
        return f"{scheme}://{auth}{self.name}{db}" + (f"?{query}" if query else "")

    def __str__(self) -> str:
        return self.redacted

    def __repr__(self) -> str:
        return f"NodeAddress({self.redacted!r})"


def resolve_driver(address: NodeAddress, option: str | None = None) -> str:
    """The driver for ``address``: the one its scheme names, else ``option`` (the router's
    ``driver`` option), else its engine's default. Raises `ConfigurationError` when the
    scheme and the option name different drivers, or the driver does not serve the engine."""
    if address.driver and option and address.driver != option:
        raise ConfigurationError(
            f"node {address.name}: its URL scheme {address.scheme}:// names the driver {address.driver!r} "
            f"but the driver option names {option!r}; name one driver, or the same in both"
        )
    driver = address.driver or option or DRIVERS[address.engine][0]
    if driver not in DRIVERS[address.engine]:
        raise ConfigurationError(
            f"driver {driver!r} does not serve {address.engine} node {address.name}; "
            f"its drivers: {', '.join(DRIVERS[address.engine])}"
        )
    return driver


def _is_secret(key: str) -> bool:
    return "pass" in key.lower() or key.lower() in {"sslkey", "ssl_key", "sslpassword"}


def parse_address(text: str, *, engine: str | None = None) -> NodeAddress:
    """Parse a node URL or a libpq keyword string.

    Raises `ConfigurationError` naming the problem. A message never quotes the
    text it could not parse (any part of it could be a password); once parsed,
    the address is shown only in redacted form. See the module docstring for
    the percent-encoding rule.
    """
    if not isinstance(text, str):
        raise ConfigurationError(
            f"a database URL must be a string, got {type(text).__name__}: e.g. postgresql://user@host:5432/db"
        )
    if not text.strip():
        raise ConfigurationError("empty database URL: expected e.g. postgresql://user@host:5432/db")
    text = text.strip()
    if "://" not in text:
        if _KEYWORD.match(text):
            return _parse_keywords(text)
        # Not echoed: with no structure to go by, any part of it could be a password.
        raise ConfigurationError(
            "malformed database URL: expected scheme://user@host:port/db with scheme "
            "postgresql, postgres, mysql or mariadb, or a libpq 'key=value ...' string"
        )
    scheme_text, rest = text.split("://", 1)
    scheme = scheme_text.lower()
    if scheme not in SCHEMES:
        shown = repr(scheme_text) if _SCHEME_SHAPE.match(scheme_text) else "(not shown)"
        raise ConfigurationError(f"unknown URL scheme {shown}: use one of {', '.join(sorted(SCHEMES))}")
    address = _parse_url(scheme, rest)
    if engine is not None and engine != address.engine:
        raise ConfigurationError(f"{address.redacted!r} is a {address.engine} URL, expected {engine}")
    return address


def _malformed(problem: str) -> ConfigurationError:
    return ConfigurationError(f"malformed database URL: {problem}")


def _parse_url(scheme: str, rest: str) -> NodeAddress:
    """``rest`` is everything after ``scheme://``. No message quotes any of it."""
    if any(ord(c) < 32 or ord(c) == 127 for c in rest):
        raise _malformed(f"a control character (tab, newline, ...); {_ENCODE_HINT}")
    if "#" in rest:
        raise _malformed(f"a '#' (write it as %23); {_ENCODE_HINT}")
    ends = [i for i in (rest.find("/"), rest.find("?")) if i >= 0]
    end = min(ends) if ends else len(rest)
    authority, tail = rest[:end], rest[end:]
    if "@" in tail:
        # Almost always a password with an unencoded '/' or '?': what follows it would
        # be read as the host, and the rest of the password shown as a database name.
        raise _malformed(
            f"an '@' after the host part; {_ENCODE_HINT} (in a database name or option, write '@' as %40)"
        )
    userinfo, at, hostport = authority.rpartition("@")
    user = password = None
    if at:
        user_text, colon, password_text = userinfo.partition(":")
        user = _decode(user_text, "user name") or None
        password = _decode(password_text, "password") if colon else None
    kind = SCHEMES[scheme]
    host, port = _host_port(hostport, kind)
    path, _, query = tail.partition("?")
    database = _decode(path.lstrip("/"), "database name") or None
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query), errors="strict")
    except (ValueError, UnicodeDecodeError):
        raise _malformed("the query string is not key=value pairs joined by '&'") from None
    return NodeAddress(
        engine=kind,
        host=host,
        port=port,
        user=user,
        password=password,
        database=database,
        options=dict(pairs),
        scheme=scheme,
        driver=scheme.partition("+")[2],
    )


def _decode(text: str, what: str) -> str:
    try:
        return unquote(text, errors="strict")
    except UnicodeDecodeError:
        raise _malformed(f"the {what} is not valid UTF-8 once percent-decoded") from None


def _host_port(hostport: str, kind: str) -> tuple[str, int]:
    if hostport.startswith("["):
        close = hostport.find("]")
        if close < 0:
            raise _malformed("a '[' without ']' around an IPv6 host")
        host, after = hostport[1:close], hostport[close + 1:]
        try:
            ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            raise _malformed("the host in brackets is not an IPv6 address") from None
        if after and not after.startswith(":"):
            raise _malformed("unexpected text after the ']' of an IPv6 host")
        port_text = after[1:]
    else:
        if hostport.count(":") > 1:
            raise _malformed("more than one ':' in the host part; write an IPv6 host in brackets, e.g. [::1]:5432")
        host, _, port_text = hostport.partition(":")
        if "[" in host or "]" in host:
            raise _malformed("a '[' or ']' outside an IPv6 host in brackets")
    if not host:
        raise _malformed("no host")
    if "," in host:
        raise _malformed("one host per URL (a ',' in the host part): list each node separately")
    if any(c.isspace() for c in host):
        raise _malformed("a space in the host")
    return host.lower(), _port(port_text, kind, "database URL")


def _port(text: str, kind: str, where: str) -> int:
    """A port number from text; empty text is the engine's default port."""
    if not text:
        return DEFAULT_PORTS[kind]
    low, high = PORT_RANGE
    if not (text.isascii() and text.isdigit()):
        raise ConfigurationError(f"the port in a {where} must be a number from {low} to {high}")
    port = int(text)
    if not low <= port <= high:
        raise ConfigurationError(f"the port in a {where} must be a number from {low} to {high}, got {port}")
    return port


def _parse_keywords(text: str) -> NodeAddress:
    """libpq ``key=value`` strings, values optionally single-quoted."""
    values: dict[str, str] = {}
    pos = 0
    key = ""
    while pos < len(text):
        match = _KEYWORD.match(text, pos)
        if not match:
            if text[pos:].strip():
                # Not quoted: the stray text may be the rest of an unquoted password.
                after = f"after the value of {key!r}" if key else "at the start"
                raise ConfigurationError(
                    f"malformed connection string {after}: expected key=value pairs "
                    "(a value with spaces goes in single quotes: key='a b')"
                )
            break
        key, pos = match.group(1), match.end()
        if pos < len(text) and text[pos] == "'":
            end, buf = pos + 1, []
            while end < len(text) and text[end] != "'":
                if text[end] == "\\" and end + 1 < len(text):
                    end += 1
                buf.append(text[end])
                end += 1
            if end >= len(text):
                raise ConfigurationError(f"unterminated quote in connection string for {key!r}")
            value, pos = "".join(buf), end + 1
        else:
            end = pos
            while end < len(text) and not text[end].isspace():
                end += 1
            value, pos = text[pos:end], end
        values[key] = value
    host = values.pop("host", None) or values.pop("hostaddr", None) or "localhost"
    port = _port(values.pop("port", "").strip(), "postgres", "connection string")
    return NodeAddress(
        engine="postgres",
        host=host,
        port=port,
        user=values.pop("user", None),
        password=values.pop("password", None),
        database=values.pop("dbname", None),
        options=values,
        scheme="postgresql",
    )


# In text that could not be parsed: everything from "scheme://user:" to the last '@' (an
# unencoded '@', '/' or '?' may be inside the password), a leading "user:...@" without a
# scheme, and password=... keywords (also sslpassword=..., in a query string or libpq string).
_URL_PASSWORD = re.compile(r"(://[^:/@\s]*:).*@", re.S)
_BARE_PASSWORD = re.compile(r"^[^:/@\s]*:.*@", re.S)
_KW_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'?|\S*)", re.IGNORECASE)


def mask_password(text: str) -> str:
    """Hide a password in text that could not be parsed (erring towards hiding too much)."""
    text = _URL_PASSWORD.sub(r"\1***@", text) if "://" in text else _BARE_PASSWORD.sub("***@", text)
    return _KW_PASSWORD.sub(r"\1***", text)
