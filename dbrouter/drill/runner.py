"""Run a drill: a workload through a Router, one fault, an optional recovery, a report.

The workload is threads through a `Router`, or with ``--async`` asyncio tasks through an
`AsyncRouter` on an event loop in a thread of its own (`AsyncWorkload`): the rest of the
drill (fault injection, timers, live view, checks, report) is the same threads either way.

Everything the drill starts (local cluster, fault proxies, router, workload
threads, timers, the Patroni timeline) is stopped by the time `run_drill`
returns or raises; a cluster passed in is left running.
Options are checked before anything starts, and a cluster that cannot be
reached stops the drill before any fault is injected.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from .._files import write_private
from ..aio.router import AsyncRouter
from ..config import check_range
from ..errors import ConfigurationError, DbRouterError
from ..router import Router
from ..workload import SLOW_CALLBACK, AsyncWorkload, Workload
from .chart import render_html
from .live import LiveView
from .report import DrillReport, Limit, build_timeline, summarise
from .scenarios import PATRONI, PROXIED_ENGINES, SCENARIOS, DrillTarget

if TYPE_CHECKING:
    from ..cluster import LocalCluster
    from ..faultproxy import FaultProxy

__all__ = ["Drill", "DrillOptions", "run_drill"]

log = logging.getLogger("dbrouter.drill")

MAX_DRILL_SECONDS = 86400.0
"""A day: the bound of every duration and delay of a drill."""
MAX_THREADS = 1024
MAX_REPLICAS = 16
LIMIT_RANGES: dict[str, tuple[float, float]] = {
    "min-read-availability": (0.0, 100.0),
    "min-write-availability": (0.0, 100.0),
    "max-lost-writes": (0.0, 1e12),
}
"""Limits not listed here are seconds, 0 to `MAX_DRILL_SECONDS`."""

# Router settings for drills on a local cluster: fast detection, bounded hangs.
LOCAL_ROUTER_OPTIONS: dict[str, Any] = {
    "health_interval": 0.5,
    "connect_timeout": 2.0,
    "statement_timeout": 2.0,
    "fail_max": 3,
    "reset_timeout": 2.0,
    "max_replica_lag": 1.0,
    "min_size": 2,
    "max_size": 10,
    "application_name": "dbrouter-drill",
}
# On a Patroni cluster the router reaches the members directly (no fault proxies: Patroni
# makes the faults), and probes as often as Patroni's own state is sampled (every 100 ms):
# its numbers are set beside Patroni's.
PATRONI_ROUTER_OPTIONS: dict[str, Any] = {**LOCAL_ROUTER_OPTIONS, "health_interval": 0.1}
PATRONI_SETTLE = 2.0
"""Seconds a Patroni drill goes on once Patroni has a running leader again: for the router to
find it and for writes to show it. The end of an outage that the drill did not see cannot be
compared with Patroni's."""
PATRONI_OVERTIME = 60.0
"""The most a Patroni drill runs past ``--duration`` waiting for that (a crashed leader's
restart in place took 8 to 20 s on a loaded 2-core machine)."""


@dataclass
class DrillOptions:
    """A drill's settings; `validate` explains any mistake before anything starts."""

    scenario: str
    local: str | None = None
    config: str | None = None
    replicas: int = 2
    sync: bool = False
    threads: int = 8
    write_ratio: float = 0.3
    duration: float = 20.0
    rate: float | None = None
    fault_at: float = 5.0
    recover_after: float | None = 5.0
    promote_after: float = 3.0
    latency: float = 0.05
    inject: str | None = None
    recover: str | None = None
    failover_wait: float | None = None  # None: the config's (or the default, 0)
    out: Path = field(default_factory=Path.cwd)
    live: bool = True
    limits: list[Limit] = field(default_factory=list)
    table: str = "dbrouter_drill"
    asyncio: bool = False  # --async: the workload as asyncio tasks through an AsyncRouter
    asyncio_debug: bool = False  # --asyncio-debug: the loop in debug mode, slow callbacks counted

    def validate(self) -> None:
        """Raise `ConfigurationError` for any bad option, naming its flag and the allowed range.

        Called by `run_drill` before anything starts: every number is checked here (finite,
        in range), so that nothing can fail on it after the fault was injected.
        """
        if self.scenario not in SCENARIOS:
            raise ConfigurationError(f"unknown scenario {self.scenario!r}; choose one of {', '.join(sorted(SCENARIOS))}")
        if (self.local is None) == (self.config is None):
            raise ConfigurationError("give exactly one of --local ENGINE or --config FILE")
        if self.local is not None and self.local not in PROXIED_ENGINES + PATRONI:
            raise ConfigurationError(f"--local must be postgres, mariadb or patroni, got {self.local!r}")
        scenario = SCENARIOS[self.scenario]
        if scenario.local_only and self.local is None:
            raise ConfigurationError(f"scenario {self.scenario} acts on a local cluster; on a real cluster use "
                                     "--scenario shell with --inject CMD and --recover CMD")
        if self.local is not None and self.local not in scenario.engines:
            fits = sorted(name for name, s in SCENARIOS.items() if self.local in s.engines)
            raise ConfigurationError(f"scenario {self.scenario} does not run on --local {self.local} "
                                     f"(it runs on --local {' or '.join(scenario.engines[:2])}); "
                                     f"on {self.local}: {', '.join(fits)}")
        if self.asyncio_debug and not self.asyncio:
            raise ConfigurationError("--asyncio-debug needs --async")
        if self.scenario == "shell" and not self.inject:
            raise ConfigurationError("--scenario shell needs --inject CMD")
        check_range("", "--duration", self.duration, low=0, low_open=True, high=MAX_DRILL_SECONDS)
        check_range("", "--fault-at", self.fault_at, low=0, high=MAX_DRILL_SECONDS)
        if not self.fault_at < self.duration:
            raise ConfigurationError(f"--fault-at must be within the duration (0 to {self.duration:g}s), got {self.fault_at:g}")
        check_range("", "--recover-after", self.recover_after, low=0, high=MAX_DRILL_SECONDS, optional=True)
        check_range("", "--promote-after", self.promote_after, low=0, high=MAX_DRILL_SECONDS)
        check_range("", "--latency", self.latency, low=0, high=60)
        check_range("", "--failover-wait", self.failover_wait, low=0, high=3600, optional=True)  # the router's failover_wait
        check_range("", "--threads", self.threads, low=1, high=MAX_THREADS, integer=True)
        check_range("", "--write-ratio", self.write_ratio, low=0, high=1)
        check_range("", "--rate", self.rate, low=0, low_open=True, high=1e6, optional=True)
        check_range("", "--replicas", self.replicas, low=0, high=MAX_REPLICAS, integer=True)
        for limit in self.limits:
            low, high = LIMIT_RANGES.get(limit.name, (0.0, MAX_DRILL_SECONDS))
            check_range("", f"--{limit.name}", limit.limit, low=low, high=high)
        if self.config is not None and not Path(self.config).is_file():
            raise ConfigurationError(f"config file {self.config} does not exist")

    @property
    def recover_at(self) -> float | None:
        if self.recover_after is None or SCENARIOS[self.scenario].recover is None:
            return None
        if self.scenario == "shell" and not self.recover:
            return None  # nothing to run: no recovery to mark
        at = self.fault_at + self.recover_after
        return at if at < self.duration else None


class Drill:
    """One drill; `run_drill` is the usual entry point. Call `tear_down` when done.

    ``cluster``: a started local cluster of the ``--local`` engine to drill on instead of
    starting one (the tests share one); it is left running.
    """

    def __init__(self, options: DrillOptions, stream: TextIO, cluster: LocalCluster | None = None) -> None:
        self.options = options
        self.stream = stream
        self.cluster: LocalCluster | None = cluster
        self._owns_cluster = cluster is None
        self.proxies: dict[str, FaultProxy] = {}
        self.router: Router | AsyncRouter | None = None
        self.names: dict[str, str] = {}
        self.events: list[dict[str, Any]] = []
        self.workload: Workload | AsyncWorkload | None = None
        self.start = 0.0
        self.patroni: dict[str, Any] | None = None  # Patroni's own timeline, on a Patroni cluster

    def say(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    # -- set up and tear down ----------------------------------------------------

    def set_up(self) -> Router | AsyncRouter:
        """Start what the drill needs (cluster, proxies, router, and for ``--async`` the
        workload's event loop with the router opened on it) and check that a primary answers."""
        options = self.options
        router_class = AsyncRouter if options.asyncio else Router
        if options.local is not None:
            from ..cluster import make_cluster
            from ..faultproxy import FaultProxy

            if self.cluster is None:
                self.say(f"starting a local {options.local} cluster: primary + {options.replicas} replicas"
                         f"{' (synchronous)' if options.sync else ''} ...")
                self.cluster = make_cluster(options.local, replicas=options.replicas, sync=options.sync).start()
            elif self.cluster.engine != {"mysql": "mariadb"}.get(options.local, options.local):
                raise ConfigurationError(f"the cluster given is a {self.cluster.engine} cluster, not --local {options.local}")
            cluster = self.cluster
            if options.local in PATRONI:
                return self._check_reachable(self._patroni_router(cluster))
            urls = {}
            for node in cluster.nodes:
                proxy = FaultProxy(upstream=("127.0.0.1", node.port)).start()
                self.proxies[node.name] = proxy
                urls[node.name] = node.url.replace(f":{node.port}/", f":{proxy.port}/")
                self.names[f"127.0.0.1:{proxy.port}"] = node.name
            primary = cluster.primary
            replicas = [{"url": urls[n.name], "name": n.name} for n in cluster.replicas]
            router = router_class({"url": urls[primary.name], "name": primary.name}, replicas,
                                  **{**LOCAL_ROUTER_OPTIONS, "failover_wait": options.failover_wait or 0.0})
        else:
            given = {} if options.failover_wait is None else {"failover_wait": options.failover_wait}
            router = router_class.from_config(options.config, **given)  # --failover-wait 0 overrides the file too
        return self._check_reachable(router)

    def _patroni_router(self, cluster: LocalCluster) -> Router | AsyncRouter:
        """A router on the members' own addresses, named as Patroni names them; it finds the
        leader by probing (primary_discovery auto), as it would with any failover manager."""
        leader = cluster.primary
        for node in cluster.nodes:
            self.names[f"{node.host}:{node.port}"] = node.name
        replicas = [{"url": node.url, "name": node.name} for node in cluster.replicas]
        router_class = AsyncRouter if self.options.asyncio else Router
        return router_class({"url": leader.url, "name": leader.name}, replicas,
                            **{**PATRONI_ROUTER_OPTIONS, "failover_wait": self.options.failover_wait or 0.0})

    def _check_reachable(self, router: Router | AsyncRouter) -> Router | AsyncRouter:
        """Make the workload (an `AsyncWorkload` opens the router on its loop), then wait for
        a probe round: `ConfigurationError` when no primary answers."""
        self.router = router
        timeout = router.config.connect.connect_timeout + 10
        if isinstance(router, AsyncRouter):
            workload = AsyncWorkload(router, debug=self.options.asyncio_debug, **self._workload_settings())
            self.workload = workload  # before it opens: tear_down closes it whatever happens
            workload.open(timeout=timeout)
            workload.call(lambda: router.wait_for_probes(1, timeout=timeout), timeout + 5)
        else:
            self.workload = Workload(router, **self._workload_settings())
            router.wait_for_probes(1, timeout=timeout)
        problem = router.topology.primary_problem()
        if problem is not None:
            raise ConfigurationError(f"cluster not reachable, no fault injected: {problem}")
        for routed in router.nodes:
            self.names.setdefault(routed.name, routed.name)
        return router

    def tear_down(self) -> None:
        if isinstance(self.workload, AsyncWorkload):
            self.workload.close(timeout=30)  # the router, on the workload's loop, then the loop
        elif isinstance(self.router, Router):
            self.router.close()
        for proxy in self.proxies.values():
            proxy.stop()
        if self.cluster is not None and self._owns_cluster:
            self.cluster.destroy()

    # -- the drill ---------------------------------------------------------------------

    def run(self) -> DrillReport:
        options = self.options
        router = self.set_up()
        workload = self.workload
        assert workload is not None
        workload.prepare()
        if self.cluster is not None:
            self.cluster.wait_replicated(timeout=30)
        else:
            time.sleep(1.0)  # let replicas create the table
        scenario = SCENARIOS[options.scenario]
        target = DrillTarget(cluster=self.cluster, proxies=self.proxies, inject_cmd=options.inject,
                             recover_cmd=options.recover, promote_after=options.promote_after, latency=options.latency)
        router.on("*", lambda e: self.events.append(
            {"t": round(time.monotonic() - self.start, 3), "name": e.name, "node": self.names.get(e.node or "", e.node),
             "message": e.message}))
        live = LiveView(router, workload, self.stream, lambda name: self.names.get(name, name))
        timeline = self._patroni_timeline()
        recover_at = options.recover_at
        workers = f"{options.threads} asyncio tasks" if options.asyncio else f"{options.threads} threads"
        self.say(f"drill {options.scenario}: {workers}, {options.write_ratio:.0%} writes, "
                 f"{options.duration:g}s; fault at {options.fault_at:g}s"
                 + (f", recovery at {recover_at:g}s" if recover_at is not None else ""))
        workload.start()
        self.start = workload.started_at
        # The date only labels the report (for people, and `dbrouter drill compare`); every
        # measurement is monotonic.
        started = datetime.now(timezone.utc).isoformat(timespec="seconds")
        if options.live:
            live.start()
        errors: list[str] = []
        try:
            self._sleep_until(options.fault_at)
            fault_time = time.monotonic()
            live.marks.append(f"fault: {scenario.name}")
            scenario.inject(target)
            if recover_at is not None and scenario.recover is not None:
                self._sleep_until(recover_at)
                live.marks.append("recovery")
                try:
                    scenario.recover(target)
                except DbRouterError as exc:
                    # The fault phase ran: its numbers are worth a report, which says the recovery failed.
                    errors.append(str(exc))
                    self.say(f"dbrouter drill: {exc}")
            self._sleep_until(options.duration)
            if timeline is not None:
                self._await_patroni_leader(timeline, target)
        finally:
            stopped = workload.stop(timeout=30)
            live.stop()
            target.wait_timers()
            if timeline is not None:
                timeline.stop()
        end = time.monotonic()
        if timeline is not None:
            self.patroni = timeline.summary(self.start, end)
        if not stopped:
            target.notes.append(f"some workload {'tasks' if options.asyncio else 'threads'} did not stop within 30s")
        lost, duplicated = self._check_writes(workload, target)
        ops = workload.snapshot()
        results = summarise(ops, start=self.start, fault_at=fault_time, events=self.events, lost=lost, duplicated=duplicated)
        if isinstance(workload, AsyncWorkload):
            target.notes.extend(f"a workload task failed outside an operation: {failure}" for failure in workload.failures)
            if workload.debug:
                results["slow_callbacks"] = workload.slow_callbacks
                results["slow_callbacks_computed"] = workload.slow_computed
                results["slow_callbacks_blocking"] = workload.slow_blocking
                results["slow_callbacks_waited"] = workload.slow_waited
                results["slow_callbacks_preempted"] = workload.slow_preempted
                if workload.slow_computed or workload.slow_blocking:
                    target.notes.append(
                        f"asyncio debug mode: {workload.slow_computed} callbacks used {SLOW_CALLBACK * 1000:g} ms or "
                        f"more of CPU on the workload's loop, {workload.slow_blocking} made a blocking call there; "
                        "the first reports: "
                        + "; ".join(workload.slow_callback_reports[:3]))
        for limit in options.limits:
            limit.measured = {"max-write-downtime": results["write_unavailability"],
                              "min-read-availability": results["read_availability"],
                              "min-write-availability": results["write_availability"],
                              "max-lost-writes": (None if results["lost_writes"] is None
                                                  else float(results["lost_writes"])),
                              "max-latency": results["max_latency"]}[limit.name]
        return DrillReport(
            scenario=options.scenario,
            engine=router.primary.adapter.engine if options.local is None else options.local,
            settings={"workload": workload.kind, "driver": router.primary.pool.adapter.driver,
                      "threads": options.threads, "write_ratio": options.write_ratio, "rate": options.rate,
                      "replicas": options.replicas if options.local else len(router.replicas), "sync": options.sync,
                      "failover_wait": router.config.routing.failover_wait,  # what the router used
                      "health_interval": router.config.monitor.health_interval},
            fault_at=round(fault_time - self.start, 3),
            recover_at=recover_at,
            duration=round(end - self.start, 3),
            timeline=build_timeline(ops, self.start, end),
            results=results,
            events=self.events,
            notes=target.notes,
            limits=options.limits,
            errors=errors,
            started=started,
            patroni=self.patroni,
        )

    def _workload_settings(self) -> dict[str, Any]:
        """`Workload` / `AsyncWorkload` settings; every worker stops by the drill's own end
        (a Patroni drill may run past --duration), plus room."""
        options = self.options
        overtime = PATRONI_OVERTIME + PATRONI_SETTLE if options.local in PATRONI else 0.0
        return {"threads": options.threads, "write_ratio": options.write_ratio, "rate": options.rate,
                "duration": options.duration + overtime + 30, "table": options.table}

    def _patroni_timeline(self) -> Any:
        """Patroni's own view, sampled from every member's REST API from now on (None when
        the cluster is not a Patroni one)."""
        from ..cluster.patroni import PatroniCluster, PatroniTimeline

        if not isinstance(self.cluster, PatroniCluster):
            return None
        return PatroniTimeline.of(self.cluster).start()

    def _await_patroni_leader(self, timeline: Any, target: DrillTarget) -> None:
        """Go on past ``--duration`` until Patroni has had a running leader for `PATRONI_SETTLE`
        seconds (at most `PATRONI_OVERTIME`), so that the report sees the outage end."""
        began = time.monotonic()
        deadline = began + PATRONI_OVERTIME
        while time.monotonic() < deadline:
            leader, since = timeline.leader_since()
            if leader is not None and since is not None and time.monotonic() - since >= PATRONI_SETTLE:
                break
            time.sleep(0.1)
        else:
            target.notes.append(f"Patroni had no running leader {PATRONI_OVERTIME:g}s after --duration")
            return
        extra = time.monotonic() - began
        if extra >= 0.1:
            target.notes.append(f"ran {extra:.1f}s past --duration, until Patroni had had a running leader "
                                f"for {PATRONI_SETTLE:g}s")

    def _sleep_until(self, offset: float) -> None:
        delay = self.start + offset - time.monotonic()
        if delay > 0:
            time.sleep(delay)

    def _check_writes(self, workload: Workload | AsyncWorkload,
                      target: DrillTarget) -> tuple[list[int] | None, list[int] | None]:
        """Read the ids back from the primary (waiting a few probe rounds for one to be known);
        (None, None) when they cannot be read back."""
        router = self.router
        assert router is not None
        deadline = time.monotonic() + max(5.0, 3 * router.config.monitor.health_interval + router.config.connect.connect_timeout)
        while True:
            while router.topology.primary_problem() is not None and time.monotonic() < deadline:
                router.topology.wake()
                time.sleep(0.2)
            try:
                return workload.check_writes(workload.read_ids())
            except DbRouterError as exc:
                # Only a read: a connection lost on the way (a primary Patroni is still
                # settling) is read again until the deadline, never taken for an answer.
                if time.monotonic() >= deadline:
                    target.notes.append(f"could not read the writes back: {exc}")
                    return None, None
                time.sleep(0.2)


def run_drill(options: DrillOptions, stream: TextIO | None = None, *, cluster: LocalCluster | None = None) -> DrillReport:
    """Run a drill, write ``dbrouter-drill-<scenario>.json`` and ``.html`` to ``options.out``,
    print the summary, and return the report. Raises `ConfigurationError` for bad options
    or an unreachable cluster, before any fault is injected. ``cluster``: a started local
    cluster of the ``--local`` engine to use (and leave running) instead of starting one."""
    options.validate()
    stream = stream or sys.stdout
    drill = Drill(options, stream, cluster)
    try:
        report = drill.run()
    finally:
        drill.tear_down()
    options.out.mkdir(parents=True, exist_ok=True)
    json_path = options.out / f"dbrouter-drill-{options.scenario}.json"
    html_path = options.out / f"dbrouter-drill-{options.scenario}.html"
    report.write_json(json_path)
    write_private(html_path, render_html(report))
    drill.say(report.human())
    drill.say(f"report: {json_path}\nchart:  {html_path}")
    return report
