"""Topology providers: where the router learns which nodes exist.

A provider answers one question, "which servers are in the cluster now?", from a
source that knows: Patroni's REST API, DNS records, the MySQL/MariaDB primary's
list of connected replicas. The router asks it every ``discovery_interval`` on its
own thread (``dbrouter-discovery``), adds the members it has not seen
(`Router.add_replica`) and drains the ones that are gone (`Router.remove_replica`).
Roles stay the probes' business (``primary_discovery = "auto"``); a provider's
role is a hint that wakes the probes when it changes.

To add a source (Aurora's topology table, Consul), write a class with the two
methods of `Provider` and pass an instance as ``Router(..., discovery=instance)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

from ..errors import DiscoveryError

__all__ = ["DiscoveryError", "Member", "Provider", "ask"]

PRIMARY = "primary"
REPLICA = "replica"


@dataclass(frozen=True)
class Member:
    """One server as the source reports it.

    ``name`` is the node's name in the router (Patroni's member name, ``host:port``
    for DNS); ``host`` and ``port`` replace those of the router's URL, whose user,
    password, database and options every member shares.
    """

    name: str
    host: str
    port: int
    role: str | None = None
    """``"primary"``, ``"replica"``, or None where the source does not say."""
    state: str | None = None
    """The source's own word for the member's state (Patroni: ``running``, ``streaming``,
    ``stopped``), for logs and `Router.stats`; routing does not depend on it."""


@runtime_checkable
class Provider(Protocol):
    """What the router needs from a topology source."""

    @property
    def source(self) -> str:
        """What is asked, for messages: ``patroni at http://127.0.0.1:8008``."""
        ...

    def members(self, timeout: float) -> Sequence[Member]:
        """Every member now, within ``timeout`` seconds; raise `DiscoveryError` when the
        source cannot tell (the router then keeps the members it has). An empty list
        is a failure too: no source legitimately reports a cluster of no servers."""
        ...

    def close(self) -> None:
        """Release what the provider holds (sockets, threads); called once at router close."""
        ...


def ask(provider: Provider, timeout: float) -> list[Member]:
    """``provider``'s members now; an empty answer is a `DiscoveryError` like any failure."""
    members = list(provider.members(timeout))
    if not members:
        raise DiscoveryError(f"{provider.source}: no members reported")
    return members
