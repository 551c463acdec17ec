"""Router events: listeners by name, and a log line for each event.

Listeners are plain callables registered with `Events.on`; they run on the
thread that noticed the event (often the monitor), so they must be quick. A
listener that raises is logged and does not stop the others.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from . import _fork
from .errors import ConfigurationError

__all__ = ["EVENT_NAMES", "Event", "Events"]

log = logging.getLogger("dbrouter.events")

EVENT_NAMES = frozenset(
    {
        "node_down",  # a node stopped answering probes
        "node_up",  # a node answers probes again
        "lag_excluded",  # a replica lags more than max_replica_lag and gets no reads
        "lag_restored",  # it caught up and gets reads again
        "slow_ejected",  # a replica's reads are much slower than the others': no reads for a while
        "slow_restored",  # its time out is over: back in rotation
        "fallback_to_primary",  # no replica can serve; reads go to the primary
        "replicas_restored",  # a replica can serve again after a fallback period
        "breaker_open",  # a node failed fail_max times in a row: out of rotation
        "breaker_half_open",  # reset_timeout passed: one trial call may go through
        "breaker_closed",  # the trial (or a recovery) succeeded: back in rotation
        "failover",  # another node now reports itself writable and is the primary
        "split_brain",  # more than one node accepts writes: writes stop
        "split_brain_resolved",  # one writable node again
        "same_server",  # two configured nodes are one server (a configuration error): writes stop
        "node_added",  # a replica joined the router (add_replica, discovery)
        "node_removed",  # a replica left the router: no new reads, its pool drains
        "discovery_failed",  # the topology provider cannot say who the members are: nodes stay
        "discovery_restored",  # it answers again
        "retry_budget_exhausted",  # retries would add more than retry_budget: calls raise instead
        "pool_exhausted",  # a caller timed out waiting for a connection
        "leak",  # a connection was held longer than leak_threshold
    }
)


@dataclass(frozen=True)
class Event:
    """Something that happened to a node or to routing."""

    name: str
    node: str | None = None
    message: str = ""
    data: dict[str, Any] = field(default_factory=dict)


class Events:
    """Registry of listeners, keyed by event name (``"*"`` for every event)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._listeners: dict[str, list[Callable[[Event], None]]] = {}
        _fork.register(self)

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()  # a thread of the parent may have held it at the fork

    def on(self, name: str, listener: Callable[[Event], None]) -> Callable[[], None]:
        """Call ``listener(event)`` for each event ``name``; returns a function that unsubscribes."""
        if name != "*" and name not in EVENT_NAMES:
            raise ConfigurationError(f"unknown event {name!r}; known: {', '.join(sorted(EVENT_NAMES))}")
        with self._lock:
            self._listeners.setdefault(name, []).append(listener)

        def unsubscribe() -> None:
            with self._lock:
                if listener in self._listeners.get(name, []):
                    self._listeners[name].remove(listener)

        return unsubscribe

    def emit(self, name: str, node: str | None = None, message: str = "", *, level: int = logging.INFO, **data: Any) -> None:
        event = Event(name=name, node=node, message=message, data=data)
        log.log(level, "%s%s: %s", name, f" [{node}]" if node else "", message)
        with self._lock:
            listeners = [*self._listeners.get(name, ()), *self._listeners.get("*", ())]
        for listener in listeners:
            try:
                listener(event)
            except Exception:  # noqa: BLE001 - one bad listener must not break routing
                log.exception("listener for %s failed", name)
