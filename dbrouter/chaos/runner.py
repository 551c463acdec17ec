"""`run_chaos`: a local cluster behind fault proxies, a Router, a seeded workload and seeded faults.

Everything it starts (cluster, proxies, router, SQLAlchemy engines, worker,
fault and detector threads) is stopped in a ``finally`` block, also on
Ctrl-C, and every wait is bounded.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import uuid
from typing import Any, Callable, TextIO
from urllib.parse import quote

from ..config import check_range
from ..errors import ClusterError, ConfigurationError
from .faults import SLACK, FaultScheduler, in_rotation
from .invariants import Invariant, StallDetector, check_writes, leftover_threads, primary_intervals
from .plan import END_MARGIN, MIN_DURATION, make_plan
from .report import ChaosReport
from .workload import TABLE, Workload

__all__ = ["ROUTER_OPTIONS", "run_chaos"]

log = logging.getLogger("dbrouter.chaos")

# Fast detection and short, bounded waits, so that every operation ends well within the
# stall limit: a write waits at most failover_wait for a primary, plus one attempt.
ROUTER_OPTIONS: dict[str, Any] = {
    "fail_max": 1,
    "reset_timeout": 1.0,
    "health_interval": 0.2,
    "connect_timeout": 2.0,  # PostgreSQL's minimum
    "statement_timeout": 1.0,
    "failover_wait": 3.0,
    "retry_deadline": 2.0,
    "acquire_timeout": 2.0,
    "min_size": 2,
    "max_size": 16,
    "max_replica_lag": 2.0,
    "causal_wait": 0.2,
}

MAX_DURATION = 86400.0  # a day
MAX_THREADS = 1024

CONNECTION_SETTLE = 2.0  # a server ends a session shortly after its client closed it
THREAD_SETTLE = 1.0  # close() joins its threads; a thread may still be leaving its last frame
FAULT_JOIN = 120.0  # a rejoin (pg_rewind or a MariaDB rebuild) can take a while


def run_chaos(engine: str, duration: float, seed: int, threads: int = 32, *, max_concurrent: int = 2,
              stall_timeout: float = 10.0, stream: TextIO | None = None, **router_options: Any) -> ChaosReport:
    """Run chaos for ``duration`` seconds on a new local ``engine`` cluster and check the invariants.

    The faults, their targets and timings come from ``seed`` (see `dbrouter.chaos.plan`), the
    workload from ``seed`` too. ``router_options`` override `ROUTER_OPTIONS`. Progress lines
    go to ``stream`` when given. Raises `ConfigurationError` for bad arguments (before anything
    starts) and `ClusterError` when the cluster cannot start; a broken invariant is reported,
    not raised. Everything is torn down before it returns, also on KeyboardInterrupt.
    """
    if engine not in ("postgres", "mariadb", "mysql"):
        raise ConfigurationError(f"engine must be postgres or mariadb, got {engine!r}")
    # Bounded: an infinite duration would plan faults forever before anything starts.
    check_range("", "duration", duration, low=MIN_DURATION, high=MAX_DURATION)
    check_range("", "threads", threads, low=1, high=MAX_THREADS, integer=True)
    check_range("", "max_concurrent", max_concurrent, low=1, high=MAX_THREADS, integer=True)
    check_range("", "stall_timeout", stall_timeout, low=0, low_open=True, high=3600)
    options = {**ROUTER_OPTIONS, **router_options}
    chaos = _Chaos(engine, duration, seed, threads, max_concurrent, stall_timeout, options, stream)
    try:
        chaos.run()
    except KeyboardInterrupt:
        chaos.report.interrupted = True
        chaos.say("interrupted: tearing down")
        raise
    finally:
        chaos.tear_down()
    chaos.say(chaos.report.human())
    return chaos.report


class _Chaos:
    def __init__(self, engine: str, duration: float, seed: int, threads: int, max_concurrent: int,
                 stall_timeout: float, options: dict[str, Any], stream: TextIO | None) -> None:
        self.engine = "mariadb" if engine == "mysql" else engine
        self.duration = duration
        self.seed = seed
        self.threads = threads
        self.max_concurrent = max_concurrent
        self.stall_timeout = stall_timeout
        self.options = options
        self.stream = stream
        self.plan = make_plan(seed, duration, max_concurrent)
        self.report = ChaosReport(seed, self.engine, duration, threads, settings=dict(options))
        self.tag = "chaos" + uuid.uuid4().hex[:10]  # marks the router's server sessions
        self.stop = threading.Event()
        self.t0 = 0.0
        self.cluster: Any = None
        self.proxies: dict[str, Any] = {}
        self.router: Any = None
        self.engines: Any = None
        self.workload: Workload | None = None
        self.scheduler: FaultScheduler | None = None
        self.detector: StallDetector | None = None
        self.failovers: list[tuple[float, str, str]] = []
        self.events: dict[str, int] = {}
        self.timeline: list[tuple[float, str, str]] = []  # (monotonic, event, node)
        self._events_lock = threading.Lock()

    def say(self, text: str) -> None:
        if self.stream is not None:
            self.stream.write(text + "\n")
            self.stream.flush()

    @property
    def bound(self) -> float:
        return float(self.options["reset_timeout"]) + 2 * float(self.options["health_interval"]) + SLACK

    # -- set up -------------------------------------------------------------------------

    def _set_up(self) -> None:
        import dbrouter  # noqa: F401 - the mysql C extension loads before anything imports ssl

        from ..cluster import make_cluster
        from ..faultproxy import FaultProxy
        from ..integrations.sqlalchemy import create_engines, routing_sessionmaker
        from ..router import Router

        self.say(f"seed {self.seed}")
        self.say(f"starting a local {self.engine} cluster: primary + 2 replicas, synchronous ...")
        self.cluster = cluster = make_cluster(self.engine, replicas=2, sync=True).start()
        database = cluster.database
        if self.engine == "mariadb":
            # MariaDB lists no connection attributes: the router's sessions are told apart by
            # their database, one made for this run.
            database = self.tag
            cluster.create_database(database)
        self.database = database
        urls = {}
        for node in cluster.nodes:
            proxy = FaultProxy(upstream=("127.0.0.1", node.port)).start()
            self.proxies[node.name] = proxy
            urls[node.name] = (f"{node.scheme}://{quote(cluster.user, safe='')}:{quote(cluster.password, safe='')}"
                               f"@127.0.0.1:{proxy.port}/{database}")
        self.router = router = Router({"url": urls[cluster.primary.name], "name": cluster.primary.name},
                                      [{"url": urls[n.name], "name": n.name} for n in cluster.replicas],
                                      application_name=self.tag, **self.options)
        router.on("*", self._on_event)
        self._wait_ready()
        router.write(f"CREATE TABLE {TABLE} (id bigint NOT NULL, port int NOT NULL, op varchar(32) NOT NULL)")
        router.write(f"CREATE INDEX {TABLE}_id ON {TABLE} (id)")  # not unique: a duplicate must show
        cluster.wait_replicated(timeout=20)
        self.initial_primary = router.stats()["primary"]
        self.engines = create_engines(router)
        port_sql = "inet_server_port()" if self.engine == "postgres" else "@@port"
        self.workload = Workload(router, self.seed, self.threads, port_sql, routing_sessionmaker(self.engines),
                                 on_done=lambda i: self.detector.done(i) if self.detector else None)

    def _wait_ready(self, timeout: float = 30.0) -> None:
        """Until the router sees every node healthy with its breaker closed (polling stats)."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.router.stats()
            if stats["primary"] == self.cluster.primary.name and all(
                    n["healthy"] and n["breaker"] == "closed" for n in stats["nodes"].values()):
                return
            if time.monotonic() > deadline:
                raise ClusterError(f"the router did not see a healthy cluster within {timeout:g}s: {stats['nodes']}")
            time.sleep(0.05)

    def _on_event(self, event: Any) -> None:
        now = time.monotonic()
        with self._events_lock:
            self.events[event.name] = self.events.get(event.name, 0) + 1
            if event.node and len(self.timeline) < 100_000:
                self.timeline.append((now, event.name, event.node))
            if event.name == "failover":
                self.failovers.append((now, str(event.data.get("old")), str(event.data.get("new"))))

    def _node_events(self, name: str, start: float, end: float) -> list[str]:
        """``name``'s events between two monotonic times, as 'event@+seconds' from ``start`` + 1 s
        (the time the node answered again, for the rotation checks)."""
        with self._events_lock:
            picked = [(t, e) for t, e, n in self.timeline if n == name and start <= t <= end]
        return [f"{e}@{t - start - 1.0:+.2f}s" for t, e in picked[-12:]]

    # -- the run --------------------------------------------------------------------------

    def run(self) -> None:
        self._set_up()
        assert self.workload is not None
        workload = self.workload
        self.say(f"plan: {len(self.plan)} faults")
        for spec in self.plan:
            self.say(f"  {spec.describe()}")
        self.t0 = time.monotonic()
        workload.t0 = self.t0
        self.detector = StallDetector(self.threads, self.stall_timeout, self.stop,
                                      lambda i: workload.workers[i].is_alive() and not workload._stop.is_set(),
                                      self.t0)
        self.scheduler = FaultScheduler(
            plan=self.plan, cluster=self.cluster, proxies=self.proxies, router=self.router, workload=workload,
            t0=self.t0, hard_end=self.duration - END_MARGIN + 2.0, max_concurrent=self.max_concurrent,
            bound=self.bound, stop=self.stop, say=self.say, node_events=self._node_events)
        self.detector.start()
        workload.start()
        self.scheduler.start()
        self.stop.wait(max(0.0, self.duration - self.bound - 1.0))
        stuck_faults = self.scheduler.join(FAULT_JOIN)  # every fault ends before the end state is checked
        end_state = self._check_end_state() if not self.stop.is_set() else None
        self.stop.wait(max(0.0, self.t0 + self.duration - time.monotonic()))
        hung = [t.name for t in workload.stop(timeout=self.stall_timeout + 5)]
        self.detector.close()
        self._collect(end_state, stuck_faults, hung)
        self._check_close()

    def _check_end_state(self) -> list[str]:
        """Every node in rotation at the end, in the role the cluster gives it; no split brain."""
        since = time.monotonic()
        deadline = since + self.bound
        problems: dict[str, str] = {}
        while True:
            problems = {}
            for node in self.cluster.nodes:
                reason = in_rotation(self.router, self.workload, node.name, node.port,  # type: ignore[arg-type]
                                     node is self.cluster.primary, since)
                if reason:
                    problems[node.name] = reason
            split = self.router.stats()["split_brain"]
            if split:
                problems["split brain"] = ", ".join(split)
            if not problems or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        return [f"end state: {name}: {why}" for name, why in problems.items()]

    def _collect(self, end_state: list[str] | None, stuck_faults: list[threading.Thread], hung: list[str]) -> None:
        report, workload, scheduler, detector = self.report, self.workload, self.scheduler, self.detector
        assert workload is not None and scheduler is not None and detector is not None
        report.operations = {op: dict(counts) for op, counts in workload.counts.items()}
        report.faults = scheduler.runs
        report.failovers = [(t - self.t0, old, new) for t, old, new in self.failovers]
        report.events = dict(self.events)
        report.unexpected = list(workload.unexpected)
        report.stacks = detector.stacks
        if hung and not report.stacks:
            from .invariants import dump_stacks

            report.stacks = dump_stacks()
        invariants = [detector.invariant(hung)]

        rotation = Invariant(f"b. every node back in rotation within reset_timeout + 2 x health_interval + "
                             f"{SLACK:g}s ({self.bound:.2f}s) of answering again after its fault", True)
        for run in scheduler.runs:
            for check in run.checks:
                if not check.ok:
                    rotation.passed = False
                    rotation.add(f"fault #{run.spec.index} {run.spec.kind}: {check.describe()}")
        if end_state is None:
            rotation.passed = False
            rotation.add("end state not checked: the run was stopped early")
        for line in end_state or []:
            rotation.passed = False
            rotation.add(line)
        invariants.append(rotation)

        records = [r for r in workload.writes.values() if r.end]
        try:
            rows, final = self._final_rows()
            names = {node.port: node.name for node in self.cluster.nodes}
            end = time.monotonic()
            intervals = primary_intervals(self.initial_primary, self.failovers, end)
            writes = check_writes(records, rows, names, intervals, self.t0)
            self.say(f"read back {len(rows)} rows from the final primary {final} directly")
            invariants.extend(writes)
        except ClusterError as exc:
            invariants.append(Invariant("c. writes checked on the final primary", False, [str(exc).splitlines()[0]]))

        ryw = Invariant("e. read-your-writes: a session's read after its acknowledged write sees it",
                        not workload.ryw_violations, list(workload.ryw_violations[:15]))
        invariants.append(ryw)
        invariants.append(Invariant("f. only errors a fault explains (dbrouter errors, driver errors that are not "
                                    "caller errors)", not workload.unexpected,
                                    [u.splitlines()[-1] for u in workload.unexpected[:10]]))
        harness = Invariant("harness: every planned fault was injected and ended, or skipped with a reason", True)
        for run in scheduler.runs:
            if run.error:
                harness.passed = False
                harness.add(f"fault #{run.spec.index} {run.spec.kind} on {run.node}: {run.error}")
        for thread in stuck_faults:
            harness.passed = False
            harness.add(f"{thread.name} still running {FAULT_JOIN:g}s after the end")
        invariants.append(harness)
        report.invariants = invariants

    def _final_rows(self) -> tuple[list[tuple[Any, ...]], str]:
        """The workload's table on the single writable node, read directly from the server."""
        sql = "SELECT pg_is_in_recovery()" if self.engine == "postgres" else "SELECT @@read_only"
        deadline = time.monotonic() + 20
        while True:
            writable = []
            for node in self.cluster.nodes:
                if not node.running or node.frozen:
                    continue
                try:
                    if node.query(sql)[0][0] in (False, 0):
                        writable.append(node)
                except ClusterError:
                    pass
            if len(writable) == 1:
                node = writable[0]
                return node.query(f"SELECT id, port FROM {TABLE}", database=self.database, timeout=30), node.name
            if time.monotonic() > deadline:
                raise ClusterError(f"no single writable node to read the writes from: {[n.name for n in writable]}")
            time.sleep(0.2)

    def _check_close(self) -> None:
        """Invariant d: after close, no server session of the router's and no dbrouter thread."""
        if self.engines is not None:
            self.engines.dispose()
        self.router.close()
        closed = time.monotonic()
        mine = {f"dbrouter-proxy-{proxy.port}" for proxy in self.proxies.values()}
        left = leftover_threads(mine, THREAD_SETTLE)
        threads = Invariant("d2. no dbrouter thread alive after close()", not left)
        for thread in left:
            threads.add(f"{thread.name} (alive {time.monotonic() - closed:.1f}s after close)")
        sessions = self._sessions_after(CONNECTION_SETTLE)
        conns = Invariant(f"d1. no server session of the router's left {CONNECTION_SETTLE:g}s after close()",
                          not any(sessions.values()), [f"{name}: {n} sessions" for name, n in sessions.items() if n])
        at = next(i for i, inv in enumerate(self.report.invariants) if inv.name.startswith("e."))
        self.report.invariants[at:at] = [conns, threads]

    def _sessions_after(self, settle: float) -> dict[str, int]:
        if self.engine == "postgres":
            sql = "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
        else:
            sql = "SELECT count(*) FROM information_schema.PROCESSLIST WHERE DB = %s"
        deadline = time.monotonic() + settle
        while True:
            counts = {}
            for node in self.cluster.nodes:
                try:
                    counts[node.name] = int(node.query(sql, (self.tag,))[0][0])
                except ClusterError as exc:
                    counts[node.name] = -1
                    log.warning("cannot count sessions on %s: %s", node.name, exc)
            if not any(counts.values()) or time.monotonic() > deadline:
                return counts
            time.sleep(0.05)

    # -- tear down -----------------------------------------------------------------------

    def tear_down(self) -> None:
        self.stop.set()
        interrupted = self.report.interrupted
        steps: list[tuple[str, Callable[[], Any]]] = [
            ("faults", lambda: self.scheduler.join(10.0 if interrupted else FAULT_JOIN) if self.scheduler else None),
            ("workers", lambda: self.workload.stop(timeout=5.0) if self.workload else None),
            ("stall detector", lambda: self.detector.close() if self.detector else None),
            ("engines", lambda: self.engines.dispose() if self.engines else None),
            ("router", lambda: self.router.close() if self.router else None),
        ]
        steps += [(f"proxy {name}", proxy.stop) for name, proxy in self.proxies.items()]
        steps.append(("cluster", lambda: self.cluster.destroy() if self.cluster else None))
        for what, step in steps:
            try:
                step()
            except BaseException as exc:  # noqa: BLE001 - the cluster must go whatever else fails
                print(f"dbrouter chaos: tearing down {what} failed: {exc!r}", file=sys.stderr)
