"""SQLAlchemy on dbrouter's pools: where statements run, proven by asking the server that
answered for its port; what happens to the connections. Both engines, Core and ORM."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from typing import Any, Callable, Iterator

import pytest
from sqlalchemy import BigInteger, Integer, func, insert, literal_column, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from dbrouter import ConfigurationError, Router, WriteOutcomeUnknown
from dbrouter.integrations.sqlalchemy import (
    RoutingEngines,
    RoutingSession,
    create_engines,
    routing_sessionmaker,
)

from .conftest import both_drivers, kill_session, wait_until

FAST = {"health_interval": 0.2, "min_size": 1, "max_size": 4}

Make = Callable[..., RoutingEngines]


def port_of(cluster: Any) -> Any:
    """A SQL expression for the answering server's port."""
    return func.inet_server_port() if cluster.engine == "postgres" else literal_column("@@port")


def replica_ports(cluster: Any) -> set[int]:
    return {n.port for n in cluster.replicas}


def model_for(table: str) -> Any:
    """An ORM class for ``table`` (id, port), in a registry of its own."""

    class Base(DeclarativeBase):
        pass

    class Row(Base):
        __tablename__ = table
        id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
        port: Mapped[int | None] = mapped_column(Integer)

    return Row


@pytest.fixture
def make(cluster: Any, driver: str) -> Iterator[Make]:
    """Builds a router on the cluster (on the test's driver) plus its engines; closes them all at the end."""
    made: list[tuple[Router, RoutingEngines]] = []

    def build(*, urls: list[str] | None = None, **options: Any) -> RoutingEngines:
        primary, *replicas = urls or [cluster.primary.url, *(n.url for n in cluster.replicas)]
        router = Router(primary, replicas, **{**FAST, "driver": driver, **options})
        engines = create_engines(router)
        made.append((router, engines))
        return engines

    yield build
    for router, engines in made:
        engines.dispose()
        router.close()


def pool_stats(engines: RoutingEngines) -> dict[str, dict[str, Any]]:
    return {node.name: node.pool.stats() for node in engines.router.nodes}


@both_drivers
def test_engines_speak_the_routers_dialect(cluster: Any, driver: str, make: Make) -> None:
    engines = make()
    for engine in (engines.writer, engines.reader):
        if cluster.engine == "postgres":
            assert (engine.dialect.name, engine.dialect.driver) == ("postgresql", driver or "psycopg2")
        else:
            assert (engine.dialect.name, engine.dialect.driver) == ("mysql", "mysqlconnector")
        with engine.connect() as conn:
            conn.execute(select(1))
        assert getattr(engine.dialect, "is_mariadb", False) == (cluster.engine == "mariadb")


@both_drivers
def test_core_writes_on_the_primary_reads_on_replicas(cluster: Any, make: Make, table: str) -> None:
    engines = make()
    row = model_for(table).__table__
    with engines.writer.begin() as conn:
        for i in range(5):
            conn.execute(insert(row).values(id=i, port=port_of(cluster)))
        assert conn.execute(select(port_of(cluster))).scalar() == cluster.primary.port
    assert cluster.primary.query(f"SELECT DISTINCT port FROM {table}") == [(cluster.primary.port,)]
    served: Counter[int] = Counter()
    for _ in range(10):
        with engines.reader.connect() as conn:
            served[conn.execute(select(port_of(cluster))).scalar()] += 1
    assert set(served) == replica_ports(cluster), served
    cluster.wait_replicated()
    with engines.reader.connect() as conn:
        assert conn.execute(select(row.c.id).order_by(row.c.id)).scalars().all() == list(range(5))


def test_a_partly_read_result_does_not_block_the_next_statement(cluster: Any, make: Make) -> None:
    """mysql-connector refuses a statement while an unbuffered cursor has unread rows;
    SQLAlchemy 2.0 relies on buffered cursors (2.1 asks for them per cursor)."""
    engines = make()
    for engine in (engines.writer, engines.reader):
        with engine.connect() as conn:
            assert conn.execute(text("SELECT 1 UNION ALL SELECT 2 UNION ALL SELECT 3")).first() == (1,)
            assert conn.execute(text("SELECT 5")).scalar() == 5


@both_drivers
def test_orm_flushes_go_to_the_primary_and_queries_to_replicas(cluster: Any, make: Make, table: str) -> None:
    Row = model_for(table)
    Session = routing_sessionmaker(make())
    for node in cluster.replicas:
        cluster.pause_replication(node)
    with Session() as session:
        session.add(Row(id=1, port=port_of(cluster)))  # evaluated by the server that runs the INSERT
        session.commit()
    assert cluster.primary.query(f"SELECT id, port FROM {table}") == [(1, cluster.primary.port)]
    for node in cluster.replicas:
        assert node.query(f"SELECT id FROM {table}") == []  # replay really is paused
    with Session() as fresh:  # no writes of its own: plain replica reads, which are stale here
        assert fresh.scalar(select(port_of(cluster))) in replica_ports(cluster)
        assert fresh.get(Row, 1) is None
        assert fresh.scalars(select(Row)).all() == []


def test_a_session_reads_its_writes_from_the_primary_while_replay_is_paused(
    cluster: Any, make: Make, table: str
) -> None:
    Row = model_for(table)
    engines = make(causal_wait=0.05)
    Session = routing_sessionmaker(engines)
    for node in cluster.replicas:
        cluster.pause_replication(node)
    for i in range(5):
        with Session() as session:
            assert session.position is None
            session.add(Row(id=i, port=0))  # ORM
            session.commit()
            assert session.position
            assert session.execute(select(Row.id, port_of(cluster)).where(Row.id == i)).one() == (i, cluster.primary.port)
            assert session.get(Row, i) is not None
        with Session() as session:  # Core through the session
            session.execute(insert(Row.__table__).values(id=100 + i, port=0))
            session.commit()
            rows = session.execute(select(Row.__table__.c.id, port_of(cluster)).where(Row.__table__.c.id == 100 + i))
            assert rows.all() == [(100 + i, cluster.primary.port)]


def test_a_session_reads_its_writes_from_replicas_that_keep_up(cluster: Any, make: Make, table: str) -> None:
    Row = model_for(table)
    Session = routing_sessionmaker(make(causal_wait=2.0))
    served: Counter[int] = Counter()
    for i in range(10):
        with Session() as session:
            session.add(Row(id=i, port=0))
            session.commit()
            got_id, port = session.execute(select(Row.id, port_of(cluster)).where(Row.id == i)).one()
            assert got_id == i
            served[port] += 1
            session.execute(insert(Row.__table__).values(id=100 + i, port=0))
            session.commit()
            assert session.scalar(select(Row.__table__.c.id).where(Row.__table__.c.id == 100 + i)) == 100 + i
            served[session.execute(select(port_of(cluster))).scalar_one()] += 1
    assert set(served) == replica_ports(cluster), served


def test_reads_after_a_flush_stay_on_the_primary_until_the_transaction_ends(
    cluster: Any, make: Make, table: str
) -> None:
    Row = model_for(table)
    Session = routing_sessionmaker(make())
    with Session() as session:
        assert session.scalar(select(port_of(cluster))) in replica_ports(cluster)
        session.add(Row(id=1, port=0))
        session.flush()
        assert session.scalar(select(port_of(cluster))) == cluster.primary.port
        assert session.scalar(select(Row.id).where(Row.id == 1)) == 1  # its own uncommitted row
        session.rollback()
        assert session.position is None  # nothing committed, nothing to wait for
        assert session.scalar(select(port_of(cluster))) in replica_ports(cluster)
        session.rollback()

        session.add(Row(id=2, port=0))
        assert session.scalars(select(Row.id)).all() == [2]  # autoflush, then read on the primary
        assert session.scalar(select(port_of(cluster))) == cluster.primary.port
        session.rollback()
    assert cluster.primary.query(f"SELECT id FROM {table}") == []


def test_a_savepoint_release_is_not_a_commit(cluster: Any, make: Make, table: str) -> None:
    Row = model_for(table)
    Session = routing_sessionmaker(make())
    with Session() as session:
        with session.begin_nested():
            session.add(Row(id=1, port=0))
        assert session.scalar(select(port_of(cluster))) == cluster.primary.port  # still in the transaction
        session.rollback()
        assert session.position is None
    assert cluster.primary.query(f"SELECT id FROM {table}") == []


def test_a_failing_replay_check_falls_back_to_the_primary(cluster: Any, make: Make, table: str) -> None:
    engines = make()
    Row = model_for(table)
    Session = routing_sessionmaker(engines)
    for node in engines.router.replicas:
        node.pool.close()  # the monitor still finds them healthy; checkouts fail with PoolClosed
    with Session() as session:
        session.add(Row(id=1, port=0))
        session.commit()
        assert session.execute(select(Row.id, port_of(cluster))).one() == (1, cluster.primary.port)


def test_locking_reads_text_writes_and_explicit_binds(cluster: Any, make: Make, table: str) -> None:
    engines = make()
    Row = model_for(table)
    Session = routing_sessionmaker(engines)
    port_sql = "inet_server_port()" if cluster.engine == "postgres" else "@@port"
    cluster.primary.query(f"INSERT INTO {table} (id, port) VALUES (1, 0)")
    cluster.wait_replicated()
    with Session() as session:
        locked = session.execute(select(Row.id, port_of(cluster)).where(Row.id == 1).with_for_update()).one()
        assert locked == (1, cluster.primary.port)
    with Session() as session:
        assert session.scalar(text(f"SELECT {port_sql}")) in replica_ports(cluster)
        session.rollback()
        session.execute(text(f"UPDATE {table} SET port = {port_sql} WHERE id = 1"))
        session.commit()
    assert cluster.primary.query(f"SELECT port FROM {table}") == [(cluster.primary.port,)]
    with Session() as session:
        forced = session.scalar(select(port_of(cluster)), bind_arguments={"bind": engines.writer})
        assert forced == cluster.primary.port


def test_text_is_routed_by_the_read_rule(cluster: Any, make: Make, table: str) -> None:
    """Issue 13 item 3: text("SELECT 1; DELETE ...") was routed as a read (to a replica, or to
    the primary by fallback). Now text() that is not one read statement goes to the primary,
    and a WITH that only reads goes to a replica."""
    engines = make()
    Session = routing_sessionmaker(engines)
    port_sql = "inet_server_port()" if cluster.engine == "postgres" else "@@port"
    writes = [
        f"SELECT 1; DELETE FROM {table}",
        f"WITH gone AS (DELETE FROM {table} RETURNING id) SELECT id FROM gone",
        f"SELECT id FROM {table} LOCK IN SHARE MODE",
        f"EXPLAIN ANALYZE DELETE FROM {table}",
    ]
    for sql in writes:
        with Session() as session:
            assert session.get_bind(clause=text(sql)) is engines.writer, sql
    with Session() as session:
        read = f"WITH x AS (SELECT 1 AS one) SELECT {port_sql}, 'a;b' /* ; DELETE */ FROM x"
        assert session.execute(text(read)).one()[0] in replica_ports(cluster)


def test_sticky_sessions_read_from_the_primary_after_a_commit(cluster: Any, make: Make, table: str) -> None:
    Row = model_for(table)
    Session = routing_sessionmaker(make(sticky_seconds=0.5))
    with Session() as session:
        assert session.scalar(select(port_of(cluster))) in replica_ports(cluster)
        session.rollback()
        session.add(Row(id=1, port=0))
        session.commit()
        assert session.scalar(select(port_of(cluster))) == cluster.primary.port
        session.rollback()
        time.sleep(0.6)
        assert session.scalar(select(port_of(cluster))) in replica_ports(cluster)


def _session_count(cluster: Any, node: Any, tag: str) -> int:
    if cluster.engine == "postgres":
        sql = f"SELECT count(*) FROM pg_stat_activity WHERE application_name = '{tag}'"
    else:  # the replication threads may show the database too; they run as "system user"
        sql = f"SELECT count(*) FROM information_schema.PROCESSLIST WHERE DB = '{tag}' AND USER <> 'system user'"
    return int(node.query(sql)[0][0])


def test_connections_go_back_to_dbrouter_pools_and_no_server_session_leaks(cluster: Any, make: Make) -> None:
    """Server sessions are counted by application_name (PostgreSQL) or by a database of the
    test's own (MariaDB does not list connection attributes)."""
    tag = "t" + uuid.uuid4().hex[:12]
    nodes = [cluster.primary, *cluster.replicas]
    if cluster.engine == "postgres":
        urls = [n.url for n in nodes]
        options: dict[str, Any] = {"application_name": tag}
        cluster.primary.query(f"CREATE TABLE {tag} (id bigint primary key, port int)")
    else:
        cluster.create_database(tag)
        cluster.primary.query(f"CREATE TABLE {tag}.{tag} (id bigint primary key, port int)")
        urls = [n.url.rsplit("/", 1)[0] + f"/{tag}" for n in nodes]
        options = {}
    cluster.wait_replicated()
    try:
        engines = make(urls=urls, max_size=3, causal_wait=1.0, **options)
        Row = model_for(tag)
        Session = routing_sessionmaker(engines)
        before = pool_stats(engines)
        errors: list[BaseException] = []

        def work(offset: int) -> None:
            try:
                for i in range(offset, offset + 15):
                    with Session() as session:
                        session.add(Row(id=i, port=0))
                        session.commit()
                        assert session.get(Row, i) is not None
                    with engines.reader.connect() as conn:
                        conn.execute(select(1))
                    with engines.writer.connect() as conn:
                        conn.execute(select(1))
            except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(t * 1000,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert errors == []
        after = pool_stats(engines)
        for node in engines.router.nodes:
            stats = after[node.name]
            assert stats["in_use"] == 0, (node.name, stats)
            assert stats["acquired"] > before[node.name]["acquired"], node.name
            assert stats["size"] <= 3 and stats["opened"] - stats["closed"] == stats["size"]
            server = next(n for n in nodes if n.port == node.address.port)
            # The pool's connections plus the monitor's probe connection, nothing else.
            assert stats["size"] <= _session_count(cluster, server, tag) <= stats["size"] + 1
        engines.dispose()
        engines.router.close()
        deadline = time.monotonic() + 10
        while any(_session_count(cluster, n, tag) for n in nodes) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [_session_count(cluster, n, tag) for n in nodes] == [0, 0, 0]
    finally:
        if cluster.engine == "postgres":
            cluster.primary.query(f"DROP TABLE IF EXISTS {tag}")
        else:
            cluster.primary.query(f"DROP DATABASE IF EXISTS {tag}")


def test_invalidated_and_killed_connections_are_discarded_by_dbrouter(cluster: Any, make: Make) -> None:
    engines = make(max_size=1)
    primary = engines.router.primary
    with engines.writer.connect() as conn:
        conn.execute(select(1))
        conn.invalidate()
    assert primary.pool.stats()["discarded"] == 1 and primary.pool.stats()["in_use"] == 0

    id_sql = "SELECT pg_backend_pid()" if cluster.engine == "postgres" else "SELECT CONNECTION_ID()"
    with engines.writer.connect() as conn:
        kill_session(cluster, conn.exec_driver_sql(id_sql).scalar_one())
        with pytest.raises(DBAPIError):
            for _ in range(50):  # MariaDB may need a moment to close the socket
                conn.execute(select(1))
                time.sleep(0.02)
    assert primary.pool.stats()["discarded"] == 2 and primary.pool.stats()["in_use"] == 0
    with engines.writer.connect() as conn:  # a fresh connection, from the same pool
        assert conn.execute(select(port_of(cluster))).scalar() == cluster.primary.port


def test_a_commit_on_a_lost_connection_is_outcome_unknown_and_counts_against_the_node(
        cluster: Any, make: Make, table: str) -> None:
    """As with Router.transaction: a COMMIT that met a dead connection may or may not have been
    applied. (mysql-connector's C extension raised its own MySQLInterfaceError from commit(),
    which SQLAlchemy does not wrap, and the lost connection was not counted against the node.)"""
    engines = make(max_size=2)
    primary = engines.router.primary
    id_sql = "SELECT pg_backend_pid()" if cluster.engine == "postgres" else "SELECT CONNECTION_ID()"
    gone_sql = ("SELECT count(*) FROM pg_stat_activity WHERE pid = {}" if cluster.engine == "postgres"
                else "SELECT count(*) FROM information_schema.PROCESSLIST WHERE ID = {}")
    with pytest.raises(WriteOutcomeUnknown) as info, engines.writer.begin() as conn:
        conn.execute(text(f"INSERT INTO {table} (id, port) VALUES (1, 0)"))
        session = conn.exec_driver_sql(id_sql).scalar_one()
        kill_session(cluster, session)
        assert wait_until(lambda: cluster.primary.query(gone_sql.format(session)) == [(0,)], 5)
    assert "during COMMIT" in str(info.value)
    stats = engines.router.stats()
    assert stats["write_outcome_unknown"] == 1 and stats["nodes"][primary.name]["breaker_failures"] == 1
    assert primary.pool.stats()["in_use"] == 0
    with engines.writer.connect() as conn:  # a fresh connection, from the same pool
        assert conn.execute(select(port_of(cluster))).scalar() == cluster.primary.port


@both_drivers
def test_session_settings_do_not_leak_into_the_pool(cluster: Any, driver: str, make: Make) -> None:
    engines = make(max_size=1)  # one connection: the next borrower gets the same one
    if cluster.engine == "postgres":
        level_sql, default_level = "SELECT current_setting('transaction_isolation')", "read committed"
    else:
        level_sql, default_level = "SELECT @@session.tx_isolation", "REPEATABLE-READ"
    with engines.writer.connect().execution_options(isolation_level="SERIALIZABLE") as conn:
        assert conn.execute(text(level_sql)).scalar_one().lower() == "serializable"
    if cluster.engine == "postgres":
        with engines.writer.connect().execution_options(postgresql_readonly=True) as conn:
            assert conn.execute(text("SHOW transaction_read_only")).scalar() == "on"
    with engines.router.connection("write") as raw:
        if cluster.engine == "postgres":
            readonly = raw.read_only if driver == "psycopg" else raw.readonly
            assert (raw.autocommit, raw.isolation_level, readonly, raw.deferrable) == (True, None, None, None)
        else:
            assert raw.autocommit is True
            with raw.cursor() as cur:  # as dbrouter opened it: unbuffered
                assert "Buffered" not in type(cur).__name__
    with engines.router.transaction() as tx:
        assert tx.read(level_sql) == [(default_level,)]
        if cluster.engine == "postgres":
            assert tx.read("SHOW transaction_read_only") == [("off",)]


def test_pool_options_and_binds_are_refused(cluster: Any, make: Make) -> None:
    engines = make()
    with pytest.raises(ConfigurationError, match="max_size"):
        create_engines(engines.router, pool_size=5)
    with pytest.raises(ConfigurationError, match="acquire_timeout"):
        create_engines(engines.router, pool_timeout=5)
    with pytest.raises(ConfigurationError, match="binds"):
        RoutingSession(engines, bind=engines.writer)
