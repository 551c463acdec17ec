"""Bulk writes: rows from any iterable, in batches, over pooled primary connections.

Each batch is one transaction on the primary, taken and judged like `run_transaction`'s
(`dbrouter.transactions`): a batch whose connection was lost before its COMMIT was rolled back
by the server, so it runs again (on the new primary after a failover, within
``failover_wait``), as do batches hit by a deadlock; a batch whose connection broke during
its COMMIT is reported unknown, never run again. Inside the transaction the adapter writes
the batch by its engine's fastest path (`Adapter.write_batch`): ``COPY ... FROM STDIN`` for a
plain INSERT on PostgreSQL, multi-row INSERTs sized to ``max_allowed_packet`` on
MySQL/MariaDB.

Memory: the caller's thread reads the input a batch at a time, and only while fewer than
``workers`` batches are in flight, so at most ``workers x batch_size`` rows are held,
whatever the input's length. The progress callback runs on the caller's thread too, once
per batch, in the order the batches finish.
"""

from __future__ import annotations

import contextvars
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from itertools import islice
from typing import TYPE_CHECKING, Any, Callable, Iterable

from .decisions import Work
from .errors import BulkWriteError, ConfigurationError, WriteOutcomeUnknown
from .retrying import Retry
from .routing import short
from .transactions import transaction

if TYPE_CHECKING:
    from .routing import Core
    from .transactions import Transaction

__all__ = ["COMMITTED", "FAILED", "UNKNOWN", "BatchReport", "write_many"]

COMMITTED = "committed"
FAILED = "failed"
UNKNOWN = "unknown"

_UNSET: Any = object()  # no plan asked for yet


@dataclass(frozen=True)
class BatchReport:
    """One finished batch of `Router.write_many`, as the ``progress`` callback receives it."""

    index: int
    """The batch's number, from 0; it holds the input rows ``first_row`` to ``first_row + rows - 1``."""
    first_row: int
    rows: int
    status: str
    """``"committed"``, ``"failed"`` (not applied) or ``"unknown"`` (the connection broke
    during its COMMIT: it may or may not have been applied)."""
    rowcount: int
    """Rows the batch wrote (0 unless committed)."""
    error: BaseException | None
    batches_done: int
    """Batches finished so far, this one included."""
    rows_committed: int
    """Rows written by the committed batches so far, this one included."""
    elapsed: float
    """Seconds since the call started."""


def write_many(core: Core, sql: str, rows: Iterable[Any], *, batch_size: int = 1000, workers: int = 4,
               outside_transaction: bool = False, progress: Callable[[BatchReport], object] | None = None) -> int:
    """See `Router.write_many`."""
    # Checked here, on the caller's thread: the batches run on worker threads, which have no
    # transaction open, and would wait for the caller's locks without a word.
    core.refuse_in_transaction("router.write_many()", outside_transaction)
    for name, value in (("batch_size", batch_size), ("workers", workers)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1_000_000:
            raise ConfigurationError(f"write_many needs {name} to be an integer from 1 to 1000000, got {value!r}")
    if isinstance(rows, (str, bytes)):
        raise ConfigurationError("write_many takes an iterable of parameter rows, got a string")
    source = iter(rows)
    plan = [_UNSET]  # asked for by the first full batch, then shared by the call's batches

    def body(tx: Transaction, batch: list[Any]) -> int:
        current = plan[0]
        adapter = tx.node.adapter
        if current is _UNSET:
            if len(batch) < adapter.bulk_min_rows:
                current = None  # the call's only batch: no plan needed
            else:
                current = plan[0] = tx.run(lambda a, conn: a.bulk_plan(conn, sql))
        count: int = tx.run(lambda a, conn: a.write_batch(conn, sql, batch, current))
        return count

    def run(batch: list[Any]) -> int:
        def attempt() -> int:
            with transaction(core, Work.RERUN, call="router.write_many()", outside_transaction=True) as tx:
                return body(tx, batch)

        try:
            return core.retry(attempt)
        except Retry as last:
            failed = last
        raise failed.cause

    started = time.monotonic()
    committed: dict[int, int] = {}
    failures: dict[int, BaseException] = {}
    unknown: list[int] = []
    spans: dict[int, tuple[int, int]] = {}  # batch index -> (first row, rows)
    in_flight: dict[Future[int], int] = {}
    total = 0

    def settle(future: Future[int], index: int) -> None:
        nonlocal total
        first, size = spans.pop(index)
        error = future.exception()
        count = 0
        if error is None:
            count = future.result()
            committed[index] = count
            total += count
            status = COMMITTED
        else:
            failures[index] = error
            if isinstance(error, WriteOutcomeUnknown):
                unknown.append(index)
                status = UNKNOWN
            else:
                status = FAILED
        if progress is not None:
            progress(BatchReport(index=index, first_row=first, rows=size, status=status, rowcount=count,
                                 error=error, batches_done=len(committed) + len(failures), rows_committed=total,
                                 elapsed=time.monotonic() - started))

    executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dbrouter-bulk")
    index = offset = 0
    exhausted = False
    try:
        while True:
            while not exhausted and len(in_flight) < workers:
                batch = list(islice(source, batch_size))
                if not batch:
                    exhausted = True
                    break
                spans[index] = (offset, len(batch))
                # In the caller's context: its deadline (dbrouter.deadline) bounds every batch.
                in_flight[executor.submit(contextvars.copy_context().run, run, batch)] = index
                index += 1
                offset += len(batch)
                del batch  # the worker holds it now, until the batch is done
            if not in_flight:
                break
            done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            for future in sorted(done, key=in_flight.__getitem__):
                settle(future, in_flight.pop(future))
    finally:
        # The input or the progress callback raised (or the caller was interrupted): no new
        # batch starts, and the batches in flight finish before the error goes up.
        executor.shutdown(wait=True, cancel_futures=True)
    if failures:
        first = min(failures)
        lost = sorted(set(failures) - set(unknown))
        what = f"{len(lost)} of {index} batches failed" + (f", {len(unknown)} unknown" if unknown else "")
        start, size = _span(first, batch_size, offset)
        raise BulkWriteError(
            f"{what} (first: batch {first}, rows {start}-{start + size - 1}: {short(failures[first])}); "
            f"{len(committed)} batches committed {total} rows",
            failures=failures, rowcount=total, committed=sorted(committed), unknown=unknown,
        ) from failures[first]
    return total


def _span(index: int, batch_size: int, rows: int) -> tuple[int, int]:
    """The first input row of batch ``index`` and its row count (the last batch may be short)."""
    start = index * batch_size
    return start, min(batch_size, rows - start)
