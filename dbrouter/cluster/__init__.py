"""Real local replication clusters (PostgreSQL, MariaDB, Patroni) for tests, demos and the CLI.

Each cluster is a primary plus N streaming replicas on 127.0.0.1, started
from the binaries installed on the machine, with helpers to inject the
faults dbrouter must survive: kill, freeze (SIGSTOP), paused replication,
promotion and rejoin.
"""

from __future__ import annotations

from typing import Any

from dbrouter.cluster._base import LocalCluster, LocalNode
from dbrouter.cluster.mariadb import MariaDBCluster, MariaDBNode
from dbrouter.cluster.patroni import PatroniCluster, PatroniNode, PatroniTimeline
from dbrouter.cluster.postgres import PostgresCluster, PostgresNode
from dbrouter.errors import ClusterError

__all__ = [
    "LocalCluster",
    "LocalNode",
    "MariaDBCluster",
    "MariaDBNode",
    "PatroniCluster",
    "PatroniNode",
    "PatroniTimeline",
    "PostgresCluster",
    "PostgresNode",
    "make_cluster",
]

_ENGINES: dict[str, type[LocalCluster]] = {
    "postgres": PostgresCluster,
    "postgresql": PostgresCluster,
    "pg": PostgresCluster,
    "mariadb": MariaDBCluster,
    "maria": MariaDBCluster,
    "mysql": MariaDBCluster,  # MariaDB is the MySQL-compatible server installed here
    "patroni": PatroniCluster,  # PostgreSQL managed by Patroni, with etcd
}


def make_cluster(engine: str, **kwargs: Any) -> LocalCluster:
    """A not yet started cluster for ``engine`` ("postgres"/"postgresql"/"pg",
    "mariadb"/"mysql" or "patroni"); ``kwargs`` go to the cluster class. Raises ClusterError
    for an unknown engine."""
    try:
        cls = _ENGINES[engine.lower()]
    except KeyError:
        raise ClusterError(f"unknown engine {engine!r}; expected one of {sorted(_ENGINES)}") from None
    return cls(**kwargs)
