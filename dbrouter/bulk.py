"""Bulk writes: many parameter rows in batches over pooled primary connections."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Sequence

from .errors import BulkWriteError, ConfigurationError
from .routing import short
from .transactions import transaction

if TYPE_CHECKING:
    from .routing import Core

__all__ = ["write_many"]


def write_many(core: Core, sql: str, rows: Sequence[Any], *, batch_size: int = 1000, workers: int = 4,
               outside_transaction: bool = False) -> int:
    """See `Router.write_many`."""
    # Checked here, on the caller's thread: the batches run on worker threads, which have no
    # transaction open, and would wait for the caller's locks without a word.
    core.refuse_in_transaction("router.write_many()", outside_transaction)
    if batch_size < 1 or workers < 1:
        raise ConfigurationError(f"write_many needs batch_size >= 1 and workers >= 1, got {batch_size} and {workers}")
    rows = list(rows)
    batches = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
    if not batches:
        return 0

    def run(batch: list[Any]) -> int:
        with transaction(core) as tx:
            count: int = tx.run(lambda adapter, conn: adapter.execute_many(conn, sql, batch))
            return count

    results: dict[int, int] = {}
    failures: dict[int, BaseException] = {}
    with ThreadPoolExecutor(max_workers=min(workers, len(batches)), thread_name_prefix="dbrouter-bulk") as pool:
        futures = {pool.submit(run, batch): index for index, batch in enumerate(batches)}
        for future, index in futures.items():
            try:
                results[index] = future.result()
            except Exception as exc:  # noqa: BLE001 - reported per batch below
                failures[index] = exc
    total = sum(results.values())
    if failures:
        first = min(failures)
        raise BulkWriteError(
            f"{len(failures)} of {len(batches)} batches failed (first: batch {first}, rows "
            f"{first * batch_size}-{min(len(rows), (first + 1) * batch_size) - 1}: {short(failures[first])}); "
            f"{len(results)} batches committed {total} rows",
            failures=failures, rowcount=total, committed=sorted(results),
        ) from failures[first]
    return total
