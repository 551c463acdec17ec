"""Read-your-writes: why a read right after a write can miss it, and how router.session() fixes that.

    python examples/read_your_writes.py [--rounds 200]

Replicas replay the primary's changes asynchronously, a few milliseconds behind. A plain
router.read sent right after router.write may reach a replica that has not replayed the
write yet: it returns the old value. That is fine for most reads, and wrong for "save,
then show what was saved".

In a session, after each write the router notes the primary's replication position
(PostgreSQL WAL LSN, MariaDB GTID, MySQL GTID set). A read in the session goes to a
replica only once that replica has replayed the position (waiting up to causal_wait,
default 50 ms); otherwise the primary answers. So a session never reads stale data.

Cluster from DBROUTER_PRIMARY / DBROUTER_REPLICAS, else a local PostgreSQL cluster.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from collections import Counter

import dbrouter  # import it early: it loads the MySQL driver's C extension before anything loads ssl

from _local_cluster import local_cluster_unless_configured


def main() -> int:
    parser = argparse.ArgumentParser(description="read-your-writes with router.session()")
    parser.add_argument("--rounds", type=int, default=200, help="write-then-read rounds in each part")
    args = parser.parse_args()

    with local_cluster_unless_configured(), dbrouter.Router.from_config() as router:
        engine = router.primary.adapter.engine
        port = "inet_server_port()" if engine == "postgres" else "@@port"
        table = f"ryw_{uuid.uuid4().hex[:8]}"
        router.write(f"CREATE TABLE {table} (id INT PRIMARY KEY, v INT)")
        try:
            router.write(f"INSERT INTO {table} (id, v) VALUES (1, 0)")
            # Each read returns the value and the port of the server that answered.
            query = f"SELECT v, {port} FROM {table} WHERE id = 1"
            wait_until_every_replica_has_the_row(router, query)
            return run(router, table, query, args.rounds)
        finally:
            router.write(f"DROP TABLE IF EXISTS {table}")


def run(router: dbrouter.Router, table: str, query: str, rounds: int) -> int:
    update = f"UPDATE {table} SET v = %s WHERE id = 1"
    primary_port = router.primary.address.port

    # 1. Outside a session: router.write then router.read. Nothing makes the replica
    #    wait for the write, so some reads may return the previous value. How many
    #    depends on load and network: on a quiet local cluster it is often 0, under
    #    load in production it is not.
    stale = 0
    for value in range(1, rounds + 1):
        router.write(update, (value,))
        seen, _server = router.read(query)[0]
        stale += seen != value
    print(f"outside a session: {stale} of {rounds} reads missed the write just made "
          "(a matter of timing: 0 is possible, and nothing prevents more)")

    # 2. Inside router.session(): same loop, reads always see the session's writes.
    stale = 0
    served: Counter[int] = Counter()
    with router.session() as session:
        for value in range(rounds + 1, 2 * rounds + 1):
            session.write(update, (value,))
            seen, server = session.read(query)[0]
            stale += seen != value
            served[server] += 1
    print(f"inside router.session(): stale reads: {stale} of {rounds}")
    for server, count in sorted(served.items()):
        role = "primary" if server == primary_port else "replica"
        print(f"  served by port {server} ({role}): {count} reads")
    print(f"reads the router sent to the primary because no replica had the write in time: "
          f"{router.stats()['causal_primary_reads']}")
    return 0 if stale == 0 else 1


def wait_until_every_replica_has_the_row(router: dbrouter.Router, query: str, timeout: float = 10.0) -> None:
    """Poll until each replica has answered ``query`` (the new table has reached all of them)."""
    replica_ports = {node.address.port for node in router.replicas}
    answered: set[int] = set()
    deadline = time.monotonic() + timeout
    while not replica_ports <= answered:
        try:
            answered.update(server for _v, server in router.read(query))
        except Exception:  # this replica has not created the table yet
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise TimeoutError(f"replicas {sorted(replica_ports - answered)} did not catch up within {timeout:g}s")
        time.sleep(0.01)


if __name__ == "__main__":
    sys.exit(main())
