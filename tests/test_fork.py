"""A Router built before ``os.fork()`` (issue 13, item 2): a forked child gets fresh pools and
threads of its own, and the parent's connections stay the parent's. Both engines, real servers:
multiprocessing's fork start method, a child that exits normally, and gunicorn ``--preload``.

Before: the child used the parent's sockets, so replies crossed (a process got the answer to
the other's query) and one of them then waited forever; the child had no monitor, prober,
housekeeping or watchdog thread; and a child that exited normally, even one that never used
the router, closed the parent's idle connections (Terminate, COM_QUIT), so the parent's next
write raised WriteOutcomeUnknown.
"""

from __future__ import annotations

import contextlib
import gc
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from dbrouter import ConnectOptions, PoolConfig, Router, _fork, connect_pool

from .conftest import both_drivers, free_low_port

ROOT = Path(__file__).resolve().parent.parent


def reap(child: Any) -> None:
    """Join a forked child, killing it if it has not exited within 10 s (it hung)."""
    child.join(timeout=10)
    if child.is_alive():
        child.kill()
        child.join(timeout=10)
# statement_timeout bounds a statement that would wait forever for an answer another process took.
OPTIONS = {"health_interval": 0.2, "min_size": 2, "max_size": 4, "statement_timeout": 10, "connect_timeout": 5}
SECONDS = 1.5  # how long parent and child query at the same time


def backend_of(cluster: Any) -> str:
    """The expressions for the server session that answers: the server's port and the session's id
    (MariaDB numbers sessions per server, from 1: two servers have sessions of the same id)."""
    return "inet_server_port(), pg_backend_pid()" if cluster.engine == "postgres" else "@@port, CONNECTION_ID()"


def hammer(router: Router, backend: str, token: int, seconds: float) -> dict[str, Any]:
    """Reads (replicas) and transactions (the primary) for ``seconds``, each sending a token of its
    own: an answer meant for another process comes back with the wrong token."""
    wrong: list[tuple[int, int]] = []
    backends: set[tuple[int, int]] = set()
    count = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        token += 1
        row = router.read(f"SELECT %s, {backend}", (token,))[0]
        with router.transaction() as tx:
            tx.execute(f"SELECT %s, {backend}", (token + 1,))
            in_tx = tx.fetchone()
        assert in_tx is not None
        token += 1
        for sent, got in ((token - 1, row), (token, in_tx)):
            if int(got[0]) != sent:
                wrong.append((sent, int(got[0])))
            backends.add((int(got[1]), int(got[2])))
        count += 2
    return {"count": count, "wrong": wrong, "backends": sorted(backends)}


def child_main(router: Router, backend: str, sender: Any) -> None:
    """The forked child: query as the parent does, report, then close the router."""
    try:
        result = hammer(router, backend, 10_000_000, SECONDS)
        result["threads"] = sorted(t.name for t in threading.enumerate())
        result["pool"] = {node.name: node.pool.stats()["opened"] for node in router.nodes}
        router.close()
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which fails the test
        result = {"error": repr(exc)}
    sender.send(result)
    sender.close()


@both_drivers
def test_parent_and_forked_child_each_get_their_own_answers(cluster: Any, driver: str, table: str) -> None:
    backend = backend_of(cluster)
    context = multiprocessing.get_context("fork")
    with Router(cluster.primary.url, [n.url for n in cluster.replicas], driver=driver, **OPTIONS) as router:
        assert all(node.adapter.driver.startswith(driver) for node in router.nodes)
        hammer(router, backend, 0, 0.3)  # idle connections in every pool; every thread running
        assert router.wait_for_probes(1, timeout=10)
        receiver, sender = context.Pipe(duplex=False)
        child = context.Process(target=child_main, args=(router, backend, sender), name="forked-child")
        child.start()
        sender.close()
        try:
            mine = hammer(router, backend, 0, SECONDS)
            assert receiver.poll(SECONDS + 30), "the child did not report: it hung"
            theirs = receiver.recv()
        finally:
            reap(child)
        assert "error" not in theirs, theirs["error"]
        assert child.exitcode == 0
        assert mine["wrong"] == [] and theirs["wrong"] == [], (mine["wrong"][:5], theirs["wrong"][:5])
        assert mine["count"] > 10 and theirs["count"] > 10
        # Sessions of its own: none of the child's answers came from a server session of the parent's.
        assert not set(map(tuple, mine["backends"])) & set(map(tuple, theirs["backends"])), (mine, theirs)
        names = theirs["threads"]
        assert "dbrouter-monitor" in names and "dbrouter-probe" in names, names
        assert all(f"dbrouter-{node.name}-maint" in names for node in router.nodes), names
        if cluster.engine == "postgres":  # its statements are guarded: statement_timeout, no read timeout in libpq
            assert "dbrouter-watchdog" in names, names
        assert all(opened >= 1 for opened in theirs["pool"].values()), theirs["pool"]
        # The child's close() closed its own connections, none of the parent's.
        insert = f"INSERT INTO {table} (id, port) VALUES (%s, 0)"
        assert [router.write(insert, (i,)) for i in range(4)] == [1, 1, 1, 1]
        assert hammer(router, backend, 0, 0.3)["wrong"] == []
        assert router.stats()["write_outcome_unknown"] == 0


def borrowed_child(pool: Any, conn: Any, engine: str, sender: Any) -> None:
    """A child forked while the parent held ``conn``: it gives it back, as the forking thread would."""
    try:
        result: dict[str, Any] = {"size": pool.stats()["size"]}
        if engine == "postgres":  # its socket now leads nowhere: a statement fails instead of crossing
            try:
                pool.adapter.execute(conn, "SELECT 1")
                result["used"] = "answered"
            except Exception as exc:  # noqa: BLE001 - the driver's error is the point
                result["used"] = f"{type(exc).__name__}: {str(exc).strip()}"
        pool.release(conn)  # abandoned: never closed, reset or handed out
        with pool.connection() as own:
            result["own"] = pool.adapter.execute(own, "SELECT 1")[0]
        result["stats"] = {key: pool.stats()[key] for key in ("size", "closed", "discarded")}
        pool.close()
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which fails the test
        result = {"error": repr(exc)}
    sender.send(result)
    sender.close()


@both_drivers
def test_a_connection_borrowed_across_the_fork_stays_the_parents(cluster: Any, driver: str) -> None:
    """The forking thread held a connection: in the child it is given back without error and
    abandoned; the child's pool opens its own; the parent's connection still works."""
    engine = "postgres" if cluster.engine == "postgres" else "mysql"
    context = multiprocessing.get_context("fork")
    with connect_pool(cluster.primary.url, pool=PoolConfig(min_size=1, max_size=2),
                      connect=ConnectOptions(driver=driver)) as pool:
        assert pool.adapter.driver.startswith(driver)
        pool.wait_ready(10)
        conn = pool.acquire()
        before = pool.adapter.execute(conn, f"SELECT {backend_of(cluster)}")[0]
        receiver, sender = context.Pipe(duplex=False)
        child = context.Process(target=borrowed_child, args=(pool, conn, engine, sender))
        child.start()
        sender.close()
        try:
            assert receiver.poll(30), "the child did not report: it hung"
            theirs = receiver.recv()
        finally:
            reap(child)
        assert "error" not in theirs, theirs["error"]
        assert theirs["size"] == 0 and theirs["own"] == [(1,)]
        assert theirs["stats"] == {"size": 1, "closed": 0, "discarded": 0}  # the inherited one was not closed
        if engine == "postgres":
            assert theirs["used"].startswith(("OperationalError", "DatabaseError")), theirs["used"]
        assert pool.adapter.execute(conn, f"SELECT {backend_of(cluster)}")[0] == before
        pool.release(conn)


EXIT_SCRIPT = textwrap.dedent("""
    import os, sys
    import dbrouter
    primary, replicas, mode = sys.argv[1], sys.argv[2].split(","), sys.argv[3]
    # validation_bypass: the parent reuses its idle connections without a liveness ping, as it
    # does when it is busy: a connection the child closed fails the next statement on it.
    router = dbrouter.Router(primary, replicas, health_interval=0.2, min_size=2, max_size=4,
                             statement_timeout=10, connect_timeout=5, validation_bypass=3600)
    for _ in range(3):
        router.write("SELECT 1")
        router.read("SELECT 1")
    for node in router.nodes:  # every connection the parent uses next was open before the fork
        node.pool.wait_ready(10)
    pid = os.fork()
    if pid == 0:
        if mode == "close":  # as an atexit handler of the application's would
            router.close()
        elif mode == "use":
            router.write("SELECT 1")
            router.read("SELECT 1")
        sys.exit(0)  # a normal exit: atexit hooks, finalizers, the modules torn down
    assert "+psycopg:" not in primary or {node.adapter.driver for node in router.nodes} == {"psycopg"}
    status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    done = 0
    try:
        for _ in range(4):
            router.write("SELECT 1")
            router.read("SELECT 1")
            done += 1
    except Exception as exc:
        print("parent failed:", type(exc).__name__, str(exc).splitlines()[0], flush=True)
    print("child", status, "parent", done, "unknown", router.stats()["write_outcome_unknown"], flush=True)
    router.close()
""")


@both_drivers
@pytest.mark.parametrize("mode", ["exit", "close", "use"])
def test_a_child_that_exits_normally_leaves_the_parents_connections_alone(cluster: Any, driver: str, mode: str) -> None:
    """The child exits with sys.exit(0) after doing nothing with the router, closing it, or using it.
    On psycopg 3, the URLs' scheme names the driver."""
    def url(node: Any) -> str:
        return node.url.replace("postgresql://", f"postgresql+{driver}://") if driver else node.url

    replicas = ",".join(url(n) for n in cluster.replicas)
    proc = subprocess.Popen([sys.executable, "-c", EXIT_SCRIPT, url(cluster.primary), replicas, mode],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:  # the script and its forked child share the session we started
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    assert "child 0 parent 4 unknown 0" in out, out + err


def get(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=30) as response:
        answer: dict[str, Any] = json.loads(response.read())
        return answer


@pytest.mark.slow
def test_gunicorn_preload_workers_each_get_their_own_answers(cluster: Any) -> None:
    """gunicorn --preload builds the Router in the arbiter, which then forks 2 workers: each
    worker's answers are its own, from server sessions of its own, with its own dbrouter threads."""
    port = free_low_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("DBROUTER_")}
    env["DBROUTER_PRIMARY"] = cluster.primary.url
    env["DBROUTER_REPLICAS"] = ",".join(n.url for n in cluster.replicas)
    command = [sys.executable, "-m", "gunicorn", "--preload", "--workers", "2", "--bind", f"127.0.0.1:{port}",
               "--timeout", "60", "--graceful-timeout", "5", "tests.gunicorn_app:app"]
    server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, start_new_session=True)
    base = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, f"gunicorn exited {server.returncode}: {server.communicate()[1][-3000:]}"
            try:
                get(base)
                break
            except OSError:
                assert time.monotonic() < deadline, "gunicorn did not answer within 60 s"
                time.sleep(0.1)
        with ThreadPoolExecutor(max_workers=4) as clients:  # keep both workers busy at once
            try:
                answers = list(clients.map(lambda token: (token, get(f"{base}?token={token}")), range(1, 201)))
            except BaseException:
                clients.shutdown(wait=False, cancel_futures=True)  # one failed: do not wait for 200
                raise
    finally:
        server.terminate()  # graceful: the arbiter stops its workers
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)  # the arbiter and its workers: the session we started
            server.wait(timeout=10)
    wrong = [(token, a["tokens"]) for token, a in answers if a["tokens"] != [token, token]]
    assert wrong == [], wrong[:5]
    by_worker: dict[int, set[tuple[int, int]]] = {}
    for _, answer in answers:
        by_worker.setdefault(answer["pid"], set()).update(map(tuple, answer["backends"]))
        assert "dbrouter-monitor" in answer["threads"] and "dbrouter-probe" in answer["threads"], answer["threads"]
    assert len(by_worker) == 2, by_worker.keys()
    first, second = by_worker.values()
    assert not first & second, (first, second)  # no server session shared by the two workers


def test_the_fork_registry_keeps_no_router_alive() -> None:
    """os.register_at_fork has no unregister: the registry holds weak references only."""
    router = Router("postgresql://app@127.0.0.1:1/app", ["postgresql://app@127.0.0.2:1/app"], open=False)
    ref = weakref.ref(router)
    registered = len(_fork._registry)
    del router
    gc.collect()
    assert ref() is None
    assert len(_fork._registry) < registered


def _kept_cancel_session(adapter: Any) -> int | None:
    """The server session of the connection the canceller keeps for ``adapter``'s node, once a
    cancel put it back (it is taken out while one runs), within 5 s; None without one."""
    from dbrouter.deadline import CANCELLER

    deadline = time.monotonic() + 5
    while id(adapter) not in CANCELLER._kept and time.monotonic() < deadline:
        time.sleep(0.05)
    kept = CANCELLER._kept.get(id(adapter))
    return None if kept is None else adapter.session_id(kept[1])


def _cancel_child(router: Router, sql: str, sender: Any) -> None:
    """The forked child: no kept cancel connection of the parent's, a cut of its own, then close."""
    from dbrouter import DeadlineExceeded
    from dbrouter.deadline import CANCELLER

    adapter = router.primary.adapter
    try:
        inherited = id(adapter) in CANCELLER._kept
        with contextlib.suppress(DeadlineExceeded):
            router.read(sql, timeout=0.2)
        result: dict[str, Any] = {"inherited": inherited, "session": _kept_cancel_session(adapter)}
        router.close()
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which fails the test
        result = {"error": repr(exc)}
    sender.send(result)
    sender.close()


@both_drivers
def test_a_forked_child_leaves_the_kept_cancel_connection_to_the_parent(cluster: Any, driver: str) -> None:
    """The connection dbrouter keeps for cancels (`Canceller`) is the parent's: the child does
    not use or close it, and opens its own for its own cancels."""
    from dbrouter import DeadlineExceeded

    sleep = "SELECT pg_sleep(30)" if cluster.engine == "postgres" else "SELECT SLEEP(30)"
    router = Router(cluster.primary.url, [], health_interval=0.2, **({"driver": driver} if driver else {}))
    adapter = router.primary.adapter
    try:
        with pytest.raises(DeadlineExceeded):
            router.read(sleep, timeout=0.2)
        session = _kept_cancel_session(adapter)
        assert session is not None
        ctx = multiprocessing.get_context("fork")
        receiver, sender = ctx.Pipe(duplex=False)
        child = ctx.Process(target=_cancel_child, args=(router, sleep, sender))
        child.start()
        try:
            assert receiver.poll(30), "the child did not report"
            result = receiver.recv()
        finally:
            reap(child)
        assert "error" not in result, result
        assert result["inherited"] is False and result["session"] not in (None, session), (result, session)
        with pytest.raises(DeadlineExceeded, match="the server was asked to cancel it"):
            router.read(sleep, timeout=0.2)
        assert _kept_cancel_session(adapter) == session  # still the parent's, still open
    finally:
        router.close()
