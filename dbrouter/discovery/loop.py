"""The thread that keeps a router's nodes in step with its provider.

Every ``discovery_interval`` it asks the provider for the members, adds the ones the
router lacks (`Router.add_replica`'s path) and drains the ones it added that are gone
from two answers in a row (one missing answer is often a replica reconnecting). A
member is matched to a node by address first, then by name, so a server configured
under one name and reported under another is not added twice. It never removes the
primary or a configured node, and while the provider fails it changes nothing.

It holds no lock while it calls the provider (network I/O) or the router.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Sequence

from .. import _fork
from ..url import NodeAddress, mask_password
from . import PRIMARY, DiscoveryError, Member, Provider, ask

if TYPE_CHECKING:
    from ..events import Events
    from ..topology import Node, Topology

__all__ = ["DiscoveryLoop", "member_address"]

log = logging.getLogger("dbrouter.discovery")

MISSING_ANSWERS = 2
"""Answers in a row without a member before its node is drained."""


class DiscoveryLoop:
    """Follows ``provider`` for one router."""

    def __init__(self, provider: Provider, *, interval: float, timeout: float, topology: Topology, events: Events,
                 template: NodeAddress, add: Callable[[NodeAddress, str], Node],
                 remove: Callable[[str], None], discovered: Sequence[str]) -> None:
        self.provider = provider
        self._interval = interval
        self._timeout = timeout
        self._topology = topology
        self._events = events
        self._template = template
        self._add = add
        self._remove = remove
        self._discovered = set(discovered)  # names of the nodes the provider brought: only those leave
        self._missing: dict[str, int] = {}
        self.failing: str | None = None  # the last failure, while the provider fails
        self.last_answer: float | None = None  # monotonic time of the last good answer
        self.members: tuple[Member, ...] = ()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dbrouter-discovery", daemon=True)
        self._started = False
        self._dormant = False
        self._revive_lock = threading.Lock()  # held only to start the thread once in a forked child
        _fork.register(self)

    def start(self) -> None:
        if not self._started:
            self._started = True
            self._thread.start()

    def _after_fork_in_child(self) -> None:
        """In a forked child the thread is gone: start it again at the router's first use."""
        self._thread = threading.Thread(target=self._run, name="dbrouter-discovery", daemon=True)
        self._revive_lock = threading.Lock()
        self._dormant = self._started and not self._stop.is_set()

    def revive(self) -> None:
        """At the router's first use in a forked child: start the thread again, once (each
        pool's first checkout there calls it, possibly on several threads at once)."""
        if not self._dormant:
            return
        with self._revive_lock:
            if not self._dormant:
                return
            self._dormant = False
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        try:
            self.provider.close()
        except Exception:  # noqa: BLE001 - closing must not fail the router's close
            log.exception("discovery: closing %s failed", self.provider.source)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.sync()
            except Exception:  # noqa: BLE001 - the loop must outlive any bug
                log.exception("discovery: a round failed")

    def sync(self) -> None:
        """Ask once and bring the router's nodes in step (the thread does it every interval)."""
        try:
            members = ask(self.provider, self._timeout)
        except Exception as exc:  # noqa: BLE001 - a provider's own bug is a failed answer too
            self._failed(exc)
            return
        self.last_answer = time.monotonic()
        self.members = tuple(members)
        if self.failing is not None:
            self.failing = None
            self._events.emit("discovery_restored", None, f"{self.provider.source} answers again")
        self._follow(members)

    def _failed(self, exc: BaseException) -> None:
        message = str(exc) if isinstance(exc, DiscoveryError) else \
            f"{self.provider.source}: {type(exc).__name__}: {mask_password(str(exc))}"
        first = self.failing is None
        self.failing = message
        if first:
            self._events.emit("discovery_failed", None, f"{message}; the nodes stay as they are",
                              level=logging.WARNING)

    def _follow(self, members: list[Member]) -> None:
        topology = self._topology
        primary = topology.snapshot.primary
        by_address = {(n.address.host, n.address.port): n for n in topology.nodes}
        by_name = {n.name: n for n in topology.nodes}
        present: set[str] = set()
        wake = False
        for member in members:
            node = by_address.get((member.host, member.port))
            if node is None:
                moved = by_name.get(member.name)
                if moved is not None:  # the same name at a new address: the old one goes
                    if moved is primary or moved.name not in self._discovered:
                        log.warning("discovery: %s reports %s at %s:%s, which is configured elsewhere: ignored",
                                    self.provider.source, member.name, member.host, member.port)
                        present.add(moved.name)
                        continue
                    self._drain(moved.name)
                node = self._join(member)
                if node is None:
                    continue
            present.add(node.name)
            if member.role == PRIMARY and node is not primary:
                wake = True
        for name in sorted(self._discovered - present):
            if name == topology.snapshot.primary.name:
                continue  # the probes move the primary; it leaves once it is a replica
            self._missing[name] = self._missing.get(name, 0) + 1
            if self._missing[name] >= MISSING_ANSWERS:
                self._drain(name)
        for name in present:
            self._missing.pop(name, None)
        if wake:
            topology.wake()  # the source saw a new primary: the probes confirm it at once

    def _join(self, member: Member) -> Node | None:
        address = member_address(self._template, member)
        try:
            node = self._add(address, member.name)
        except Exception as exc:  # noqa: BLE001 - one bad member must not stop the others
            log.warning("discovery: cannot add %s from %s: %s", member.name, self.provider.source, exc)
            return None
        self._discovered.add(node.name)
        return node

    def _drain(self, name: str) -> None:
        self._missing.pop(name, None)
        try:
            self._remove(name)
        except Exception as exc:  # noqa: BLE001 - tried again at the next answer
            log.warning("discovery: cannot remove %s: %s", name, exc)
            return
        self._discovered.discard(name)

    def stats(self) -> dict[str, Any]:
        age = None if self.last_answer is None else time.monotonic() - self.last_answer
        return {"source": self.provider.source, "members": [m.name for m in self.members],
                "last_answer_age": age, "failing": self.failing}


def member_address(template: NodeAddress, member: Member) -> NodeAddress:
    """The template's user, password, database and options at the member's host and port."""
    return dataclasses.replace(template, host=member.host, port=member.port)
