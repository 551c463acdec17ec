"""The dbrouter error tree.

Every error dbrouter raises is a `DbRouterError`. Errors name the node they
concern (by its redacted address, never with a password) and keep the
driver's exception as ``__cause__``.
"""

from __future__ import annotations

__all__ = [
    "BulkWriteError",
    "ClusterError",
    "ConfigurationError",
    "ConnectError",
    "DbRouterError",
    "DeadlineExceeded",
    "DeadlineExceededAfterWrite",
    "DiscoveryError",
    "NoPrimaryAvailable",
    "NoReplicaAvailable",
    "NodeRemoved",
    "NodeUnavailable",
    "NotAReadStatement",
    "PoolClosed",
    "PoolError",
    "PoolTimeout",
    "RoutingError",
    "SplitBrain",
    "StreamInterrupted",
    "TooManyWaiting",
    "UsageError",
    "WriteOutcomeUnknown",
]


class DbRouterError(Exception):
    """Root of every error raised by dbrouter."""


class ConfigurationError(DbRouterError, ValueError):
    """An option, URL or config file is invalid; raised at construction."""


class ClusterError(DbRouterError):
    """A local replication cluster could not be started or changed."""


class DiscoveryError(DbRouterError):
    """A topology provider could not say who the members are. The message names the source
    (``patroni at http://10.0.0.5:8008``) and the problem, never a password."""


class NodeUnavailable(DbRouterError):
    """A node cannot serve right now (unreachable, or its breaker is open)."""

    def __init__(self, message: str, node: str | None = None) -> None:
        super().__init__(message)
        self.node = node


class ConnectError(NodeUnavailable):
    """Opening a connection to a node failed (refused, timed out, auth refused)."""


class PoolError(DbRouterError):
    """Base of pool errors."""


class PoolClosed(PoolError):
    """The pool was closed; no connection can be acquired from it."""


class NodeRemoved(PoolClosed):
    """The node was removed from the router (`Router.remove_replica`, discovery) after a
    call chose it: nothing was sent, and the call goes to another node."""


class PoolTimeout(PoolError):
    """No connection became free within the acquire timeout."""

    def __init__(self, message: str, node: str | None = None) -> None:
        super().__init__(message)
        self.node = node


class TooManyWaiting(PoolTimeout):
    """The pool's queue was full (``max_waiting``): refused at once, without waiting, so
    that an overloaded node sheds load instead of piling up callers."""


class RoutingError(DbRouterError):
    """Base of errors about where a statement can go."""


class NoPrimaryAvailable(RoutingError):
    """No writable node is known or reachable."""


class NotAReadStatement(RoutingError, ValueError):
    """`Router.read` or `Session.read` was given something that is not one read statement.

    Raised before anything is sent; ``reason`` says which part of the rule
    (`dbrouter.statements`) it broke.
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class NoReplicaAvailable(RoutingError):
    """No replica can serve a read and falling back to the primary is off."""


class SplitBrain(RoutingError):
    """More than one node reports itself writable; writes stop rather than guess."""


class UsageError(DbRouterError, RuntimeError):
    """dbrouter was called in a way that cannot work; raised at once, before any I/O.

    A write beside the transaction this thread has open on the same router (it would wait
    for that transaction's locks), or a `Session` used by a thread other than its own.
    """


class WriteOutcomeUnknown(DbRouterError):
    """The connection broke after a write was sent: it may or may not have been applied."""


class DeadlineExceeded(DbRouterError, TimeoutError):
    """A call's deadline (``timeout=``, `Router.deadline`, the ``call_timeout`` option) ran
    out before it finished. The message says where the time went (breaker, pool wait,
    statements, retry pauses, failover wait) and names the nodes; ``node`` is the node the
    call was on when it ran out (None between nodes)."""

    def __init__(self, message: str, node: str | None = None) -> None:
        super().__init__(message)
        self.node = node


class DeadlineExceededAfterWrite(DeadlineExceeded, WriteOutcomeUnknown):
    """The deadline ran out after a write (or a COMMIT) was sent: it was cut, and it may
    or may not have been applied. Also a `WriteOutcomeUnknown`."""


class BulkWriteError(DbRouterError):
    """Some batches of a `Router.write_many` did not commit; the others did.

    ``committed`` lists the batch indexes that committed and ``rowcount`` is their
    total; ``failed`` lists those that were not applied (rolled back), ``unknown`` those
    whose connection broke during the COMMIT (applied or not: check before writing them
    again); ``failures`` maps every batch of either kind to its error (a
    `WriteOutcomeUnknown` for the unknown ones). Batch ``i`` holds the input rows from
    ``i * batch_size`` on.
    """

    def __init__(self, message: str, *, failures: dict[int, BaseException], rowcount: int, committed: list[int],
                 unknown: list[int] | None = None) -> None:
        super().__init__(message)
        self.failures = failures
        self.rowcount = rowcount
        self.committed = committed
        self.unknown = sorted(unknown or [])
        self.failed = sorted(set(failures) - set(self.unknown))


class StreamInterrupted(DbRouterError):
    """A `Router.stream` lost its node after it had handed out rows: the rows read so far
    are good, the rest never came, and the stream is not started again (it would hand out
    the first rows twice). ``node`` names the node, ``rows`` counts the rows handed out."""

    def __init__(self, message: str, *, node: str, rows: int) -> None:
        super().__init__(message)
        self.node = node
        self.rows = rows


for _name in __all__:
    globals()[_name].__module__ = "dbrouter"
del _name
