"""``discovery = "dns"``: the servers that DNS names resolve to, asked again every interval.

The shape of RDS/Aurora reader endpoints (one name, an A record per reader) and of
Kubernetes headless services (an A/AAAA record per pod, or SRV records with ports).
A name that starts with ``_`` (``_postgresql._tcp.db.internal``) is read as SRV: each
target with its own port, its address from the same resolver. Any other name is read
as A and AAAA, each address on the name's port (``name:5433``) or the primary URL's.

Uses dnspython (extra ``dns``): it asks the nameservers given (``host`` or
``host:port``) or the system's, with a deadline, and tells NXDOMAIN from no answer.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Any, Sequence

from . import REPLICA, DiscoveryError, Member

__all__ = ["DnsProvider"]

log = logging.getLogger("dbrouter.discovery")


def _split_port(text: str, default: int, what: str) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]:port`` or a bare IPv6 address."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, ""
    if not port_text:
        return host, default
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise DiscoveryError(f"dns: {what} {text!r} has a bad port (1 to 65535)")
    return host, int(port_text)


def _node_name(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class DnsProvider:
    """Members from A/AAAA or SRV records of ``names``; every member is a replica (DNS has
    no roles: the probes find the primary)."""

    def __init__(self, names: Sequence[str], default_port: int, nameservers: Sequence[str] = ()) -> None:
        try:
            import dns.nameserver
            import dns.resolver
        except ImportError as exc:  # pragma: no cover - the extra is missing
            raise DiscoveryError("dns discovery needs dnspython: pip install 'dbrouter[dns]'") from exc
        self._names = [_split_port(name, default_port, "name") for name in names]
        resolver = dns.resolver.Resolver(configure=not nameservers)
        if nameservers:
            servers: list[Any] = []
            for text in nameservers:
                host, port = _split_port(text, 53, "nameserver")
                try:
                    ipaddress.ip_address(host)
                except ValueError:
                    raise DiscoveryError(f"dns: nameserver {text!r} must be an IP address") from None
                servers.append(dns.nameserver.Do53Nameserver(host, port))
            resolver.nameservers = servers
        self._resolver = resolver
        self.source = "dns " + ", ".join(name.strip() for name in names)

    def members(self, timeout: float) -> list[Member]:
        import dns.exception
        import dns.resolver

        self._resolver.lifetime = timeout
        self._resolver.timeout = timeout
        found: dict[str, Member] = {}
        try:
            for name, port in self._names:
                members = self._srv(name) if name.startswith("_") else self._addresses(name, port)
                for member in members:
                    found.setdefault(member.name, member)
        except dns.resolver.LifetimeTimeout:
            raise DiscoveryError(f"{self.source}: no answer from the nameservers within {timeout:g}s") from None
        except dns.resolver.NoNameservers as exc:
            raise DiscoveryError(f"{self.source}: every nameserver failed ({exc})") from None
        except dns.exception.DNSException as exc:
            raise DiscoveryError(f"{self.source}: {type(exc).__name__}: {exc}") from None
        if not found:
            raise DiscoveryError(f"{self.source}: no address records")
        return list(found.values())

    def _resolve(self, name: str, rdtype: str) -> Any:
        """The answer for ``name`` and ``rdtype``, None when the name has no such record;
        `DiscoveryError` naming it when it does not exist."""
        import dns.resolver

        try:
            return self._resolver.resolve(name, rdtype, search=False)
        except dns.resolver.NoAnswer:
            return None
        except dns.resolver.NXDOMAIN:
            raise DiscoveryError(f"{self.source}: {name} does not exist (NXDOMAIN)") from None

    def _addresses(self, name: str, port: int) -> list[Member]:
        members = []
        for rdtype in ("A", "AAAA"):
            for record in self._resolve(name, rdtype) or ():
                host = record.to_text()
                members.append(Member(_node_name(host, port), host, port, REPLICA))
        return members

    def _srv(self, name: str) -> list[Member]:
        answer = self._resolve(name, "SRV")
        if answer is None:
            return []
        members = []
        for record in sorted(answer, key=lambda r: (r.priority, -r.weight, r.target.to_text(), r.port)):
            target = record.target.to_text(omit_final_dot=True)
            try:
                ipaddress.ip_address(target)
                hosts = [target]
            except ValueError:
                hosts = [m.host for m in self._addresses(target, record.port)]
            if not hosts:
                log.warning("%s: SRV target %s has no address record: skipped", self.source, target)
                continue
            # One server per target: its first address (a target with several is one server).
            members.append(Member(f"{target}:{record.port}", hosts[0], record.port, REPLICA))
        return members

    def close(self) -> None:
        """Nothing to release: each question uses its own socket."""
