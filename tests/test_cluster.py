"""The local replication clusters, proved against the real servers they start.

Every claim is checked by asking the servers themselves (their port, whether
they are in recovery / read-only, which rows they hold) over TCP as the
application user, never by trusting the cluster object's bookkeeping.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import mysql.connector
import psycopg2
import psycopg2.errors
import pytest

from dbrouter.cluster import (
    LocalCluster,
    LocalNode,
    MariaDBCluster,
    PostgresCluster,
    make_cluster,
)
from dbrouter.cluster._base import PORT_RANGE, allocate_ports, port_is_free, release_ports
from dbrouter.errors import ClusterError

pytestmark = pytest.mark.slow

ENGINES = [
    pytest.param("postgres", marks=pytest.mark.postgres, id="postgres"),
    pytest.param("mariadb", marks=pytest.mark.mysql, id="mariadb"),
]
TABLE = "cluster_probe"
DRIVER_ERRORS = (psycopg2.Error, mysql.connector.Error)


# ------------------------------------------------------------------ fixtures


def _started(cluster: LocalCluster) -> LocalCluster:
    cluster.start()
    assert cluster.start_seconds is not None
    print(f"\n{type(cluster).__name__}(replicas={len(cluster.nodes) - 1}) started in {cluster.start_seconds:.2f} s")
    assert cluster.start_seconds < 30
    return cluster


@pytest.fixture(scope="module")
def module_pg() -> Iterator[LocalCluster]:
    cluster = _started(PostgresCluster(replicas=2))
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture(scope="module")
def module_maria() -> Iterator[LocalCluster]:
    cluster = _started(MariaDBCluster(replicas=2))
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A temporary directory that is gone after the test (pytest's tmp_path stays)."""
    with tempfile.TemporaryDirectory(prefix="dbrouter-test-") as d:
        yield Path(d)


@pytest.fixture
def mcluster(request: pytest.FixtureRequest) -> LocalCluster:
    name = "module_pg" if request.param == "postgres" else "module_maria"
    c: LocalCluster = request.getfixturevalue(name)
    # Earlier tests may leave a node stopped or paused on failure; start clean.
    for node in c.nodes:
        if node.frozen:
            node.thaw()
        node.start()
        if node.paused:
            c.resume_replication(node)
    ensure_table(c.primary)
    c.wait_replicated()
    return c


# ------------------------------------------------------------------- helpers


def connect(node: LocalNode, timeout: int = 5) -> Any:
    """An application connection built from ``node.url`` (which proves the URL)."""
    u = urlsplit(node.url)
    assert u.hostname and u.port and u.username and u.password
    kwargs = dict(host=u.hostname, port=u.port, user=unquote(u.username), password=unquote(u.password))
    db = u.path.lstrip("/")
    if u.scheme == "postgresql":
        conn = psycopg2.connect(dbname=db, connect_timeout=timeout, **kwargs)
        conn.autocommit = True
        return conn
    assert u.scheme == "mariadb"
    return mysql.connector.connect(
        database=db,
        collation="utf8mb4_general_ci",
        connection_timeout=timeout,
        autocommit=True,
        use_pure=True,
        **kwargs,
    )


def fetch(node: LocalNode, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    conn = connect(node)
    try:
        cur = conn.cursor()
        cur.execute(sql, params or None)
        rows = cur.fetchall() if cur.description else []
        cur.close()
        return [tuple(r) for r in rows]
    finally:
        conn.close()


def ensure_table(node: LocalNode) -> None:
    fetch(node, f"CREATE TABLE IF NOT EXISTS {TABLE} (id varchar(64) PRIMARY KEY)")


def insert(node: LocalNode) -> str:
    key = uuid.uuid4().hex
    fetch(node, f"INSERT INTO {TABLE} (id) VALUES (%s)", (key,))
    return key


def has_row(node: LocalNode, key: str) -> bool:
    return bool(fetch(node, f"SELECT 1 FROM {TABLE} WHERE id = %s", (key,)))


def identity(node: LocalNode) -> tuple[int, bool]:
    """(port, read-only) as the server itself reports them."""
    if node.engine == "postgres":
        port, ro = fetch(node, "SELECT inet_server_port(), pg_is_in_recovery()")[0]
    else:
        port, ro = fetch(node, "SELECT @@port, @@read_only")[0]
    return int(port), bool(ro)


def process_tree(pid: int) -> list[int]:
    """pid and its direct children (PostgreSQL backends), read from /proc."""
    out = [pid]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry))
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def wait_gone(pids: list[int], timeout: float = 10) -> list[int]:
    end = time.monotonic() + timeout
    while time.monotonic() < end and any(alive(p) for p in pids):
        time.sleep(0.02)
    return [p for p in pids if alive(p)]


# ------------------------------------------------------------ no server needed


def test_make_cluster_maps_engine_names() -> None:
    assert type(make_cluster("postgres")) is PostgresCluster
    assert type(make_cluster("postgresql")) is PostgresCluster
    assert type(make_cluster("mariadb")) is MariaDBCluster
    assert type(make_cluster("mysql", replicas=1)) is MariaDBCluster
    with pytest.raises(ClusterError, match="unknown engine"):
        make_cluster("oracle")
    with pytest.raises(ClusterError, match="replicas"):
        PostgresCluster(replicas=-1)
    with pytest.raises(ClusterError, match="not started"):
        _ = MariaDBCluster().base_dir


def test_ports_are_free_and_below_the_ephemeral_range() -> None:
    ports = allocate_ports(5)
    try:
        assert len(set(ports)) == 5
        assert all(PORT_RANGE[0] <= p < PORT_RANGE[1] < 32768 for p in ports)
        assert all(port_is_free(p) for p in ports)
        assert not set(allocate_ports(3)) & set(ports)  # remembered until released
    finally:
        release_ports(ports)


def test_refuses_a_non_empty_base_dir(scratch: Path) -> None:
    (scratch / "precious.txt").write_text("mine")
    with pytest.raises(ClusterError, match="empty"):
        PostgresCluster(replicas=0, base_dir=scratch).start()
    assert (scratch / "precious.txt").read_text() == "mine"


# ----------------------------------------------------------- running clusters


@pytest.mark.parametrize("mcluster", ENGINES, indirect=True)
def test_servers_confirm_who_is_primary(mcluster: LocalCluster) -> None:
    primary, r1, r2 = mcluster.nodes
    prefix = "pg" if mcluster.engine == "postgres" else "maria"
    scheme = "postgresql" if mcluster.engine == "postgres" else "mariadb"
    assert [n.name for n in mcluster.nodes] == [f"{prefix}0", f"{prefix}1", f"{prefix}2"]
    assert mcluster.primary is primary and mcluster.replicas == [r1, r2]
    assert len({n.port for n in mcluster.nodes}) == 3
    for node in mcluster.nodes:
        assert node.url == f"{scheme}://dbrouter:{mcluster.password}@127.0.0.1:{node.port}/dbrouter"
        assert node.running and node.pid and alive(node.pid)
        assert identity(node) == (node.port, node is not primary)
    status = mcluster.status()
    assert [(s["name"], s["port"], s["role"]) for s in status] == [
        (n.name, n.port, "primary" if n is primary else "replica") for n in mcluster.nodes
    ]
    assert all(s["running"] and s["pid"] == n.pid for s, n in zip(status, mcluster.nodes, strict=True))


@pytest.mark.parametrize("mcluster", ENGINES, indirect=True)
def test_wrong_password_is_refused(mcluster: LocalCluster) -> None:
    node = mcluster.primary
    with pytest.raises(DRIVER_ERRORS) as info:
        if mcluster.engine == "postgres":
            psycopg2.connect(host=node.host, port=node.port, user=mcluster.user, password="wrong",
                             dbname=mcluster.database, connect_timeout=5)
        else:
            mysql.connector.connect(host=node.host, port=node.port, user=mcluster.user, password="wrong",
                                    collation="utf8mb4_general_ci", connection_timeout=5, use_pure=True)
    if mcluster.engine == "postgres":
        assert "password authentication failed" in str(info.value)
    else:
        assert getattr(info.value, "errno", None) == 1045


@pytest.mark.parametrize("mcluster", ENGINES, indirect=True)
def test_row_written_on_primary_reaches_every_replica(mcluster: LocalCluster) -> None:
    key = insert(mcluster.primary)
    mcluster.wait_replicated(timeout=10)
    assert all(has_row(r, key) for r in mcluster.replicas)


@pytest.mark.parametrize("mcluster", ENGINES, indirect=True)
def test_replica_refuses_writes_from_the_app_user(mcluster: LocalCluster) -> None:
    for replica in mcluster.replicas:
        with pytest.raises(DRIVER_ERRORS) as info:
            insert(replica)
        if mcluster.engine == "postgres":
            assert getattr(info.value, "pgcode", None) == "25006"
            assert isinstance(info.value, psycopg2.errors.ReadOnlySqlTransaction)
        else:
            assert getattr(info.value, "errno", None) == 1290


@pytest.mark.parametrize("mcluster", ENGINES, indirect=True)
def test_paused_replica_misses_rows_until_resumed(mcluster: LocalCluster) -> None:
    paused, other = mcluster.replicas
    mcluster.pause_replication(paused)
    try:
        key = insert(mcluster.primary)
        mcluster.wait_replicated(timeout=10)  # skips the paused replica
        assert has_row(other, key)
        time.sleep(0.3)
        assert not has_row(paused, key)
        assert [s["paused"] for s in mcluster.status()] == [False, True, False]
    finally:
        mcluster.resume_replication(paused)
    mcluster.wait_replicated(timeout=10)
    assert has_row(paused, key)


@pytest.mark.parametrize("mcluster", ENGINES, indirect=True)
def test_killed_replica_restarts_and_catches_up(mcluster: LocalCluster) -> None:
    victim = mcluster.replicas[1]
    pids = process_tree(victim.pid or 0)
    victim.kill()
    assert not victim.running and victim.pid is None
    assert wait_gone(pids, timeout=1) == []
    with pytest.raises(DRIVER_ERRORS):
        connect(victim, timeout=2)
    assert mcluster.status()[2]["role"] == "down"
    key = insert(mcluster.primary)
    victim.start()
    mcluster.wait_replicated(timeout=15)
    assert has_row(victim, key)
    assert identity(victim) == (victim.port, True)


@pytest.mark.parametrize("mcluster", ENGINES, indirect=True)
def test_frozen_node_times_out_then_recovers(mcluster: LocalCluster) -> None:
    node = mcluster.replicas[0]
    node.freeze()
    try:
        t0 = time.monotonic()
        with pytest.raises(DRIVER_ERRORS):
            connect(node, timeout=1)
        assert time.monotonic() - t0 < 5
        assert mcluster.status()[1]["role"] == "unknown"
        mcluster.wait_replicated(timeout=5)  # does not wait for the frozen one
    finally:
        node.thaw()
    assert identity(node) == (node.port, True)


@pytest.mark.parametrize("mcluster", ENGINES, indirect=True)
def test_state_round_trip(mcluster: LocalCluster, scratch: Path) -> None:
    path = scratch / "mcluster.json"
    mcluster.save_state(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # holds the password
    raw = json.loads(path.read_text())
    assert raw["engine"] == mcluster.engine
    assert raw["base_dir"] == str(mcluster.base_dir)
    assert [n["port"] for n in raw["nodes"]] == [n.port for n in mcluster.nodes]

    loaded = LocalCluster.load_state(path)
    assert type(loaded) is type(mcluster)
    assert loaded.base_dir == mcluster.base_dir and loaded.primary.name == mcluster.primary.name
    assert [(n.name, n.port, n.datadir, n.pid, n.url) for n in loaded.nodes] == [
        (n.name, n.port, n.datadir, n.pid, n.url) for n in mcluster.nodes
    ]
    assert [s["role"] for s in loaded.status()] == ["primary", "replica", "replica"]
    with pytest.raises(ClusterError):
        (PostgresCluster if mcluster.engine == "mariadb" else MariaDBCluster).load_state(path)


@pytest.mark.parametrize("engine", ENGINES)
def test_promote_rejoin_and_destroy(engine: str, scratch: Path) -> None:
    """Failover on a synchronous cluster of its own: kill the primary, promote a
    replica, bring the old primary back writable (split brain, with a write
    the new primary never saw), rejoin it, then destroy it as the CLI would."""
    c = _started(make_cluster(engine, replicas=2, sync=True))
    with c:
        old, new, other = c.nodes
        if engine == "postgres":
            assert old.query("SHOW synchronous_standby_names") == [("ANY 1 (pg1, pg2)",)]
        else:
            assert old.query("SHOW STATUS LIKE 'Rpl_semi_sync_master_status'") == [
                ("Rpl_semi_sync_master_status", "ON")
            ]
        ensure_table(old)
        before = insert(old)
        c.wait_replicated()

        old.kill()
        c.promote(new, timeout=30)
        assert c.primary is new and c.replicas == [old, other]
        assert identity(new) == (new.port, False)
        after = insert(new)  # synchronous: needs `other` to follow the new primary
        c.wait_replicated()
        assert has_row(other, after) and has_row(other, before)
        assert identity(other) == (other.port, True)
        if engine == "postgres":
            assert new.query("SELECT application_name FROM pg_stat_replication") == [("pg2",)]
        else:
            assert other.slave_status()["Master_Port"] == new.port  # type: ignore[attr-defined]

        # The old primary restarts writable: a split brain, and a lost write.
        old.start()
        assert identity(old) == (old.port, False)
        assert [s["role"] for s in c.status()] == ["primary", "primary", "replica"]
        # No standby will acknowledge it: do not wait for one.
        if engine == "postgres":
            old.query(f"SET synchronous_commit = local; INSERT INTO {TABLE} (id) VALUES ('split-brain')")
        else:
            old.query("SET GLOBAL rpl_semi_sync_master_enabled = OFF")
            old.query(f"INSERT INTO {TABLE} (id) VALUES ('split-brain')")

        c.rejoin(old, timeout=60)
        assert identity(old) == (old.port, True)
        assert not has_row(old, "split-brain")
        latest = insert(new)
        c.wait_replicated()
        assert all(has_row(old, k) for k in (before, after, latest))
        assert [s["role"] for s in c.status()] == ["replica", "primary", "replica"]

        # `dbrouter cluster down`: load the saved state and destroy, with a node frozen.
        other.freeze()
        pids = [p for n in c.nodes for p in process_tree(n.pid or 0)]
        assert len(pids) >= 3
        state = scratch / "state.json"
        c.save_state(state)
        LocalCluster.load_state(state).destroy()
        assert wait_gone(pids, timeout=5) == []
        assert not c.base_dir.exists()
    c.destroy()  # idempotent


SCRIPT = textwrap.dedent(
    """
    import json, sys
    from dbrouter.cluster import make_cluster
    out = {}
    for engine in ("postgres", "mariadb"):
        kept = make_cluster(engine, replicas=0).start()
        kept.save_state(f"{sys.argv[1]}/{engine}.json")
        kept.detach()
        doomed = make_cluster(engine, replicas=0).start()
        frozen = make_cluster(engine, replicas=0).start()
        frozen.primary.freeze()
        out[engine] = {
            "kept": kept.primary.pid,
            "doomed": [doomed.primary.pid, frozen.primary.pid],
            "doomed_dirs": [str(doomed.base_dir), str(frozen.base_dir)],
        }
    print(json.dumps(out))
    """
)


@pytest.mark.postgres
@pytest.mark.mysql
def test_atexit_destroys_unless_detached(scratch: Path) -> None:
    """A process that forgets destroy() leaves nothing behind, except the clusters
    it detached (the CLI's `cluster up`), which keep running until `down`."""
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(scratch)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for engine, info in out.items():
        assert wait_gone(info["doomed"], timeout=5) == [], engine
        assert not any(Path(d).exists() for d in info["doomed_dirs"]), engine
        assert alive(info["kept"]), engine
        kept = LocalCluster.load_state(scratch / f"{engine}.json")
        try:
            assert kept.primary.pid == info["kept"]
            assert identity(kept.primary) == (kept.primary.port, False)
            pids = process_tree(info["kept"])
        finally:
            kept.destroy()
        assert wait_gone(pids, timeout=5) == []
        assert not kept.base_dir.exists()


@pytest.mark.mysql
def test_cli_cluster_down_reads_the_engine_from_the_state(scratch: Path) -> None:
    """`dbrouter cluster down --state FILE` stops what the file records and names its engine."""
    state = scratch / "maria.json"
    cli = [sys.executable, "-m", "dbrouter.cli", "cluster"]
    up = subprocess.run(cli + ["up", "--engine", "mariadb", "--replicas", "1", "--state", str(state)],
                        capture_output=True, text=True, timeout=120)
    assert up.returncode == 0, up.stderr
    pids = [n.pid for n in LocalCluster.load_state(state).nodes]
    assert all(alive(pid) for pid in pids)
    down = subprocess.run(cli + ["down", "--state", str(state)], capture_output=True, text=True, timeout=120)
    assert down.returncode == 0, down.stderr
    assert down.stdout.strip() == "mariadb cluster stopped and removed"
    assert wait_gone(pids, timeout=5) == []
    assert not state.exists()


# ------------------------------------------------------------- other local users


def no_password_login(engine: str, node: LocalNode, user: str, *, socket_dir: Path | None, as_nobody: bool,
                      password: str | None = None) -> subprocess.CompletedProcess[str]:
    """``SELECT 1`` with the engine's command-line client, with no password unless given, in a
    clean environment (no option files, no PGPASSWORD) as ``nobody`` or as this process's user;
    over TCP, or over the unix socket in ``socket_dir``."""
    env = ["env", "-i", "PATH=/usr/bin:/bin", "HOME=/nonexistent"]
    if engine == "postgres":
        host = str(socket_dir) if socket_dir else node.host
        if password is not None:
            env.append(f"PGPASSWORD={password}")
        argv = ["psql", "-X", "-w", "-h", host, "-p", str(node.port), "-U", user, "-d", "postgres", "-c", "SELECT 1"]
    else:
        where = ["-S", str(socket_dir / "mysqld.sock")] if socket_dir else ["-h", node.host, "-P", str(node.port),
                                                                          "--protocol=TCP"]
        argv = ["mariadb", "--no-defaults", *where, "-u", user, "-e", "SELECT 1"]
        if password is not None:
            argv.append(f"--password={password}")
    command = [*env, *argv]
    if as_nobody:
        command = ["runuser", "-u", "nobody", "--", *command]
    return subprocess.run(command, capture_output=True, text=True, timeout=30, cwd="/")


@pytest.mark.parametrize("engine", ENGINES)
def test_cluster_up_leaves_nothing_open_to_other_local_users(engine: str, scratch: Path) -> None:
    """`dbrouter cluster up`, even under umask 000: no account of any node lets anyone in
    without its generated password, over TCP (as another OS user) or over the unix socket
    (whose directory only the servers' owner can enter; and even the owner needs the password);
    state, config, base, node and data directories are the owner's only. Before: PostgreSQL
    trusted the unix socket, MariaDB's root had no password (also over TCP from 127.0.0.1),
    the directories were 0755 and the application role a superuser with a fixed password."""
    assert os.geteuid() == 0, "runs the clients as nobody through runuser"
    state = scratch / f"{engine}.json"
    cli = [sys.executable, "-m", "dbrouter.cli", "cluster"]
    up = subprocess.run(cli + ["up", "--engine", engine, "--replicas", "1", "--state", str(state)],
                        capture_output=True, text=True, timeout=120, preexec_fn=lambda: os.umask(0))
    assert up.returncode == 0, up.stderr
    try:
        cluster = LocalCluster.load_state(state)
        assert cluster.password != "dbrouter-pw" and len(cluster.password) >= 16
        for path in (state, state.with_suffix(".toml")):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        directories = [cluster.base_dir, *(d for n in cluster.nodes for d in (n.node_dir, n.datadir))]
        for directory in directories:
            assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory

        primary = cluster.primary
        if engine == "postgres":
            users = {row[0] for row in primary.query("SELECT rolname FROM pg_roles WHERE rolcanlogin")}
            assert primary.query("SELECT rolsuper FROM pg_roles WHERE rolname = %s", (cluster.user,)) == [(False,)]
        else:
            users = {row[0] for row in primary.query("SELECT user FROM mysql.user")}
            assert not primary.query("SELECT 1 FROM mysql.user WHERE user = %s AND Super_priv = 'Y'", (cluster.user,))
        users |= {"root", "postgres", "mysql", "nobody", cluster.user, ""}
        for node in cluster.nodes:
            for user in sorted(users):
                tcp = no_password_login(engine, node, user, socket_dir=None, as_nobody=True)
                assert tcp.returncode != 0, f"{user!r} logged in over TCP without a password: {tcp.stdout}"
                for as_nobody in (True, False):
                    unix = no_password_login(engine, node, user, socket_dir=node.node_dir, as_nobody=as_nobody)
                    assert unix.returncode != 0, (f"{user!r} logged in over the unix socket without a password "
                                                  f"(as {'nobody' if as_nobody else 'its owner'}): {unix.stdout}")
            # The generated password works, from another OS user too.
            ok = no_password_login(engine, node, cluster.user, socket_dir=None, as_nobody=True, password=cluster.password)
            assert ok.returncode == 0, ok.stderr
    finally:
        down = subprocess.run(cli + ["down", "--state", str(state)], capture_output=True, text=True, timeout=120)
        assert down.returncode == 0, down.stderr
