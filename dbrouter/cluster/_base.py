"""Engine-independent parts of the local replication clusters.

The clusters exist so that tests and demos run against real replication
instead of mocks. Most of this module is about never leaking a server: every
process is tracked by pid (and its command line checked before it is
signalled, so a recycled pid is never hit), every wait has a deadline, and an
atexit hook tears down whatever a crashed test left behind.

Nothing of a cluster is open to the other users of the machine: every account
has a password generated for the cluster (the application's, the admin's, the
replication's), on the unix socket as over TCP; the base, node (socket) and data
directories are the servers' owner's only (0700), and files holding a password
are created 0600 whatever the umask.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import logging
import math
import os
import pwd
import random
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, TypeVar
from urllib.parse import quote

from dbrouter._files import write_private
from dbrouter.errors import ClusterError

logger = logging.getLogger("dbrouter.cluster")

HOST = "127.0.0.1"

# Linux hands out ephemeral client ports from 32768 up: a server port in that
# range can be taken by any outgoing connection (and then sit in TIME_WAIT), so
# servers get ports below it.
PORT_RANGE = (20000, 32000)

STATE_VERSION = 2  # 2: admin and replication passwords (1: trusted unix socket, no admin password)
SHM_MIN_FREE = 2 << 30  # bytes free on /dev/shm before clusters go there by default

_T = TypeVar("_T")
_C = TypeVar("_C", bound="LocalCluster")

_port_lock = threading.Lock()
_ports_in_use: dict[int, int] = {}  # handed out by this process and not yet released -> its lock file's fd
PORT_LOCK_DIR = "/tmp/dbrouter-ports"
"""One lock file per port handed out, locked (flock) by the process that holds the port:
another process on the machine (a second test run, a chaos run, a drill) skips it, even
while the server that owns it is down and the port looks free. The kernel drops the lock
when the process ends, so nothing is left held by a process that died."""

_live_lock = threading.Lock()
_live: set[LocalCluster] = set()  # strong refs: a forgotten cluster must still be torn down


# ---------------------------------------------------------------- small helpers


class Deadline:
    """A point in monotonic time; every wait in this package takes one."""

    def __init__(self, timeout: float) -> None:
        self.timeout = float(timeout)
        self.end = time.monotonic() + self.timeout

    def remaining(self, floor: float = 0.0) -> float:
        return max(floor, self.end - time.monotonic())

    @property
    def expired(self) -> bool:
        return time.monotonic() >= self.end


def is_root() -> bool:
    return os.geteuid() == 0


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for server tools, without the caller's PG*/MYSQL* settings.

    A stray PGHOST, PGDATA or PGPASSWORD in the developer's shell would
    otherwise silently redirect initdb, pg_basebackup or pg_rewind.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PG", "MYSQL", "MARIADB", "LC_", "LANG"))
    }
    env["LC_ALL"] = "C"
    env["LANG"] = "C"
    env.update(extra)
    return env


def chown_to(path: Path, user: str, *, recursive: bool = False) -> None:
    """Give ``path`` to ``user`` when we are root (servers refuse to run as root)."""
    if not is_root():
        return
    entry = pwd.getpwnam(user)
    os.chown(path, entry.pw_uid, entry.pw_gid)
    if recursive and path.is_dir():
        for root, dirs, files in os.walk(path):
            for name in (*dirs, *files):
                os.lchown(os.path.join(root, name), entry.pw_uid, entry.pw_gid)


def new_password() -> str:
    """A random password: 32 characters of ``[A-Za-z0-9_-]``, safe in URLs, SQL and config files."""
    return secrets.token_urlsafe(24)


def write_file(path: Path, text: str, *, owner: str | None, mode: int = 0o600) -> None:
    """Write a server file (password file, configuration) created with ``mode`` from the start."""
    write_private(path, text, mode=mode)
    if owner:
        chown_to(path, owner)


def tail(path: Path, lines: int = 25) -> str:
    """The last ``lines`` lines of a log file, for error messages."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 16384))
            data = f.read().decode("utf-8", errors="replace")
    except OSError as exc:
        return f"(no log: {exc})"
    return "\n".join(data.splitlines()[-lines:])


def run_command(
    argv: Sequence[str | os.PathLike[str]],
    *,
    what: str,
    timeout: float,
    as_user: str | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> str:
    """Run a server tool to completion and return its output.

    As root the tool runs as ``as_user`` through runuser. Output goes to a
    temporary file, not a pipe: pg_ctl leaves a daemon behind, and a daemon
    that inherited a pipe would keep us waiting for EOF forever. On timeout the
    tool's whole process group is killed (the daemon it may have started is in
    a session of its own, so it is not).
    """
    args = [os.fspath(a) for a in argv]
    if as_user and is_root():
        args = ["runuser", "-u", as_user, "--", *args]
    logger.debug("running %s: %s", what, " ".join(args))
    with tempfile.TemporaryFile() as out:
        try:
            proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env if env is not None else clean_env(),
                cwd=cwd,
                start_new_session=True,
            )
        except OSError as exc:
            raise ClusterError(f"{what}: cannot run {args[0]}: {exc}") from exc
        try:
            rc = proc.wait(timeout=max(timeout, 0.1))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            out.seek(0)
            text = out.read().decode("utf-8", errors="replace")
            raise ClusterError(
                f"{what} did not finish within {timeout:.1f} s; output:\n{_last_lines(text)}"
            ) from None
        out.seek(0)
        text = out.read().decode("utf-8", errors="replace")
    if rc != 0:
        raise ClusterError(f"{what} failed with exit code {rc}; output:\n{_last_lines(text)}")
    return text


def _last_lines(text: str, lines: int = 25) -> str:
    """The end of a command's output, after its lines that say ERROR wherever they are (a
    tool that fails may print the cause first and a page of advice after it)."""
    all_lines = text.splitlines()
    tail = all_lines[-lines:]
    errors = [line for line in all_lines[:-lines] if "ERROR" in line.upper()][:10]
    return "\n".join([*errors, "..."] if errors else []) + ("\n" if errors else "") + "\n".join(tail)


def run_parallel(fn: Callable[[_T], None], items: Iterable[_T]) -> None:
    """Run ``fn`` on every item in threads; re-raise the first failure.

    Used to set replicas up side by side: each step mostly waits on a server,
    so threads halve the start time even on two cores.
    """
    items = list(items)
    if not items:
        return
    if len(items) == 1:
        fn(items[0])
        return
    with ThreadPoolExecutor(max_workers=len(items), thread_name_prefix="dbrouter-cluster") as ex:
        futures = [ex.submit(fn, item) for item in items]
        errors = [f.exception() for f in futures]
    failures = [e for e in errors if e is not None]
    for extra in failures[1:]:
        logger.error("parallel cluster step also failed: %s", extra)
    if failures:
        raise failures[0]


# -------------------------------------------------------------------- processes


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) of a process, or None if it does not exist."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    # The command name is in parentheses and may itself contain ") ".
    fields = data.rsplit(")", 1)[-1].split()
    if len(fields) < 2:
        return None
    return fields[0], int(fields[1])


def pid_alive(pid: int | None) -> bool:
    """Whether ``pid`` is a live process; a zombie counts as dead."""
    if not pid or pid <= 0:
        return False
    st = _proc_stat(pid)
    return st is not None and st[0] not in ("Z", "X", "x")


def proc_cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            "utf-8", errors="replace"
        )
    except OSError:
        return ""


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (PostgreSQL backends of a postmaster)."""
    out: list[int] = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return out
    for entry in entries:
        if not entry.isdigit():
            continue
        st = _proc_stat(int(entry))
        if st is not None and st[1] == pid and st[0] not in ("Z", "X", "x"):
            out.append(int(entry))
    return out


def signal_pids(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def wait_pids_gone(pids: Iterable[int], deadline: Deadline) -> list[int]:
    """Wait until none of ``pids`` is alive; return those still alive at the deadline."""
    pending = [p for p in pids if pid_alive(p)]
    while pending and not deadline.expired:
        time.sleep(0.01)
        pending = [p for p in pending if pid_alive(p)]
    return pending


def default_parent_dir() -> str:
    """Where base_dir goes when none is given: /dev/shm if it is roomy, else the temp dir.

    A cluster is a few thousand small files written once and thrown away
    (fsync is off anyway). On a VM disk creating them dominates start-up:
    initdb, pg_basebackup or a template copy take ~1 s each there and ~0.1 s
    on tmpfs. A small /dev/shm (Docker's default is 64 MB) would fill up, so
    it needs 2 GiB free; TMPDIR, when set, always wins.
    """
    if os.environ.get("TMPDIR"):
        return tempfile.gettempdir()
    shm = "/dev/shm"
    try:
        st = os.statvfs(shm)
    except OSError:
        return tempfile.gettempdir()
    if st.f_bavail * st.f_frsize >= SHM_MIN_FREE and os.access(shm, os.W_OK | os.X_OK):
        return shm
    return tempfile.gettempdir()


# ------------------------------------------------------------------------ ports


def port_is_free(port: int) -> bool:
    """Whether a server could listen on 127.0.0.1:``port`` right now.

    SO_REUSEADDR is set as the servers set it, so TIME_WAIT leftovers do not
    count as busy, while a listener on 127.0.0.1 or 0.0.0.0 does.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
            s.listen(1)
        except OSError:
            return False
    return True


def _reserve(port: int) -> int | None:
    """An exclusive lock on ``port``'s lock file (its fd), or None when another process holds it."""
    try:
        os.makedirs(PORT_LOCK_DIR, mode=0o1777, exist_ok=True)
        fd = os.open(os.path.join(PORT_LOCK_DIR, f"{port}.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except OSError:
        return -1  # no shared directory: this process's own bookkeeping still holds
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def allocate_ports(count: int) -> list[int]:
    """``count`` free ports below the ephemeral range, scanning from a random start.

    Ports handed out are held until released: within this process, and against the other
    processes on the machine by a lock file each (`PORT_LOCK_DIR`), so that no two clusters,
    proxies or test servers get one port even while its server is down.
    """
    low, high = PORT_RANGE
    span = high - low
    start = random.randrange(span)
    found: dict[int, int] = {}
    with _port_lock:
        for i in range(span):
            port = low + (start + i) % span
            if port in _ports_in_use or port in found or not port_is_free(port):
                continue
            fd = _reserve(port)
            if fd is None:
                continue
            found[port] = fd
            if len(found) == count:
                _ports_in_use.update(found)
                return list(found)
        for fd in found.values():
            if fd >= 0:
                os.close(fd)
    raise ClusterError(f"no {count} free ports in {low}-{high} on {HOST}")


def release_ports(ports: Iterable[int]) -> None:
    with _port_lock:
        for port in ports:
            fd = _ports_in_use.pop(port, -1)
            if fd >= 0:
                os.close(fd)  # closing the last fd of the lock file drops the lock


# ------------------------------------------------------------------------- node


class LocalNode:
    """One server of a :class:`LocalCluster`: its port, directories and process.

    The engine subclasses implement start/stop/kill and the admin connection;
    everything that only needs a pid lives here.
    """

    engine: ClassVar[str] = ""
    scheme: ClassVar[str] = ""
    log_name: ClassVar[str] = "server.log"
    system_database: ClassVar[str] = ""  # always exists, unlike the application database

    def __init__(self, cluster: LocalCluster, name: str, index: int, port: int, node_dir: Path) -> None:
        self.cluster = cluster
        self.name = name
        self.index = index
        self.port = port
        self.host = HOST
        self.node_dir = node_dir
        self.frozen = False
        self.paused = False

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.host}:{self.port} pid={self.pid}>"

    # -- identity

    @property
    def datadir(self) -> Path:
        return self.node_dir / "data"

    @property
    def log_file(self) -> Path:
        return self.node_dir / self.log_name

    @property
    def url(self) -> str:
        """URL for the cluster's application user over TCP (includes the password)."""
        c = self.cluster
        return (
            f"{self.scheme}://{quote(c.user, safe='')}:{quote(c.password, safe='')}"
            f"@{self.host}:{self.port}/{quote(c.database, safe='')}"
        )

    @property
    def redacted_url(self) -> str:
        """`url` with the password shown as ``***``: what to print."""
        c = self.cluster
        return f"{self.scheme}://{quote(c.user, safe='')}:***@{self.host}:{self.port}/{quote(c.database, safe='')}"

    @property
    def pid(self) -> int | None:
        """The server's (postmaster's) pid, or None when it is not running."""
        return self._find_pid()

    @property
    def running(self) -> bool:
        return self._find_pid() is not None

    # -- lifecycle (engine-specific parts)

    def _find_pid(self) -> int | None:
        raise NotImplementedError

    def start(self, timeout: float = 30.0) -> None:
        """Start the server on its datadir and port; wait until it accepts connections.

        Does nothing if it is running. Raises ClusterError (with the log tail)
        if it is not ready within ``timeout`` seconds.
        """
        raise NotImplementedError

    def stop(self, timeout: float = 30.0) -> None:
        """Shut the server down cleanly; does nothing if it is not running."""
        raise NotImplementedError

    def _process_tree(self) -> list[int]:
        """The server pid first, then any helper processes that must be signalled too."""
        pid = self._find_pid()
        return [pid] if pid else []

    def _after_exit(self) -> None:
        """Hook run once the server's processes are gone (reap, release IPC)."""

    def restart(self, timeout: float = 30.0) -> None:
        """Clean stop, then start; each step gets ``timeout`` seconds."""
        self.stop(timeout)
        self.start(timeout)

    def kill(self, timeout: float = 10.0) -> None:
        """SIGKILL the server (a crash); wait until its processes are gone.

        For PostgreSQL the backends are killed with the postmaster, as when a
        machine dies: a backend left behind would keep the shared memory busy
        and block the restart.
        """
        pids = self._process_tree()
        if not pids:
            self.frozen = False
            return
        logger.info("%s: SIGKILL pid %s", self.name, pids[0])
        signal_pids(pids, signal.SIGKILL)
        left = wait_pids_gone(pids, Deadline(timeout))
        self._after_exit()
        if left:
            raise self._error(f"processes {left} still alive {timeout:.0f} s after SIGKILL")
        self.frozen = False
        self.paused = False

    def freeze(self) -> None:
        """SIGSTOP the server and its helper processes: the hung-node case.

        The kernel still completes TCP handshakes on the listening socket, but
        nothing answers. Undo with :meth:`thaw`.
        """
        pids = self._process_tree()
        if not pids:
            raise self._error("cannot freeze: not running")
        # Parent first, so it cannot start a new child while we stop the others.
        signal_pids(pids, signal.SIGSTOP)
        self.frozen = True
        logger.info("%s: frozen (SIGSTOP %d processes)", self.name, len(pids))

    def thaw(self) -> None:
        """SIGCONT everything :meth:`freeze` stopped."""
        pids = self._process_tree()
        signal_pids(reversed(pids), signal.SIGCONT)
        self.frozen = False
        if pids:
            logger.info("%s: thawed", self.name)

    def _teardown(self, timeout: float = 10.0) -> None:
        """Fast, unconditional stop for destroy(): no clean shutdown needed."""
        pids = self._process_tree()
        if pids:
            signal_pids(pids, signal.SIGCONT)  # a stopped process never handles SIGTERM/SIGQUIT
            signal_pids(pids, signal.SIGKILL)
            left = wait_pids_gone(pids, Deadline(timeout))
            if left:
                logger.error("%s: processes %s survived SIGKILL", self.name, left)
        self._after_exit()
        self.frozen = False

    # -- admin connection

    def _connect(self, database: str | None = None, timeout: float = 5.0) -> Any:
        """A DB-API connection as the superuser over the unix socket, autocommit."""
        raise NotImplementedError

    def _default_database(self) -> str | None:
        raise NotImplementedError

    def query(
        self,
        sql: str,
        params: Sequence[Any] | None = None,
        *,
        database: str | None = None,
        timeout: float = 5.0,
    ) -> list[tuple[Any, ...]]:
        """Run one statement as the superuser on a fresh connection, autocommit.

        An admin helper for tests and the cluster itself, not a fast path.
        ``database`` defaults to the cluster's database. Raises ClusterError
        naming the node; the driver's exception is its ``__cause__`` (check
        ``pgcode`` / ``errno`` there).
        """
        if self.frozen:
            raise self._error("is frozen; it would never answer", log=False)
        try:
            conn = self._connect(database or self._default_database(), timeout)
        except Exception as exc:
            raise self._error(f"cannot connect for an admin query: {exc}", log=False) from exc
        try:
            cur = conn.cursor()
            try:
                cur.execute(sql, tuple(params) if params is not None else None)
                rows = cur.fetchall() if cur.description else []
            finally:
                cur.close()
            return [tuple(r) for r in rows]
        except Exception as exc:
            raise self._error(f"query failed: {exc}", log=False) from exc
        finally:
            conn.close()

    def _admin(self, sql: str, params: Sequence[Any] | None = None) -> list[tuple[Any, ...]]:
        """query() in the system database: cluster internals must work on a node
        whose application database does not exist (yet)."""
        return self.query(sql, params, database=self.system_database)

    # -- errors and state

    def log_tail(self, lines: int = 25) -> str:
        return tail(self.log_file, lines)

    def _error(self, message: str, *, log: bool = True) -> ClusterError:
        text = f"{self.name} (port {self.port}): {message}"
        if log:
            text += f"\n--- last lines of {self.log_file} ---\n{self.log_tail()}"
        return ClusterError(text)

    def _state(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "index": self.index,
            "port": self.port,
            "node_dir": str(self.node_dir),
            "datadir": str(self.datadir),
            "pid": self.pid,
        }

    def _restore(self, state: dict[str, Any]) -> None:
        """Engine-specific fields saved by :meth:`_state`."""


# ---------------------------------------------------------------------- cluster


class LocalCluster:
    """A primary and N streaming replicas on 127.0.0.1, started from installed binaries.

    Use as a context manager, or call :meth:`start` and :meth:`destroy`. Every
    server started is destroyed at interpreter exit unless :meth:`detach` was
    called (the CLI's ``cluster up``), so nothing outlives a crashed test run.

    ``password`` is the application user's (``user``, no superuser); None generates one.
    The admin and replication passwords are always generated (see the module).
    """

    engine: ClassVar[str] = ""
    node_prefix: ClassVar[str] = "node"
    node_class: ClassVar[type[LocalNode]] = LocalNode
    os_user: ClassVar[str] = ""  # the servers run as this OS user when started as root
    reserved_users: ClassVar[frozenset[str]] = frozenset()  # the cluster's own accounts
    _engines: ClassVar[dict[str, type[LocalCluster]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.engine:
            LocalCluster._engines[cls.engine] = cls

    def __init__(
        self,
        replicas: int = 2,
        base_dir: str | os.PathLike[str] | None = None,
        sync: bool = False,
        user: str = "dbrouter",
        password: str | None = None,
        database: str = "dbrouter",
        *,
        keep: bool = False,
        start_timeout: float = 60.0,
    ) -> None:
        if not isinstance(replicas, int) or replicas < 0:
            raise ClusterError(f"replicas must be an int >= 0, got {replicas!r}")
        for field, value in (("user", user), ("database", database)):
            if not value.isidentifier() or not value.isascii():
                raise ClusterError(f"{field} must be a plain identifier, got {value!r}")
        if user in self.reserved_users:
            raise ClusterError(f"user {user!r} is one of the cluster's own accounts {sorted(self.reserved_users)}")
        if password is not None and not password:
            raise ClusterError("password must not be empty")
        self.replica_count = replicas
        self.sync = bool(sync)
        self.user = user
        self.password = password if password is not None else new_password()
        """The application user's password (generated unless given)."""
        self.admin_password = new_password()
        """The servers' superuser's (PostgreSQL ``postgres``, MariaDB ``root``): admin queries only."""
        self.replication_password = new_password()
        """The replication user's."""
        self.database = database
        self.keep = keep
        self.start_timeout = start_timeout
        self.nodes: list[LocalNode] = []
        self._primary: LocalNode | None = None
        self.start_seconds: float | None = None
        self._base_dir: Path | None = Path(base_dir).resolve() if base_dir is not None else None
        self._started = False
        self._destroyed = False
        self._detached = False
        self._db_ready = False  # the application database exists on every node
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        state = "destroyed" if self._destroyed else ("running" if self._started else "new")
        return f"<{type(self).__name__} {state} nodes={[n.name for n in self.nodes]} base_dir={self._base_dir}>"

    # -- context manager

    def __enter__(self: _C) -> _C:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.destroy()

    # -- topology

    @property
    def base_dir(self) -> Path:
        if self._base_dir is None:
            raise ClusterError("base_dir is chosen by start(); the cluster is not started")
        return self._base_dir

    @property
    def primary(self) -> LocalNode:
        """The node currently believed primary: node 0 until promote() moves it."""
        if self._primary is None:
            raise ClusterError("cluster is not started")
        return self._primary

    @primary.setter
    def primary(self, node: LocalNode) -> None:
        self._primary = node

    @property
    def replicas(self) -> list[LocalNode]:
        """Every node except the one currently believed primary."""
        return [n for n in self.nodes if n is not self._primary]

    def node(self, name: str) -> LocalNode:
        for n in self.nodes:
            if n.name == name:
                return n
        raise ClusterError(f"no node named {name!r} in {[n.name for n in self.nodes]}")

    # -- lifecycle

    def start(self: _C) -> _C:
        """Create the datadirs, start the primary and replicas, wait until replicated.

        Idempotent. On any failure every server started so far is destroyed
        and ClusterError is raised with the failing node's log tail. Bounded by
        ``start_timeout`` seconds.
        """
        with self._lock:
            if self._destroyed:
                raise ClusterError("cluster was destroyed; create a new one")
            if self._started:
                return self
            self._started = True
        with _live_lock:
            _live.add(self)  # from here on, the atexit hook guarantees teardown
        t0 = time.monotonic()
        deadline = Deadline(self.start_timeout)
        try:
            self._make_base_dir()
            ports = allocate_ports(1 + self.replica_count)
            self.nodes = [
                self.node_class(self, f"{self.node_prefix}{i}", i, port, self.base_dir / f"{self.node_prefix}{i}")
                for i, port in enumerate(ports)
            ]
            self.primary = self.nodes[0]
            self._bootstrap(deadline)
            self.wait_replicated(timeout=deadline.remaining(1.0))
            self._db_ready = True
        except BaseException:
            logger.error("%s cluster failed to start; tearing it down", self.engine)
            self.destroy()
            raise
        self.start_seconds = time.monotonic() - t0
        logger.info(
            "%s cluster started in %.2f s: %s",
            self.engine,
            self.start_seconds,
            ", ".join(f"{n.name}:{n.port}" for n in self.nodes),
        )
        return self

    def _make_base_dir(self) -> None:
        if self._base_dir is None:
            self._base_dir = Path(
                tempfile.mkdtemp(prefix=f"dbrouter-{self.engine}-", dir=default_parent_dir())
            ).resolve()
        else:
            self._base_dir.mkdir(parents=True, exist_ok=True)
            if any(self._base_dir.iterdir()):
                # destroy() removes base_dir: never adopt a directory with someone's files in it.
                self._base_dir = None
                raise ClusterError("base_dir must be empty or not exist yet")
        # Only the servers' owner may enter it: it holds the sockets, the logs and the data.
        # As root, the servers run as os_user and must traverse it, so it is theirs.
        os.chmod(self._base_dir, 0o700)
        chown_to(self._base_dir, self.os_user)

    def detach(self) -> None:
        """Let the servers outlive this Python process (the CLI's ``cluster up``).

        Without it the atexit hook destroys the cluster. Pair with
        :meth:`save_state` so that ``load_state(...).destroy()`` can stop them later.
        """
        self._detached = True

    def destroy(self, keep: bool | None = None) -> None:
        """Kill every server of the cluster and remove base_dir (unless ``keep``).

        Idempotent, safe on half-started clusters, frozen or already-dead
        nodes. Uses SIGKILL: nothing here needs a clean shutdown.
        """
        with self._lock:
            if self._destroyed:
                return
            self._destroyed = True
        keep = self.keep if keep is None else keep
        for node in self.nodes:
            try:
                node._teardown()
            except Exception:  # keep going: the other nodes must die too
                logger.exception("%s: teardown failed", node.name)
        release_ports(n.port for n in self.nodes)
        if self._base_dir is not None and not keep:
            shutil.rmtree(self._base_dir, ignore_errors=True)
            if self._base_dir.exists():
                logger.error("could not remove %s", self._base_dir)
        with _live_lock:
            _live.discard(self)
        logger.info("%s cluster destroyed (%s)", self.engine, self._base_dir)

    # -- replication control

    def _require_running(self, node: LocalNode, action: str) -> None:
        if node not in self.nodes:
            raise ClusterError(f"{node.name} is not a node of this cluster")
        if node.frozen:
            raise ClusterError(f"cannot {action} {node.name}: it is frozen")
        if not node.running:
            raise ClusterError(f"cannot {action} {node.name}: it is not running")

    def _active_replicas(self) -> list[LocalNode]:
        return [n for n in self.replicas if not n.paused and not n.frozen and n.running]

    def wait_replicated(self, timeout: float = 10.0) -> None:
        """Block until every running, non-paused, non-frozen replica has replayed
        everything the primary has written so far.

        Nodes that no longer act as replicas (a restarted old primary) are
        skipped. Raises ClusterError naming the lagging node after ``timeout`` s.
        """
        deadline = Deadline(timeout)
        primary = self.primary
        self._require_running(primary, "read the position of primary")
        target = self._primary_position(primary)
        for node in self._active_replicas():
            self._wait_caught_up(node, target, deadline)

    def wait_caught_up(self, node: LocalNode, timeout: float = 10.0) -> None:
        """Block until ``node`` has replayed everything the primary has written so far.
        Raises ClusterError after ``timeout`` s, or when the primary cannot be read."""
        deadline = Deadline(timeout)
        self._require_running(self.primary, "read the position of primary")
        self._wait_caught_up(node, self._primary_position(self.primary), deadline)

    def promote(self, node: LocalNode, timeout: float = 30.0) -> None:
        """Make ``node`` the primary and re-point the other running replicas to it.

        The old primary is left as it is (it may be dead, or come back writable:
        a split brain until :meth:`rejoin`). Raises ClusterError if the
        promotion or a re-pointed replica does not complete within ``timeout``.
        """
        if node is self.primary:
            raise ClusterError(f"{node.name} is already the primary")
        self._require_running(node, "promote")
        deadline = Deadline(timeout)
        old = self._primary
        t0 = time.monotonic()
        self._promote_node(node, deadline)
        self.primary = node
        others = [n for n in self.nodes if n is not node and n is not old and n.running]
        for other in others:
            if other.frozen:
                logger.warning("%s is frozen; not re-pointing it to %s", other.name, node.name)
                continue
            self._repoint(other, node, deadline)
        self._wait_following(node, [o for o in others if not o.frozen], deadline)
        logger.info(
            "promoted %s to primary in %.2f s (old primary %s)",
            node.name,
            time.monotonic() - t0,
            old.name if old else None,
        )

    def most_advanced(self, candidates: list[LocalNode] | None = None) -> LocalNode:
        """The running replica (of ``candidates``) that received the most from the primary:
        the one a failover manager promotes, as it loses the least. Promoting another one
        can leave a replica ahead of the new primary, unable to follow it."""
        nodes = [n for n in (self.replicas if candidates is None else candidates) if n.running]
        if not nodes:
            raise ClusterError("no running replica to choose from")
        return max(nodes, key=self._received)

    def rejoin(self, node: LocalNode, timeout: float = 60.0) -> None:
        """Turn a stopped (or running, diverged) node into a replica of the current primary.

        PostgreSQL rewinds it with pg_rewind (or clones it again if that fails);
        MariaDB restarts it read-only and points it at the primary by GTID (or
        rebuilds it from the template if its history diverged). Returns when it
        has caught up. Raises ClusterError after ``timeout`` seconds.
        """
        if node not in self.nodes:
            raise ClusterError(f"{node.name} is not a node of this cluster")
        if node is self.primary:
            raise ClusterError(f"{node.name} is the primary; promote another node first")
        self._require_running(self.primary, "rejoin to the primary")
        if node.frozen:
            node.thaw()
        deadline = Deadline(timeout)
        t0 = time.monotonic()
        node.paused = False
        self._rejoin_node(node, deadline)
        self._wait_caught_up(node, self._primary_position(self.primary), deadline)
        logger.info("%s rejoined as a replica of %s in %.2f s", node.name, self.primary.name, time.monotonic() - t0)

    def pause_replication(self, node: LocalNode) -> None:
        """Stop applying replicated changes on ``node`` (it keeps receiving them)."""
        if node is self.primary:
            raise ClusterError(f"{node.name} is the primary; only replicas can pause")
        self._require_running(node, "pause replication on")
        self._pause(node)
        node.paused = True
        logger.info("%s: replication paused", node.name)

    def resume_replication(self, node: LocalNode) -> None:
        """Undo :meth:`pause_replication`."""
        self._require_running(node, "resume replication on")
        self._resume(node)
        node.paused = False
        logger.info("%s: replication resumed", node.name)

    def status(self) -> list[dict[str, Any]]:
        """One dict per node; ``role`` is asked from the server itself.

        role is "primary" or "replica" as the server reports it, "down" when it
        is not running, "unknown" when it is frozen or does not answer.
        """
        out: list[dict[str, Any]] = []
        for node in self.nodes:
            pid = node.pid
            role = "down"
            if pid is not None:
                role = "unknown"
                if not node.frozen:
                    try:
                        role = self._role(node)
                    except ClusterError as exc:
                        logger.debug("%s: role query failed: %s", node.name, exc)
            out.append(
                {
                    "name": node.name,
                    "host": node.host,
                    "port": node.port,
                    "pid": pid,
                    "running": pid is not None,
                    "role": role,
                    "believed_primary": node is self._primary,
                    "frozen": node.frozen,
                    "paused": node.paused,
                    "datadir": str(node.datadir),
                }
            )
        return out

    # -- persistence for the CLI

    def save_state(self, path: str | os.PathLike[str]) -> None:
        """Write what :meth:`load_state` needs to find and stop the servers (mode 0600 from
        the start, whatever the umask: it contains the passwords)."""
        if not self.nodes:
            raise ClusterError("nothing to save: the cluster is not started")
        state = {
            "version": STATE_VERSION,
            "engine": self.engine,
            "base_dir": str(self.base_dir),
            "sync": self.sync,
            "keep": self.keep,
            "credentials": {
                "user": self.user,
                "password": self.password,
                "database": self.database,
                "admin_password": self.admin_password,
                "replication_password": self.replication_password,
            },
            "primary": self._primary.name if self._primary else None,
            "nodes": [n._state() for n in self.nodes],
        }
        write_private(path, json.dumps(state, indent=2))

    @classmethod
    def load_state(cls, path: str | os.PathLike[str]) -> LocalCluster:
        """Rebuild a cluster object from :meth:`save_state` output.

        The result is detached (the atexit hook leaves it alone): loading a
        cluster to look at it must not stop it. Call destroy() to stop it.
        """
        try:
            state = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ClusterError(f"cannot read cluster state {path}: {exc}") from exc
        if state.get("version") not in (1, STATE_VERSION):
            raise ClusterError(f"{path}: unsupported state version {state.get('version')!r}")
        engine_cls = cls._engines.get(state.get("engine", ""))
        if engine_cls is None:
            raise ClusterError(f"{path}: unknown engine {state.get('engine')!r}")
        if cls is not LocalCluster and not issubclass(engine_cls, cls):
            raise ClusterError(f"{path} holds a {state['engine']} cluster, not a {cls.engine} one")
        creds = state["credentials"]
        cluster = engine_cls(
            replicas=len(state["nodes"]) - 1,
            base_dir=state["base_dir"],
            sync=state["sync"],
            user=creds["user"],
            password=creds["password"],
            database=creds["database"],
            keep=state.get("keep", False),
        )
        # Version 1 clusters trusted their unix socket (PostgreSQL) or had no root password
        # (MariaDB): an empty admin password still logs in there, so they can be stopped.
        cluster.admin_password = creds.get("admin_password", "")
        cluster.replication_password = creds.get("replication_password", creds["password"])
        cluster._started = True
        cluster._detached = True
        cluster._db_ready = True
        for ns in state["nodes"]:
            node = engine_cls.node_class(cluster, ns["name"], ns["index"], ns["port"], Path(ns["node_dir"]))
            node._restore(ns)
            cluster.nodes.append(node)
        cluster.primary = cluster.node(state["primary"]) if state.get("primary") else cluster.nodes[0]
        with _port_lock:
            for n in cluster.nodes:  # a cluster loaded from its state file: its ports are this process's
                if n.port not in _ports_in_use:
                    fd = _reserve(n.port)
                    _ports_in_use[n.port] = -1 if fd is None else fd
        return cluster

    def create_database(self, name: str) -> None:
        """Create database ``name`` on the primary for the application user (its owner on
        PostgreSQL; every privilege on it on MariaDB). Replication carries it to the replicas."""
        if not name.isidentifier() or not name.isascii():
            raise ClusterError(f"database must be a plain identifier, got {name!r}")
        self._require_running(self.primary, "create a database on")
        self._create_database(name)

    # -- engine hooks

    def _bootstrap(self, deadline: Deadline) -> None:
        raise NotImplementedError

    def _create_database(self, name: str) -> None:
        raise NotImplementedError

    def _primary_position(self, primary: LocalNode) -> str:
        raise NotImplementedError

    def _received(self, replica: LocalNode) -> int:
        """How far ``replica`` has received the primary's log, comparable across replicas."""
        raise NotImplementedError

    def _wait_caught_up(self, node: LocalNode, target: str, deadline: Deadline) -> None:
        raise NotImplementedError

    def _promote_node(self, node: LocalNode, deadline: Deadline) -> None:
        raise NotImplementedError

    def _repoint(self, replica: LocalNode, primary: LocalNode, deadline: Deadline) -> None:
        raise NotImplementedError

    def _wait_following(self, primary: LocalNode, replicas: list[LocalNode], deadline: Deadline) -> None:
        raise NotImplementedError

    def _rejoin_node(self, node: LocalNode, deadline: Deadline) -> None:
        raise NotImplementedError

    def _pause(self, node: LocalNode) -> None:
        raise NotImplementedError

    def _resume(self, node: LocalNode) -> None:
        raise NotImplementedError

    def _role(self, node: LocalNode) -> str:
        raise NotImplementedError


def ceil_seconds(seconds: float) -> int:
    return max(1, math.ceil(seconds))


@atexit.register
def _destroy_all_at_exit() -> None:
    """Tear down every cluster this process started and did not detach."""
    with _live_lock:
        clusters = [c for c in _live if not c._detached]
    for cluster in clusters:
        try:
            cluster.destroy()
        except Exception:
            logger.exception("atexit teardown of %r failed", cluster)
