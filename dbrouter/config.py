"""Configuration as frozen, validated dataclasses (times in float seconds).

Each dataclass validates itself in ``__post_init__`` and names the field and
its allowed range when a value is wrong, so a bad option fails at
construction, never halfway through a request.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, fields
from difflib import get_close_matches
from pathlib import Path
from typing import Any, Iterable, Mapping

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from .errors import ConfigurationError
from .url import DRIVERS, mask_password, parse_address, resolve_driver

__all__ = [
    "BreakerPolicy",
    "ConnectOptions",
    "DiscoveryConfig",
    "MonitorConfig",
    "PoolConfig",
    "ReplicaSpec",
    "RetryPolicy",
    "RouterConfig",
    "RoutingConfig",
    "build_router_config",
    "check_range",
    "load_router_config",
]


# Upper bounds. Where a driver or the server has a limit, the bound is that limit; elsewhere it
# is far above any sensible value, so that inf, 1e308 or a typo fails here, naming the option,
# instead of overflowing a thread wait (threading.TIMEOUT_MAX, about 9.2e9 s), a C int in a
# driver, or building a router that waits forever.
MAX_WAIT = 86400.0
"""A day: the bound of every time a caller or a thread waits or sleeps."""
MAX_AGE = 31536000.0
"""A year: the bound of ages and thresholds that are only compared, never waited on."""
MAX_STATEMENT_TIMEOUT = 2147483.647
"""PostgreSQL's statement_timeout is an int of milliseconds (at most 2^31 - 1); MariaDB's
max_statement_time (a year) and MySQL's max_execution_time (2^32 - 1 ms) allow more."""
MIN_STATEMENT_TIMEOUT = 0.001
"""One millisecond: MariaDB's max_statement_time is sent with 3 decimals, and 0 means no limit."""
MAX_KEEPALIVE_SECONDS = 32767
"""Linux's TCP_KEEPIDLE and TCP_KEEPINTVL maximum."""
MAX_KEEPALIVE_COUNT = 127
"""Linux's TCP_KEEPCNT maximum."""
MAX_POOL_SIZE = 100000
"""MariaDB's max_connections maximum (PostgreSQL's is 262143)."""
MAX_WAITING = 1000000
MAX_RETRY_FLOOR = 1e6
MAX_WEIGHT = 1e6
MAX_FAIL_MAX = 1000000


def _number(value: float) -> str:
    """A bound as people write it: 86400, 0.01, 2147483.647."""
    return str(int(value)) if float(value).is_integer() else repr(value)


def _shown(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**18:
        return f"an integer of {len(str(abs(value))) if value.bit_length() < 10000 else 'thousands of'} digits"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def describe_range(
    low: float | None, high: float | None, *, low_open: bool = False, optional: bool = False
) -> str:
    """``> 0 and <= 86400``, ``>= 1 and <= 100 or None``: the range as a message states it."""
    parts = []
    if low is not None:
        parts.append(f"> {_number(low)}" if low_open else f">= {_number(low)}")
    if high is not None:
        parts.append(f"<= {_number(high)}")
    text = " and ".join(parts)
    return f"{text} or None" if optional else text


def check_wait(name: str, value: Any, *, optional: bool = False) -> None:
    """A timeout argument of a call (not an option): a number of seconds, 0 to `MAX_WAIT`."""
    check_range("", name, value, low=0.0, high=MAX_WAIT, optional=optional)


def check_range(
    owner: str,
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    optional: bool = False,
    integer: bool = False,
    where: str | None = None,
) -> None:
    """Raise `ConfigurationError` unless ``value`` is a number in range.

    The message names ``owner.name`` (``name`` alone when ``owner`` is empty, as for a
    command-line flag), ``where`` (the node, for a per-node option) and the allowed
    range. Booleans, NaN and infinities are refused: every option that takes a number
    has a finite upper bound.
    """
    if value is None and optional:
        return
    label = f"{owner}.{name}" if owner else name
    allowed = describe_range(low, high, low_open=low_open, optional=optional)
    at = f" for {where}" if where else ""
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or value != value:  # value != value: NaN
        what = "an integer" if integer else "a number"
        raise ConfigurationError(f"{label} must be {what} {allowed}{at}, got {_shown(value)}")
    if (
        (low is not None and (value <= low if low_open else value < low))
        or (high is not None and value > high)
        or value in (float("inf"), float("-inf"))
    ):
        raise ConfigurationError(f"{label} must be {allowed}{at}, got {_shown(value)}")


def from_mapping(cls: Any, owner: str, values: Mapping[str, Any]) -> Any:
    """Build a config dataclass from a mapping, rejecting unknown keys by name."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(map(str, set(values) - known))
    if unknown:
        raise ConfigurationError(
            f"unknown option(s) {', '.join(unknown)} in {owner}; known: {', '.join(sorted(known))}"
        )
    return cls(**values)


@dataclass(frozen=True, kw_only=True)
class ConnectOptions:
    """How each new server connection is opened."""

    connect_timeout: float = 5.0
    """Seconds to wait for TCP connect + login. PostgreSQL rounds up to whole seconds (min 2)."""
    statement_timeout: float | None = None
    """Server-side limit per statement, seconds (PostgreSQL ``statement_timeout``,
    MariaDB ``max_statement_time``, MySQL ``max_execution_time`` for SELECT). None: no limit."""
    keepalive_idle: float = 30.0
    """Seconds of TCP silence before keepalive probes start."""
    keepalive_interval: float = 10.0
    """Seconds between keepalive probes."""
    keepalive_count: int = 3
    """Unanswered probes before the kernel declares the connection dead."""
    application_name: str = "dbrouter"
    """Shown in ``pg_stat_activity`` and MySQL connection attributes."""
    driver: str | None = None
    """The driver of every node: ``psycopg2`` or ``psycopg`` (psycopg 3) for PostgreSQL,
    ``mysql-connector`` for MySQL/MariaDB. None (or ""): the one the URL scheme names
    (``postgresql+psycopg://``), else the engine's default (psycopg2, mysql-connector). A
    scheme that names another driver is a `ConfigurationError`."""

    def __post_init__(self) -> None:
        owner = "ConnectOptions"
        known = sorted({name for names in DRIVERS.values() for name in names})
        if self.driver == "":
            object.__setattr__(self, "driver", None)  # frozen: normalised once, here
        if self.driver is not None and self.driver not in known:
            close = get_close_matches(str(self.driver), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigurationError(f"{owner}.driver must be one of {', '.join(known)} or None (the URL's or the "
                                     f"engine's default), got {_shown(self.driver)}{hint}")
        check_range(owner, "connect_timeout", self.connect_timeout, low=0, low_open=True, high=MAX_WAIT)
        check_range(owner, "statement_timeout", self.statement_timeout, low=MIN_STATEMENT_TIMEOUT,
                    high=MAX_STATEMENT_TIMEOUT, optional=True)
        check_range(owner, "keepalive_idle", self.keepalive_idle, low=1, high=MAX_KEEPALIVE_SECONDS)
        check_range(owner, "keepalive_interval", self.keepalive_interval, low=1, high=MAX_KEEPALIVE_SECONDS)
        check_range(owner, "keepalive_count", self.keepalive_count, low=1, high=MAX_KEEPALIVE_COUNT, integer=True)
        if not isinstance(self.application_name, str) or "\x00" in self.application_name:
            raise ConfigurationError("ConnectOptions.application_name must be a string without NUL characters")


@dataclass(frozen=True, kw_only=True)
class PoolConfig:
    """Sizing and lifecycle of one node's pool."""

    min_size: int = 1
    """Connections kept open even when idle."""
    max_size: int = 10
    """Hard cap on open connections (server sessions) for this node."""
    acquire_timeout: float = 10.0
    """Seconds a caller waits for a free connection before `PoolTimeout`."""
    max_waiting: int = 0
    """Callers that may queue for a connection; one more gets `TooManyWaiting` at once
    instead of joining the queue (load shedding). 0: no limit."""
    max_lifetime: float | None = 1800.0
    """Seconds after which a connection is retired (jittered down by up to 5%). None: never."""
    max_idle: float | None = 600.0
    """Seconds an idle connection above ``min_size`` is kept. None: forever."""
    validation_bypass: float = 0.5
    """A connection used within this many seconds is handed out without a liveness ping."""
    leak_threshold: float | None = None
    """Warn, with the borrower's stack, when a connection is held longer. None: off."""
    maintenance_interval: float = 1.0
    """Seconds between housekeeping runs (prune, retire, refill, leak check)."""

    def __post_init__(self) -> None:
        owner = "PoolConfig"
        check_range(owner, "min_size", self.min_size, low=0, high=MAX_POOL_SIZE, integer=True)
        check_range(owner, "max_size", self.max_size, low=1, high=MAX_POOL_SIZE, integer=True)
        if self.min_size > self.max_size:
            raise ConfigurationError(
                f"PoolConfig.min_size ({self.min_size}) must be <= max_size ({self.max_size})"
            )
        check_range(owner, "acquire_timeout", self.acquire_timeout, low=0, low_open=True, high=MAX_WAIT)
        check_range(owner, "max_waiting", self.max_waiting, low=0, high=MAX_WAITING, integer=True)
        check_range(owner, "max_lifetime", self.max_lifetime, low=0, low_open=True, high=MAX_AGE, optional=True)
        check_range(owner, "max_idle", self.max_idle, low=0, low_open=True, high=MAX_AGE, optional=True)
        check_range(owner, "validation_bypass", self.validation_bypass, low=0, high=MAX_AGE)
        check_range(owner, "leak_threshold", self.leak_threshold, low=0, low_open=True, high=MAX_AGE, optional=True)
        check_range(owner, "maintenance_interval", self.maintenance_interval, low=0.01, high=3600)


POLICIES = ("round_robin", "random", "least_outstanding", "latency")


@dataclass(frozen=True, kw_only=True)
class RoutingConfig:
    """Where reads go."""

    policy: str = "round_robin"
    """Replica choice: ``round_robin``, ``random``, ``least_outstanding`` or ``latency``
    (moving average of response time, power of two choices)."""
    fallback_to_primary: bool = True
    """When no replica can serve, read from the primary (logged) instead of raising
    `NoReplicaAvailable`."""
    max_replica_lag: float | None = None
    """Seconds of replay lag above which a replica gets no reads. None: lag is ignored."""
    causal_wait: float = 0.05
    """In a session, seconds a read waits for a replica to replay the session's last
    write before going to the primary instead."""
    sticky_seconds: float | None = None
    """If set, sessions use the simpler sticky mode: reads go to the primary for this
    many seconds after the session's last write (no position tracking)."""
    failover_wait: float = 0.0
    """Seconds a write waits for a new primary when none is available (a planned
    switchover, a promotion). 0: fail at once with `NoPrimaryAvailable`."""
    hedge_after: float | str | None = None
    """Hedged reads (`Router.read` only): a read still running after this many seconds is
    also sent to another replica, the first answer wins and the other is cut and cancelled.
    ``"auto"``: the first node's p95 read time over its last 256 reads, at least 10 ms. None: off."""
    hedge_budget: float = 0.05
    """The most hedges may add to the reads (of the last 10 s, plus one a second)."""
    call_timeout: float | None = None
    """Seconds each call (read, write, transaction, ...) may take in all, retries,
    failover wait and statements included, when it has no ``timeout=`` of its own and no
    `Router.deadline` is in force: past it, `DeadlineExceeded`. None: no such limit."""
    slow_replica_ratio: float | None = None
    """Slow-replica ejection: a replica whose median read time (over its last 256 reads) is more than this
    many times the median of the other replicas' (and more than ``slow_replica_margin``
    above it) gets no reads for ``slow_replica_ejection`` seconds, doubled each time in a
    row it is found slow again (up to 8 times). At most half the replicas are out at once.
    None: off (compare like with like: it judges the reads each replica served)."""
    slow_replica_margin: float = 0.005
    """Seconds a replica's read time must also exceed the others' median by to be ejected."""
    slow_replica_ejection: float = 10.0
    """Seconds a slow replica is first kept out of rotation."""

    def __post_init__(self) -> None:
        owner = "RoutingConfig"
        if self.policy not in POLICIES:
            raise ConfigurationError(
                f"{owner}.policy must be one of {', '.join(POLICIES)}, got {self.policy!r}"
            )
        if not isinstance(self.fallback_to_primary, bool):
            raise ConfigurationError(f"{owner}.fallback_to_primary must be true or false")
        check_range(owner, "max_replica_lag", self.max_replica_lag, low=0, high=MAX_AGE, optional=True)
        check_range(owner, "causal_wait", self.causal_wait, low=0, high=60)
        check_range(owner, "sticky_seconds", self.sticky_seconds, low=0, low_open=True, high=MAX_AGE, optional=True)
        check_range(owner, "failover_wait", self.failover_wait, low=0, high=3600)
        if isinstance(self.hedge_after, str) and self.hedge_after != "auto":
            raise ConfigurationError(f"{owner}.hedge_after must be 'auto' or a number > 0 and <= {MAX_WAIT:g}, "
                                     f"got {self.hedge_after!r}")
        if not isinstance(self.hedge_after, str):
            check_range(owner, "hedge_after", self.hedge_after, low=0, low_open=True, high=MAX_WAIT, optional=True)
        check_range(owner, "hedge_budget", self.hedge_budget, low=0, low_open=True, high=1)
        check_range(owner, "call_timeout", self.call_timeout, low=0, low_open=True, high=MAX_WAIT, optional=True)
        check_range(owner, "slow_replica_ratio", self.slow_replica_ratio, low=1, low_open=True, high=1000, optional=True)
        check_range(owner, "slow_replica_margin", self.slow_replica_margin, low=0, high=3600)
        check_range(owner, "slow_replica_ejection", self.slow_replica_ejection, low=0, low_open=True, high=MAX_WAIT)


@dataclass(frozen=True, kw_only=True)
class MonitorConfig:
    """The background monitor that probes each node."""

    health_interval: float = 1.0
    """Seconds between probes of every node's role and replica lag."""
    primary_discovery: str = "auto"
    """``auto``: after a failover, the node that reports itself writable becomes the
    primary and a recovered read-only node joins the replicas. ``static``: roles
    never change; only health is tracked."""

    def __post_init__(self) -> None:
        check_range("MonitorConfig", "health_interval", self.health_interval, low=0.01, high=3600)
        if self.primary_discovery not in ("auto", "static"):
            raise ConfigurationError(
                f"MonitorConfig.primary_discovery must be 'auto' or 'static', got {self.primary_discovery!r}"
            )


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """Retries of transient failures: exponential backoff with jitter, bounded twice."""

    retry_attempts: int = 3
    """Attempts per call, the first included (1: no retry)."""
    retry_deadline: float = 10.0
    """Seconds after which no new attempt starts, whatever the attempt count."""
    retry_backoff: float = 0.02
    """Seconds before the first retry; doubles each time, plus up to as much again in jitter."""
    retry_backoff_max: float = 1.0
    """Upper bound of one backoff sleep."""
    retry_budget: float | None = 0.2
    """Retries may add at most this share of the requests of the last 10 seconds (plus
    ``retry_budget_floor`` a second); past it a call raises its error instead of retrying,
    so that clients do not bury an overloaded database in retries. None: no budget."""
    retry_budget_floor: float = 10.0
    """Retries a second that the budget always allows, however few the requests."""

    def __post_init__(self) -> None:
        owner = "RetryPolicy"
        check_range(owner, "retry_attempts", self.retry_attempts, low=1, high=100, integer=True)
        check_range(owner, "retry_deadline", self.retry_deadline, low=0, low_open=True, high=MAX_WAIT)
        check_range(owner, "retry_backoff", self.retry_backoff, low=0, high=MAX_WAIT)
        check_range(owner, "retry_backoff_max", self.retry_backoff_max, low=0, high=MAX_WAIT)
        check_range(owner, "retry_budget", self.retry_budget, low=0, high=100, optional=True)
        check_range(owner, "retry_budget_floor", self.retry_budget_floor, low=0, high=MAX_RETRY_FLOOR)


@dataclass(frozen=True, kw_only=True)
class BreakerPolicy:
    """One circuit breaker per node, counting node failures only."""

    fail_max: int = 5
    """Consecutive node failures (connect refused or timed out, connection lost,
    hung statement) that open the breaker and take the node out of rotation."""
    reset_timeout: float = 10.0
    """Seconds an open breaker waits before letting one trial call through."""
    breaker_redis_url: str | None = None
    """``redis://host:port/db``: share every node's breaker state with the other
    processes of the application through Redis, so that one process finding a node
    down spares the others (extra ``redis``). None: each process on its own. Nothing
    connects at construction; while Redis does not answer, each process's breakers
    work on their own (one warning), and bad values in Redis are ignored and
    overwritten (see `dbrouter.fleet`)."""
    breaker_refresh: float = 0.5
    """With shared state, seconds between two reads of a breaker's state from Redis into
    the process's copy, done in the background (so another process's change is seen within
    that; 0: every 0.05 s). Callers only read the copy: Redis is off the query path."""

    def __post_init__(self) -> None:
        check_range("BreakerPolicy", "fail_max", self.fail_max, low=1, high=MAX_FAIL_MAX, integer=True)
        check_range("BreakerPolicy", "reset_timeout", self.reset_timeout, low=0, low_open=True, high=MAX_WAIT)
        check_range("BreakerPolicy", "breaker_refresh", self.breaker_refresh, low=0, high=60)
        url = self.breaker_redis_url
        if url is not None and not (isinstance(url, str) and url.startswith(("redis://", "rediss://", "unix://"))):
            shown = mask_password(url) if isinstance(url, str) else type(url).__name__
            raise ConfigurationError(
                f"BreakerPolicy.breaker_redis_url must be a redis://, rediss:// or unix:// URL, got {shown!r}"
            )

    def __repr__(self) -> str:
        # The Redis URL may carry a password (redis://:secret@host): never shown.
        url = None if self.breaker_redis_url is None else mask_password(self.breaker_redis_url)
        return (
            f"BreakerPolicy(fail_max={self.fail_max!r}, reset_timeout={self.reset_timeout!r}, "
            f"breaker_redis_url={url!r}, breaker_refresh={self.breaker_refresh!r})"
        )


DISCOVERY_KINDS = ("static", "patroni", "dns", "mysql")


@dataclass(frozen=True, kw_only=True)
class DiscoveryConfig:
    """Where the router learns which nodes exist (see `dbrouter.discovery`)."""

    discovery: Any = "static"
    """``static``: the nodes configured, nothing more. ``patroni``: the members that
    Patroni's REST API reports (``discovery_endpoints``: one or more members' REST URLs).
    ``dns``: the servers that names resolve to (A/AAAA records, or SRV for a name that
    starts with ``_``), as replicas of the configured primary. ``mysql``: the replicas
    connected to the MySQL/MariaDB primary (``SHOW SLAVE HOSTS``; each replica needs
    ``report_host``). Or an object with the `dbrouter.discovery.Provider` methods. With a
    provider, the primary URL's user, password, database and options are used for every
    member it reports; the nodes it reports are added and, once gone from two answers in
    a row, drained. Configured replicas always stay."""
    discovery_endpoints: tuple[str, ...] = ()
    """``patroni``: REST URLs (``http://10.0.0.5:8008``); ``dns``: names, optionally with a
    port (``replicas.db.internal:5432``; default: the primary URL's port)."""
    discovery_interval: float = 2.0
    """Seconds between two questions to the provider."""
    discovery_nameservers: tuple[str, ...] = ()
    """``dns``: servers to ask (``10.0.0.2`` or ``127.0.0.1:5353``); empty: the system's."""

    def __post_init__(self) -> None:
        owner = "DiscoveryConfig"
        kind = self.discovery
        if isinstance(kind, str):
            if kind not in DISCOVERY_KINDS:
                raise ConfigurationError(
                    f"{owner}.discovery must be one of {', '.join(DISCOVERY_KINDS)} or a provider object, got {_shown(kind)}"
                )
        elif not all(callable(getattr(kind, name, None)) for name in ("members", "close")):
            raise ConfigurationError(
                f"{owner}.discovery must be one of {', '.join(DISCOVERY_KINDS)} or an object with members() and "
                f"close() (dbrouter.discovery.Provider), got {type(kind).__name__}"
            )
        for name in ("discovery_endpoints", "discovery_nameservers"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = tuple(part.strip() for part in value.split(",") if part.strip())
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v.strip() for v in value):
                raise ConfigurationError(f"{owner}.{name} must be a list of non-empty strings, got {_shown(value)}")
            object.__setattr__(self, name, tuple(value))  # frozen: normalised once, here
        if kind in ("patroni", "dns") and not self.discovery_endpoints:
            example = "http://127.0.0.1:8008" if kind == "patroni" else "replicas.db.internal"
            raise ConfigurationError(f"{owner}.discovery_endpoints is empty: {kind} discovery needs at least one, "
                                     f"e.g. [{example!r}]")
        check_range(owner, "discovery_interval", self.discovery_interval, low=0.05, high=3600)

    def __repr__(self) -> str:
        # A Patroni REST URL may carry a password (http://user:secret@host:8008): never shown.
        endpoints = tuple(mask_password(e) for e in self.discovery_endpoints)
        kind = self.discovery if isinstance(self.discovery, str) else f"<{type(self.discovery).__name__}>"
        return (f"DiscoveryConfig(discovery={kind!r}, discovery_endpoints={endpoints!r}, "
                f"discovery_interval={self.discovery_interval!r}, discovery_nameservers={self.discovery_nameservers!r})")


def _shown_url(url: Any) -> str:
    """A node URL for a repr: redacted when it parses, masked when it does not."""
    if not isinstance(url, str):
        return f"<{type(url).__name__}>"
    try:
        return parse_address(url).redacted
    except ConfigurationError:
        return mask_password(url)


def _check_name(owner: str, name: Any) -> None:
    if name is not None and not (isinstance(name, str) and name.strip()):
        raise ConfigurationError(f"{owner} name must be a non-empty string or None, got {_shown(name)}")


@dataclass(frozen=True, kw_only=True)
class ReplicaSpec:
    """One replica: its URL, its share of reads relative to the others, an optional name."""

    url: str
    weight: float = 1.0
    name: str | None = None

    def __post_init__(self) -> None:
        _check_name("replica", self.name)
        if not isinstance(self.url, str):
            raise ConfigurationError(f"replica URL must be a string, got {type(self.url).__name__}")
        if not self.url.strip():
            raise ConfigurationError("replica URL is empty")
        address = parse_address(self.url)
        node = f"replica {self.name or address.name}"
        check_range("replica", "weight", self.weight, low=0, low_open=True, high=MAX_WEIGHT, where=node)

    def __repr__(self) -> str:
        return f"ReplicaSpec(url={_shown_url(self.url)!r}, weight={self.weight!r}, name={self.name!r})"


SECTIONS: dict[str, type] = {
    "pool": PoolConfig,
    "connect": ConnectOptions,
    "routing": RoutingConfig,
    "monitor": MonitorConfig,
    "retry": RetryPolicy,
    "breaker": BreakerPolicy,
    "discovery": DiscoveryConfig,
}
# Flat option name -> section. Field names are unique across sections, so
# Router(max_size=20) and [pool] max_size = 20 mean the same thing.
FLAT_OPTIONS: dict[str, str] = {f.name: section for section, cls in SECTIONS.items() for f in fields(cls)}


@dataclass(frozen=True, kw_only=True)
class RouterConfig:
    """Everything a `Router` needs, validated; immutable once the router starts."""

    primary: str
    replicas: tuple[ReplicaSpec, ...] = ()
    primary_name: str | None = None
    pool: PoolConfig = PoolConfig()
    connect: ConnectOptions = ConnectOptions()
    routing: RoutingConfig = RoutingConfig()
    monitor: MonitorConfig = MonitorConfig()
    retry: RetryPolicy = RetryPolicy()
    breaker: BreakerPolicy = BreakerPolicy()
    discovery: DiscoveryConfig = DiscoveryConfig()

    def __repr__(self) -> str:
        parts = [f"primary={_shown_url(self.primary)!r}", f"primary_name={self.primary_name!r}",
                 f"replicas={self.replicas!r}"]
        parts += [f"{name}={getattr(self, name)!r}" for name in SECTIONS]
        return f"RouterConfig({', '.join(parts)})"

    def __post_init__(self) -> None:
        if self.primary is not None and not isinstance(self.primary, str):
            raise ConfigurationError(
                f"primary must be a URL string (or a table with url and name), got {type(self.primary).__name__}"
            )
        if not self.primary or not self.primary.strip():
            raise ConfigurationError("primary URL is empty: give the primary's URL, e.g. postgresql://app@db1/app")
        _check_name("primary", self.primary_name)
        try:
            primary = parse_address(self.primary)
        except ConfigurationError as exc:
            raise ConfigurationError(f"primary: {exc}") from None
        if not (isinstance(self.replicas, tuple) and all(isinstance(r, ReplicaSpec) for r in self.replicas)):
            object.__setattr__(self, "replicas", _replica_specs(self.replicas))  # frozen: set once, here
        for section, cls in SECTIONS.items():
            if not isinstance(getattr(self, section), cls):
                raise ConfigurationError(f"RouterConfig.{section} must be a {cls.__name__}")
        # A scheme that names a driver against the driver option, or a driver of another engine:
        # said here, at construction (a replica of another engine is the router's to refuse).
        resolve_driver(primary, self.connect.driver)
        for replica in self.replicas:
            address = parse_address(replica.url)
            if address.engine == primary.engine:
                resolve_driver(address, self.connect.driver)


def build_router_config(
    primary: str | Mapping[str, Any] | None,
    replicas: Any = (),
    options: Mapping[str, Any] | None = None,
    sections: Mapping[str, Mapping[str, Any]] | None = None,
) -> RouterConfig:
    """Build a `RouterConfig` from flat options and/or per-section mappings.

    Unknown names fail with the list of known ones.
    """
    grouped: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for section, values in (sections or {}).items():
        if section not in SECTIONS:
            raise ConfigurationError(
                f"unknown config section [{section}]; known: {', '.join(sorted(SECTIONS))}"
            )
        if not isinstance(values, Mapping):
            raise ConfigurationError(f"config section [{section}] must be a table of options")
        grouped[section].update(values)
    for name, value in (options or {}).items():
        target = FLAT_OPTIONS.get(name)
        if target is None:
            close = get_close_matches(str(name), FLAT_OPTIONS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigurationError(f"unknown option {name!r}{hint}; known: {', '.join(sorted(FLAT_OPTIONS))}")
        grouped[target][name] = value
    built = {name: from_mapping(SECTIONS[name], f"[{name}]", values) for name, values in grouped.items()}
    primary_name = None
    if isinstance(primary, Mapping):  # {url = "...", name = "db1"}
        unknown = sorted(map(str, set(primary) - {"url", "name"}))
        if unknown:
            raise ConfigurationError(f"unknown key(s) {', '.join(map(str, unknown))} for primary; use url and name")
        primary_name = primary.get("name")
        primary = primary.get("url")
    return RouterConfig(primary="" if primary is None else primary, replicas=_replica_specs(replicas), primary_name=primary_name, **built)


# In DBROUTER_REPLICAS, a comma starts a new entry only where a URL (scheme://) follows, so that
# a password may hold a comma. A list of libpq key=value strings splits where a key= follows.
_NEXT_URL = re.compile(r",(?=\s*[A-Za-z][A-Za-z0-9+.-]*://)")
_NEXT_KEYWORDS = re.compile(r",(?=\s*[A-Za-z_][A-Za-z0-9_]*\s*=)")


def split_replica_list(text: str) -> list[str]:
    """Split a comma-separated list of replica URLs (``DBROUTER_REPLICAS``)."""
    pattern = _NEXT_URL if "://" in text else _NEXT_KEYWORDS
    return [part for part in (p.strip() for p in pattern.split(text)) if part]


def _replica_specs(replicas: Any) -> tuple[ReplicaSpec, ...]:
    if replicas is None:
        return ()
    if isinstance(replicas, str):
        replicas = split_replica_list(replicas)
    elif isinstance(replicas, (Mapping, bytes, bytearray)) or not isinstance(replicas, Iterable):
        raise ConfigurationError(
            f"replicas must be a list of URLs or of tables with url/weight/name, got {type(replicas).__name__}"
        )
    specs = []
    for index, item in enumerate(replicas, 1):
        try:
            if isinstance(item, ReplicaSpec):
                specs.append(item)
            elif isinstance(item, str):
                specs.append(ReplicaSpec(url=item))
            elif isinstance(item, Mapping):
                if "url" not in item:
                    raise ConfigurationError("a replica table needs a url")
                specs.append(from_mapping(ReplicaSpec, "replica", item))
            else:
                raise ConfigurationError(
                    f"a replica must be a URL or a table with url/weight/name, got {type(item).__name__}"
                )
        except ConfigurationError as exc:
            raise ConfigurationError(f"replica #{index}: {exc}") from None
    return tuple(specs)


def load_router_config(source: Any, env: Mapping[str, str] | None = None) -> RouterConfig:
    """A `RouterConfig` from a mapping, a TOML file path, or the environment (``source=None``).

    Mapping / TOML layout: ``primary``, ``replicas`` (URLs or tables with
    ``url``, ``weight``, ``name``), flat options at the top level, or sections
    ``[pool]``, ``[connect]``, ``[routing]``, ``[monitor]``, ``[retry]``, ``[breaker]``, ``[discovery]``. Environment:
    ``DBROUTER_PRIMARY``, ``DBROUTER_REPLICAS`` (comma-separated: a comma followed by
    ``scheme://`` starts the next URL, so passwords may contain commas) and
    ``DBROUTER_<OPTION>`` for every flat option, e.g. ``DBROUTER_MAX_SIZE=20``.
    """
    if source is None:
        return _from_env(os.environ if env is None else env)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        try:
            with path.open("rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigurationError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigurationError(f"config file {path} is not valid TOML: {exc}") from None
        return _from_mapping(data)
    if isinstance(source, Mapping):
        return _from_mapping(source)
    raise ConfigurationError(f"config source must be a mapping, a TOML path or None, got {type(source).__name__}")


def _from_mapping(data: Mapping[str, Any]) -> RouterConfig:
    data = dict(data)
    primary = data.pop("primary", None)
    replicas = data.pop("replicas", ())
    sections = {k: data.pop(k) for k in list(data) if k in SECTIONS}
    unknown_tables = [k for k, v in data.items() if isinstance(v, Mapping)]
    if unknown_tables:
        raise ConfigurationError(
            f"unknown config section [{unknown_tables[0]}]; known: {', '.join(sorted(SECTIONS))}"
        )
    return build_router_config(primary, replicas, data, sections)


def _from_env(env: Mapping[str, str]) -> RouterConfig:
    options: dict[str, Any] = {}
    for key, text in env.items():
        if not key.startswith("DBROUTER_") or key in ("DBROUTER_PRIMARY", "DBROUTER_REPLICAS", "DBROUTER_HOME"):
            continue
        name = key[len("DBROUTER_"):].lower()
        section = FLAT_OPTIONS.get(name)
        if section is None:
            raise ConfigurationError(f"unknown option in environment variable {key}")
        field_type = next(f.type for f in fields(SECTIONS[section]) if f.name == name)
        options[name] = _convert(key, text, str(field_type))
    return build_router_config(env.get("DBROUTER_PRIMARY"), env.get("DBROUTER_REPLICAS", ""), options)


def _convert(key: str, text: str, type_name: str) -> Any:
    """Environment text to the field's type, by its annotation."""
    text = text.strip()
    if "None" in type_name and text.lower() in ("", "none", "null"):
        return None
    try:
        if type_name.startswith("bool"):
            lowered = text.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if type_name.startswith("int"):
            return int(text)
        if type_name.startswith("float"):
            try:
                return float(text)
            except ValueError:
                if "str" not in type_name:  # a number or a word (hedge_after: seconds or "auto")
                    raise
                return text
        if type_name.startswith("tuple"):
            return tuple(part.strip() for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise ConfigurationError(f"{key}={text!r}: {exc}") from None
    return text
