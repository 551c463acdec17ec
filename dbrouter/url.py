"""Parse node addresses: URLs and libpq keyword strings.

A parsed `NodeAddress` keeps the password out of ``repr``, ``str`` and every
error message: `NodeAddress.redacted` is the only form that is ever shown.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from .errors import ConfigurationError

__all__ = ["NodeAddress", "mask_password", "parse_address"]

# URL scheme -> engine. MariaDB speaks the MySQL protocol, so one adapter serves both.
SCHEMES: Mapping[str, str] = MappingProxyType(
    {
        "postgresql": "postgres",
        "postgres": "postgres",
        "mysql": "mysql",
        "mariadb": "mysql",
    }
)
DEFAULT_PORTS: Mapping[str, int] = MappingProxyType({"postgres": 5432, "mysql": 3306})

_KEYWORD = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*")


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


def _is_secret(key: str) -> bool:
    return "pass" in key.lower() or key.lower() in {"sslkey", "ssl_key", "sslpassword"}


def parse_address(text: str, *, engine: str | None = None) -> NodeAddress:
    """Parse a node URL or a libpq keyword string.

    Raises `ConfigurationError` naming the problem; the message shows the
    address only in redacted form.
    """
    if not isinstance(text, str) or not text.strip():
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
    scheme = text.split("://", 1)[0].lower()
    if scheme not in SCHEMES:
        raise ConfigurationError(
            f"unknown URL scheme {scheme!r} in {mask_password(text)!r}: "
            f"use one of {', '.join(sorted(SCHEMES))}"
        )
    try:
        parts = urlsplit(text)
        port = parts.port
        host = parts.hostname
    except ValueError as exc:
        raise ConfigurationError(f"malformed database URL {mask_password(text)!r}: {exc}") from None
    kind = SCHEMES[scheme]
    if engine is not None and engine != kind:
        raise ConfigurationError(f"{mask_password(text)!r} is a {kind} URL, expected {engine}")
    if not host:
        raise ConfigurationError(f"malformed database URL {mask_password(text)!r}: no host")
    options: dict[str, str] = {}
    try:
        pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError:
        raise ConfigurationError(
            f"malformed query string in database URL {mask_password(text)!r}"
        ) from None
    for key, value in pairs:
        options[key] = value
    database = unquote(parts.path.lstrip("/")) or None
    return NodeAddress(
        engine=kind,
        host=host,
        port=port or DEFAULT_PORTS[kind],
        user=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
        database=database,
        options=options,
        scheme=scheme,
    )


def _parse_keywords(text: str) -> NodeAddress:
    """libpq ``key=value`` strings, values optionally single-quoted."""
    values: dict[str, str] = {}
    pos = 0
    while pos < len(text):
        match = _KEYWORD.match(text, pos)
        if not match:
            if text[pos:].strip():
                raise ConfigurationError(
                    f"malformed connection string near {mask_password(text[pos:pos + 20])!r} "
                    "(expected key=value pairs)"
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
    port_text = values.pop("port", None)
    try:
        port = int(port_text) if port_text else DEFAULT_PORTS["postgres"]
    except ValueError:
        raise ConfigurationError(f"invalid port {port_text!r} in connection string") from None
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


_URL_PASSWORD = re.compile(r"(://[^:/@]*:)[^@]*@")
_KW_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


def mask_password(text: str) -> str:
    """Hide a password in text that could not be parsed."""
    return _KW_PASSWORD.sub(r"\1***", _URL_PASSWORD.sub(r"\1***@", text))
