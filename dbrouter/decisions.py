"""One decision table: what a failure means, whether to go again, and who pays for it.

Every path that borrows a connection (reads, writes, transactions, sessions,
bulk writes, integrations) classifies its failure with `failure_of` and asks
`decide(failure, phase, work)`. The answer says whether to retry, to raise
`WriteOutcomeUnknown` or to raise the error as it is, whether the connection is
lost, and whether the node is to blame (its breaker counts it and its pool
retires every connection).

Phases tell how far a call got: a write is safe to repeat only while nothing
of it can have been applied.

========================  ==========  ===========  ==========================  ==================
failure                   CONNECT     BEFORE_SEND  SENT                        COMMIT
========================  ==========  ===========  ==========================  ==================
NODE_DOWN / HUNG          retry *     retry *      read, idempotent, rerun:    unknown *
                                                   retry *; write, unchecked:  (idempotent:
                                                   unknown *; block: raise *   retry *)
REFUSED (breaker open,    retry       -            -                           -
node removed)
BUSY (pool timeout)       read, unchecked: retry,  -                           -
                          else raise
CONFLICT                  -           retry        retry (block, unchecked:    retry (block: raise)
                                                   raise)
READ_ONLY                 -           write: retry d; read, unchecked, rerun, block:
                                                   raise (the caller may have asked for read-only)
TIMEOUT, CALLER           raise       raise        raise                       raise
INTERRUPTED               raise, connection discarded, node not blamed
DEADLINE                  raise (a write or COMMIT that was sent and cut: unknown), connection
                          discarded when cut, node not blamed
UNROUTABLE                raise
========================  ==========  ===========  ==========================  ==================

``*``: the node is blamed and the connection is lost. ``d``: the node refused a
write as read-only (demoted): its breaker opens and the monitor looks at once.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .adapters.base import ErrorKind
from .errors import (
    ConnectError,
    DeadlineExceeded,
    NodeRemoved,
    NodeUnavailable,
    NoPrimaryAvailable,
    NoReplicaAvailable,
    PoolTimeout,
    SplitBrain,
)

if TYPE_CHECKING:
    from .adapters.base import Adapter

__all__ = ["Action", "Decision", "Failure", "Phase", "Work", "decide", "failure_of"]


class Phase(enum.Enum):
    """How far a call got when it failed."""

    CONNECT = "connect"
    """Breaker admission or pool checkout: nothing was sent."""
    BEFORE_SEND = "before_send"
    """A connection in hand, the work not sent yet (e.g. BEGIN failed)."""
    SENT = "sent"
    """The statement (or the caller's transaction body) reached the connection."""
    COMMIT = "commit"
    """COMMIT was sent: the transaction may have been applied."""


class Work(enum.Enum):
    """What the call is, which decides what may run again."""

    READ = "read"
    """A read: may run again on any node."""
    UNCHECKED = "unchecked"
    """``read(sql, unchecked=True)``: run like a read, but dbrouter cannot tell that it only
    reads, so once sent it never runs again (``idempotent=True`` makes it a `READ`)."""
    WRITE = "write"
    """One autocommit write: runs again only if it provably never applied."""
    IDEMPOTENT = "idempotent"
    """A write the caller marked idempotent: may run again after any node failure."""
    RERUN = "rerun"
    """A `run_transaction` function: the whole function runs again unless the COMMIT was sent."""
    BLOCK = "block"
    """A ``with transaction()`` block: the caller's code, never run again by dbrouter."""


class Failure(enum.Enum):
    """A failure as the decision table sees it."""

    NODE_DOWN = "node_down"
    """Connect refused or timed out, connection lost, server shutting down."""
    HUNG = "hung"
    """No answer within the statement timeout plus grace: the watchdog aborted it."""
    REFUSED = "refused"
    """The node's breaker refused the call, or the node left the router after the call
    chose it: nothing was sent, nothing is counted."""
    BUSY = "busy"
    """No pooled connection became free within ``acquire_timeout``."""
    CONFLICT = "conflict"
    """Serialization failure or deadlock: the server rolled the transaction back."""
    READ_ONLY = "read_only"
    """The node refused a write as read-only: it is not (or no longer) the primary."""
    TIMEOUT = "timeout"
    """The server cancelled the statement at its statement timeout."""
    CALLER = "caller"
    """Syntax, constraint, permission, bad data: the caller's error."""
    INTERRUPTED = "interrupted"
    """Not an Exception (KeyboardInterrupt, SystemExit, GeneratorExit)."""
    UNROUTABLE = "unroutable"
    """No node can take the call (no primary, no replica, split brain)."""
    DEADLINE = "deadline"
    """The call's own deadline passed (`dbrouter.deadline`); a statement running then was
    cut. Says nothing about the node."""


class Action(enum.Enum):
    RETRY = "retry"
    """Run again: a read on another node, a write on the (possibly new) primary."""
    UNKNOWN = "unknown"
    """Raise `WriteOutcomeUnknown`: it may or may not have been applied."""
    RAISE = "raise"
    """Raise the error as it is."""


@dataclass(frozen=True)
class Decision:
    action: Action
    blame_node: bool = False
    """Count it against the node's breaker and retire the node's other connections."""
    connection_lost: bool = False
    """Discard the connection instead of returning it to the pool."""
    demoted: bool = False
    """The node refused a write as read-only: open its breaker and probe at once."""


_ERROR_KINDS = {
    ErrorKind.UNREACHABLE: Failure.NODE_DOWN,
    ErrorKind.CONFLICT: Failure.CONFLICT,
    ErrorKind.READ_ONLY: Failure.READ_ONLY,
    ErrorKind.TIMEOUT: Failure.TIMEOUT,
    ErrorKind.CALLER: Failure.CALLER,
}


class Hung(NodeUnavailable):
    """A statement got no answer within its deadline and was aborted by the watchdog."""


class BreakerOpen(NodeUnavailable):
    """The node's breaker refused the call: nothing was sent."""


def failure_of(exc: BaseException, adapter: Adapter) -> Failure:
    """Classify ``exc``, raised by work on ``adapter``'s node (or by dbrouter around it)."""
    if not isinstance(exc, Exception):
        return Failure.INTERRUPTED
    if isinstance(exc, DeadlineExceeded):
        return Failure.DEADLINE
    if isinstance(exc, (BreakerOpen, NodeRemoved)):
        return Failure.REFUSED
    if isinstance(exc, Hung):
        return Failure.HUNG
    if isinstance(exc, (ConnectError, NodeUnavailable)):
        return Failure.NODE_DOWN
    if isinstance(exc, PoolTimeout):
        return Failure.BUSY
    if isinstance(exc, (NoPrimaryAvailable, NoReplicaAvailable, SplitBrain)):
        return Failure.UNROUTABLE
    return _ERROR_KINDS[adapter.classify(exc)]


_RAISE = Decision(Action.RAISE)
_RETRY = Decision(Action.RETRY)
_LOST_RETRY = Decision(Action.RETRY, blame_node=True, connection_lost=True)
_LOST_RAISE = Decision(Action.RAISE, blame_node=True, connection_lost=True)
_LOST_UNKNOWN = Decision(Action.UNKNOWN, blame_node=True, connection_lost=True)
_DEMOTED_RETRY = Decision(Action.RETRY, demoted=True)
_CUT = Decision(Action.RAISE, connection_lost=True)
_CUT_UNKNOWN = Decision(Action.UNKNOWN, connection_lost=True)


def decide(failure: Failure, phase: Phase, work: Work) -> Decision:
    """The table in the module docstring."""
    if failure is Failure.NODE_DOWN or failure is Failure.HUNG:
        if phase is Phase.CONNECT or phase is Phase.BEFORE_SEND:
            return _LOST_RETRY
        if work is Work.READ or work is Work.IDEMPOTENT:
            return _LOST_RETRY
        if phase is Phase.COMMIT:
            return _LOST_UNKNOWN
        if work is Work.RERUN:
            return _LOST_RETRY  # not committed: the server rolled it back
        return _LOST_UNKNOWN if work is Work.WRITE or work is Work.UNCHECKED else _LOST_RAISE
    if failure is Failure.REFUSED:
        return _RETRY if phase is Phase.CONNECT else _RAISE
    if failure is Failure.BUSY:
        return _RETRY if work is Work.READ or (work is Work.UNCHECKED and phase is Phase.CONNECT) else _RAISE
    if failure is Failure.CONFLICT:
        if work is Work.BLOCK or (work is Work.UNCHECKED and phase is not Phase.BEFORE_SEND):
            return _RAISE  # unchecked: the statements before the one that conflicted may have committed
        return _RETRY
    if failure is Failure.READ_ONLY:
        # Only a statement dbrouter sent as a write proves the node demoted: in the caller's
        # own transaction or connection it may be the caller's doing (SET TRANSACTION READ
        # ONLY, nextval() on a replica), and the monitor finds a real demotion anyway.
        return _DEMOTED_RETRY if work is Work.WRITE or work is Work.IDEMPOTENT else _RAISE
    if failure is Failure.INTERRUPTED:
        return Decision(Action.RAISE, connection_lost=True)
    if failure is Failure.DEADLINE:
        if phase is Phase.COMMIT or (phase is Phase.SENT and (work is Work.WRITE or work is Work.UNCHECKED)):
            return _CUT_UNKNOWN
        return _CUT
    return _RAISE
