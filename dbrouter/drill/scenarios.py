"""Built-in faults for drills on a local cluster, and shell commands for real ones.

A scenario injects one fault at the drill's fault time and, when the drill
has a recovery time, undoes it. Local scenarios act on the cluster the drill
started (every node sits behind a fault proxy, so hangs and latency can be
injected as well as crashes); the ``patroni-*`` scenarios act through Patroni
on a local Patroni cluster (``--local patroni``); the ``shell`` scenario runs the
user's own commands, for example a Patroni switchover or a cloud failover.
"""

from __future__ import annotations

import logging
import subprocess
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from ..errors import ConfigurationError
from ..url import mask_password

if TYPE_CHECKING:
    from ..cluster import LocalCluster, LocalNode, PatroniCluster
    from ..faultproxy import FaultProxy

__all__ = ["SCENARIOS", "DrillTarget", "Scenario", "scenario_names"]

PROXIED_ENGINES = ("postgres", "mariadb", "mysql")  # local clusters whose nodes the drill puts behind fault proxies
PATRONI = ("patroni",)

log = logging.getLogger("dbrouter.drill")


@dataclass
class DrillTarget:
    """What a scenario may act on: the local cluster and the proxy in front of each node."""

    cluster: LocalCluster | None = None
    proxies: dict[str, FaultProxy] = field(default_factory=dict)
    inject_cmd: str | None = None
    recover_cmd: str | None = None
    promote_after: float = 3.0
    latency: float = 0.05
    command_timeout: float = 120.0
    notes: list[str] = field(default_factory=list)
    _timers: list[threading.Timer] = field(default_factory=list)
    _state: dict[str, Any] = field(default_factory=dict)

    @property
    def local(self) -> LocalCluster:
        if self.cluster is None:
            raise ConfigurationError("this scenario needs a local cluster (--local); on a real one use --inject/--recover")
        return self.cluster

    @property
    def patroni(self) -> PatroniCluster:
        from ..cluster.patroni import PatroniCluster

        if not isinstance(self.cluster, PatroniCluster):
            raise ConfigurationError("this scenario needs a local Patroni cluster (--local patroni)")
        return self.cluster

    def replica(self) -> LocalNode:
        running = [n for n in self.local.replicas if n.running]
        if not running:
            raise ConfigurationError("this scenario needs a running replica; start the cluster with --replicas 1 or more")
        return running[0]

    def later(self, delay: float, action: Callable[[], None], what: str) -> None:
        """Run ``action`` after ``delay`` seconds on a timer thread (joined by `cancel_timers`)."""
        def run() -> None:
            try:
                action()
                self.notes.append(what)
            except Exception as exc:  # noqa: BLE001 - reported in the drill's notes
                self.notes.append(f"{what} failed: {exc}")
                log.warning("%s failed: %s", what, exc)
        timer = threading.Timer(delay, run)
        timer.daemon = True
        timer.start()
        self._timers.append(timer)

    def wait_timers(self, timeout: float = 60.0) -> None:
        for timer in self._timers:
            timer.join(timeout)

    def run_command(self, command: str, what: str) -> None:
        """Run a user's shell command (``what`` is ``inject`` or ``recover``); a failure stops the
        drill with its exit code and the tail of its output.

        The command itself is never repeated in a note, a log line or an error (it may carry a
        password, e.g. a URL or ``PGPASSWORD=...``), and the output is shown with anything
        that looks like a password masked, only in the error.
        """
        log.info("running the --%s command", what)
        try:
            done = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=self.command_timeout)
        except subprocess.TimeoutExpired:  # its message quotes the command
            raise ConfigurationError(f"the --{what} command did not finish within {self.command_timeout:g}s") from None
        if done.returncode != 0:
            output = mask_password((done.stderr or done.stdout).strip()[-2000:])
            raise ConfigurationError(f"the --{what} command failed with exit code {done.returncode}:\n{output}")
        self.notes.append(f"{what}: the --{what} command succeeded")


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    inject: Callable[[DrillTarget], None]
    recover: Callable[[DrillTarget], None] | None = None
    local_only: bool = True
    engines: tuple[str, ...] = PROXIED_ENGINES
    """The ``--local`` clusters it runs on."""


def _kill_primary(t: DrillTarget) -> None:
    t._state["old_primary"] = t.local.primary
    t.local.primary.kill()


def _restart_old_primary(t: DrillTarget) -> None:
    t._state["old_primary"].start()


def _kill_and_promote(t: DrillTarget) -> None:
    cluster = t.local
    old = cluster.primary
    t._state["old_primary"] = old
    old.kill()

    def promote() -> None:
        cluster.promote(cluster.most_advanced())
    t.later(t.promote_after, promote, f"promoted a replica {t.promote_after:g}s after the kill")


def _rejoin_old_primary(t: DrillTarget) -> None:
    t.wait_timers()
    old = t._state["old_primary"]
    t.local.rejoin(old)


def _stop_replica(t: DrillTarget) -> None:
    node = t.replica()
    t._state["replica"] = node
    node.stop()


def _start_replica(t: DrillTarget) -> None:
    t._state["replica"].start()


def _blackhole_replica(t: DrillTarget) -> None:
    node = t.replica()
    t._state["replica"] = node
    t.proxies[node.name].blackhole()


def _clear_proxy(t: DrillTarget) -> None:
    t.proxies[t._state["replica"].name].pass_through()


def _latency(t: DrillTarget) -> None:
    node = t.replica()
    t._state["replica"] = node
    t.proxies[node.name].latency(t.latency)


def _pause_replication(t: DrillTarget) -> None:
    node = t.replica()
    t._state["replica"] = node
    t.local.pause_replication(node)


def _resume_replication(t: DrillTarget) -> None:
    t.local.resume_replication(t._state["replica"])


def _restart_replica(t: DrillTarget) -> None:
    t.replica().restart()


def _shell_inject(t: DrillTarget) -> None:
    if not t.inject_cmd:
        raise ConfigurationError("the shell scenario needs --inject CMD")
    t.run_command(t.inject_cmd, "inject")


def _shell_recover(t: DrillTarget) -> None:
    if t.recover_cmd:
        t.run_command(t.recover_cmd, "recover")


def _patroni_switchover(t: DrillTarget) -> None:
    new = t.patroni.switchover()
    t.notes.append(f"Patroni switched over to {new.name}")


def _patroni_failover(t: DrillTarget) -> None:
    new = t.patroni.failover()
    t.notes.append(f"Patroni failed over to {new.name}")


def _patroni_crash(t: DrillTarget) -> None:
    leader = t.patroni.crash_leader_postmaster()
    t.notes.append(f"killed (-9) the postmaster of the leader {leader.name}; its Patroni restarts it in place")


def _patroni_lose_leader(t: DrillTarget) -> None:
    leader = t.patroni.kill_leader()
    t._state["old_leader"] = leader
    t.notes.append(f"killed (-9) the Patroni and the postmaster of the leader {leader.name}")


def _patroni_rejoin(t: DrillTarget) -> None:
    """Restart the killed Patroni once another member leads: started before the old leader key
    expired, it would take the lead back in place and there would be no election to see."""
    from ..cluster.patroni import RETRY_TIMEOUT, TTL

    cluster, old = t.patroni, t._state["old_leader"]
    new = cluster.wait_leader(timeout=TTL + 2 * RETRY_TIMEOUT + 60, not_on=old)
    cluster.restart_patroni(old, wait=False)  # it rewinds and rejoins meanwhile; the drill goes on
    t.notes.append(f"restarted the Patroni of {old.name} once {new.name} led; {old.name} rejoins as a replica")


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("kill-primary", "SIGKILL the primary; recovery restarts it", _kill_primary, _restart_old_primary),
        Scenario("kill-primary-promote", "SIGKILL the primary, promote the most advanced replica after --promote-after; "
                 "recovery rejoins the old primary as a replica", _kill_and_promote, _rejoin_old_primary),
        Scenario("stop-replica", "shut a replica down cleanly; recovery starts it", _stop_replica, _start_replica),
        Scenario("blackhole-replica", "a replica accepts connections but never answers; recovery clears it",
                 _blackhole_replica, _clear_proxy),
        Scenario("latency", "add --latency seconds each way to a replica; recovery clears it", _latency, _clear_proxy),
        Scenario("pause-replication", "pause replay on a replica so that it lags; recovery resumes it",
                 _pause_replication, _resume_replication),
        Scenario("restart-replica", "restart a replica (stop, then start)", _restart_replica, None),
        Scenario("patroni-switchover", "a planned Patroni switchover (REST POST /switchover) to a replica",
                 _patroni_switchover, None, engines=PATRONI),
        Scenario("patroni-failover", "a manual Patroni failover (REST POST /failover) to the synchronous or "
                 "least lagging replica", _patroni_failover, None, engines=PATRONI),
        Scenario("patroni-crash", "kill -9 of the leader's postmaster; its Patroni restarts it in place (no election)",
                 _patroni_crash, None, engines=PATRONI),
        Scenario("patroni-lose-leader", "kill -9 of the leader's Patroni and postmaster: an election once the leader "
                 "key expires; recovery restarts that Patroni once another member leads, and it rejoins",
                 _patroni_lose_leader, _patroni_rejoin, engines=PATRONI),
        Scenario("shell", "run --inject CMD at the fault time and --recover CMD at the recovery time",
                 _shell_inject, _shell_recover, local_only=False, engines=PROXIED_ENGINES + PATRONI),
    )
}


def scenario_names() -> list[str]:
    return sorted(SCENARIOS)
