"""Prometheus metrics: serve a router's pools, breakers, lag and counters at /metrics.

    python examples/prometheus_metrics.py [--port 0]

Needs the ``prometheus`` extra (prometheus-client). Everything is read from
router.stats() when Prometheus scrapes: the query path pays nothing.
Cluster from DBROUTER_PRIMARY / DBROUTER_REPLICAS, else a local PostgreSQL cluster.
"""

from __future__ import annotations

import argparse
import urllib.request
import uuid

import dbrouter  # import it early: it loads the MySQL driver's C extension before anything loads ssl
from dbrouter.metrics import start_http_server

from _local_cluster import local_cluster_unless_configured

# The lines this example prints; /metrics has many more (see dbrouter/metrics.py).
SHOWN = ("dbrouter_pool_acquired_total", "dbrouter_reads_total", "dbrouter_writes_total",
         "dbrouter_node_primary", "dbrouter_breaker_state", "dbrouter_replica_lag_seconds")


def main() -> None:
    parser = argparse.ArgumentParser(description="serve a router's metrics")
    parser.add_argument("--port", type=int, default=0, help="port for /metrics (0: any free port)")
    args = parser.parse_args()

    with local_cluster_unless_configured(), dbrouter.Router.from_config() as router:
        # Binds to 127.0.0.1; pass addr="0.0.0.0" for a Prometheus on another host.
        # With several routers in one process, give each its own name= (the "router" label).
        server = start_http_server(router, port=args.port)
        try:
            print(f"metrics at http://127.0.0.1:{server.port}/metrics")
            traffic(router)
            with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=10) as response:
                text = response.read().decode()
        finally:
            server.stop()
        for line in text.splitlines():
            if line.startswith(SHOWN):
                print(line)


def traffic(router: dbrouter.Router) -> None:
    """A few writes on the primary and reads on the replicas, so the counters move."""
    table = f"metrics_{uuid.uuid4().hex[:8]}"
    router.write(f"CREATE TABLE {table} (id INT PRIMARY KEY)")
    try:
        for i in range(5):
            router.write(f"INSERT INTO {table} (id) VALUES (%s)", (i,))
        for _ in range(20):
            router.read("SELECT 1")
    finally:
        router.write(f"DROP TABLE IF EXISTS {table}")


if __name__ == "__main__":
    main()
