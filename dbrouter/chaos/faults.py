"""Running the planned faults on a live cluster, and checking that each node comes back.

A scheduler thread starts each planned fault at its time, on its own thread,
which injects it, holds it, and always ends it (``finally``), cut short so
that every fault ends before the run does. Once the node answers again, the
same thread checks that the router has put it back in rotation (invariant b).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from ..errors import ClusterError
from .plan import FaultSpec

if TYPE_CHECKING:
    from ..cluster import LocalCluster, LocalNode
    from ..faultproxy import FaultProxy
    from ..router import Router
    from .workload import Workload

__all__ = ["FaultRun", "FaultScheduler", "RotationCheck", "in_rotation"]

log = logging.getLogger("dbrouter.chaos")

# Beyond reset_timeout + 2 x health_interval, counted from when the node answers again: one
# probe's own round trip and the next read or write reaching the node under this load.
SLACK = 0.5
DIAGNOSE_FOR = 10.0  # after a missed deadline, keep watching this long to say when it came back
ANSWER_TIMEOUT = 15.0  # a restarted server must answer (and a replica catch up) within this long
NO_READ = "no read served by it since it answered"
FAULT_WAIT = 60.0  # how long a check waits for another fault on its node to end
PROBE_READS = 4  # a rotation check's own reads in flight at once


@dataclass
class RotationCheck:
    """Whether ``node`` was back in rotation within ``bound`` seconds of answering again."""

    node: str
    role: str
    answered_at: float  # seconds since the start of the run
    bound: float
    back_after: float | None = None  # seconds from answering to back in rotation; None: never seen
    reason: str = ""  # what was still wrong at the deadline
    concurrent: list[str] = field(default_factory=list)  # other faults active meanwhile
    cut_short: bool = False  # the run stopped (a stall) before the deadline: no verdict
    decided: bool = False  # in rotation, or the deadline passed: the node may take a new fault
    events: list[str] = field(default_factory=list)  # the router's events for the node, when it failed

    @property
    def ok(self) -> bool:
        return self.cut_short or (self.back_after is not None and self.back_after <= self.bound)

    def describe(self) -> str:
        if self.cut_short:
            return f"{self.node}: not checked to the end, the run was stopped"
        if self.ok:
            return f"{self.node} back as {self.role} {self.back_after:.2f}s after it answered (bound {self.bound:.2f}s)"
        later = "never within the watch" if self.back_after is None else f"only after {self.back_after:.2f}s"
        others = f"; other faults meanwhile: {', '.join(self.concurrent)}" if self.concurrent else ""
        events = f"; its events (seconds from answering): {', '.join(self.events)}" if self.events else ""
        return (f"{self.node} NOT back as {self.role} within {self.bound:.2f}s of answering again at "
                f"{self.answered_at:.2f}s ({later}); at the deadline: {self.reason}{others}{events}")


@dataclass
class FaultRun:
    """What happened to one planned fault."""

    spec: FaultSpec
    node: str | None = None
    started: float | None = None  # seconds since the start of the run
    ended: float | None = None  # when the fault was undone (the node may still be restarting)
    skipped: str | None = None
    error: str | None = None  # the cluster or proxy refused an action: the run cannot be trusted
    notes: list[str] = field(default_factory=list)
    checks: list[RotationCheck] = field(default_factory=list)
    thread: threading.Thread | None = None
    awaiting: set[str] = field(default_factory=set)  # nodes whose rotation check has not begun

    def describe(self) -> str:
        head = self.spec.describe()
        if self.skipped:
            return f"{head}: skipped ({self.skipped})"
        when = f"{self.started:.2f}s" if self.started is not None else "?"
        until = f"{self.ended:.2f}s" if self.ended is not None else "?"
        text = f"{head}: {self.node} from {when} to {until}"
        for note in self.notes:
            text += f"; {note}"
        if self.error:
            text += f"; ERROR {self.error}"
        return text


class FaultScheduler:
    """Starts the planned faults at their times; see the module docstring."""

    def __init__(self, *, plan: list[FaultSpec], cluster: LocalCluster, proxies: dict[str, FaultProxy],
                 router: Router, workload: Workload, t0: float, hard_end: float, max_concurrent: int,
                 bound: float, stop: threading.Event, say: Callable[[str], None],
                 node_events: Callable[[str, float, float], list[str]]) -> None:
        self.runs = [FaultRun(spec) for spec in plan]
        self.cluster = cluster
        self.proxies = proxies
        self.router = router
        self.workload = workload
        self.t0 = t0
        self.hard_end = hard_end
        self.max_concurrent = max_concurrent
        self.bound = bound
        self.stop = stop
        self.say = say
        self.node_events = node_events
        self._lock = threading.Lock()
        self._probe_reads: list[threading.Thread] = []
        self._thread = threading.Thread(target=self._run, name="chaos-scheduler", daemon=True)

    def now(self) -> float:
        return time.monotonic() - self.t0

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float) -> list[threading.Thread]:
        """Wait for the scheduler and every fault thread; returns those still running."""
        deadline = time.monotonic() + timeout
        self._thread.join(max(0.0, deadline - time.monotonic()))
        threads = [self._thread] + [r.thread for r in self.runs if r.thread is not None]
        with self._lock:
            threads += self._probe_reads
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return [t for t in threads if t.is_alive()]

    # -- scheduling ------------------------------------------------------------------

    def _active(self) -> list[FaultRun]:
        return [r for r in self.runs if r.started is not None and r.ended is None and r.skipped is None]

    def _busy_nodes(self) -> set[str]:
        """Nodes with a fault on, or whose return to rotation is not decided yet."""
        busy = set()
        for run in self.runs:
            if run.node is None or run.thread is None or not run.thread.is_alive():
                continue
            if run.ended is None:
                busy.add(run.node)
            busy.update(c.node for c in run.checks if not c.decided)
            busy.update(run.awaiting)  # waiting for it to answer (and a replica to catch up)
        return busy

    def _run(self) -> None:
        for run in self.runs:
            spec = run.spec
            if self.stop.wait(max(0.0, spec.at - self.now())):
                run.skipped = "run stopped"
                continue
            while True:
                active = self._active()
                if len(active) < self.max_concurrent and not (spec.server and any(r.spec.server for r in active)):
                    break
                if self.stop.wait(0.05):
                    break
            if self.stop.is_set():
                run.skipped = "run stopped"
                continue
            if spec.server:
                try:  # a replica still catching up would make a loss possible: wait for it
                    self.cluster.wait_replicated(timeout=5.0)
                except ClusterError as exc:
                    run.skipped = f"cluster not replicated: {str(exc).splitlines()[0]}"
                    continue
            if self.now() + spec.estimate > self.hard_end:
                run.skipped = f"no time left at {self.now():.2f}s"
                continue
            node = self._resolve(spec)
            if node is None:
                run.skipped = f"{spec.target} already has a fault"
                continue
            run.node = node.name
            run.awaiting.add(node.name)
            run.started = self.now()
            run.thread = threading.Thread(target=self._execute, args=(run, node), name=f"chaos-fault-{spec.index}",
                                          daemon=True)
            run.thread.start()

    def _resolve(self, spec: FaultSpec) -> LocalNode | None:
        busy = self._busy_nodes()
        if spec.role == "primary":
            candidates = [self.cluster.primary]
        else:
            replicas = sorted(self.cluster.replicas, key=lambda n: n.name)
            i = spec.replica_index % len(replicas)
            candidates = replicas[i:] + replicas[:i]
        for node in candidates:
            if node.name not in busy:
                return node
        return None

    # -- one fault ---------------------------------------------------------------------

    def _hold(self, until: float) -> None:
        self.stop.wait(max(0.0, min(until, self.hard_end) - self.now()))

    def _execute(self, run: FaultRun, node: LocalNode) -> None:
        spec = run.spec
        assert run.started is not None
        until = run.started + spec.duration
        proxy = self.proxies[node.name]
        checks: list[threading.Thread] = []
        self.say(f"{self.now():7.2f}s  fault {spec.describe()} -> {node.name}")
        try:
            if spec.kind == "kill":
                node.kill()
                try:
                    self._hold(until)
                finally:
                    node.start(timeout=30)
            elif spec.kind == "freeze":
                node.freeze()
                try:
                    self._hold(until)
                finally:
                    node.thaw()
            elif spec.kind == "blackhole":
                proxy.blackhole()
                try:
                    self._hold(until)
                finally:
                    proxy.pass_through()
            elif spec.kind == "latency":
                proxy.latency(spec.param)
                try:
                    self._hold(until)
                finally:
                    proxy.pass_through()
            elif spec.kind == "reset":
                try:
                    cut = True
                    while self.now() < min(until, self.hard_end) and not self.stop.is_set():
                        # Alternate: reset every connection, or cut the next request right after
                        # it reached the server (the answer never comes back).
                        if cut:
                            proxy.cut_after_client_sends(1)
                        else:
                            run.notes.append(f"reset {proxy.reset_connections()} connections")
                        cut = not cut
                        self._hold(min(until, self.now() + spec.param))
                finally:
                    proxy.pass_through()
                run.notes = _squash(run.notes)
            elif spec.kind == "pause":
                self.cluster.pause_replication(node)
                try:
                    self._hold(until)
                finally:
                    self.cluster.resume_replication(node)
            elif spec.kind == "promote":
                self._promote(run, node, checks)
            else:  # pragma: no cover - plan.py draws only the kinds above
                raise ValueError(f"unknown fault kind {spec.kind!r}")
        except Exception as exc:  # noqa: BLE001 - reported as a harness failure, never hidden
            run.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            log.exception("chaos fault %s failed", spec.describe())
        finally:
            run.ended = self.now()
        self.say(f"{self.now():7.2f}s  fault #{spec.index} {spec.kind} on {node.name} ended"
                 + (f" with an error: {run.error}" if run.error else ""))
        if run.error is None:
            self._check(run, node)
        else:
            with self._lock:
                run.awaiting.discard(node.name)
        for thread in checks:
            thread.join(ANSWER_TIMEOUT + self.bound + DIAGNOSE_FOR + 5)

    def _promote(self, run: FaultRun, old: LocalNode, checks: list[threading.Thread]) -> None:
        spec = run.spec
        cluster = self.cluster
        old.kill()
        try:
            self._hold(run.started + spec.param if run.started is not None else 0.0)
            new = cluster.most_advanced()
            cluster.promote(new)
            run.notes.append(f"promoted {new.name} at {self.now():.2f}s")
            # The new primary answers from now on: its check runs while the fault goes on.
            thread = threading.Thread(target=self._check, args=(run, new), name=f"chaos-check-{spec.index}",
                                      daemon=True)
            thread.start()
            checks.append(thread)
            self._hold(run.started + spec.param + spec.duration if run.started is not None else 0.0)
        finally:
            if cluster.primary is old:
                old.start(timeout=30)  # the promotion did not happen: the old primary comes back
            else:
                cluster.rejoin(old, timeout=60)
                run.notes.append(f"{old.name} rejoined at {self.now():.2f}s")

    # -- invariant b ----------------------------------------------------------------------

    def _check(self, run: FaultRun, node: LocalNode) -> None:
        with self._lock:
            run.awaiting.add(node.name)
        try:
            self._check_rotation(run, node)
        finally:
            with self._lock:
                run.awaiting.discard(node.name)

    def _wait_caught_up(self, node: LocalNode) -> None:
        """Until ``node`` has replayed what the primary wrote. While the primary itself is
        down (another fault), nobody can tell how far behind the replica is, and the router
        rightly keeps a replica it saw lagging out until it can: wait for the primary too."""
        until = time.monotonic() + ANSWER_TIMEOUT
        while not self.stop.is_set():
            remaining = until - time.monotonic()
            if remaining <= 0:
                log.info("%s: did not catch up within %.0fs", node.name, ANSWER_TIMEOUT)
                return
            try:
                self.cluster.wait_caught_up(node, timeout=remaining)
                return
            except ClusterError as exc:  # the primary cannot be read (down, restarting): again
                log.debug("%s: catching up: %s", node.name, exc)
            time.sleep(0.1)

    def _check_rotation(self, run: FaultRun, node: LocalNode) -> None:
        answered = self._answers(node)
        if answered is None:
            if self.stop.is_set():
                return  # the run is stopping (a stall): no verdict
            run.error = f"{node.name} did not answer within {ANSWER_TIMEOUT:.0f}s after the fault ended"
            return
        if self.cluster.primary is not node:
            # A replica that was down or cut off is behind until it has replayed what it
            # missed (a restarted standby may wait seconds to stream again), and the router
            # rightly keeps it out for lag meanwhile: the clock starts once it has caught up.
            self._wait_caught_up(node)
            answered = self.now()
        if self._refaulted(run, node.name):
            # Another fault is on the node (a replica under a latency fault promoted, say):
            # the router cannot see it answer until that fault ends too.
            until = time.monotonic() + FAULT_WAIT
            while self._refaulted(run, node.name) and time.monotonic() < until and not self.stop.is_set():
                time.sleep(0.05)
            answered = self.now()
        check = RotationCheck(node.name, "?", answered, self.bound)
        with self._lock:
            run.checks.append(check)
            run.awaiting.discard(node.name)  # the check keeps it busy until decided
        port = node.port
        deadline = answered + self.bound
        probes: list[threading.Thread] = []
        reason: str | None = "not checked"
        while not self.stop.is_set():
            check.role = "primary" if self.cluster.primary is node else "replica"
            reason = in_rotation(self.router, self.workload, node.name, port, check.role == "primary",
                                 self.t0 + answered)
            now = self.now()
            if reason is None:
                check.back_after = max(0.0, now - answered)
                break
            if reason.startswith(NO_READ):
                # All else is back, but no worker's read reached it yet: the readers may all
                # be held by another node that hangs until its timeout. Reads of the checker's
                # own, each on its own thread so that one held the same way does not stop the
                # next, show whether the router sends reads there.
                self._read_through_router(probes)
            if now <= deadline:
                check.reason = reason
            else:
                check.decided = True  # late: watch on only to say when it came back
                if now > deadline + DIAGNOSE_FOR or self._refaulted(run, node.name):
                    break
            time.sleep(0.05)
        else:
            check.cut_short = self.now() <= deadline
        check.decided = True
        if not check.ok:
            check.events = self.node_events(node.name, self.t0 + answered - 1.0, self.t0 + deadline)
        began = run.started or 0.0
        check.concurrent = [f"#{r.spec.index} {r.spec.kind} on {r.node}" for r in self.runs
                            if r is not run and r.started is not None and r.skipped is None
                            and r.started <= max(self.now(), deadline) and (r.ended is None or r.ended >= began)]
        if check.ok:
            self.say(f"{self.now():7.2f}s  {check.describe()}")
        else:
            self.say(f"{self.now():7.2f}s  FAIL (seed {self.workload.seed}): {check.describe()}")

    def _read_through_router(self, probes: list[threading.Thread]) -> None:
        """Start one more read through the router, with at most PROBE_READS in flight."""
        probes[:] = [t for t in probes if t.is_alive()]
        if len(probes) >= PROBE_READS:
            return
        thread = threading.Thread(target=self.workload.read_once, name="chaos-probe-read", daemon=True)
        thread.start()
        probes.append(thread)
        with self._lock:
            self._probe_reads = [t for t in self._probe_reads if t.is_alive()] + [thread]

    def _refaulted(self, run: FaultRun, name: str) -> bool:
        return any(r is not run and r.node == name and r.started is not None and r.ended is None for r in self.runs)

    def _answers(self, node: LocalNode) -> float | None:
        """When ``node`` answers a query again (its own socket, not through the proxy)."""
        deadline = time.monotonic() + ANSWER_TIMEOUT
        while time.monotonic() < deadline and not self.stop.is_set():
            try:
                node.query("SELECT 1", timeout=2.0)
                return self.now()
            except ClusterError:
                time.sleep(0.05)
        return None


def in_rotation(router: Router, workload: Workload, name: str, port: int, primary: bool, since: float) -> str | None:
    """None when ``name`` is fully back: healthy, breaker closed, in its role, and serving (a
    read answered by it, or for the primary a write it acknowledged, that started at or after
    ``since``, monotonic). Otherwise what is still wrong."""
    stats: dict[str, Any] = router.stats()
    node = stats["nodes"].get(name)
    if node is None:
        return f"the router has no node named {name}"
    problems = []
    if not node["healthy"]:
        problems.append(f"not healthy ({node.get('last_error')})")
    if node["breaker"] != "closed":
        problems.append(f"breaker {node['breaker']}")
    if primary:
        if stats["primary"] != name:
            problems.append(f"the router's primary is {stats['primary']}")
        if workload.last_ok.get(("write", port), 0.0) < since:
            problems.append("no write acknowledged by it since it answered")
    else:
        if node["role"] != "replica":
            problems.append(f"role {node['role']}")
        if node["lag_excluded"]:
            problems.append(f"excluded for lag ({node['lag']})")
        if not node["serving_reads"]:
            problems.append("not in the router's readable set")
        if workload.last_ok.get(("read", port), 0.0) < since:
            latest = max((t for (what, _), t in workload.last_ok.items() if what == "read"), default=0.0)
            anywhere = f"the latest read answered anywhere began {time.monotonic() - latest:.2f}s ago" if latest else \
                "no read answered anywhere yet"
            problems.append(f"{NO_READ} ({anywhere})")
    return "; ".join(problems) or None


def _squash(notes: list[str]) -> list[str]:
    """'reset N connections' notes of the reset fault, summed into one."""
    resets = [n for n in notes if n.startswith("reset ")]
    total = sum(int(n.split()[1]) for n in resets)
    return [n for n in notes if not n.startswith("reset ")] + ([f"{len(resets)} resets ({total} connections)"]
                                                               if resets else [])
