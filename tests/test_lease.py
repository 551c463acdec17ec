"""The lease and the decision table against real servers: who pays for a failure, what runs
again, what a lease feeds (both engines)."""

from __future__ import annotations

import gc
import time
import uuid
from typing import Any

import pytest

from dbrouter import DbRouterError, Router

from .conftest import wait_until

FAST = {"health_interval": 0.2, "min_size": 0, "max_size": 2, "connect_timeout": 2, "fail_max": 1,
        "reset_timeout": 5}


def breaker_of(router: Router, name: str) -> tuple[str, int]:
    node = router.stats()["nodes"][name]
    return node["breaker"], node["breaker_failures"]


def test_a_callers_read_only_transaction_does_not_take_the_primary_out(cluster: Any, table: str) -> None:
    """Only a write dbrouter sent itself proves a node demoted: a caller who asked for a
    read-only transaction gets the server's error, and the primary stays in service."""
    with Router(cluster.primary.url, **FAST) as router:
        primary = router.primary.name
        with pytest.raises(Exception) as info, router.transaction() as tx:  # noqa: PT011 - the driver's own
            if cluster.engine == "postgres":
                tx.execute("SET TRANSACTION READ ONLY")
            else:
                tx.execute("ROLLBACK")  # MariaDB: only a new transaction can be read-only
                tx.execute("START TRANSACTION READ ONLY")
            tx.execute(f"INSERT INTO {table} (id, port) VALUES (1, 0)")
        assert "read" in str(info.value).lower()
        assert breaker_of(router, primary) == ("closed", 0)
        assert router.write(f"INSERT INTO {table} (id, port) VALUES (2, 0)") == 1


def test_a_nested_borrows_failure_is_not_charged_to_the_outer_connection(cluster: Any) -> None:
    """connection() and checkin() blame their node only for their own connection's errors."""
    dead = "postgresql://postgres@127.0.0.1:1/postgres" if cluster.engine == "postgres" else "mysql://root@127.0.0.1:1/mysql"
    with Router(cluster.primary.url, **FAST) as router, Router(dead, connect_timeout=1) as other:
        primary = router.primary.name
        with pytest.raises(DbRouterError), router.connection("write"):
            with other.connection("write"):
                pass
        assert breaker_of(router, primary) == ("closed", 0)
        assert router.stats()["nodes"][primary]["pool"]["discarded"] == 0
        node, conn = router.checkout("write")
        try:
            other.checkout("write")
        except DbRouterError as exc:  # ConnectError, or NoPrimaryAvailable once probed
            router.checkin(node, conn, exc)
        assert breaker_of(router, primary) == ("closed", 0)


def test_run_transaction_reruns_a_conflict_raised_through_the_raw_connection(cluster: Any) -> None:
    """An error from tx.connection is the transaction's own: a serialization failure there is
    rerun like one from tx.execute."""
    conflict = ("DO $$ BEGIN RAISE EXCEPTION USING ERRCODE = '40001'; END $$" if cluster.engine == "postgres"
                else "SIGNAL SQLSTATE '40001' SET MYSQL_ERRNO = 1213, MESSAGE_TEXT = 'deadlock'")
    runs: list[int] = []

    def fn(tx: Any) -> str:
        runs.append(1)
        if len(runs) < 3:
            cur = tx.connection.cursor()
            try:
                cur.execute(conflict)
            finally:
                cur.close()
        return "done"

    with Router(cluster.primary.url, **FAST, retry_backoff=0.01) as router:
        assert router.run_transaction(fn) == "done"
        assert len(runs) == 3 and router.stats()["retries"] == 2
        assert breaker_of(router, router.primary.name) == ("closed", 0)


def test_latency_is_fed_by_single_statements_only(cluster: Any) -> None:
    with Router(cluster.primary.url, [cluster.replicas[0].url], **FAST) as router:
        replica = router.replicas[0]
        for _ in range(20):
            router.read("SELECT 1")
        before = replica.latency
        assert 0 < before < 0.1
        with router.connection("read"):
            time.sleep(0.5)
        assert replica.latency == before


def test_a_dropped_lease_gives_its_connection_back(cluster: Any) -> None:
    """A lease garbage-collected without a release: its connection is discarded at the next
    housekeeping and the pool serves again, without blaming the node."""
    with Router(cluster.primary.url, **{**FAST, "max_size": 1}, maintenance_interval=0.05) as router:
        primary = router.primary
        lease = router.lease("write")
        assert primary.pool.stats()["in_use"] == 1
        del lease
        gc.collect()
        assert wait_until(lambda: primary.pool.stats()["in_use"] == 0, 3)
        assert router.write("SELECT 1") is not None
        assert primary.pool.stats()["discarded"] == 1 and breaker_of(router, primary.name) == ("closed", 0)


def test_a_session_that_lost_its_position_reads_from_the_primary(cluster: Any, table: str) -> None:
    """A replica without the session's write is never asked, even when the primary fails."""
    with Router(cluster.primary.url, [n.url for n in cluster.replicas], **FAST) as router, router.session() as s:
        s.write(f"INSERT INTO {table} (id, port) VALUES (1, 0)")
        for replica in cluster.replicas:
            cluster.pause_replication(replica)
        try:
            s.write(f"INSERT INTO {table} (id, port) VALUES (2, 0)")
            name = f"r{uuid.uuid4().hex[:6]}"
            assert s.read(f"SELECT count(*) AS {name} FROM {table}") == [(2,)]
            assert router.stats()["causal_primary_reads"] >= 1
        finally:
            for replica in cluster.replicas:
                cluster.resume_replication(replica)
