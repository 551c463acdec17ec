"""Adversity (issue 15, "Overload and tail latency"): slow replicas, overload, hung nodes.

Every scenario runs on both engines (the bench's PostgreSQL and MariaDB clusters, a primary
and two replicas each), with a `dbrouter.faultproxy.FaultProxy` in front of the second replica
(the primary in scenario 5), and three setups side by side:

* ``on``: dbrouter with the features of the issue on: ``hedge_after="auto"``,
  ``slow_replica_ratio=3``, the retry budget (``retry_budget=0.2``) and ``max_waiting``;
* ``off``: dbrouter with its defaults and no budget (``retry_budget=None``): no hedging, no
  ejection, no queue cap;
* ``naive``: what code without dbrouter does: a driver pool per node (psycopg2
  ``ThreadedConnectionPool``, ``mysql.connector.pooling.MySQLConnectionPool``, each behind
  a ``BoundedSemaphore`` of its size since both raise when exhausted), round-robin over the
  replicas, and tenacity retrying 3 attempts on ``OperationalError``/``InterfaceError``
  (the next attempt goes to the next replica).

Scenarios: (1) one replica with latency spikes on 1% of its replies, (2) one replica ~10x
slower throughout, (3) 3x the measured capacity offered open loop while one replica resets
half its requests, counted on the servers, (4) a replica blackholed in the middle of 10,000
calls with ``timeout=0.2``, then a leak check, (5) one write to a blackholed primary with no
timeout option at all.

The proxy runs in a child process of its own (``python -m bench.adversity proxy ...``): in
the bench's process its thread would wait for the GIL behind the client threads, and the
delay it adds would depend on the client's load. Every loop is bounded in count and time;
the proxies are stopped at the end (the clusters by the bench's cluster lifetime).
"""

from __future__ import annotations

import dbrouter  # noqa: F401 - first: loads mysql-connector's C extension before ssl/hashlib

import contextlib
import itertools
import json
import logging
import math
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from dbrouter.cluster._base import allocate_ports, release_ports

from .contenders import _mysql_kwargs, _pg_autocommit_factory

__all__ = ["SETUPS", "run_adversity"]

log = logging.getLogger("bench")

TABLE = "adv_kv"
LOG_TABLE = "adv_log"
ROWS = 1000
POINT = f"SELECT v FROM {TABLE} WHERE id = %s"
SLEEP = {"postgres": "SELECT pg_sleep(0.01)", "mysql": "SELECT SLEEP(0.01)"}
SERVICE_S = 0.01  # the overload query's server time
DEADLINE_S = 0.2  # scenario 4: timeout= of every call
DEADLINE_TARGET_S = 0.25
SPIKES = (0.01, 0.2)  # scenario 1: 1% of the proxied replica's replies 200 ms late
SLOW_FACTOR = 10.0  # scenario 2: the proxied replica's reads this many times the healthy read time
FLAKY = 0.5  # scenario 3: share of the proxied replica's requests reset
OVERLOAD = 3.0  # scenario 3: offered load / capacity
CAP_S = 0.1  # scenario 3: every request's cap (deadline, acquire_timeout, the naive gate's wait)
SLOW_MARGIN = 0.001  # slow_replica_margin of the "on" setup: the default 5 ms exceeds a 10x-slow point read here
DEADLINE_POOL = 10  # scenario 4: connections per node (the Router's default max_size)
# Scenario 4: each thread pauses between calls, so that 10,000 calls from 32 threads take about 10 s
# and the blackhole lasts past the probes' verdict on the node (max(1, connect_timeout) = 5 s after it).
DEADLINE_PAUSE_S = 0.03
SETTLE_S = 11.0  # scenario 4: threads back within 2 x connect_timeout (5 s) + 1 s, the cancels' own bound
DEFAULTS_BOUND_S = 6.0  # scenario 5: max(1, connect_timeout) + health_interval with the defaults

SETUPS = {
    "on": "dbrouter, features on (hedge_after='auto', slow_replica_ratio=3, retry_budget=0.2, max_waiting)",
    "off": "dbrouter, defaults with the features off (retry_budget=None; no hedging, ejection or queue cap)",
    "naive": "naive: a driver pool per node, round-robin over the replicas, tenacity 3 attempts",
}
SPIKE_ROUNDS = 4  # scenario 1: the healthy baseline and the setups under the fault, alternated this many times


def _pure(url: str) -> str:
    return url + ("&" if "?" in url else "?") + "use_pure=true"


# Scenario 1 again, on the driver whose reads a hedge can end without cutting their connection
# (`Adapter.overtakes`): (label, router options, URL transform). The default drivers block in C.
DRAINING: dict[str, tuple[str, dict[str, Any], Callable[[str], str]]] = {
    "postgres": ("psycopg 3", {"driver": "psycopg"}, str),
    "mysql": ("mysql-connector (pure Python)", {}, _pure),
}
# Scenarios 1 and 2 also run the scenario's own feature alone (the defaults plus that one option),
# so that what each feature does shows apart from the others'.
ALONE: dict[str, tuple[str, str, dict[str, Any]]] = {
    "spikes": ("hedge_only", "dbrouter, defaults + hedge_after='auto' alone", {"hedge_after": "auto"}),
    "slow": ("eject_only", "dbrouter, defaults + slow_replica_ratio=3 alone",
             {"slow_replica_ratio": 3, "slow_replica_margin": SLOW_MARGIN}),
}


# -- the proxy, in a process of its own -----------------------------------------------------------


class ProxyProcess:
    """A `FaultProxy` in a child interpreter, driven by one command per line on its stdin."""

    def __init__(self, upstream_port: int) -> None:
        self.port = allocate_ports(1)[0]
        root = Path(__file__).resolve().parent.parent
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "bench.adversity", "proxy", str(upstream_port), str(self.port)],
            cwd=root, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self._lock = threading.Lock()
        ready = self._readline(10.0)
        if ready != "ready":
            self.stop()
            raise RuntimeError(f"fault proxy child did not start: {ready!r}")
        self.mode = "pass_through"

    def _readline(self, timeout: float) -> str:
        assert self._proc.stdout is not None
        box: list[str] = []
        reader = threading.Thread(target=lambda: box.append(self._proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
        reader.start()
        reader.join(timeout)
        return box[0].strip() if box else ""

    def set(self, mode: str, *args: float) -> None:
        """Switch the proxy's mode (a `FaultProxy` method name and its arguments); waits for it."""
        with self._lock:
            assert self._proc.stdin is not None
            self._proc.stdin.write(" ".join([mode, *map(repr, args)]) + "\n")
            self._proc.stdin.flush()
            answer = self._readline(5.0)
        if answer != "ok":
            raise RuntimeError(f"fault proxy: {mode}{args} answered {answer!r}")
        self.mode = mode

    def url(self, node: Any) -> str:
        return str(node.url).replace(f":{node.port}/", f":{self.port}/")

    def stop(self) -> None:
        try:
            if self._proc.poll() is None and self._proc.stdin is not None:
                self._proc.stdin.write("stop\n")
                self._proc.stdin.flush()
                self._proc.wait(5.0)
        except (OSError, subprocess.TimeoutExpired):
            pass
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(5.0)
        release_ports([self.port])


def _proxy_child(upstream_port: int, listen_port: int) -> None:
    from dbrouter.faultproxy import FaultProxy

    proxy = FaultProxy(upstream=("127.0.0.1", upstream_port), listen_port=listen_port).start()
    print("ready", flush=True)
    try:
        for line in sys.stdin:
            words = line.split()
            if not words or words[0] == "stop":
                break
            getattr(proxy, words[0])(*(float(w) for w in words[1:]))
            print("ok", flush=True)
    finally:
        proxy.stop()


# -- the setups -----------------------------------------------------------------------------------


class NaiveTimeout(Exception):
    """The naive setup's gate (its stand-in for a pool wait) ran out of time: request shed."""


class Naive:
    """One driver pool per node, round-robin, tenacity: what code without dbrouter does.

    Each pool sits behind a ``BoundedSemaphore`` of its size (both pools raise at once when
    exhausted, the usual recipe); ``gate_timeout`` caps the wait for it (None: wait for ever).
    Every attempt goes to the next node in turn; tenacity retries 3 attempts in all on the
    driver's ``OperationalError``/``InterfaceError``, with dbrouter's default backoff shape.
    """

    def __init__(self, engine: str, urls: list[str], size: int, *, connect_timeout: int = 5,
                 gate_timeout: float | None = None) -> None:
        import tenacity

        self.engine = engine
        self.size = size
        self.gate_timeout = gate_timeout
        self.gates = [threading.BoundedSemaphore(size) for _ in urls]
        self.gate_waits: list[float] = []
        self._rr = itertools.count()
        self.pools: list[Any] = []
        try:
            for url in urls:
                self.pools.append(self._pool(url, size, connect_timeout))
        except BaseException:
            self.close()
            raise
        if engine == "postgres":
            import psycopg2

            errors: tuple[type[BaseException], ...] = (psycopg2.OperationalError, psycopg2.InterfaceError)
        else:
            import mysql.connector

            errors = (mysql.connector.errors.OperationalError, mysql.connector.errors.InterfaceError)
        self._retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(3), retry=tenacity.retry_if_exception_type(errors),
            wait=tenacity.wait_exponential(multiplier=0.02, max=1.0), reraise=True)

    def _pool(self, url: str, size: int, connect_timeout: int) -> Any:
        if self.engine == "postgres":
            from psycopg2.pool import ThreadedConnectionPool

            # minconn = maxconn: connections beyond minconn are closed on putconn.
            return ThreadedConnectionPool(size, size, url, connect_timeout=connect_timeout,
                                          connection_factory=_pg_autocommit_factory())
        from mysql.connector import pooling

        return pooling.MySQLConnectionPool(pool_name=f"adv{next(_pool_names)}", pool_size=size,
                                           connection_timeout=connect_timeout, **_mysql_kwargs(url))

    def read(self, sql: str, params: Any = None) -> Any:
        return self._retrying(self._attempt, sql, params)

    def _attempt(self, sql: str, params: Any) -> Any:
        i = next(self._rr) % len(self.pools)
        gate = self.gates[i]
        started = time.perf_counter()
        acquired = gate.acquire(timeout=self.gate_timeout) if self.gate_timeout is not None else gate.acquire()
        if not acquired:
            raise NaiveTimeout(f"no connection to node {i} within {self.gate_timeout}s")
        self.gate_waits.append(time.perf_counter() - started)
        try:
            pool = self.pools[i]
            if self.engine == "postgres":
                conn = pool.getconn()
                try:
                    with conn.cursor() as cur:
                        cur.execute(sql, params)
                        return cur.fetchall()
                finally:
                    pool.putconn(conn)  # a broken connection (conn.closed) is discarded by the pool
            conn = pool.get_connection()  # pings; reconnects a connection found broken
            try:
                cur = conn.cursor()
                cur.execute(sql, params)
                rows = cur.fetchall()
                cur.close()
                return rows
            finally:
                # Back to the pool with a session reset, which raises on a broken connection: the
                # query's own error, if any, is the one that counts.
                with contextlib.suppress(Exception):
                    conn.close()
        finally:
            gate.release()

    def in_use(self) -> int:
        return sum(self.size - g._value for g in self.gates)  # CPython's count of free permits

    def close(self) -> None:
        for pool in self.pools:
            try:
                if self.engine == "postgres":
                    pool.closeall()
                else:
                    pool._remove_connections()  # MySQLConnectionPool has no close()
            except Exception as exc:  # noqa: BLE001 - closing must not hide results
                log.warning("closing a naive pool failed: %s", exc)


_pool_names = itertools.count()


def _router(cluster: Any, replicas: list[tuple[str, str]], setup: str, size: int,
            url_of: Callable[[str], str] = str, **extra: Any) -> Any:
    options: dict[str, Any] = {"max_size": size, "min_size": size}
    if setup == "on":
        options.update(hedge_after="auto", slow_replica_ratio=3, slow_replica_margin=SLOW_MARGIN, retry_budget=0.2,
                       max_waiting=2 * size)
    else:  # "off" and the one-feature setups (their feature comes in ``extra``)
        options.update(retry_budget=None)
    options.update(extra)
    router = dbrouter.Router(url_of(cluster.primary.url), [{"url": url_of(url), "name": name} for name, url in replicas],
                             **options)
    router.wait_for_probes(timeout=15)
    return router


class Setup:
    """One contender of a scenario: ``read(sql, params, timeout)`` and what it counted."""

    def __init__(self, key: str, read: Callable[..., Any], close: Callable[[], None], router: Any = None,
                 naive: Naive | None = None) -> None:
        self.key = key
        self.read = read
        self.close = close
        self.router = router
        self.naive = naive

    def counters(self) -> dict[str, int]:
        if self.router is None:
            return {}
        s = self.router.stats()
        out = {k: s[k] for k in ("reads", "retries", "retries_refused", "hedges", "hedges_won", "hedges_refused",
                                 "deadline_exceeded", "fallbacks")}
        # Connections opened and discarded, all pools: a hedge's loser is cut, not pooled again.
        out["opened"] = sum(n["pool"]["opened"] for n in s["nodes"].values())
        out["discarded"] = sum(n["pool"]["discarded"] for n in s["nodes"].values())
        return out


def open_setup(key: str, engine: str, cluster: Any, proxy: ProxyProcess, size: int, *, timeout: float | None = None,
               gate_timeout: float | None = None, url_of: Callable[[str], str] = str, **extra: Any) -> Setup:
    direct, proxied = cluster.replicas[0], cluster.replicas[1]
    if key == "naive":
        naive = Naive(engine, [direct.url, proxy.url(proxied)], size, gate_timeout=gate_timeout)
        return Setup(key, lambda sql, params=None: naive.read(sql, params), naive.close, naive=naive)
    router = _router(cluster, [("direct", direct.url), ("proxied", proxy.url(proxied))], key, size, url_of, **extra)
    if timeout is None:
        return Setup(key, router.read, router.close, router=router)
    return Setup(key, lambda sql, params=None: router.read(sql, params, timeout=timeout), router.close, router=router)


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after}


# -- measuring ------------------------------------------------------------------------------------


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(q * (len(values) - 1) + 0.5))]


def summarize(lat: list[float], errors: Counter[str], seconds: float) -> dict[str, Any]:
    """Latencies (seconds, failures included at the time they failed) as milliseconds."""
    v = sorted(lat)
    return {"n": len(v), "p50_ms": _quantile(v, 0.5) * 1e3, "p99_ms": _quantile(v, 0.99) * 1e3,
            "p999_ms": _quantile(v, 0.999) * 1e3, "max_ms": (v[-1] if v else float("nan")) * 1e3,
            "errors": sum(errors.values()), "error_types": dict(errors), "seconds": seconds,
            "throughput": len(v) / seconds if seconds else float("nan")}


def closed_loop(read: Callable[..., Any], threads: int, total: int, time_limit: float,
                until: Callable[[], bool] | None = None, grace: float = 30.0, pause: float = 0.0
                ) -> tuple[list[float], Counter[str], float, int]:
    """``threads`` threads doing point reads back to back (or ``pause`` seconds apart) until
    ``total`` reads (or the time limit, or ``until()``): each finished read's time, the errors
    by type, the seconds, and the threads still blocked in a call ``grace`` seconds after the
    time limit."""
    counter = itertools.count()
    lat: list[list[float]] = [[] for _ in range(threads)]
    errors: Counter[str] = Counter()
    lock = threading.Lock()
    start = time.perf_counter()
    deadline = start + time_limit
    clock = time.perf_counter

    def worker(mine: list[float]) -> None:
        while True:
            i = next(counter)
            if i >= total or clock() > deadline or (until is not None and i % 50 == 0 and until()):
                return
            t = clock()
            try:
                read(POINT, (i * 7919 % ROWS + 1,))
            except Exception as exc:  # noqa: BLE001 - counted; the time to fail is a latency too
                with lock:
                    errors[type(exc).__name__] += 1
            mine.append(clock() - t)
            if pause:
                time.sleep(pause)

    pool = [threading.Thread(target=worker, args=(lat[i],), daemon=True) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(max(0.0, deadline - clock() + grace))
    seconds = min(clock(), deadline) - start
    return [x for part in lat for x in part], errors, seconds, sum(t.is_alive() for t in pool)


def open_loop(read: Callable[..., Any], sql: str, rate: float, seconds: float, workers: int) -> dict[str, Any]:
    """Requests issued on a schedule (``rate`` a second for ``seconds``) by ``workers`` threads:
    request i is due at start + i / rate, whether or not earlier ones finished. A request's
    latency counts from when it was due (a late start is the client's queue, not hidden)."""
    total = int(rate * seconds)
    counter = itertools.count()
    ok: list[float] = []
    failed: list[float] = []
    late: list[float] = []
    errors: Counter[str] = Counter()
    samples: dict[str, str] = {}  # the first message of each error type, for the reader
    lock = threading.Lock()
    clock = time.perf_counter
    start = clock() + 0.05

    def worker() -> None:
        while True:
            i = next(counter)
            if i >= total:
                return
            due = start + i / rate
            wait = due - clock()
            if wait > 0:
                time.sleep(wait)
            began = clock()
            try:
                read(sql)
                outcome = None
            except Exception as exc:  # noqa: BLE001 - shed, timed out or failed: counted by type
                outcome = type(exc).__name__
                if outcome not in samples:
                    samples[outcome] = str(exc)[:300]
            took = clock() - due
            with lock:
                late.append(began - due)
                if outcome is None:
                    ok.append(took)
                else:
                    failed.append(took)
                    errors[outcome] += 1

    pool = [threading.Thread(target=worker, daemon=True) for _ in range(workers)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(max(0.0, start + seconds - clock()) + 30.0)
    elapsed = clock() - start
    hung = sum(t.is_alive() for t in pool)
    ok.sort()
    late.sort()
    issued = len(ok) + len(failed)
    return {"offered": total, "issued": issued, "ok": len(ok), "failed": len(failed), "errors": dict(errors),
            "error_samples": samples,
            "seconds": elapsed, "window_s": seconds, "rate": rate, "goodput": len(ok) / max(seconds, elapsed),
            "ok_p50_ms": _quantile(ok, 0.5) * 1e3, "ok_p99_ms": _quantile(ok, 0.99) * 1e3,
            "late_p99_ms": _quantile(late, 0.99) * 1e3, "hung_workers": hung, "workers": workers}


# -- server-side counters -------------------------------------------------------------------------


def server_count(engine: str, cluster: Any) -> dict[str, int]:
    """Statements that reached each node: PostgreSQL transactions (xact_commit + xact_rollback of the
    database), MariaDB ``Com_select``. Read on a fresh admin connection per node."""
    out = {}
    for node in cluster.nodes:
        if engine == "postgres":
            rows = node.query("SELECT sum(xact_commit + xact_rollback)::bigint FROM pg_stat_database "
                              "WHERE datname = current_database()")
            out[node.name] = int(rows[0][0])
        else:
            rows = node.query("SHOW GLOBAL STATUS LIKE 'Com_select'")
            out[node.name] = int(rows[0][1])
    return out


def own_count_cost(engine: str, cluster: Any) -> dict[str, float]:
    """What one `server_count` adds to each node's counter itself, measured with nothing
    else running: three counts in a row, the last minus the first, halved."""
    first = server_count(engine, cluster)
    time.sleep(0.6)
    server_count(engine, cluster)
    time.sleep(0.6)
    last = server_count(engine, cluster)
    return {name: (last[name] - first[name]) / 2 for name in last}


# -- the scenarios --------------------------------------------------------------------------------


def scenario_tail(engine: str, cluster: Any, proxy: ProxyProcess, kind: str, reads: int, threads: int, size: int,
                  time_limit: float, rng: random.Random, *, draining: bool = False) -> dict[str, Any]:
    """Scenarios 1 (``spikes``) and 2 (``slow``): a healthy baseline through dbrouter, then each
    setup under the fault in a fresh random order, after a warm-up under it. ``draining``: the
    dbrouter setups on the engine's `DRAINING` driver (no naive setup: it is the default run's)."""
    out: dict[str, Any] = {"sql": POINT, "reads": reads, "threads": threads, "pool_size": size, "setups": {}}
    setups: dict[str, Setup] = {}
    alone, _, alone_options = ALONE[kind]
    driver, options, url_of = DRAINING[engine] if draining else (None, {}, str)
    if driver:
        out["driver"] = driver
    try:
        for key in ("off", "on") if draining else ("off", "on", "naive"):
            setups[key] = open_setup(key, engine, cluster, proxy, size, url_of=url_of, **options)
        setups[alone] = open_setup(alone, engine, cluster, proxy, size, url_of=url_of, **options, **alone_options)
        if kind == "spikes":
            out["fault"] = f"spikes({SPIKES[0]}, {SPIKES[1]})"
            _tail_in_rounds(out, setups, proxy, ("spikes", SPIKES), reads, threads, time_limit, rng)
        else:
            _tail_once(out, setups, proxy, reads, threads, time_limit, rng)
    finally:
        proxy.set("pass_through")
        for s in setups.values():
            s.close()
    return out


def _tail_in_rounds(out: dict[str, Any], setups: dict[str, Setup], proxy: ProxyProcess,
                    fault: tuple[str, tuple[float, ...]], reads: int, threads: int, time_limit: float,
                    rng: random.Random) -> None:
    """Scenario 1: the healthy baseline and every setup under the fault, alternated in
    `SPIKE_ROUNDS` rounds of a share of the reads each (every setup warmed up under the fault
    in the first), the rounds' reads pooled: the machine's drift over the scenario reaches the
    baseline and the setups alike, not whichever ran last."""
    base = setups["off"]
    batch = reads // SPIKE_ROUNDS
    healthy: list[float] = []
    healthy_errors: Counter[str] = Counter()
    healthy_seconds = 0.0
    lat: dict[str, list[float]] = {key: [] for key in setups}
    errors: dict[str, Counter[str]] = {key: Counter() for key in setups}
    seconds = dict.fromkeys(setups, 0.0)
    counted: dict[str, dict[str, int]] = {}
    warm: dict[str, dict[str, Any]] = {}
    proxy.set("pass_through")
    closed_loop(base.read, threads, min(reads // 5, 2000), time_limit)  # warm-up
    orders = []
    for round_ in range(SPIKE_ROUNDS):
        proxy.set("pass_through")
        c0 = base.counters()
        part, errs, secs, _ = closed_loop(base.read, threads, batch, time_limit)
        healthy += part
        healthy_errors += errs
        healthy_seconds += secs
        if round_ == 0:
            out["healthy_counters"] = _delta(base.counters(), c0)
        proxy.set(fault[0], *fault[1])
        order = list(setups)
        rng.shuffle(order)
        orders.append(order)
        for key in order:
            s = setups[key]
            if round_ == 0:
                started = time.perf_counter()
                wlat, werr, wsec, _ = closed_loop(s.read, threads, min(reads // 5, 2000), time_limit)
                warm[key] = {**summarize(wlat, werr, wsec), "seconds_to_steady": time.perf_counter() - started}
            c0 = s.counters()
            part, errs, secs, _ = closed_loop(s.read, threads, batch, time_limit)
            lat[key] += part
            errors[key] += errs
            seconds[key] += secs
            if s.router is not None:
                d = _delta(s.counters(), c0)
                counted[key] = {k: counted.get(key, {}).get(k, 0) + v for k, v in d.items()}
        log.info("9. adversity, spikes, round %d of %d done", round_ + 1, SPIKE_ROUNDS)
    out["rounds"] = SPIKE_ROUNDS
    out["order"] = orders[0]
    out["healthy"] = {**summarize(healthy, healthy_errors, healthy_seconds), "counters": out.pop("healthy_counters")}
    for key, s in setups.items():
        res = {**summarize(lat[key], errors[key], seconds[key]), "warmup": warm[key]}
        if s.router is not None:
            _router_columns(res, counted[key], s.router)
        out["setups"][key] = res
        _log_tail(out, key, res)


def _tail_once(out: dict[str, Any], setups: dict[str, Setup], proxy: ProxyProcess, reads: int, threads: int,
               time_limit: float, rng: random.Random) -> None:
    """Scenario 2: the healthy baseline, then every setup under the fault (10x slower
    throughout) after a warm-up under it; the setups that eject are warmed up until the
    replica is out (its ejection is the steady state measured)."""
    base = setups["off"]
    proxy.set("pass_through")
    closed_loop(base.read, threads, min(reads // 5, 2000), time_limit)  # warm-up
    c0 = base.counters()
    lat, errors, seconds, _ = closed_loop(base.read, threads, reads, time_limit)
    out["healthy"] = {**summarize(lat, errors, seconds), "counters": _delta(base.counters(), c0)}
    healthy_p50 = out["healthy"]["p50_ms"] / 1e3
    # latency() delays both directions: a read gains 2x, so 10x the healthy read time
    # takes (10 - 1) / 2 of it each way.
    x = (SLOW_FACTOR - 1) / 2 * healthy_p50
    out["fault"] = f"latency({x * 1e3:.2f} ms)"
    out["added_ms_each_way"] = x * 1e3
    out["healthy_p50_ms"] = healthy_p50 * 1e3
    proxy.set("latency", x)
    order = list(setups)
    rng.shuffle(order)
    for key in order:
        s = setups[key]
        warm_start = time.perf_counter()
        if s.router is not None and s.router.config.routing.slow_replica_ratio is not None:
            # Until the slow replica is ejected (two probe rounds once it has served 20 reads):
            # the detection's cost is reported beside the steady state.
            def ejected(router: Any = s.router) -> bool:
                return bool(router.stats()["nodes"]["proxied"]["slow_ejected"])

            wlat, werr, wsec, _ = closed_loop(s.read, threads, 10**9, 15.0, until=ejected)
            warm = summarize(wlat, werr, wsec)
            warm["ejected"] = ejected()
        else:
            wlat, werr, wsec, _ = closed_loop(s.read, threads, min(reads // 5, 2000), time_limit)
            warm = summarize(wlat, werr, wsec)
        warm["seconds_to_steady"] = time.perf_counter() - warm_start
        c0 = s.counters()
        lat, errors, seconds, _ = closed_loop(s.read, threads, reads, time_limit)
        res = {**summarize(lat, errors, seconds), "warmup": warm}
        if s.router is not None:
            _router_columns(res, _delta(s.counters(), c0), s.router)
        out["setups"][key] = res
        _log_tail(out, key, res)
    out["order"] = order


def _router_columns(res: dict[str, Any], d: dict[str, int], router: Any) -> None:
    """A dbrouter setup's counters over its measured reads, and its nodes' read times now."""
    res["counters"] = d
    res["extra_share"] = (d["hedges"] + d["retries"]) / d["reads"] if d["reads"] else float("nan")
    res["hedge_share"] = d["hedges"] / d["reads"] if d["reads"] else float("nan")
    nodes = router.stats()["nodes"]
    res["node_latency_ms"] = {n: nodes[n]["latency"] * 1e3 for n in ("direct", "proxied")}
    res["slow_ejected"] = nodes["proxied"]["slow_ejected"]


def _log_tail(out: dict[str, Any], key: str, res: dict[str, Any]) -> None:
    log.info("9. adversity, %s%s, %-10s: p50 %.2f ms, p99 %.2f ms (healthy %.2f), p99.9 %.1f ms, max %.0f ms, errors %d%s",
             out["fault"], f" ({out['driver']})" if "driver" in out else "", key, res["p50_ms"], res["p99_ms"],
             out["healthy"]["p99_ms"], res["p999_ms"], res["max_ms"], res["errors"],
             f", hedges {res['counters']['hedges']}/{res['counters']['reads']}" if "counters" in res else "")


def scenario_overload(engine: str, cluster: Any, proxy: ProxyProcess, size: int, window: float,
                      capacity_window: float, rng: random.Random) -> dict[str, Any]:
    """Scenario 3: the capacity measured, then 3x it offered open loop with one replica flaky,
    each setup alone (so that the servers' counters are its own)."""
    sql = SLEEP[engine]
    proxy.set("pass_through")
    own = own_count_cost(engine, cluster)
    # Capacity: 2 replicas x size connections, closed loop with 3x as many threads as connections.
    probe = open_setup("off", engine, cluster, proxy, size)
    try:
        closed_loop(lambda s, p=None: probe.read(sql), 4 * size, 200, 10.0)
        lat, errors, seconds, _ = closed_loop(lambda s, p=None: probe.read(sql), 6 * size, 10**9, capacity_window)
    finally:
        probe.close()
    capacity = len(lat) / seconds
    out: dict[str, Any] = {
        "sql": sql, "pool_size": size, "connections": 2 * size, "nominal_capacity": 2 * size / SERVICE_S,
        "capacity": capacity, "capacity_errors": sum(errors.values()), "overload": OVERLOAD, "flaky": FLAKY,
        "cap_s": CAP_S, "window_s": window, "own_count_cost": own, "setups": {},
    }
    rate = OVERLOAD * capacity
    # Enough threads for every request in flight at once: each takes at most its cap plus the
    # service time, per attempt (the setups without a deadline may make three attempts).
    workers = min(1000, math.ceil(rate * (3 * CAP_S + 0.05)))
    order = list(SETUPS)
    rng.shuffle(order)
    for key in order:
        extra: dict[str, Any] = {"acquire_timeout": CAP_S}
        s = open_setup(key, engine, cluster, proxy, size, timeout=CAP_S if key == "on" else None,
                       gate_timeout=CAP_S, **({} if key == "naive" else extra))
        try:
            s.read(sql)
            time.sleep(1.2)  # the warm-up's statements reach the counters before the first count
            proxy.set("flaky", FLAKY)
            c0 = s.counters()
            before = server_count(engine, cluster)
            res = open_loop(s.read, sql, rate, window, workers)
            proxy.set("pass_through")
            d = _delta(s.counters(), c0)
            if s.router is not None:
                nodes = s.router.stats()["nodes"]
                res["wait_p99_s"] = max(n["pool"]["acquire_wait_p99"] for n in nodes.values())
                res["wait_p99_by_node_s"] = {name: n["pool"]["acquire_wait_p99"] for name, n in nodes.items()}
                res["counters"] = d
                res["breakers"] = {name: n["breaker"] for name, n in nodes.items()}
            else:
                assert s.naive is not None
                waits = sorted(s.naive.gate_waits)
                res["wait_p99_s"] = _quantile(waits, 0.99)
        finally:
            proxy.set("pass_through")
            s.close()  # PostgreSQL counts a backend's transactions for sure once it exits
        time.sleep(1.5)
        after = server_count(engine, cluster)
        per_node = {n: after[n] - before[n] - own[n] for n in after}
        res["server_queries_by_node"] = per_node
        res["server_queries"] = sum(per_node.values())
        res["amplification"] = res["server_queries"] / res["issued"] if res["issued"] else float("nan")
        res["goodput_share"] = res["goodput"] / capacity
        out["setups"][key] = res
        log.info("9. adversity, %s, overload, %-5s: offered %d (%.0f/s), ok %d, goodput %.0f/s (%.0f%% of %.0f), "
                 "server queries %d (%.2fx), wait p99 %.0f ms, errors %s", engine, key, res["issued"], rate, res["ok"],
                 res["goodput"], 100 * res["goodput_share"], capacity, res["server_queries"], res["amplification"],
                 res["wait_p99_s"] * 1e3, res["errors"])
    out["order"] = order
    out["rate"] = rate
    out["workers"] = workers
    return out


def _threads_settle(baseline: int, limit: float, before: set[int | None] | None = None) -> tuple[int, float]:
    """Wait until the thread count is back to ``baseline`` and, given ``before`` (the idents alive
    before the calls), no thread started since is alive but the hedge executor's fixed workers."""

    def settled() -> bool:
        new = [t for t in threading.enumerate() if before is not None and t.ident not in before]
        workers = sum(t.name.startswith("dbrouter-hedge") for t in new)
        return threading.active_count() - workers <= baseline and len(new) == workers

    start = time.perf_counter()
    while not settled() and time.perf_counter() - start < limit:
        time.sleep(0.05)
    return threading.active_count(), time.perf_counter() - start


def scenario_deadline(engine: str, cluster: Any, proxy: ProxyProcess, calls: int, threads: int, size: int,
                      naive_limit: float) -> dict[str, Any]:
    """Scenario 4: ``calls`` reads with ``timeout=0.2`` from ``threads`` threads; the proxied
    replica blackholed once a third of them are done. Then: threads and connections back."""
    out: dict[str, Any] = {"calls": calls, "threads": threads, "timeout_s": DEADLINE_S}
    proxy.set("pass_through")
    for key in ("on", "naive"):
        baseline_threads = threading.active_count()
        s = open_setup(key, engine, cluster, proxy, size, timeout=DEADLINE_S if key == "on" else None)
        try:
            closed_loop(s.read, threads, 500, 10.0)
            opened_threads = threading.active_count()
            before = {t.ident for t in threading.enumerate()}
            c0 = s.counters()
            done = itertools.count()
            blackholed = threading.Event()
            at: dict[str, float] = {}  # when the blackhole began, when the probes marked the node down
            samples: dict[str, str] = {}  # the first message of each error type
            late_calls: list[dict[str, Any]] = []
            if s.router is not None:
                s.router.on("node_down", lambda event, _at=at: _at.setdefault("down", time.perf_counter())
                            if event.node == "proxied" else None)

            def read(sql: str, params: Any = None, _s: Setup = s, _done: Any = done,
                     _blackholed: threading.Event = blackholed, _at: dict[str, float] = at,
                     _samples: dict[str, str] = samples, _late: list[dict[str, Any]] = late_calls) -> Any:
                if not _blackholed.is_set() and next(_done) >= calls // 3:
                    _blackholed.set()
                    proxy.set("blackhole")
                    _at.setdefault("blackhole", time.perf_counter())
                started = time.perf_counter()
                outcome = "rows"
                try:
                    return _s.read(sql, params)
                except Exception as exc:
                    outcome = f"{type(exc).__name__}: {str(exc)[:300]}"
                    _samples.setdefault(type(exc).__name__, str(exc)[:300])
                    raise
                finally:
                    took = time.perf_counter() - started
                    if took > DEADLINE_TARGET_S and len(_late) < 10:
                        # The calls past the target: when (from the blackhole) and how they ended.
                        _late.append({"seconds": took, "started_after_blackhole_s":
                                           started - _at.get("blackhole", started), "outcome": outcome})

            # The naive setup has no deadline: its calls are given naive_limit seconds, then the
            # threads still blocked in a call are counted (and released by pass_through below).
            limit, grace = (120.0, 30.0) if key == "on" else (naive_limit, 0.5)
            lat, errors, seconds, blocked = closed_loop(read, threads, calls, limit, grace=grace, pause=DEADLINE_PAUSE_S)
            res = summarize(lat, errors, seconds)
            res["within_target"] = sum(x <= DEADLINE_TARGET_S for x in lat)
            res["share_within_target"] = res["within_target"] / calls
            res["blocked_at_end"] = blocked
            res["unfinished"] = calls - len(lat)
            res["error_samples"] = samples
            res["late_calls"] = list(late_calls)  # a copy: the naive setup's blocked calls end later
            if "blackhole" in at and "down" in at:
                res["node_down_after_s"] = at["down"] - at["blackhole"]
            proxy.set("pass_through")  # releases what still hangs in the proxy (the naive setup's calls)
            if key == "on":
                res["threads_before"] = opened_threads
                # Threads started during the calls and still there after the wait (the hedge executor's
                # fixed pool of workers starts at the first hedge and stays until close: not a leak; a
                # server-side cancel sent to the blackholed node waits up to connect_timeout to connect).
                res["threads_after"], res["threads_settled_s"] = _threads_settle(opened_threads, SETTLE_S, before)
                res["new_threads"] = sorted(t.name for t in threading.enumerate() if t.ident not in before)
                nodes = s.router.stats()["nodes"]
                res["in_use_after"] = sum(n["pool"]["in_use"] for n in nodes.values())
                res["counters"] = _delta(s.counters(), c0)
            else:
                assert s.naive is not None
                res["in_use_after"] = s.naive.in_use()  # at the cut-off, before pass_through released them
                released = time.perf_counter()
                while s.naive.in_use() and time.perf_counter() - released < 10.0:
                    time.sleep(0.05)
                res["released_after_s"] = time.perf_counter() - released
                res["in_use_after_release"] = s.naive.in_use()
        finally:
            proxy.set("pass_through")
            s.close()
        if key == "on":
            res["threads_after_close"], _ = _threads_settle(baseline_threads, 5.0)
            res["threads_baseline"] = baseline_threads
        out[key] = res
        log.info("9. adversity, %s, deadline, %-5s: %d calls in %.1f s, %.2f%% within %.0f ms, p99.9 %.0f ms, max %.0f "
                 "ms, errors %s, blocked at the end %d", engine, key, res["n"], res["seconds"],
                 100 * res["share_within_target"], DEADLINE_TARGET_S * 1e3, res["p999_ms"], res["max_ms"],
                 res["error_types"], res["blocked_at_end"])
    return out


def scenario_defaults(engine: str, cluster: Any) -> dict[str, Any]:
    """Scenario 5: Router defaults (no timeout option), its primary behind a proxy that is
    blackholed; one write. Bound: max(1, connect_timeout) + health_interval = 6 s."""
    proxy = ProxyProcess(cluster.primary.port)
    router = None
    try:
        router = dbrouter.Router(proxy.url(cluster.primary), [n.url for n in cluster.replicas])
        router.wait_for_probes(timeout=15)
        router.write(f"INSERT INTO {LOG_TABLE} (v) VALUES (1)")
        proxy.set("blackhole")
        box: list[Any] = []

        def write() -> None:
            started = time.perf_counter()
            try:
                router.write(f"INSERT INTO {LOG_TABLE} (v) VALUES (2)")
                box.append((time.perf_counter() - started, "returned"))
            except Exception as exc:  # noqa: BLE001 - the error is the point: which one, and when
                box.append((time.perf_counter() - started, f"{type(exc).__name__}: {str(exc)[:200]}"))

        t = threading.Thread(target=write, daemon=True)
        started = time.perf_counter()
        t.start()
        t.join(60.0)
        seconds, outcome = box[0] if box else (time.perf_counter() - started, "still blocked after 60 s")
    finally:
        proxy.set("pass_through")
        if router is not None:
            router.close()
        proxy.stop()
    log.info("9. adversity, %s, defaults: write to a blackholed primary returned after %.2f s (%s)", engine, seconds,
             outcome)
    return {"seconds": seconds, "outcome": outcome, "bound_s": DEFAULTS_BOUND_S}


def _prepare(engine: str, cluster: Any) -> None:
    p = cluster.primary
    p.query(f"DROP TABLE IF EXISTS {TABLE}")
    p.query(f"DROP TABLE IF EXISTS {LOG_TABLE}")
    if engine == "postgres":
        p.query(f"CREATE TABLE {TABLE} (id int PRIMARY KEY, v text)")
        p.query(f"INSERT INTO {TABLE} SELECT g, md5(g::text) FROM generate_series(1, {ROWS}) AS g")
        p.query(f"CREATE TABLE {LOG_TABLE} (id bigserial PRIMARY KEY, v int)")
    else:
        p.query(f"CREATE TABLE {TABLE} (id int PRIMARY KEY, v varchar(32))")
        p.query(f"INSERT INTO {TABLE} SELECT seq, MD5(seq) FROM seq_1_to_{ROWS}")
        p.query(f"CREATE TABLE {LOG_TABLE} (id bigint AUTO_INCREMENT PRIMARY KEY, v int)")
    cluster.wait_replicated(timeout=30)


def run_adversity(clusters: dict[str, Any], s: Any, seed: int, gate: Any) -> dict[str, Any]:
    """Every scenario on both engines; ``s`` carries the ``adv_*`` settings."""
    started = time.perf_counter()
    rng = random.Random(seed + 15)
    out: dict[str, Any] = {"setups": SETUPS, "constants": {
        "spikes": list(SPIKES), "slow_factor": SLOW_FACTOR, "flaky": FLAKY, "overload": OVERLOAD, "cap_s": CAP_S,
        "deadline_s": DEADLINE_S, "deadline_target_s": DEADLINE_TARGET_S, "slow_margin_s": SLOW_MARGIN,
        "settle_s": SETTLE_S, "deadline_pause_s": DEADLINE_PAUSE_S, "spike_rounds": SPIKE_ROUNDS,
        "defaults_bound_s": DEFAULTS_BOUND_S}}
    for engine in ("postgres", "mysql"):
        cluster = clusters[engine]
        _prepare(engine, cluster)
        proxy = ProxyProcess(cluster.replicas[1].port)
        res: dict[str, Any] = {}
        try:
            for kind in ("spikes", "slow"):
                gate.wait(f"adversity, {engine}, {kind}")
                res[kind] = scenario_tail(engine, cluster, proxy, kind, s.adv_reads, s.adv_threads, s.adv_pool,
                                          s.adv_time_limit_s, rng)
            gate.wait(f"adversity, {engine}, spikes, {DRAINING[engine][0]}")
            res["spikes_draining"] = scenario_tail(engine, cluster, proxy, "spikes", s.adv_reads, s.adv_threads,
                                                   s.adv_pool, s.adv_time_limit_s, rng, draining=True)
            gate.wait(f"adversity, {engine}, overload")
            res["overload"] = scenario_overload(engine, cluster, proxy, s.adv_overload_pool, s.adv_overload_window_s,
                                                s.adv_capacity_window_s, rng)
            gate.wait(f"adversity, {engine}, deadline")
            res["deadline"] = scenario_deadline(engine, cluster, proxy, s.adv_deadline_calls, s.adv_deadline_threads,
                                                DEADLINE_POOL, s.adv_naive_limit_s)
        finally:
            proxy.stop()
        res["defaults"] = scenario_defaults(engine, cluster)
        out[engine] = res
    out["duration_s"] = time.perf_counter() - started
    return out


if __name__ == "__main__":
    if sys.argv[1] == "proxy":
        _proxy_child(int(sys.argv[2]), int(sys.argv[3]))
    else:
        print(json.dumps({"error": f"unknown command {sys.argv[1]!r}"}))
        sys.exit(2)
