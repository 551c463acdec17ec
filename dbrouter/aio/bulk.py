"""`AsyncRouter.write_many`: `dbrouter.bulk.write_many`'s rules, with batches as tasks.

Each batch is its own transaction on the primary, run as `AsyncRouter.run_transaction`
runs a function: lost before its COMMIT, it runs again (on the new primary after a
failover, within ``failover_wait``); lost during its COMMIT, it is reported unknown. The
reports (`BatchReport`) and the error (`BulkWriteError`) are the sync call's. At most
``workers`` batches are in flight, so at most ``workers x batch_size`` rows are held; the
input may be an iterable or an async iterable, read a batch at a time. A batch goes as
multi-row INSERTs (`AsyncAdapter.execute_many`); COPY is the sync router's for now.
"""

from __future__ import annotations

import asyncio
import time
from itertools import islice
from typing import TYPE_CHECKING, Any, AsyncIterable, AsyncIterator, Callable, Iterable

from ..bulk import COMMITTED, FAILED, UNKNOWN, BatchReport, _span
from ..errors import BulkWriteError, ConfigurationError, WriteOutcomeUnknown
from ..routing import short

if TYPE_CHECKING:
    from .router import AsyncRouter, AsyncTransaction

__all__ = ["write_many"]


async def _batches(rows: Iterable[Any] | AsyncIterable[Any], size: int) -> AsyncIterator[list[Any]]:
    if hasattr(rows, "__aiter__"):
        batch: list[Any] = []
        async for row in rows:
            batch.append(row)
            if len(batch) == size:
                yield batch
                batch = []
        if batch:
            yield batch
        return
    source = iter(rows)
    while True:
        batch = list(islice(source, size))
        if not batch:
            return
        yield batch


async def write_many(router: AsyncRouter, sql: str, rows: Iterable[Any] | AsyncIterable[Any], *,
                     batch_size: int = 1000, workers: int = 4, outside_transaction: bool = False,
                     progress: Callable[[BatchReport], object] | None = None) -> int:
    """See `AsyncRouter.write_many`."""
    router._refuse_in_transaction("router.write_many()", outside_transaction)
    for name, value in (("batch_size", batch_size), ("workers", workers)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1_000_000:
            raise ConfigurationError(f"write_many needs {name} to be an integer from 1 to 1000000, got {value!r}")
    if isinstance(rows, (str, bytes)):
        raise ConfigurationError("write_many takes an iterable of parameter rows, got a string")

    async def run(batch: list[Any]) -> int:
        async def body(tx: AsyncTransaction) -> int:
            return await tx.run(lambda adapter, conn: adapter.execute_many(conn, sql, batch))

        return await router.run_transaction(body, outside_transaction=True)

    started = time.monotonic()
    committed: dict[int, int] = {}
    failures: dict[int, BaseException] = {}
    unknown: list[int] = []
    spans: dict[int, tuple[int, int]] = {}
    in_flight: dict[asyncio.Task[int], int] = {}
    total = 0
    index = offset = 0

    def settle(task: asyncio.Task[int], number: int) -> None:
        nonlocal total
        first, size = spans.pop(number)
        error = task.exception()
        count = 0
        if error is None:
            count = task.result()
            committed[number] = count
            total += count
            status = COMMITTED
        else:
            failures[number] = error
            status = UNKNOWN if isinstance(error, WriteOutcomeUnknown) else FAILED
            if status == UNKNOWN:
                unknown.append(number)
        if progress is not None:
            progress(BatchReport(index=number, first_row=first, rows=size, status=status, rowcount=count,
                                 error=error, batches_done=len(committed) + len(failures), rows_committed=total,
                                 elapsed=time.monotonic() - started))

    source = _batches(rows, batch_size)
    exhausted = False
    try:
        while True:
            while not exhausted and len(in_flight) < workers:
                batch = await anext(source, None)
                if batch is None:
                    exhausted = True
                    break
                spans[index] = (offset, len(batch))
                in_flight[asyncio.ensure_future(run(batch))] = index
                index += 1
                offset += len(batch)
            if not in_flight:
                break
            done, _ = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=in_flight.__getitem__):
                settle(task, in_flight.pop(task))
    finally:
        # The input or the progress callback raised (or the caller was cancelled): no new
        # batch starts, and those in flight finish before the error goes up.
        if in_flight:
            await asyncio.wait(in_flight)
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
