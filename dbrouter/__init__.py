"""dbrouter: pools, routing, retries, breakers and failover for PostgreSQL and MySQL/MariaDB."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .adapters import preload_mysql_extension

# Before anything imports ssl: see preload_mysql_extension.
preload_mysql_extension()

from .bulk import BatchReport  # noqa: E402
from .config import (  # noqa: E402
    ConnectOptions,
    MonitorConfig,
    PoolConfig,
    ReplicaSpec,
    RouterConfig,
    RoutingConfig,
)
from .errors import (  # noqa: E402
    BulkWriteError,
    ClusterError,
    ConfigurationError,
    ConnectError,
    DbRouterError,
    DeadlineExceeded,
    DeadlineExceededAfterWrite,
    DiscoveryError,
    NodeRemoved,
    NodeUnavailable,
    NoPrimaryAvailable,
    NoReplicaAvailable,
    NotAReadStatement,
    PoolClosed,
    PoolError,
    PoolTimeout,
    RoutingError,
    SplitBrain,
    StreamInterrupted,
    TooManyWaiting,
    UsageError,
    WriteOutcomeUnknown,
)
from .events import Event  # noqa: E402
from .pool import Pool  # noqa: E402
from .router import Router, is_read_statement  # noqa: E402
from .session import Session  # noqa: E402
from .stream import Stream  # noqa: E402
from .transactions import Transaction  # noqa: E402
from .url import NodeAddress, parse_address  # noqa: E402

__all__ = [
    "AsyncRouter",
    "BatchReport",
    "BulkWriteError",
    "ClusterError",
    "ConfigurationError",
    "ConnectError",
    "ConnectOptions",
    "DbRouterError",
    "DeadlineExceeded",
    "DeadlineExceededAfterWrite",
    "DiscoveryError",
    "Event",
    "MonitorConfig",
    "NoPrimaryAvailable",
    "NoReplicaAvailable",
    "NodeAddress",
    "NodeRemoved",
    "NodeUnavailable",
    "NotAReadStatement",
    "Pool",
    "PoolClosed",
    "PoolConfig",
    "PoolError",
    "PoolTimeout",
    "ReplicaSpec",
    "Router",
    "RouterConfig",
    "RoutingConfig",
    "RoutingError",
    "Session",
    "SplitBrain",
    "Stream",
    "StreamInterrupted",
    "TooManyWaiting",
    "Transaction",
    "UsageError",
    "WriteOutcomeUnknown",
    "connect_pool",
    "is_read_statement",
    "parse_address",
]

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .aio import AsyncRouter


def __getattr__(name: str) -> Any:
    # AsyncRouter on first use: a sync application does not import asyncio for it.
    if name == "AsyncRouter":
        from .aio import AsyncRouter

        return AsyncRouter
    raise AttributeError(f"module 'dbrouter' has no attribute {name!r}")


def connect_pool(url: str, *, pool: PoolConfig | None = None, connect: ConnectOptions | None = None, name: str | None = None) -> Pool:
    """A pool for the node at ``url`` (``postgresql://``, ``mysql://``, ``mariadb://`` or libpq keywords).

    Raises `ConfigurationError` for a bad URL or option, before any connection is made.
    """
    from .adapters import make_adapter

    return Pool(make_adapter(parse_address(url), connect), pool, name=name)
