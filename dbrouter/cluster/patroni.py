"""A local Patroni cluster from the installed packages: one etcd and N Patroni-managed PostgreSQL nodes.

What the tests and drills need to see dbrouter beside a real HA manager: Patroni
3 (Debian's ``patroni``) with its ``etcd3`` DCS on one etcd 3.4 (``etcd-server``),
both on loopback ports of their own, their data and configuration in the
cluster's temporary directory. Patroni runs each PostgreSQL as its own child,
as the ``postgres`` user (PostgreSQL refuses root); so does etcd.

The timings are short for fast drills: ``ttl: 10, loop_wait: 1, retry_timeout: 5``.
``sync=True`` sets Patroni's ``synchronous_mode: true`` (Patroni names the synchronous
standby and promotes only it, so an acknowledged commit survives losing the leader).

Faults: `PatroniCluster.switchover`, `failover` (REST ``POST /switchover``,
``/failover``), `crash_leader_postmaster` (kill -9 of the leader's postmaster:
Patroni restarts it in place, no election), `kill_leader` (kill -9 of the leader's
Patroni and postmaster: an election once the leader key expires after ``ttl``),
`restart_patroni`, `add_member`. `PatroniTimeline` records what Patroni itself
reported meanwhile, and when it had no leader accepting writes.

Passwords: the PostgreSQL ones as in `PostgresCluster`, and one for the REST API's
basic auth (``restapi.authentication``, needed by its POST endpoints), all
generated; the Patroni configuration files holding them are 0600.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ..discovery import DiscoveryError
from ..discovery.patroni import PRIMARY_ROLES, PatroniMember, PatroniProvider, request_json
from ..errors import ClusterError
from ._base import (
    HOST,
    Deadline,
    LocalCluster,
    LocalNode,
    allocate_ports,
    chown_to,
    clean_env,
    is_root,
    logger,
    release_ports,
    run_parallel,
    tail,
    write_file,
)
from .postgres import OS_USER, REPL_USER, SUPERUSER, PostgresCluster, PostgresNode, pg_bindir

__all__ = ["PatroniCluster", "PatroniNode", "PatroniTimeline", "patroni_binaries"]

TTL, LOOP_WAIT, RETRY_TIMEOUT = 10, 1, 5
API_USER = "dbrouter"  # the REST API's basic-auth user (its password is generated)
WRITABLE_STATE = "running"

_HBA = [
    "local all all scram-sha-256",
    "local replication all scram-sha-256",
    f"host all all {HOST}/32 scram-sha-256",
    f"host replication all {HOST}/32 scram-sha-256",
]


def patroni_binaries() -> tuple[Path, Path]:
    """``(patroni, etcd)``: the installed executables. Raises ClusterError when one is missing
    (``scripts/setup.sh`` installs Debian's ``patroni`` and ``etcd-server``)."""
    found = []
    for name, package in (("patroni", "patroni"), ("etcd", "etcd-server")):
        path = shutil.which(name) or (f"/usr/bin/{name}" if os.access(f"/usr/bin/{name}", os.X_OK) else None)
        if path is None:
            raise ClusterError(f"{name} is not installed (Debian package {package}): run scripts/setup.sh")
        found.append(Path(path))
    return found[0], found[1]


class _Daemon:
    """A long-running process we started (Patroni, etcd), tracked by its Popen: its pid cannot
    be recycled before we reap it, so signalling it never hits another process."""

    def __init__(self, what: str, argv: list[str], log_file: Path, cwd: Path) -> None:
        self.what = what
        env = clean_env(HOME=str(cwd))
        extra: dict[str, Any] = {}
        if is_root():  # as the servers' owner; not through runuser, whose pid would not be the daemon's
            entry = pwd.getpwnam(OS_USER)
            extra = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
        with open(log_file, "ab") as log:
            try:
                self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                             env=env, cwd=cwd, start_new_session=True, **extra)
            except OSError as exc:
                raise ClusterError(f"{what}: cannot run {argv[0]}: {exc}") from exc

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc.poll() is None else None

    def send(self, sig: int) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    def stop(self, timeout: float, sig: int = signal.SIGTERM) -> None:
        """Send ``sig``; SIGKILL after ``timeout`` seconds. Returns once it is reaped."""
        self.send(sig)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            logger.warning("%s did not exit within %.0f s of signal %d; SIGKILL", self.what, timeout, sig)
            self.send(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def kill(self) -> None:
        self.stop(10.0, signal.SIGKILL)


class PatroniNode(PostgresNode):
    """A PostgreSQL server managed by its own Patroni process.

    `start` and `stop` act on Patroni (which starts and stops PostgreSQL); `kill`
    stays the crash of the server (SIGKILL of the postmaster and its backends, which
    Patroni then restarts); `kill_patroni` is the death of the manager itself.
    """

    log_name: ClassVar[str] = "patroni.log"

    def __init__(self, cluster: LocalCluster, name: str, index: int, port: int, node_dir: Path) -> None:
        super().__init__(cluster, name, index, port, node_dir)
        self.api_port = 0
        self._patroni: _Daemon | None = None

    def __repr__(self) -> str:
        return f"<PatroniNode {self.name} pg {self.host}:{self.port} api :{self.api_port} pid={self.pid}>"

    @property
    def api_url(self) -> str:
        """The base URL of this member's REST API (``http://127.0.0.1:PORT``)."""
        return f"http://{self.host}:{self.api_port}"

    @property
    def config_file(self) -> Path:
        return self.node_dir / "patroni.yml"

    @property
    def patroni_pid(self) -> int | None:
        return self._patroni.pid if self._patroni is not None else None

    @property
    def patroni_running(self) -> bool:
        return self.patroni_pid is not None

    def api_status(self, timeout: float = 1.0) -> dict[str, Any] | None:
        """What this member's Patroni says of itself (``GET /``: ``role`` and ``state`` read
        from its PostgreSQL at that moment), or None when its REST API does not answer."""
        try:
            _status, body = request_json(self.api_url + "/", timeout=timeout)
        except OSError:
            return None
        return body if isinstance(body, dict) else None

    def accepts_writes(self, timeout: float = 1.0) -> bool:
        """Whether Patroni reports this member as a running primary (not in recovery)."""
        status = self.api_status(timeout)
        return status is not None and status.get("role") in PRIMARY_ROLES and status.get("state") == WRITABLE_STATE

    def start(self, timeout: float = 60.0, *, wait: bool = True) -> None:
        """Start this member's Patroni (it starts, or clones and starts, PostgreSQL); with
        ``wait``, until its PostgreSQL is running. Does nothing if Patroni runs. Raises
        ClusterError with the log tail after ``timeout`` seconds."""
        if self.patroni_running:
            return
        cluster = self.cluster
        assert isinstance(cluster, PatroniCluster)
        self.thaw()
        # A killed postmaster may be a zombie still named in postmaster.pid: Patroni would
        # take it for a running server.
        self._clear_stale_locks()
        t0 = time.monotonic()
        self._patroni = _Daemon(f"patroni of {self.name}", [str(cluster.patroni_bin), str(self.config_file)],
                                self.log_file, self.node_dir)
        if not wait:
            logger.info("%s: Patroni started", self.name)
            return
        deadline = Deadline(timeout)
        while True:
            status = self.api_status(timeout=min(1.0, deadline.remaining(0.1)))
            if status is not None and status.get("state") == WRITABLE_STATE and self.running:
                break
            if not self.patroni_running:
                raise self._error("Patroni exited while starting")
            if deadline.expired:
                raise self._error(f"not running within {timeout:.0f} s (Patroni says {status})")
            time.sleep(0.1)
        self.frozen = False
        self.paused = False
        logger.info("%s: Patroni started, PostgreSQL running (%.2f s)", self.name, time.monotonic() - t0)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop Patroni cleanly (SIGTERM: it shuts PostgreSQL down and, as the leader, hands
        the leader key over); SIGKILL after ``timeout`` seconds."""
        if self.frozen:
            self.thaw()
        if self._patroni is not None:
            self._patroni.stop(timeout)
        if self.running:  # Patroni died before it stopped its server
            self.kill()
        logger.info("%s: Patroni stopped", self.name)

    def kill_patroni(self) -> None:
        """SIGKILL this member's Patroni only; its PostgreSQL goes on without a manager."""
        if self._patroni is not None and self._patroni.pid is not None:
            logger.info("%s: SIGKILL Patroni pid %s", self.name, self._patroni.pid)
            self._patroni.kill()

    def _teardown(self, timeout: float = 10.0) -> None:
        self.kill_patroni()  # first: it would start the server again
        super()._teardown(timeout)

    def _error(self, message: str, *, log: bool = True) -> ClusterError:
        text = f"{self.name} (port {self.port}, api {self.api_port}): {message}"
        if log:
            text += f"\n--- last lines of {self.log_file} ---\n{self.log_tail()}"
        return ClusterError(text)


class PatroniCluster(PostgresCluster):
    """A Patroni cluster: etcd plus ``1 + replicas`` Patroni members (node 0 bootstraps
    the cluster and is the first leader; the others clone it). See the module docstring.

    `primary` is the member that holds Patroni's leader key, as its REST API says. Use as
    a context manager, or `start` and `destroy`; everything is torn down at exit.
    """

    engine: ClassVar[str] = "patroni"
    node_prefix: ClassVar[str] = "pg"
    node_class: ClassVar[type[LocalNode]] = PatroniNode

    def __init__(self, replicas: int = 2, base_dir: str | os.PathLike[str] | None = None, sync: bool = False,
                 user: str = "dbrouter", password: str | None = None, database: str = "dbrouter", *,
                 keep: bool = False, start_timeout: float = 120.0) -> None:
        super().__init__(replicas, base_dir, sync, user, password, database, keep=keep, start_timeout=start_timeout)
        self.patroni_bin, self.etcd_bin = patroni_binaries()
        self.scope = f"dbrouter-{secrets.token_hex(4)}"
        self.api_password = secrets.token_urlsafe(24)
        """The REST API's basic-auth password (user ``dbrouter``)."""
        self.etcd_port = 0
        self._etcd: _Daemon | None = None
        self._extra_ports: list[int] = []

    @property
    def api_auth(self) -> tuple[str, str]:
        return API_USER, self.api_password

    @property
    def patroni_nodes(self) -> list[PatroniNode]:
        return [n for n in self.nodes if isinstance(n, PatroniNode)]

    # -- setup

    def _bootstrap(self, deadline: Deadline) -> None:
        if self.user == SUPERUSER:
            self.admin_password = self.password
        client, peer = self._ports(2)
        self.etcd_port = client
        self._start_etcd(peer, deadline)
        for node in self.patroni_nodes:
            node.api_port = self._ports(1)[0]
            self._prepare_member(node)
        first, *others = self.patroni_nodes
        first.start(timeout=deadline.remaining(1.0))
        self.wait_leader(timeout=deadline.remaining(1.0))
        self._primary = first
        if self.user != SUPERUSER:
            first._admin(f'CREATE ROLE "{self.user}" LOGIN NOSUPERUSER PASSWORD %s', (self.password,))
        self._create_database(self.database)
        run_parallel(lambda node: node.start(timeout=deadline.remaining(1.0)), others)
        self.wait_healthy(timeout=deadline.remaining(1.0))

    def _ports(self, count: int) -> list[int]:
        ports = allocate_ports(count)
        self._extra_ports += ports
        return ports

    def _start_etcd(self, peer_port: int, deadline: Deadline) -> None:
        data = self.base_dir / "etcd"
        data.mkdir(mode=0o700)
        chown_to(data, OS_USER)
        client_url, peer_url = f"http://{HOST}:{self.etcd_port}", f"http://{HOST}:{peer_port}"
        self._etcd = _Daemon("etcd", [
            str(self.etcd_bin), "--name", "etcd0", "--data-dir", str(data / "data"),
            "--listen-client-urls", client_url, "--advertise-client-urls", client_url,
            "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", f"etcd0={peer_url}", "--initial-cluster-state", "new",
            "--initial-cluster-token", self.scope, "--logger", "zap", "--log-level", "warn",
        ], self.base_dir / "etcd.log", data)
        while True:
            try:
                status, body = request_json(f"{client_url}/health", timeout=1.0)
                if status == 200 and isinstance(body, dict) and body.get("health") == "true":
                    break
            except OSError:
                pass
            if self._etcd.pid is None or deadline.expired:
                raise ClusterError(f"etcd on port {self.etcd_port} did not become healthy; log:\n"
                                   f"{tail(self.base_dir / 'etcd.log')}")
            time.sleep(0.05)
        logger.info("etcd on port %d ready", self.etcd_port)

    def _prepare_member(self, node: PatroniNode) -> None:
        self._prepare_node_dir(node)
        write_file(node.config_file, json.dumps(self._member_config(node), indent=1), owner=OS_USER)

    def _member_config(self, node: PatroniNode) -> dict[str, Any]:
        """Patroni's YAML configuration (written as JSON, which YAML reads)."""
        api = f"{HOST}:{node.api_port}"
        return {
            "scope": self.scope,
            "namespace": "/dbrouter/",
            "name": node.name,
            "log": {"level": "INFO"},
            "restapi": {"listen": api, "connect_address": api,
                        "authentication": {"username": API_USER, "password": self.api_password}},
            "etcd3": {"hosts": [f"{HOST}:{self.etcd_port}"]},
            "watchdog": {"mode": "off"},
            "bootstrap": {
                "dcs": {
                    "ttl": TTL, "loop_wait": LOOP_WAIT, "retry_timeout": RETRY_TIMEOUT,
                    "maximum_lag_on_failover": 16 << 20,
                    "synchronous_mode": self.sync,
                    "postgresql": {
                        "use_pg_rewind": True,
                        "use_slots": True,
                        "parameters": {
                            "wal_level": "replica", "hot_standby": "on", "wal_log_hints": "on",
                            "max_connections": 100, "max_wal_senders": 10, "max_replication_slots": 10,
                            "wal_keep_size": "256MB", "hot_standby_feedback": "on",
                        },
                    },
                },
                "initdb": [{"encoding": "UTF8"}, {"locale": "C"}, "no-sync"],
            },
            "postgresql": {
                "listen": f"{HOST}:{node.port}",
                "connect_address": f"{HOST}:{node.port}",
                "data_dir": str(node.datadir),
                "bin_dir": str(pg_bindir()),
                "pgpass": str(node.node_dir / "pgpass"),
                "authentication": {
                    "superuser": {"username": SUPERUSER, "password": self.admin_password},
                    "replication": {"username": REPL_USER, "password": self.replication_password},
                },
                "pg_hba": _HBA,
                "basebackup": [{"checkpoint": "fast"}],
                "parameters": {
                    "unix_socket_directories": str(node.node_dir),
                    "shared_buffers": "32MB",
                    # as in PostgresCluster: a SIGKILLed postmaster leaves no segments in /dev/shm
                    "dynamic_shared_memory_type": "mmap",
                    "fsync": "off",
                    "wal_receiver_status_interval": "1s",
                    "wal_retrieve_retry_interval": "500ms",
                    "logging_collector": "off",
                    "log_line_prefix": "%m [%p] %q%u@%d ",
                },
            },
            "tags": {"nofailover": False, "noloadbalance": False, "clonefrom": False, "nosync": False},
        }

    def save_state(self, path: str | os.PathLike[str]) -> None:
        raise ClusterError("a Patroni cluster cannot be saved and reloaded: it lives as long as its process")

    # -- the REST API's view

    def members(self, timeout: float = 5.0) -> list[PatroniMember]:
        """Every member as Patroni's ``GET /cluster`` reports it (any member that answers).
        Raises ClusterError when none does."""
        provider = PatroniProvider([n.api_url for n in self.patroni_nodes], username=API_USER,
                                   password=self.api_password)
        try:
            return provider.cluster(timeout)
        except DiscoveryError as exc:
            raise ClusterError(str(exc)) from exc

    def leader(self, timeout: float = 5.0) -> PatroniNode | None:
        """The member holding the leader key (its server may be down), or None."""
        for member in self.members(timeout):
            if member.role in PRIMARY_ROLES:
                found = self.node(member.name)
                assert isinstance(found, PatroniNode)
                return found
        return None

    @property
    def primary(self) -> LocalNode:
        """The member holding Patroni's leader key, asked from the REST API (the last one
        seen when no member answers)."""
        if self._primary is None:
            raise ClusterError("cluster is not started")
        with contextlib.suppress(ClusterError):
            found = self.leader(timeout=2.0)
            if found is not None:
                self._primary = found
        return self._primary

    @primary.setter
    def primary(self, node: LocalNode) -> None:
        self._primary = node

    @property
    def replicas(self) -> list[LocalNode]:
        primary = self.primary
        return [n for n in self.nodes if n is not primary]

    def wait_leader(self, timeout: float = 30.0, *, not_on: PatroniNode | None = None) -> PatroniNode:
        """Wait until a member (other than ``not_on``) reports itself a running primary;
        return it. Raises ClusterError after ``timeout`` seconds."""
        deadline = Deadline(timeout)
        while True:
            for node in self.patroni_nodes:
                if node is not not_on and node.patroni_running and node.accepts_writes(timeout=1.0):
                    return node
            if deadline.expired:
                raise ClusterError(f"no member{f' other than {not_on.name}' if not_on else ''} became a running "
                                   f"leader within {timeout:.0f} s: {self._describe()}")
            time.sleep(0.1)

    def wait_healthy(self, timeout: float = 60.0) -> PatroniNode:
        """Wait until every member runs: one leader that takes writes, the others streaming
        from it (with ``sync``, one of them Patroni's synchronous standby). Returns the leader.
        Raises ClusterError describing the members after ``timeout`` seconds."""
        deadline = Deadline(timeout)
        names = {n.name for n in self.nodes}
        while True:
            try:
                members = {m.name: m for m in self.members(timeout=min(2.0, deadline.remaining(0.5)))}
            except ClusterError:
                members = {}
            leaders = [m for m in members.values() if m.role in PRIMARY_ROLES]
            settled = (
                set(members) >= names
                and len(leaders) == 1
                and all(m.state in ("running", "streaming") for m in members.values())
                and (not self.sync or len(names) < 2 or any(m.role == "sync_standby" for m in members.values()))
            )
            if settled:
                leader = self.node(leaders[0].name)
                assert isinstance(leader, PatroniNode)
                if leader.accepts_writes():
                    self._primary = leader
                    self._wait_following(leader, [n for n in self.nodes if n is not leader], deadline)
                    return leader
            if deadline.expired:
                raise ClusterError(f"the Patroni cluster did not settle within {timeout:.0f} s: {self._describe()}")
            time.sleep(0.1)

    def _stopped_for_good(self, node: LocalNode) -> bool:
        """A member's server that is down while its Patroni runs is being restarted by it: a
        member whose timeline forked from the leader's (it lost the leader key with WAL the
        others never got) is stopped, rewound with pg_rewind and started again. CI saw the
        heal give up on that member instead of waiting the few seconds it takes."""
        return not node.running and not (isinstance(node, PatroniNode) and node.patroni_running)

    def _describe(self) -> str:
        try:
            return ", ".join(f"{m.name} {m.role} {m.state}" for m in self.members(timeout=2.0))
        except ClusterError as exc:
            return str(exc)

    # -- faults

    def _post(self, path: str, body: dict[str, Any], timeout: float) -> tuple[int, Any]:
        """POST to the first member whose REST API answers."""
        problems = []
        for node in self.patroni_nodes:
            if not node.patroni_running:
                continue
            try:
                return request_json(node.api_url + path, timeout=timeout, auth=self.api_auth, method="POST", body=body)
            except OSError as exc:
                problems.append(f"{node.name}: {exc}")
        raise ClusterError(f"POST {path}: no member's REST API answered ({'; '.join(problems)})")

    def switchover(self, candidate: str | None = None, timeout: float = 60.0) -> PatroniNode:
        """A planned switchover (REST ``POST /switchover``) from the leader to ``candidate``
        (a member name; None lets Patroni choose). Returns the new leader once it takes writes.
        Raises ClusterError when Patroni refuses or the new leader does not run within ``timeout``."""
        return self._change_leader("switchover", candidate, timeout)

    def failover(self, candidate: str | None = None, timeout: float = 60.0) -> PatroniNode:
        """A manual failover (REST ``POST /failover``) to ``candidate`` (default: the synchronous
        standby, else the healthy replica that lags least). Returns the new leader once it takes
        writes. Raises ClusterError as `switchover` does."""
        if candidate is None:
            replicas = [m for m in self.members() if m.role not in PRIMARY_ROLES and m.state in ("running", "streaming")]
            if not replicas:
                raise ClusterError(f"no running replica to fail over to: {self._describe()}")
            candidate = min(replicas, key=lambda m: (m.role != "sync_standby", m.lag or 0, m.name)).name
        return self._change_leader("failover", candidate, timeout)

    def _change_leader(self, action: str, candidate: str | None, timeout: float) -> PatroniNode:
        old = self.leader()
        if old is None:
            raise ClusterError(f"{action}: the cluster has no leader: {self._describe()}")
        body: dict[str, Any] = {"leader": old.name}
        if candidate is not None:
            self.node(candidate)  # a name of ours, or ClusterError
            body["candidate"] = candidate
        t0 = time.monotonic()
        status, answer = self._post(f"/{action}", body, timeout)
        if status != 200:
            raise ClusterError(f"{action} from {old.name} to {candidate or 'any member'}: Patroni answered "
                               f"HTTP {status}: {str(answer)[:300]}")
        new = self.wait_leader(timeout=max(1.0, timeout - (time.monotonic() - t0)), not_on=old)
        self._primary = new
        logger.info("%s from %s to %s in %.2f s", action, old.name, new.name, time.monotonic() - t0)
        return new

    def crash_leader_postmaster(self) -> PatroniNode:
        """kill -9 of the leader's postmaster (and its backends). Its Patroni restarts it in
        place and promotes it again: no election. Returns the leader."""
        leader = self._current_leader("crash the leader's postmaster")
        leader.kill()
        return leader

    def kill_leader(self) -> PatroniNode:
        """kill -9 of the leader's Patroni, then of its postmaster: the leader key expires after
        ``ttl`` and the replicas elect a new leader. Returns the old leader; `restart_patroni`
        brings it back (it rejoins as a replica)."""
        leader = self._current_leader("kill the leader")
        leader.kill_patroni()
        leader.kill()
        return leader

    def restart_patroni(self, node: LocalNode, timeout: float = 60.0, *, wait: bool = True) -> None:
        """Start a stopped or killed member's Patroni again; with ``wait``, returns once its
        PostgreSQL runs (a former leader is rewound and rejoins as a replica; `wait_healthy`
        waits for that)."""
        if not isinstance(node, PatroniNode) or node not in self.nodes:
            raise ClusterError(f"{node.name} is not a member of this Patroni cluster")
        node.start(timeout, wait=wait)

    def add_member(self, timeout: float = 60.0) -> PatroniNode:
        """Start one more Patroni member: it clones the leader and joins as a replica.
        Returns it once it streams. Raises ClusterError after ``timeout`` seconds."""
        if not self._started or self._destroyed:
            raise ClusterError("the cluster is not running")
        deadline = Deadline(timeout)
        index = max(n.index for n in self.nodes) + 1
        port, api_port = self._ports(2)
        name = f"{self.node_prefix}{index}"
        node = PatroniNode(self, name, index, port, self.base_dir / name)
        node.api_port = api_port
        self.nodes.append(node)  # from here on destroy() tears it down
        self.replica_count += 1
        self._prepare_member(node)
        node.start(timeout=deadline.remaining(1.0))
        self.wait_healthy(timeout=deadline.remaining(1.0))
        logger.info("%s joined the Patroni cluster", name)
        return node

    def heal(self, timeout: float = 60.0) -> PatroniNode:
        """Back to a healthy cluster after a fault: every member's Patroni running (restarted
        where it was killed or stopped), one leader, the others streaming. Returns the leader."""
        deadline = Deadline(timeout)
        stopped = [n for n in self.patroni_nodes if n.frozen or not n.patroni_running]
        run_parallel(lambda node: node.start(timeout=deadline.remaining(1.0)), stopped)
        for node in self.patroni_nodes:
            node.paused = False
        return self.wait_healthy(timeout=deadline.remaining(1.0))

    def _current_leader(self, action: str) -> PatroniNode:
        leader = self.leader()
        if leader is None or not leader.running:
            raise ClusterError(f"cannot {action}: no running leader ({self._describe()})")
        return leader

    # LocalCluster's own failover helpers would fight Patroni: the same things, done its way.

    def promote(self, node: LocalNode, timeout: float = 30.0) -> None:
        """A switchover to ``node``."""
        self.switchover(node.name, timeout)

    def rejoin(self, node: LocalNode, timeout: float = 60.0) -> None:
        """Start ``node``'s Patroni again (it rewinds the server and follows the leader)."""
        self.restart_patroni(node, timeout)
        self.wait_healthy(timeout)

    # -- teardown

    def destroy(self, keep: bool | None = None) -> None:
        """Kill every Patroni (first: they would restart their servers), then etcd, then the
        servers; remove base_dir unless ``keep``. Idempotent."""
        if self._destroyed:
            return
        for node in self.patroni_nodes:
            try:
                node.kill_patroni()
            except Exception:  # keep going: the rest must die too
                logger.exception("%s: killing Patroni failed", node.name)
        if self._etcd is not None:
            self._etcd.kill()
        super().destroy(keep)
        release_ports(self._extra_ports)


# ------------------------------------------------------------------- the timeline


@dataclass(frozen=True)
class Sample:
    """What one member's REST API said at ``t`` (monotonic, when the answer came)."""

    t: float
    member: str
    role: str | None  # None: no answer
    state: str

    @property
    def writable(self) -> bool:
        return self.role in PRIMARY_ROLES and self.state == WRITABLE_STATE


class PatroniTimeline:
    """Records what Patroni reports while a drill runs: one thread per member asks its
    REST API (``GET /``: the member's role and state, read from its PostgreSQL at that
    moment) every ``interval`` seconds.

    From the samples: member changes (role or state), leader changes (which member
    reports itself a running primary), and Patroni's own write unavailability: the spans
    in which no member was a running primary. ``GET /primary`` answers 200 while the
    leader's postmaster is crashed (the leader key is still held), so the body's ``role``
    and ``state`` decide, not the status code.
    """

    def __init__(self, members: dict[str, str], *, interval: float = 0.1, timeout: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.members = dict(members)  # name -> REST base URL
        self.interval = interval
        self.timeout = timeout
        self.clock = clock
        self.samples: list[Sample] = []  # per member, only those that differ from its previous one
        self.polls = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    @classmethod
    def of(cls, cluster: PatroniCluster, **kwargs: Any) -> PatroniTimeline:
        return cls({n.name: n.api_url for n in cluster.patroni_nodes}, **kwargs)

    def start(self) -> PatroniTimeline:
        for name, url in self.members.items():
            thread = threading.Thread(target=self._poll, args=(name, url), name=f"dbrouter-patroni-timeline-{name}",
                                      daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout + 2)

    def _poll(self, name: str, url: str) -> None:
        previous: tuple[str | None, str] | None = None
        while not self._stop.is_set():
            began = self.clock()
            try:
                _status, body = request_json(url + "/", timeout=self.timeout)
                if isinstance(body, dict):
                    role, state = (str(body["role"]) if body.get("role") else None), str(body.get("state") or "unknown")
                else:
                    role, state = None, "bad answer"
            except OSError:
                role, state = None, "unreachable"
            now = self.clock()
            with self._lock:
                self.polls += 1
                if (role, state) != previous:  # the state holds until the next change: only changes are kept
                    self.samples.append(Sample(now, name, role, state))
            previous = (role, state)
            self._stop.wait(max(0.0, self.interval - (now - began)))

    def _ordered(self) -> list[Sample]:
        with self._lock:
            return sorted(self.samples, key=lambda s: s.t)

    def member_changes(self) -> list[Sample]:
        """The samples in which a member's role or state differs from its previous one."""
        last: dict[str, tuple[str | None, str]] = {}
        changes = []
        for sample in self._ordered():
            key = (sample.role, sample.state)
            if last.get(sample.member) != key:
                changes.append(sample)
                last[sample.member] = key
        return changes

    def leader_changes(self) -> list[tuple[float, str | None]]:
        """``(t, leader)`` each time the running primary changes (None: there is none)."""
        writable: dict[str, bool] = {}
        current: str | None = None
        changes: list[tuple[float, str | None]] = []
        for sample in self._ordered():
            writable[sample.member] = sample.writable
            leaders = sorted(name for name, ok in writable.items() if ok)
            leader = current if current in leaders else (leaders[0] if leaders else None)
            if not changes and leader is None and len(writable) < len(self.members):
                continue  # not every member has answered yet: "no leader" would be a guess
            if leader != current or not changes:
                changes.append((sample.t, leader))
                current = leader
        return changes

    def leader_since(self) -> tuple[str | None, float | None]:
        """``(leader, since)``: the running primary now (None if there is none) and since when
        (None before any member answered)."""
        changes = self.leader_changes()
        if not changes:
            return None, None
        at, leader = changes[-1]
        return leader, at

    def write_outages(self, end: float | None = None) -> list[tuple[float, float]]:
        """The spans (monotonic) with no running primary, from the first time one was seen;
        one still open is closed at ``end`` (default: the last sample)."""
        changes = self.leader_changes()
        spans: list[tuple[float, float]] = []
        seen_leader = False
        opened: float | None = None
        for at, leader in changes:
            if leader is None and seen_leader and opened is None:
                opened = at
            elif leader is not None:
                seen_leader = True
                if opened is not None:
                    spans.append((opened, at))
                    opened = None
        if opened is not None:
            ordered = self._ordered()
            spans.append((opened, end if end is not None else ordered[-1].t))
        return spans

    def summary(self, origin: float, end: float | None = None) -> dict[str, Any]:
        """JSON-ready results, times in seconds from ``origin`` (the drill's start)."""
        outages = self.write_outages(end)

        def rel(t: float) -> float:
            return round(t - origin, 3)

        return {
            "write_unavailability": sum(e - b for b, e in outages),
            "write_outages": [[rel(b), rel(e)] for b, e in outages],
            "leader_changes": [{"t": rel(t), "leader": leader} for t, leader in self.leader_changes()],
            "member_changes": [{"t": rel(s.t), "member": s.member, "role": s.role, "state": s.state}
                               for s in self.member_changes()],
            "polls": self.polls,
            "interval": self.interval,
        }
