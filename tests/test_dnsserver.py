"""tests/dnsserver.py, the DNS server the tests control, asked by dnspython's own resolver
exactly as DNS discovery will ask it."""

from __future__ import annotations

import socket

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rdatatype
import dns.resolver
import pytest

from .dnsserver import DNSServer


def resolver(server: DNSServer) -> dns.resolver.Resolver:
    """A resolver that asks only ``server`` (no /etc/resolv.conf), and gives up quickly."""
    found = dns.resolver.Resolver(configure=False)
    found.nameservers = [server.host]
    found.port = server.port
    found.lifetime = 3.0
    return found


def addresses(answer: dns.resolver.Answer) -> list[str]:
    return sorted(rdata.to_text() for rdata in answer)


def test_a_and_aaaa_records(dns_server: DNSServer) -> None:
    assert dns_server.port < 32768
    dns_server.set("db.test.", "A", ["127.0.0.1", "127.0.0.2"])
    dns_server.set("db.test", "AAAA", ["::1"])  # a name without the final dot is the same name
    ask = resolver(dns_server)
    answer = ask.resolve("db.test.", "A")
    assert addresses(answer) == ["127.0.0.1", "127.0.0.2"]
    assert answer.rrset is not None and answer.rrset.ttl == 1  # the short default TTL
    assert answer.response.flags & dns.flags.AA
    assert addresses(ask.resolve("DB.Test.", "AAAA")) == ["::1"]  # names are case-insensitive
    assert dns_server.count("db.test.", "A") == 1 and dns_server.count("db.test.", "AAAA") == 1
    assert dns_server.count() == 2


def test_srv_carries_the_targets_addresses_in_the_additional_section(dns_server: DNSServer) -> None:
    dns_server.set("_postgresql._tcp.db.test.", "SRV", [(0, 1, 5433, "n1.db.test."), (0, 1, 5434, "n2.db.test."),
                                                         (10, 1, 5435, "n3.db.test.")])
    dns_server.set("n1.db.test.", "A", ["127.0.0.1"])
    dns_server.set("n2.db.test.", "A", ["127.0.0.2"])
    dns_server.set("n2.db.test.", "AAAA", ["::1"])  # n3: no address known, none added
    answer = resolver(dns_server).resolve("_postgresql._tcp.db.test.", "SRV")
    assert sorted((r.priority, r.weight, r.port, r.target.to_text()) for r in answer) == [
        (0, 1, 5433, "n1.db.test."), (0, 1, 5434, "n2.db.test."), (10, 1, 5435, "n3.db.test.")]
    additional = {(rrset.name.to_text(), dns.rdatatype.to_text(rrset.rdtype)): sorted(r.to_text() for r in rrset)
                  for rrset in answer.response.additional}
    assert additional == {("n1.db.test.", "A"): ["127.0.0.1"], ("n2.db.test.", "A"): ["127.0.0.2"],
                          ("n2.db.test.", "AAAA"): ["::1"]}


def test_unknown_names_are_nxdomain_and_other_types_no_answer(dns_server: DNSServer) -> None:
    dns_server.set("db.test.", "A", ["127.0.0.1"])
    ask = resolver(dns_server)
    with pytest.raises(dns.resolver.NXDOMAIN):
        ask.resolve("nowhere.test.", "A")
    with pytest.raises(dns.resolver.NoAnswer):  # the name exists: NOERROR, no record of that type
        ask.resolve("db.test.", "SRV")
    dns_server.delete("db.test.")
    with pytest.raises(dns.resolver.NXDOMAIN):
        ask.resolve("db.test.", "A")
    assert dns_server.count("nowhere.test.") == 1


def test_a_record_changed_between_two_queries_is_answered_anew(dns_server: DNSServer) -> None:
    ask = resolver(dns_server)
    dns_server.set("primary.db.test.", "A", ["127.0.0.1"])
    assert addresses(ask.resolve("primary.db.test.", "A")) == ["127.0.0.1"]
    dns_server.set("primary.db.test.", "A", ["127.0.0.3"], ttl=7)  # a failover: the name moves
    answer = ask.resolve("primary.db.test.", "A")
    assert addresses(answer) == ["127.0.0.3"] and answer.rrset is not None and answer.rrset.ttl == 7
    dns_server.ttl = 0
    dns_server.set("primary.db.test.", "A", ["127.0.0.4"])
    answer = ask.resolve("primary.db.test.", "A")
    assert addresses(answer) == ["127.0.0.4"] and answer.rrset is not None and answer.rrset.ttl == 0
    assert dns_server.count("primary.db.test.", "A") == 3  # no cache in between


def test_a_long_answer_is_truncated_over_udp_and_complete_over_tcp(dns_server: DNSServer) -> None:
    many = [f"127.0.1.{i}" for i in range(1, 61)]  # 60 A records: about 1 KB, over 512 bytes
    dns_server.set("big.db.test.", "A", many)
    query = dns.message.make_query("big.db.test.", "A", use_edns=False)
    over_udp = dns.query.udp(query, dns_server.host, port=dns_server.port, timeout=3)
    assert over_udp.flags & dns.flags.TC and not over_udp.answer
    answer = resolver(dns_server).resolve("big.db.test.", "A")  # the resolver retries over TCP by itself
    assert addresses(answer) == sorted(many)
    assert dns_server.count("big.db.test.", transport="tcp") == 1
    over_tcp = dns.query.tcp(query, dns_server.host, port=dns_server.port, timeout=3)
    assert sorted(r.to_text() for r in over_tcp.answer[0]) == sorted(many)


def test_garbage_is_dropped_and_the_server_goes_on(dns_server: DNSServer) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(b"\x00\x01garbage", (dns_server.host, dns_server.port))
    with socket.create_connection((dns_server.host, dns_server.port)) as conn:
        conn.sendall(b"\x00")  # half a length, then gone
    dns_server.set("db.test.", "A", ["127.0.0.1"])
    assert addresses(resolver(dns_server).resolve("db.test.", "A")) == ["127.0.0.1"]


def test_bad_records_are_refused_when_set(dns_server: DNSServer) -> None:
    with pytest.raises(ValueError, match="answers A, AAAA, SRV"):
        dns_server.set("db.test.", "MX", ["10 mail.test."])
    with pytest.raises(dns.exception.SyntaxError):
        dns_server.set("db.test.", "A", ["not-an-address"])


def test_stop_joins_the_thread_and_closes_the_port() -> None:
    server = DNSServer(ttl=5).start()
    server.set("db.test.", "A", ["127.0.0.1"])
    ask = resolver(server)
    assert addresses(ask.resolve("db.test.", "A")) == ["127.0.0.1"]
    with socket.create_connection((server.host, server.port)):  # an idle TCP client does not hold it up
        server.stop()
    assert not server.running
    server.stop()  # twice is fine
    ask.lifetime = 0.5
    with pytest.raises(dns.resolver.LifetimeTimeout):  # nobody answers on the port any more
        ask.resolve("db.test.", "A")
    assert server.count() == 1 and not server.errors
    with DNSServer(port=server.port) as again:  # UDP and TCP are free again (TCP: SO_REUSEADDR, TIME_WAIT)
        again.set("db.test.", "A", ["127.0.0.9"])
        ask.lifetime = 3.0
        assert addresses(ask.resolve("db.test.", "A")) == ["127.0.0.9"]
