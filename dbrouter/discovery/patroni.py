"""Patroni as a topology source: the members, their roles and states from its REST API.

Any member's ``GET /cluster`` lists every member with its role, its state, its
PostgreSQL address and its own REST address (``api_url``), read from the DCS. So
the provider needs one reachable member: it remembers the ``api_url`` of every
member it has seen and asks those when the configured endpoints are gone (the
member you configured may be the one that died), the last one that answered first.

Only the standard library is used (``urllib``), without the environment's HTTP
proxies: a Patroni REST API is a cluster-internal address. Basic auth
(``restapi.authentication``) is optional; its password is never shown, in a
message, a ``repr`` or `source`.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Sequence
from urllib.parse import unquote, urlsplit, urlunsplit

from ..errors import ConfigurationError
from . import PRIMARY, REPLICA, DiscoveryError, Member

__all__ = ["PatroniMember", "PatroniProvider", "parse_cluster", "request_json"]

PRIMARY_ROLES = frozenset({"leader", "standby_leader", "master", "primary"})
"""Patroni's words for the member that holds the leader key (3.0 says ``leader``; older
versions and ``GET /patroni`` say ``master``, newer ones ``primary``)."""
REPLICA_ROLES = frozenset({"replica", "sync_standby", "quorum_standby"})

DEFAULT_PORT = 8008  # Patroni's default restapi port
MIN_ATTEMPT = 0.5  # seconds: the least an endpoint gets when several share the timeout

# A REST API is a cluster-internal address: never through the environment's http_proxy.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class PatroniMember:
    """One member as ``GET /cluster`` reports it, in Patroni's own words.

    ``role`` is ``leader``, ``standby_leader``, ``sync_standby`` or ``replica``; ``state``
    ``running``, ``streaming``, ``starting``, ``stopped``, ``crashed``, ...; ``host`` and
    ``port`` are its PostgreSQL's, ``api_url`` its REST API's. ``lag`` is in bytes behind
    the leader (None for the leader, or when Patroni does not know).
    """

    name: str
    role: str
    state: str
    host: str
    port: int
    api_url: str
    timeline: int | None = None
    lag: int | None = None

    def as_member(self) -> Member:
        """The `Member` a router uses: roles mapped to ``primary`` / ``replica`` (None for a
        role Patroni may add later)."""
        role = PRIMARY if self.role in PRIMARY_ROLES else REPLICA if self.role in REPLICA_ROLES else None
        return Member(name=self.name, host=self.host, port=self.port, role=role, state=self.state or None)


def _endpoint(text: str) -> tuple[str, str | None, str | None]:
    """A REST base URL from ``host:port`` or ``http(s)://[user:password@]host[:port]``, and the
    credentials it carried. Raises `ConfigurationError` naming the endpoint (never its password)."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigurationError(f"a Patroni endpoint must be a non-empty string, got {text!r}"[:200])
    raw = text.strip()
    parts = urlsplit(raw if "://" in raw else f"http://{raw}")
    shown = urlunsplit((parts.scheme, parts.hostname or "", "", "", ""))
    if parts.scheme not in ("http", "https"):
        raise ConfigurationError(f"a Patroni endpoint must be an http:// or https:// URL, got {parts.scheme}:// ({shown})")
    if not parts.hostname:
        raise ConfigurationError(f"a Patroni endpoint needs a host, got {shown!r}")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise ConfigurationError(f"the port of Patroni endpoint {shown} must be a number from 1 to 65535") from None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    base = urlunsplit((parts.scheme, f"{host}:{port}", parts.path.rstrip("/"), "", ""))
    user, secret = parts.username, parts.password
    return base, (unquote(user) if user is not None else None), (unquote(secret) if secret is not None else None)


def request_json(url: str, *, timeout: float, auth: tuple[str, str] | None = None, method: str = "GET",
                 body: dict[str, Any] | None = None) -> tuple[int, Any]:
    """One request to a Patroni REST API: ``(status, parsed JSON body or text)``.

    An HTTP error status is returned, not raised: Patroni answers 503 with a useful body
    (``GET /primary`` on a replica, a refused switchover). Raises ``OSError`` (``URLError``,
    a timeout) when nothing answered within ``timeout`` seconds.
    """
    headers = {"Accept": "application/json"}
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    if auth is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with _OPENER.open(request, timeout=timeout) as answer:
            status, raw = answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
        exc.close()
    text = raw.decode("utf-8", errors="replace")
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def parse_cluster(document: Any) -> list[PatroniMember]:
    """The members of a ``GET /cluster`` answer, sorted by name. Members without a PostgreSQL
    address (one whose server never started) are left out: nothing can connect to them.
    Raises ``ValueError`` saying what is wrong with the document."""
    if not isinstance(document, dict) or not isinstance(document.get("members"), list):
        raise ValueError("the answer is not a Patroni cluster document (no members list)")
    members = []
    for entry in document["members"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ValueError(f"a member without a name: {str(entry)[:200]}")
        host, port = entry.get("host"), entry.get("port", 5432)
        if not host:
            continue
        if not isinstance(host, str) or isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError(f"member {entry['name']}: bad address host={host!r} port={port!r}")
        timeline, lag = entry.get("timeline"), entry.get("lag")
        members.append(PatroniMember(
            name=entry["name"], role=str(entry.get("role") or ""), state=str(entry.get("state") or ""),
            host=host, port=port, api_url=str(entry.get("api_url") or ""),
            timeline=timeline if isinstance(timeline, int) and not isinstance(timeline, bool) else None,
            lag=lag if isinstance(lag, int) and not isinstance(lag, bool) else None,
        ))
    return sorted(members, key=lambda m: m.name)


class PatroniProvider:
    """The members of a Patroni cluster, from the REST API of any member.

    ``endpoints`` are REST addresses (``http://10.0.0.5:8008`` or ``10.0.0.5:8008``); one
    is enough. `members` asks the last endpoint that answered first, then the configured
    ones, then the ``api_url`` of every member seen so far, sharing ``timeout`` between
    them. ``username`` / ``password`` (or credentials in an endpoint URL) are sent as
    basic auth; they are never shown.

    Raises `ConfigurationError` for an endpoint that is not an http(s) address.
    """

    def __init__(self, endpoints: Sequence[str] | str, *, username: str | None = None,
                 password: str | None = None) -> None:
        if isinstance(endpoints, str):
            endpoints = [endpoints]
        if not endpoints:
            raise ConfigurationError("PatroniProvider needs at least one REST endpoint (host:port of a member)")
        parsed = [_endpoint(text) for text in endpoints]
        self._endpoints = list(dict.fromkeys(base for base, _user, _password in parsed))
        given = [(user, secret) for _base, user, secret in parsed if user]
        if username is None and given:
            username, password = given[0]
        if password is not None and username is None:
            raise ConfigurationError("PatroniProvider: a password without a username")
        self._auth = (username, password or "") if username is not None else None
        self._lock = threading.Lock()  # bookkeeping only: never held across a request
        self._seen: dict[str, str] = {}  # member name -> its api_url, from the last answers
        self._last_good: str | None = None

    def __repr__(self) -> str:
        return f"<PatroniProvider {', '.join(self._endpoints)}{' (basic auth)' if self._auth else ''}>"

    @property
    def source(self) -> str:
        return f"patroni at {', '.join(self._endpoints)}"

    def candidates(self) -> list[str]:
        """The REST addresses `members` tries, in order: the last one that answered, the
        configured ones, the other members seen."""
        with self._lock:
            ordered = [self._last_good] if self._last_good else []
            ordered += self._endpoints
            ordered += sorted(self._seen.values())
        return list(dict.fromkeys(url for url in ordered if url))

    def cluster(self, timeout: float) -> list[PatroniMember]:
        """Every member as Patroni reports it (`PatroniMember`), within ``timeout`` seconds.
        Raises `DiscoveryError` naming each address tried and what went wrong there."""
        if not timeout > 0:
            raise ConfigurationError(f"timeout must be > 0, got {timeout!r}")
        deadline = time.monotonic() + timeout
        candidates = self.candidates()
        problems = []
        for index, base in enumerate(candidates):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                problems.append(f"{base}: not tried, the {timeout:g}s timeout was used up")
                continue
            attempt = min(remaining, max(MIN_ATTEMPT, remaining / (len(candidates) - index)))
            try:
                members = self._ask(base, attempt)
            except DiscoveryError as exc:
                problems.append(str(exc).removeprefix("patroni at "))
                continue
            with self._lock:
                self._last_good = base
                for member in members:
                    api = _api_base(member.api_url)
                    if api is not None:
                        self._seen[member.name] = api
            return members
        raise DiscoveryError(self._hide(f"patroni: no REST endpoint answered with the members: {'; '.join(problems)}"))

    def members(self, timeout: float) -> list[Member]:
        """Every member (`Member`: roles mapped to primary / replica), within ``timeout``
        seconds; raises `DiscoveryError` when no endpoint could tell."""
        return [m.as_member() for m in self.cluster(timeout)]

    def close(self) -> None:
        """Nothing to release: every request opens and closes its own connection."""

    def _ask(self, base: str, timeout: float) -> list[PatroniMember]:
        where = f"patroni at {base}"
        try:
            status, document = request_json(f"{base}/cluster", timeout=timeout, auth=self._auth)
        except (OSError, ValueError) as exc:  # URLError, timeouts, refused, a bad http answer
            reason = getattr(exc, "reason", None) or exc
            raise DiscoveryError(self._hide(f"{where}: {type(exc).__name__}: {reason}")) from None
        if status != 200:
            raise DiscoveryError(self._hide(f"{where}: GET /cluster answered HTTP {status}: {str(document)[:200]}"))
        try:
            members = parse_cluster(document)
        except ValueError as exc:
            raise DiscoveryError(self._hide(f"{where}: {exc}")) from None
        if not members:
            raise DiscoveryError(f"{where}: the cluster has no member with a PostgreSQL address")
        return members

    def _hide(self, text: str) -> str:
        if self._auth is not None and self._auth[1]:
            text = text.replace(self._auth[1], "***")
        return text


def _api_base(api_url: str) -> str | None:
    """The REST base address of a member's ``api_url`` (``http://h:8008/patroni``), None when
    it is missing or not an http(s) address."""
    if not api_url:
        return None
    try:
        return _endpoint(api_url.removesuffix("/patroni"))[0]
    except ConfigurationError:
        return None
