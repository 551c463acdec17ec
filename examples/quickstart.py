"""Quickstart: writes go to the primary, reads to the replicas.

    DBROUTER_PRIMARY=postgresql://app:secret@db1:5432/shop \
    DBROUTER_REPLICAS=postgresql://app:secret@db2:5432/shop,postgresql://app:secret@db3:5432/shop \
    python examples/quickstart.py

Without DBROUTER_PRIMARY it starts a local PostgreSQL primary + 2 replicas.
Works the same with mysql:// / mariadb:// URLs.
"""

from __future__ import annotations

import time
import uuid

import dbrouter  # import it early: it loads the MySQL driver's C extension before anything loads ssl

from _local_cluster import local_cluster_unless_configured


def main() -> None:
    with local_cluster_unless_configured(), dbrouter.Router.from_config() as router:
        # Which server answered? Each engine can tell us its own port.
        engine = router.primary.adapter.engine  # "postgres" or "mysql"
        port_sql = "SELECT inet_server_port()" if engine == "postgres" else "SELECT @@port"
        print(f"router: {router!r} ({engine})")

        table = f"quickstart_{uuid.uuid4().hex[:8]}"  # a fresh table, dropped at the end
        router.write(f"CREATE TABLE {table} (id INT PRIMARY KEY, name VARCHAR(50), qty INT)")
        try:
            run(router, table, port_sql)
        finally:
            router.write(f"DROP TABLE IF EXISTS {table}")

        # A snapshot of what the router did and how each node is doing.
        stats = router.stats()
        print(f"stats: reads={stats['reads']} writes={stats['writes']} retries={stats['retries']} "
              f"fallbacks={stats['fallbacks']} primary={stats['primary']}")
        for name, node in stats["nodes"].items():
            print(f"  {name}: {node['role']}, healthy={node['healthy']}, breaker={node['breaker']}, "
                  f"connections acquired={node['pool']['acquired']}")


def run(router: dbrouter.Router, table: str, port_sql: str) -> None:
    # router.write: one statement on the primary, committed at once; returns the rowcount.
    # Parameters use the driver's placeholder, %s for both psycopg2 and mysql-connector.
    for row in [(1, "apples", 10), (2, "pears", 5), (3, "plums", 7)]:
        router.write(f"INSERT INTO {table} (id, name, qty) VALUES (%s, %s, %s)", row)
    print("wrote 3 rows on the primary")

    # router.read: one query on a replica. Replicas replay the primary's changes
    # asynchronously, so a read right after a write may not see it yet ...
    rows = wait_for(lambda: router.read(f"SELECT id, name, qty FROM {table} ORDER BY id"), expect=3)
    print(f"read {len(rows)} rows from a replica: {rows}")

    # ... whereas in a session, reads see the session's own writes (a replica that has
    # replayed them, else the primary).
    with router.session() as session:
        session.write(f"INSERT INTO {table} (id, name, qty) VALUES (%s, %s, %s)", (4, "figs", 3))
        count = session.read(f"SELECT count(*) FROM {table}")[0][0]
        print(f"session: wrote 1 row, read it back at once: {count} rows")

    # router.transaction: several statements on the primary, committed together
    # (rolled back if the block raises). Reads inside it go to the primary too.
    with router.transaction() as tx:
        tx.write(f"UPDATE {table} SET qty = qty - 1 WHERE name = %s", ("apples",))
        tx.write(f"UPDATE {table} SET qty = qty + 1 WHERE name = %s", ("pears",))
        primary_port = tx.read(port_sql)[0][0]
    print(f"transaction committed; writes served by port {primary_port} (primary)")

    # Plain reads are spread over the replicas (round robin by default).
    ports = sorted({router.read(port_sql)[0][0] for _ in range(6)})
    print(f"reads served by port(s) {', '.join(map(str, ports))} (replicas)")


def wait_for(query, expect: int, timeout: float = 10.0):
    """Run ``query`` until it returns ``expect`` rows (replication catching up)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            rows = query()
            if len(rows) == expect:
                return rows
        except Exception:  # the table itself may not have reached this replica yet
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise TimeoutError(f"replicas did not catch up within {timeout:g}s")
        time.sleep(0.02)


if __name__ == "__main__":
    main()
