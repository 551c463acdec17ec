"""Bulk inserts: router.write_many, and many threads sharing one router.

    python examples/bulk_insert.py [--rows 50000] [--batch-size 2000] [--threaded-rows 2000]

Cluster from DBROUTER_PRIMARY / DBROUTER_REPLICAS, else a local PostgreSQL cluster.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import dbrouter  # import it early: it loads the MySQL driver's C extension before anything loads ssl

from _local_cluster import local_cluster_unless_configured

WORKERS = 8  # threads in the second part; keep it <= the pool's max_size (default 10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000, help="rows for write_many")
    parser.add_argument("--batch-size", type=int, default=2_000, help="rows per write_many batch (one transaction each)")
    parser.add_argument("--threaded-rows", type=int, default=2_000, help="rows written one by one by the thread pool")
    args = parser.parse_args()

    with local_cluster_unless_configured(), dbrouter.Router.from_config() as router:
        table = f"bulk_{uuid.uuid4().hex[:8]}"
        router.write(f"CREATE TABLE {table} (id INT PRIMARY KEY, payload VARCHAR(40), source VARCHAR(10))")
        try:
            return run(router, table, args)
        finally:
            router.write(f"DROP TABLE IF EXISTS {table}")


def run(router: dbrouter.Router, table: str, args: argparse.Namespace) -> int:
    insert = f"INSERT INTO {table} (id, payload, source) VALUES (%s, %s, %s)"

    # 1. write_many: the rows are cut into batches; each batch is one multi-row INSERT in
    #    its own transaction, and `workers` batches run at once on pooled primary connections.
    #    If a batch fails, BulkWriteError says which ones (the others are committed).
    rows = [(i, f"row {i}", "bulk") for i in range(args.rows)]
    started = time.perf_counter()
    written = router.write_many(insert, rows, batch_size=args.batch_size, workers=4)
    elapsed = time.perf_counter() - started
    print(f"write_many: {written} rows in {elapsed:.2f}s ({written / elapsed:,.0f} rows/s, "
          f"batches of {args.batch_size}, 4 workers)")

    # 2. Your own threads: a Router is thread-safe, so share one. Each router.write is one
    #    statement in its own transaction, on a connection borrowed from the primary's pool.
    def write_slice(ids: range) -> int:
        return sum(router.write(insert, (i, f"row {i}", "thread")) for i in ids)

    first = args.rows
    size = -(-args.threaded_rows // WORKERS)  # ceiling division
    slices = [range(start, min(start + size, first + args.threaded_rows))
              for start in range(first, first + args.threaded_rows, size)]
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=WORKERS) as executor:
        threaded = sum(executor.map(write_slice, slices))
    elapsed = time.perf_counter() - started
    print(f"thread pool: {threaded} rows by {len(slices)} workers, one router.write each, in {elapsed:.2f}s "
          f"({threaded / elapsed:,.0f} rows/s)")

    # 3. Check the total on the primary: reads inside a transaction go to the primary,
    #    so replication lag cannot make the count look short.
    with router.transaction() as tx:
        total = tx.read(f"SELECT count(*) FROM {table}")[0][0]
    expected = args.rows + args.threaded_rows
    print(f"total on the primary: {total} rows (expected {expected})")
    pool = router.stats()["nodes"][router.primary.name]["pool"]
    print(f"primary pool: {pool['size']} connections open (max {pool['max_size']}), "
          f"{pool['acquired']} checkouts, {pool['timeouts']} timeouts")
    return 0 if total == expected else 1


if __name__ == "__main__":
    sys.exit(main())
