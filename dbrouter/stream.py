"""Streamed reads: the rows of one read statement in bounded memory (`Router.stream`).

A stream takes one lease where a read would go (a replica by the routing rules, the primary
as the fallback) and keeps it until it is closed: a server-side cursor on PostgreSQL (in a
transaction, ``FETCH FORWARD batch_size`` per batch), an unbuffered result on MySQL/MariaDB
(the rows stay on the server's side of the socket until read). Only one batch is held on the
client at a time (with psycopg2, as the driver's result: each row is built as the iteration
reaches it). Every fetch goes through the lease (`Lease.run`), so the hung-statement guard
covers it.

Failures follow the read rules until rows have been handed out: opening the stream and
fetching its first batch is one attempt, retried on another node when its node fails. After
that, going on elsewhere would hand out rows twice (or, with another replica's lag, different
ones), so a node failure raises `StreamInterrupted` naming how many rows were read; the
caller's own errors (a division by zero met at row one million) are raised as they are.

The connection is held as a `HeldLease`: a stream dropped without being closed gives it
back as unknown (discarded by the pool's housekeeping), and the pool's leak detection
(``leak_threshold``) sees a stream held too long like any borrowed connection.
"""

from __future__ import annotations

import logging
from itertools import chain
from typing import TYPE_CHECKING, Any, Iterator

from .adapters.base import Batch, Rows
from .decisions import Action, Phase, Work
from .errors import ConfigurationError, NoReplicaAvailable, StreamInterrupted, UsageError
from .lease import HeldLease, Lease, Outcome
from .retrying import Retry
from .routing import short

if TYPE_CHECKING:
    from .routing import Core
    from .topology import Node

__all__ = ["Stream"]

log = logging.getLogger("dbrouter.stream")


class Stream:
    """``with router.stream(sql, params, batch_size=...) as rows``: iterate ``rows`` for the
    rows (tuples), or `batches` for lists of up to ``batch_size`` rows. Read once, inside the
    ``with`` block."""

    def __init__(self, core: Core, sql: str, params: Any = None, *, batch_size: int = 1000) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= 1_000_000:
            raise ConfigurationError(f"stream needs batch_size to be an integer from 1 to 1000000, got {batch_size!r}")
        core.check_read(sql, params)  # NotAReadStatement before anything is sent
        self._core = core
        self._sql = sql
        self._params = params
        self.batch_size = batch_size
        self._lease: Lease | None = None
        self._state: Any = None
        self._first: Batch | None = None
        self._node: Node | None = None
        self._opened = False
        self._read = False
        self._finished = False
        self.rows = 0
        """Rows handed out so far (whole batches: a batch counts once the iteration reaches it)."""

    def __repr__(self) -> str:
        where = self._node.name if self._node is not None else "not open"
        return f"<Stream {where}, {self.rows} rows{' (finished)' if self._finished else ''}>"

    @property
    def node(self) -> Node:
        """The node the rows come from (once open)."""
        if self._node is None:
            raise UsageError("the stream is not open: use it in a with block")
        return self._node

    def __enter__(self) -> Stream:
        return self.open()

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def open(self) -> Stream:
        """Start the statement and fetch the first batch, retried on other nodes like a read
        while no row was handed out. Raises `NoReplicaAvailable` when it failed on every node
        tried, or the driver's error for the caller's (syntax, permission, ...)."""
        if self._opened:
            raise UsageError("a stream is opened once; call router.stream() again for another")
        self._opened = True
        core, sql, params, size = self._core, self._sql, self._params, self.batch_size
        core.counts.reads.inc()
        tried: list[Node] = []
        errors: dict[str, BaseException] = {}

        def start(lease: Lease) -> tuple[Lease, Any, Batch]:
            # A failure here is the attempt's: run_on releases the lease by the read rules, and
            # the pool's reset (ROLLBACK) ends a half-opened cursor with its transaction.
            state = lease.run(lambda adapter, conn: adapter.open_stream(conn, sql, params, size))
            first: Batch = lease.run(lambda adapter, conn: adapter.fetch_stream(conn, state))
            return lease, state, first

        def attempt() -> tuple[Lease, Any, Batch]:
            node = core.choose_reader(exclude=tried)
            try:
                return core.run_on(node, start, Work.READ, keep=True, kind=HeldLease)
            except Retry as again:
                tried.append(node)
                errors[node.name] = again.cause
                raise

        try:
            lease, state, first = core.retry(attempt)
        except Retry as last:
            summary = "; ".join(f"{name}: {short(err)}" for name, err in errors.items())
            raise NoReplicaAvailable(f"stream failed on every node tried ({summary})") from last.cause
        self._lease, self._state, self._first, self._node = lease, state, first, lease.node
        if len(first) < size:
            self._finished = True
        return self

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        # chain: the rows of each batch are handed out by C code, not a Python frame per row
        # (with psycopg2, each row is built from the driver's result only as it is reached).
        return chain.from_iterable(self._start())

    def batches(self) -> Iterator[Rows]:
        """The rows in lists of up to ``batch_size``, as fetched."""
        return map(_listed, self._start())

    def _start(self) -> Iterator[Batch]:
        if not self._opened or (self._lease is None and not self._finished):
            raise UsageError("the stream is not open (or closed): use it in a with block")
        if self._read:
            raise UsageError("a stream is read once")
        self._read = True
        return self._batches()

    def _batches(self) -> Iterator[Batch]:
        first, self._first = self._first, None
        if first:
            self.rows += len(first)
            yield first
        while not self._finished:
            batch = self._fetch()
            if len(batch) < self.batch_size:
                self._finished = True
            if not batch:
                return
            self.rows += len(batch)
            yield batch

    def _fetch(self) -> Batch:
        lease = self._lease
        if lease is None:
            raise UsageError("the stream was closed")
        state = self._state
        try:
            # Through the lease, like every statement: the hung-node guard covers each FETCH.
            rows: Batch = lease.run(lambda adapter, conn: adapter.fetch_stream(conn, state))
            return rows
        except BaseException as exc:
            self._lease = None
            node = lease.node
            decision = lease.release_after(exc, Phase.SENT, Work.READ)
            if decision.action is Action.RETRY and isinstance(exc, Exception):
                # A read would go again on another node; a stream that handed out rows cannot.
                raise StreamInterrupted(
                    f"stream from {node.role} {node.name} broke after {self.rows} rows ({short(exc)}): the rows "
                    "read so far are good, the rest were not read; a stream is not started again",
                    node=node.name, rows=self.rows,
                ) from exc
            raise

    def close(self) -> None:
        """End the statement and give the connection back (on MySQL/MariaDB, a stream closed
        before its last row leaves its connection to be discarded rather than read to the end).
        Idempotent; never raises for a connection that broke meanwhile."""
        lease, self._lease = self._lease, None
        if lease is None:
            return
        state, finished = self._state, self._finished
        self._state = None  # the driver's cursor and its last batch go with the stream's end
        try:
            clean = lease.run(lambda adapter, conn: adapter.close_stream(conn, state, finished))
        except BaseException as exc:
            lease.release_after(exc, Phase.SENT, Work.READ)
            if not isinstance(exc, Exception):
                raise
            log.debug("closing a stream on %s: %s", lease.node.name, exc)
            return
        if clean:
            lease.release()
        else:
            lease.release(Outcome.DISCARDED)


def _listed(batch: Batch) -> Rows:
    """A batch as a list (a driver's lazy batch is read into one)."""
    return batch if isinstance(batch, list) else list(batch)
