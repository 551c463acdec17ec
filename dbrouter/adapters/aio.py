"""The asyncio flavour of a driver adapter: the I/O of `Adapter`, awaited.

An `AsyncAdapter` wraps the same driver's sync adapter (`sync`), which keeps
everything that is not I/O on a pooled connection: the address and options, the
classification of errors (both flavours of a driver raise the same exception
classes), what a returned connection needs (`return_state`, no round trip), and the
client-side statement limit. The control plane probes nodes with the sync adapter
in its own threads (`dbrouter.monitor`), so a probe never runs on the event loop
and the async router shares the sync router's rules rather than copying them; only
the calls that serve the application are awaited.

A call cancelled halfway (its task cancelled, or its time limit reached) leaves the
connection in an unknown state: `abort` makes sure it is never used again, and the
pool discards it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Sequence

from ..config import ConnectOptions
from ..url import NodeAddress
from .base import Adapter, ErrorKind, Result, ReturnState

__all__ = ["AsyncAdapter"]


class AsyncAdapter(ABC):
    """One node's asyncio driver; thread-safe to build, used on one event loop."""

    driver: str = ""
    """As `Adapter.driver`, for `AsyncRouter.stats` and ``dbrouter status``."""

    @classmethod
    @abstractmethod
    def for_address(cls, address: NodeAddress, options: ConnectOptions | None = None) -> AsyncAdapter:
        """The adapter for a node, over a new sync adapter of the same driver."""

    def __init__(self, sync: Adapter) -> None:
        self.sync = sync
        self.engine = sync.engine
        self.address = sync.address
        self.options = sync.options

    @property
    def node(self) -> str:
        return self.sync.node

    @property
    def guard_timeout(self) -> float | None:
        """The client-side limit of one statement (`Adapter.guard_timeout`): the server's
        statement timeout plus a grace period; None without a statement timeout."""
        return self.sync.guard_timeout

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.address.redacted}>"

    def classify(self, exc: BaseException) -> ErrorKind:
        return self.sync.classify(exc)

    @abstractmethod
    async def connect(self) -> Any:
        """Open a connection in autocommit mode; raises `ConnectError` (naming the node and
        the reason, never the password) within ``connect_timeout``."""

    @abstractmethod
    async def ping(self, conn: Any) -> None:
        """One cheap round trip; raises the driver's error when the connection is dead."""

    @abstractmethod
    def return_state(self, conn: Any) -> ReturnState:
        """Classify a returned connection without talking to the server."""

    @abstractmethod
    async def reset(self, conn: Any) -> None:
        """Roll back anything open and restore autocommit (for `ReturnState.DIRTY`)."""

    @abstractmethod
    async def close(self, conn: Any) -> None:
        """Close quietly: errors on close are not interesting."""

    @abstractmethod
    def abort(self, conn: Any) -> None:
        """Make sure ``conn`` is never used again after a call on it was cancelled halfway:
        close its socket without a round trip (and without raising)."""

    def session_id(self, conn: Any) -> int | None:
        """As `Adapter.session_id` (both flavours of a driver keep it in the same place): the
        session a cut statement's cancel names (`dbrouter.deadline.Canceller`)."""
        return self.sync.session_id(conn)

    def discard(self, conn: Any) -> None:
        """Close ``conn`` now, without a round trip and without raising (nobody is using it):
        the pool's way to drop a broken or invalidated connection without a task."""
        self.abort(conn)

    @abstractmethod
    async def execute(self, conn: Any, sql: str, params: Any = None) -> Result:
        """Run one statement: ``(rows or None, rowcount)``, one round trip when the
        connection is warm."""

    @abstractmethod
    async def execute_many(self, conn: Any, sql: str, rows: Sequence[Any]) -> int:
        """One statement for many parameter rows in as few round trips as the driver allows."""

    @abstractmethod
    async def begin(self, conn: Any) -> None:
        """Start an explicit transaction on an autocommit connection."""

    @abstractmethod
    async def commit(self, conn: Any) -> None: ...

    @abstractmethod
    async def rollback(self, conn: Any) -> None: ...

    @abstractmethod
    async def replication_position(self, conn: Any) -> str:
        """As `Adapter.replication_position`."""

    @abstractmethod
    async def has_replayed(self, conn: Any, position: str, timeout: float = 0.0) -> bool:
        """As `Adapter.has_replayed`; a wait for replay is awaited, never blocking the loop."""

    def position_covers(self, have: str, want: str) -> bool | None:
        return self.sync.position_covers(have, want)
