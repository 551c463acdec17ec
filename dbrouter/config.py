"""Configuration as frozen, validated dataclasses (times in float seconds).

Each dataclass validates itself in ``__post_init__`` and names the field and
its allowed range when a value is wrong, so a bad option fails at
construction, never halfway through a request.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

from .errors import ConfigurationError

__all__ = ["ConnectOptions", "PoolConfig", "check_range"]


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
) -> None:
    """Raise `ConfigurationError` unless ``value`` is a number in range."""
    if value is None and optional:
        return
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        what = "an integer" if integer else "a number"
        raise ConfigurationError(f"{owner}.{name} must be {what}, got {value!r}")
    if value != value:  # NaN
        raise ConfigurationError(f"{owner}.{name} must be a number, got NaN")
    if low is not None and (value <= low if low_open else value < low):
        bound = f"> {low}" if low_open else f">= {low}"
        raise ConfigurationError(f"{owner}.{name} must be {bound}, got {value!r}")
    if high is not None and value > high:
        raise ConfigurationError(f"{owner}.{name} must be <= {high}, got {value!r}")


def from_mapping(cls: Any, owner: str, values: Mapping[str, Any]) -> Any:
    """Build a config dataclass from a mapping, rejecting unknown keys by name."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
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

    def __post_init__(self) -> None:
        owner = "ConnectOptions"
        check_range(owner, "connect_timeout", self.connect_timeout, low=0, low_open=True)
        check_range(
            owner, "statement_timeout", self.statement_timeout, low=0, low_open=True, optional=True
        )
        check_range(owner, "keepalive_idle", self.keepalive_idle, low=1)
        check_range(owner, "keepalive_interval", self.keepalive_interval, low=1)
        check_range(owner, "keepalive_count", self.keepalive_count, low=1, integer=True)
        if not isinstance(self.application_name, str):
            raise ConfigurationError("ConnectOptions.application_name must be a string")


@dataclass(frozen=True, kw_only=True)
class PoolConfig:
    """Sizing and lifecycle of one node's pool."""

    min_size: int = 1
    """Connections kept open even when idle."""
    max_size: int = 10
    """Hard cap on open connections (server sessions) for this node."""
    acquire_timeout: float = 10.0
    """Seconds a caller waits for a free connection before `PoolTimeout`."""
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
        check_range(owner, "min_size", self.min_size, low=0, integer=True)
        check_range(owner, "max_size", self.max_size, low=1, integer=True)
        if self.min_size > self.max_size:
            raise ConfigurationError(
                f"PoolConfig.min_size ({self.min_size}) must be <= max_size ({self.max_size})"
            )
        check_range(owner, "acquire_timeout", self.acquire_timeout, low=0, low_open=True)
        check_range(owner, "max_lifetime", self.max_lifetime, low=0, low_open=True, optional=True)
        check_range(owner, "max_idle", self.max_idle, low=0, low_open=True, optional=True)
        check_range(owner, "validation_bypass", self.validation_bypass, low=0)
        check_range(owner, "leak_threshold", self.leak_threshold, low=0, low_open=True, optional=True)
        check_range(owner, "maintenance_interval", self.maintenance_interval, low=0.01, high=3600)
