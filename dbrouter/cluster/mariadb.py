"""MariaDB GTID replication clusters from the installed binaries.

mariadb-install-db runs once into a template datadir; each node gets a copy
and its own mariadbd (own port, socket, server id). Replicas follow the
primary with ``MASTER_USE_GTID=slave_pos``. Because every node starts from
the same empty template and the users are created on the primary before the
replicas connect, replication itself carries the users and the database.

Every account has a password generated for the cluster: ``root@localhost`` (the
only root account left in the template, reachable on the unix socket only: admin
queries), ``dbrouter_repl`` (replication) and the application user, who is no
superuser: every privilege on its database (and on those `create_database` makes),
and SLAVE MONITOR to read replication status, nothing else.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

from dbrouter.cluster._base import (
    HOST,
    Deadline,
    LocalCluster,
    LocalNode,
    chown_to,
    is_root,
    logger,
    pid_alive,
    proc_cmdline,
    run_command,
    run_parallel,
    signal_pids,
    wait_pids_gone,
    write_file,
)
from dbrouter.errors import ClusterError

OS_USER = "mysql"
REPL_USER = "dbrouter_repl"
SEMI_SYNC_TIMEOUT_MS = 5000
COLLATION = "utf8mb4_general_ci"  # the connector's MySQL 8 default is unknown to MariaDB

# Errors after which a replica will never catch up by itself: the SQL thread
# stopped, or the primary does not have the replica's position (diverged history).
_FATAL_IO_ERRNOS = {1236}


def _find_binary(*candidates: str) -> str:
    for cand in candidates:
        path = cand if os.path.isabs(cand) else shutil.which(cand)
        if path and os.access(path, os.X_OK):
            return path
    raise ClusterError(f"MariaDB binary not found (tried {', '.join(candidates)})")


@functools.lru_cache(maxsize=1)
def mariadbd_binary() -> str:
    return _find_binary("/usr/sbin/mariadbd", "mariadbd", "/usr/sbin/mysqld", "mysqld")


@functools.lru_cache(maxsize=1)
def install_db_binary() -> str:
    return _find_binary("/usr/bin/mariadb-install-db", "mariadb-install-db", "mysql_install_db")


def _connector() -> Any:
    """mysql.connector, loading its C extension before anything imports ``ssl``.

    The extension bundles an OpenSSL with the system's library name: once
    Python's ssl module is loaded it cannot load, and the connector silently
    falls back to pure Python for the whole process. The admin helper itself
    uses the pure implementation; this only avoids spoiling it for others.
    """
    if "ssl" not in sys.modules:
        with contextlib.suppress(ImportError):
            importlib.import_module("_mysql_connector")
    import mysql.connector

    return mysql.connector


def _common_args() -> list[str]:
    # Shared by mariadb-install-db and mariadbd: the InnoDB log size must match the template.
    return [
        "--innodb-buffer-pool-size=32M",
        "--innodb-log-file-size=16M",
        "--innodb-read-io-threads=1",
        "--innodb-write-io-threads=1",
    ]


class MariaDBNode(LocalNode):
    """A mariadbd: ``node_dir`` holds socket, pid file and logs, ``node_dir/data`` the datadir."""

    engine: ClassVar[str] = "mariadb"
    scheme: ClassVar[str] = "mariadb"
    log_name: ClassVar[str] = "error.log"
    system_database: ClassVar[str] = "mysql"

    def __init__(self, cluster: LocalCluster, name: str, index: int, port: int, node_dir: Path) -> None:
        super().__init__(cluster, name, index, port, node_dir)
        self.server_id = index + 1
        # What the next start uses: the initial primary starts writable, the
        # rest read-only. promote()/rejoin() update it, so a restarted old
        # primary comes back writable (a split brain, as in real life).
        self.read_only = index != 0
        self.semisync_master = False
        self._popen: subprocess.Popen[bytes] | None = None

    @property
    def socket_path(self) -> Path:
        return self.node_dir / "mysqld.sock"

    @property
    def pid_file(self) -> Path:
        return self.node_dir / "mariadbd.pid"

    def _find_pid(self) -> int | None:
        if self._popen is not None:
            if self._popen.poll() is None:  # poll() also reaps our dead child
                return self._popen.pid
            self._popen = None
            return None
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        # A stale pid file may name a recycled pid: check it is our mariadbd.
        if pid_alive(pid) and f"--datadir={self.datadir}" in proc_cmdline(pid):
            return pid
        return None

    def _argv(self) -> list[str]:
        cluster = self.cluster
        argv = [
            mariadbd_binary(),
            "--no-defaults",
            f"--datadir={self.datadir}",
            f"--socket={self.socket_path}",
            f"--port={self.port}",
            f"--bind-address={HOST}",
            f"--server-id={self.server_id}",
            f"--report-host={HOST}",  # listed by the primary's SHOW SLAVE HOSTS (discovery = "mysql")
            f"--report-port={self.port}",
            f"--pid-file={self.pid_file}",
            f"--log-error={self.log_file}",
            "--log-bin=mysql-bin",
            "--relay-log=relay-bin",  # not hostname-based: survives a hostname change
            "--log-slave-updates",
            "--binlog-format=ROW",
            "--gtid-strict-mode=1",
            "--skip-name-resolve",
            "--innodb-flush-log-at-trx-commit=2",
            "--sync-binlog=0",
            "--max-connections=300",
            "--slave-net-timeout=10",
            "--character-set-server=utf8mb4",
            f"--collation-server={COLLATION}",
            *_common_args(),
            f"--read-only={1 if self.read_only else 0}",
        ]
        if cluster.sync:
            argv.append("--rpl-semi-sync-slave-enabled=ON")
            if self.semisync_master:
                argv += [
                    "--rpl-semi-sync-master-enabled=ON",
                    f"--rpl-semi-sync-master-timeout={SEMI_SYNC_TIMEOUT_MS}",
                ]
        if is_root():
            argv.append(f"--user={OS_USER}")
        return argv

    def start(self, timeout: float = 30.0) -> None:
        if self.running:
            return
        deadline = Deadline(timeout)
        t0 = time.monotonic()
        for stale in (self.socket_path, self.pid_file):
            stale.unlink(missing_ok=True)
        with open(self.node_dir / "mariadbd.out", "ab") as out:
            # Own session: a Ctrl-C in the terminal or the CLI exiting must not reach it.
            self._popen = subprocess.Popen(
                self._argv(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.node_dir,
                start_new_session=True,
            )
        self.frozen = False
        self.paused = False  # a restart forgets STOP SLAVE SQL_THREAD
        last: Exception | None = None
        while True:
            rc = self._popen.poll()
            if rc is not None:
                self._popen = None
                raise self._error(f"mariadbd exited with code {rc} during startup")
            try:
                self._connect(None, timeout=1.0).close()
                break
            except Exception as exc:
                last = exc
            if deadline.expired:
                self._teardown()
                raise self._error(f"not accepting connections within {timeout:.1f} s (last error: {last})")
            time.sleep(0.03)
        logger.info("%s: started on port %d (%.2f s)", self.name, self.port, time.monotonic() - t0)

    def stop(self, timeout: float = 30.0) -> None:
        pid = self._find_pid()
        if pid is None:
            return
        if self.frozen:
            self.thaw()
        signal_pids([pid], signal.SIGTERM)
        left = wait_pids_gone([pid], Deadline(timeout))
        self._after_exit()
        self.paused = False
        if left:
            self.kill()
            raise self._error(f"did not shut down within {timeout:.1f} s of SIGTERM; killed it")
        logger.info("%s: stopped", self.name)

    def _after_exit(self) -> None:
        # /proc shows the main thread as a zombie while the other threads still
        # exit, and waitpid() only reports the process after the last one:
        # reap it here so that `running` is false when kill()/stop() return.
        popen = self._popen
        if popen is not None:
            try:
                popen.wait(timeout=5)
                self._popen = None
            except subprocess.TimeoutExpired:
                logger.error("%s: pid %d did not exit", self.name, popen.pid)

    def _default_database(self) -> str | None:
        return self.cluster.database if self.cluster._db_ready else None

    def _connect(self, database: str | None = None, timeout: float = 5.0) -> Any:
        kwargs: dict[str, Any] = {}
        if database:
            kwargs["database"] = database
        return _connector().connect(
            unix_socket=str(self.socket_path),
            user="root",
            password=self.cluster.admin_password,
            collation=COLLATION,
            connection_timeout=max(1, round(timeout)),
            autocommit=True,
            use_pure=True,
            **kwargs,
        )

    def slave_status(self) -> dict[str, Any] | None:
        """SHOW SLAVE STATUS as a dict, or None when the node replicates from nobody."""
        conn = self._connect(None, timeout=5.0)
        try:
            cur = conn.cursor(dictionary=True)
            cur.execute("SHOW SLAVE STATUS")
            rows = cur.fetchall()
            cur.close()
        finally:
            conn.close()
        return dict(rows[0]) if rows else None

    def _state(self) -> dict[str, Any]:
        state = super()._state()
        state.update(server_id=self.server_id, read_only=self.read_only, semisync_master=self.semisync_master)
        return state

    def _restore(self, state: dict[str, Any]) -> None:
        self.server_id = int(state.get("server_id", self.index + 1))
        self.read_only = bool(state.get("read_only", self.index != 0))
        self.semisync_master = bool(state.get("semisync_master", False))


class MariaDBCluster(LocalCluster):
    """A MariaDB primary with ``replicas`` GTID replicas (see LocalCluster).

    ``sync=True`` enables semi-synchronous replication: a commit on the
    primary returns once a replica has received it (or after
    SEMI_SYNC_TIMEOUT_MS, when MariaDB falls back to asynchronous).
    The ``dbrouter`` user has every privilege except READ ONLY ADMIN, so
    read_only replicas refuse its writes (error 1290) as they would in production.
    """

    engine: ClassVar[str] = "mariadb"
    node_prefix: ClassVar[str] = "maria"
    node_class: ClassVar[type[LocalNode]] = MariaDBNode
    os_user: ClassVar[str] = OS_USER
    reserved_users: ClassVar[frozenset[str]] = frozenset({"root", REPL_USER})

    @property
    def template_dir(self) -> Path:
        return self.base_dir / "template"

    # -- setup

    def _bootstrap(self, deadline: Deadline) -> None:
        template = self.template_dir
        template.mkdir(mode=0o700)
        chown_to(template, OS_USER)
        # Run by mariadb-install-db (as this process's user) once the system tables exist:
        # "normal" makes root@localhost, root@127.0.0.1, root@::1 and root@<hostname> with
        # no password; only root@localhost (the unix socket) stays, with the admin password.
        secure = self.base_dir / "secure.sql"
        admin_password = self.admin_password.replace("\\", "\\\\").replace("'", "\\'")
        write_file(secure, (
            "FLUSH PRIVILEGES;\n"
            "DELETE FROM mysql.global_priv WHERE User = '' OR (User = 'root' AND Host <> 'localhost');\n"
            "DELETE FROM mysql.proxies_priv WHERE User = '' OR (User = 'root' AND Host <> 'localhost');\n"
            "FLUSH PRIVILEGES;\n"
            f"ALTER USER 'root'@'localhost' IDENTIFIED BY '{admin_password}';\n"
        ), owner=None)
        argv = [
            install_db_binary(),
            "--no-defaults",
            f"--datadir={template}",
            "--auth-root-authentication-method=normal",
            "--skip-test-db",
            f"--extra-file={secure}",
            *_common_args(),
        ]
        if is_root():
            argv.append(f"--user={OS_USER}")
        try:
            for attempt in (1, 2):
                try:
                    run_command(argv, what="mariadb-install-db", timeout=deadline.remaining(1.0), cwd=self.base_dir)
                    break
                except ClusterError as exc:
                    # Seen on a machine at load 20-25, once in many runs (exit 1, cause not
                    # printed): the template is made again from scratch, once.
                    if attempt == 2:
                        raise
                    logger.warning("%s; making the template again", exc)
                    shutil.rmtree(template, ignore_errors=True)
                    template.mkdir(mode=0o700)
                    chown_to(template, OS_USER)
        finally:
            secure.unlink(missing_ok=True)
        for node in self.nodes:
            self._copy_template(node)  # type: ignore[arg-type]

        run_parallel(lambda n: n.start(timeout=deadline.remaining(1.0)), self.nodes)

        primary = self.nodes[0]
        for account in self._app_accounts():
            primary._admin(f"CREATE USER {account} IDENTIFIED BY %s", (self.password,))
            # SHOW SLAVE STATUS, for the router's lag probes; no global privilege beyond it
            # (no SUPER, no READ ONLY ADMIN: read_only replicas refuse its writes, 1290).
            try:
                primary._admin(f"GRANT SLAVE MONITOR ON *.* TO {account}")
            except ClusterError:  # before MariaDB 10.5.9, REPLICATION CLIENT allowed it
                primary._admin(f"GRANT REPLICATION CLIENT ON *.* TO {account}")
        primary._admin(f"CREATE USER '{REPL_USER}'@'{HOST}' IDENTIFIED BY %s", (self.replication_password,))
        primary._admin(f"GRANT REPLICATION SLAVE ON *.* TO '{REPL_USER}'@'{HOST}'")
        self._create_database(self.database)

        replicas = self.nodes[1:]
        for node in replicas:
            self._change_master(node, primary, start=True)  # type: ignore[arg-type]
        self._wait_following(primary, replicas, deadline)
        self._configure_sync(primary)  # type: ignore[arg-type]

    def _app_accounts(self) -> list[str]:
        # TCP from 127.0.0.1 (--skip-name-resolve) and the unix socket.
        return [f"'{self.user}'@'{host}'" for host in (HOST, "localhost")]

    def _create_database(self, name: str) -> None:
        primary = self.primary
        primary._admin(f"CREATE DATABASE `{name}`")
        for account in self._app_accounts():
            primary._admin(f"GRANT ALL PRIVILEGES ON `{name}`.* TO {account}")

    def _copy_template(self, node: MariaDBNode) -> None:
        node.node_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(node.node_dir, 0o700)  # the unix socket's directory: the server's owner's only
        chown_to(node.node_dir, OS_USER)
        if len(str(node.socket_path)) > 100:
            raise ClusterError(f"{node.node_dir} is too long for a unix socket path; use a shorter base_dir")
        if node.datadir.exists():
            shutil.rmtree(node.datadir)
        # cp -a keeps the mysql ownership that shutil.copytree would lose.
        run_command(["cp", "-a", self.template_dir, node.datadir], what=f"copy template to {node.name}", timeout=60)

    def _change_master(self, node: MariaDBNode, primary: LocalNode, *, start: bool) -> None:
        node._admin(
            "CHANGE MASTER TO MASTER_HOST=%s, MASTER_PORT=%s, MASTER_USER=%s, MASTER_PASSWORD=%s,"
            " MASTER_USE_GTID=slave_pos, MASTER_CONNECT_RETRY=1",
            (HOST, primary.port, REPL_USER, self.replication_password),
        )
        if start:
            # A paused replica keeps receiving but does not apply.
            node._admin("START SLAVE IO_THREAD" if node.paused else "START SLAVE")

    def _configure_sync(self, primary: MariaDBNode) -> None:
        if not self.sync:
            return
        # Enabled only now: the setup writes above would each wait for a
        # replica ack that could not come before the replicas connected.
        primary._admin("SET GLOBAL rpl_semi_sync_master_timeout = %s", (SEMI_SYNC_TIMEOUT_MS,))
        primary._admin("SET GLOBAL rpl_semi_sync_master_enabled = ON")
        primary.semisync_master = True

    # -- replication state

    def _primary_position(self, primary: LocalNode) -> str:
        return str(primary._admin("SELECT @@gtid_binlog_pos")[0][0] or "")

    def _received(self, replica: LocalNode) -> int:
        gtid = replica._admin("SELECT @@gtid_slave_pos")[0][0] or "0-0-0"
        return max(int(part.split("-")[2]) for part in str(gtid).split(","))

    def _check_slave(self, node: MariaDBNode, status: dict[str, Any]) -> None:
        """Raise if replication on ``node`` has failed for good."""
        if status.get("Last_SQL_Errno"):
            raise node._error(f"replication SQL error {status['Last_SQL_Errno']}: {status.get('Last_SQL_Error')}")
        if status.get("Last_IO_Errno") in _FATAL_IO_ERRNOS:
            raise node._error(f"replication IO error {status['Last_IO_Errno']}: {status.get('Last_IO_Error')}")

    def _wait_caught_up(self, node: LocalNode, target: str, deadline: Deadline) -> None:
        assert isinstance(node, MariaDBNode)
        try:
            status = node.slave_status()
        except Exception as exc:
            raise node._error(f"cannot read slave status: {exc}") from exc
        if status is None:
            logger.debug("%s replicates from nobody; not waiting for it", node.name)
            return
        if not target:
            return
        try:
            conn = node._connect(None, timeout=5.0)
        except Exception as exc:
            raise node._error(f"cannot connect to check replication: {exc}") from exc
        try:
            cur = conn.cursor()
            while True:
                # Waits server-side, in slices short enough to notice a broken replica.
                wait = max(0.05, min(0.5, deadline.remaining()))
                cur.execute("SELECT MASTER_GTID_WAIT(%s, %s)", (target, wait))
                (rc,) = cur.fetchone()
                if rc == 0:
                    return
                status = node.slave_status() or {}
                self._check_slave(node, status)
                if deadline.expired:
                    cur.execute("SELECT @@gtid_slave_pos")
                    (pos,) = cur.fetchone()
                    raise node._error(
                        f"applied up to GTID {pos!r}, not {target!r}, within {deadline.timeout:.1f} s"
                        f" (IO: {status.get('Slave_IO_Running')}, SQL: {status.get('Slave_SQL_Running')},"
                        f" last IO error: {status.get('Last_IO_Error')!r})"
                    )
        except ClusterError:
            raise
        except Exception as exc:
            raise node._error(f"checking replication failed: {exc}") from exc
        finally:
            conn.close()

    def _wait_following(self, primary: LocalNode, replicas: list[LocalNode], deadline: Deadline) -> None:
        """Wait until each replica's IO thread is connected to ``primary``."""
        for node in replicas:
            assert isinstance(node, MariaDBNode)
            while True:
                status = node.slave_status() or {}
                self._check_slave(node, status)
                io_ok = status.get("Slave_IO_Running") == "Yes" and int(status.get("Master_Port") or 0) == primary.port
                sql_ok = node.paused or status.get("Slave_SQL_Running") == "Yes"
                if io_ok and sql_ok:
                    break
                if deadline.expired:
                    raise node._error(
                        f"not replicating from {primary.name} within {deadline.timeout:.1f} s"
                        f" (IO: {status.get('Slave_IO_Running')}, SQL: {status.get('Slave_SQL_Running')},"
                        f" last IO error: {status.get('Last_IO_Error')!r})"
                    )
                time.sleep(0.02)

    def _role(self, node: LocalNode) -> str:
        read_only = node._admin("SELECT @@read_only")[0][0]
        return "replica" if int(read_only) else "primary"

    # -- failover

    def _promote_node(self, node: LocalNode, deadline: Deadline) -> None:
        assert isinstance(node, MariaDBNode)
        status = node.slave_status()
        if status is not None:
            if node.paused:
                node._admin("START SLAVE SQL_THREAD")
            node._admin("STOP SLAVE IO_THREAD")
            # Apply what was already received before dropping the relay log:
            # those transactions were committed on the old primary.
            while True:
                st = node.slave_status() or {}
                if st.get("Slave_SQL_Running") != "Yes":
                    break
                if (st.get("Relay_Master_Log_File"), st.get("Exec_Master_Log_Pos")) == (
                    st.get("Master_Log_File"),
                    st.get("Read_Master_Log_Pos"),
                ):
                    break
                if deadline.expired:
                    logger.warning("%s: relay log not fully applied before promotion", node.name)
                    break
                time.sleep(0.02)
            node._admin("STOP SLAVE")
            node._admin("RESET SLAVE ALL")
        node._admin("SET GLOBAL read_only = 0")
        node.read_only = False
        node.paused = False
        self._configure_sync(node)

    def _repoint(self, replica: LocalNode, primary: LocalNode, deadline: Deadline) -> None:
        assert isinstance(replica, MariaDBNode)
        replica._admin("STOP SLAVE")
        self._change_master(replica, primary, start=True)
        logger.info("%s: now follows %s", replica.name, primary.name)

    def _rejoin_node(self, node: LocalNode, deadline: Deadline) -> None:
        assert isinstance(node, MariaDBNode)
        primary = self.primary
        node.stop(timeout=deadline.remaining(1.0))
        node.read_only = True
        node.semisync_master = False
        node.start(timeout=deadline.remaining(1.0))
        # Leave time for the rebuild below if resuming does not work out.
        attempt = Deadline(max(5.0, deadline.remaining() / 2))
        try:
            node._admin("STOP SLAVE")
            # An old primary's own writes are in its binlog, not in
            # gtid_slave_pos: continue from what it has actually got.
            node._admin("SET GLOBAL gtid_slave_pos = @@gtid_binlog_pos")
            self._change_master(node, primary, start=True)
            self._wait_following(primary, [node], attempt)
            self._wait_caught_up(node, self._primary_position(primary), attempt)
            return
        except ClusterError as exc:
            if deadline.expired:
                raise
            logger.warning("%s: cannot resume replication (%s); rebuilding it from the template", node.name, exc)
        # Diverged history (GTID strict mode refuses it): start from an empty
        # datadir and replay the primary's binlog, which holds the whole
        # history because every node logs what it replicates. A new server id,
        # or events the node wrote under its old id would be skipped as its own.
        node.stop(timeout=deadline.remaining(1.0))
        self._copy_template(node)
        node.server_id = max(n.server_id for n in self.nodes if isinstance(n, MariaDBNode)) + 1
        node.start(timeout=deadline.remaining(1.0))
        self._change_master(node, primary, start=True)
        self._wait_following(primary, [node], deadline)

    def _pause(self, node: LocalNode) -> None:
        node._admin("STOP SLAVE SQL_THREAD")

    def _resume(self, node: LocalNode) -> None:
        node._admin("START SLAVE SQL_THREAD")
