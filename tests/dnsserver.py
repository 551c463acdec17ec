"""A tiny authoritative DNS server for tests: the resolver a test controls.

It answers A, AAAA and SRV queries from a record table the test changes at
will (``server.set("db.test.", "A", ["127.0.0.1"])``), on 127.0.0.1 over UDP
and TCP on one port below 32768, from one thread of its own. dnspython parses
and builds the messages; this module only decides what to answer:

- a name with records of the asked type: those records (authoritative, with the
  server's short TTL, or the one given to `set`); an SRV answer carries the A and
  AAAA records of its targets in the additional section when the table has them;
- a name with records of other types only: no answer, NOERROR (NODATA);
- an unknown name: NXDOMAIN;
- a UDP answer too long for the client (512 bytes, or its EDNS size) goes out
  truncated (TC), so that a resolver asks again over TCP, as real ones do.

Every query is counted (`count`). `stop` closes every socket and joins the thread.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import struct
import threading
from dataclasses import dataclass
from typing import Any, Iterable

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from dbrouter.cluster._base import allocate_ports

__all__ = ["DNSServer", "Query"]

TYPES = ("A", "AAAA", "SRV")
PORTS = (20000, 32000)  # below the ephemeral range, as tests/conftest.py's free_low_port
UDP_SIZE = 512  # the most a client without EDNS takes over UDP
TCP_READ_TIMEOUT = 2.0  # a TCP client that sent a length and stalls is dropped after this


@dataclass(frozen=True)
class Query:
    """One question the server was asked."""

    name: str  # absolute, lower case: "db.test."
    rtype: str  # "A", "SRV", ... as asked, supported or not
    transport: str  # "udp" or "tcp"


class DNSServer:
    """See the module docstring. ``ttl`` (seconds) applies to records set without their own."""

    def __init__(self, *, ttl: int = 1, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host = host
        self.ttl = ttl
        self._records: dict[tuple[dns.name.Name, str], tuple[list[dns.rdata.Rdata], int | None]] = {}
        self._queries: list[Query] = []
        self._lock = threading.Lock()  # guards the table and the query log; no I/O under it
        self._udp, self._tcp = self._bind(port)
        self.port: int = self._udp.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._selector = selectors.DefaultSelector()
        self._clients: set[socket.socket] = set()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.errors: list[Exception] = []  # what went wrong answering (the fixture fails the test on any)

    # -- lifecycle ---------------------------------------------------------------------

    def _bind(self, port: int | None) -> tuple[socket.socket, socket.socket]:
        """A UDP and a TCP socket on one port: the given one, else a free one in `PORTS`.
        The sockets stay bound, so no other process can take the port between a probe and the
        start (the race a probe-then-bind port chooser has)."""
        for attempt in range(200):
            if port is None:
                candidate = allocate_ports(1)[0]  # held against the other processes on the machine too
            elif attempt:
                break
            else:
                candidate = port
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                udp.bind((self.host, candidate))
                tcp.bind((self.host, candidate))
                tcp.listen(16)
            except OSError:
                udp.close()
                tcp.close()
                if port is not None:
                    raise
                continue
            return udp, tcp
        raise RuntimeError(f"no port free for UDP and TCP in {PORTS[0]}..{PORTS[1]}")

    def start(self) -> DNSServer:
        """Serve on a daemon thread; returns self."""
        for sock in (self._udp, self._tcp, self._wake_r):
            sock.setblocking(False)
            self._selector.register(sock, selectors.EVENT_READ)
        self._thread = threading.Thread(target=self._serve, name=f"dnsserver-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving: the thread is joined and every socket closed. Safe to call twice."""
        self._stopping.set()
        with contextlib.suppress(OSError):  # already closed: stopped before
            self._wake_w.send(b"x")
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RuntimeError(f"DNS server thread {self._thread.name} did not stop within {timeout}s")
        for sock in (self._udp, self._tcp, self._wake_r, self._wake_w, *self._clients):
            sock.close()
        self._clients.clear()
        self._selector.close()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> DNSServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- the record table -------------------------------------------------------------

    def set(self, name: str, rtype: str, values: Iterable[Any], ttl: int | None = None) -> None:
        """Replace the ``rtype`` records of ``name``: addresses for A and AAAA, ``(priority,
        weight, port, target)`` for SRV. An empty list removes them. Bad values raise here
        (dnspython's error), not when a query comes."""
        rtype = rtype.upper()
        if rtype not in TYPES:
            raise ValueError(f"record type {rtype!r}: this server answers {', '.join(TYPES)}")
        texts = [" ".join(map(str, v)) if rtype == "SRV" else str(v) for v in values]
        rdatas = [dns.rdata.from_text(dns.rdataclass.IN, rtype, text, origin=dns.name.root, relativize=False)
                  for text in texts]
        key = (dns.name.from_text(name), rtype)
        with self._lock:
            if rdatas:
                self._records[key] = (rdatas, ttl)
            else:
                self._records.pop(key, None)

    def delete(self, name: str) -> None:
        """Remove every record of ``name``: it answers NXDOMAIN from now on."""
        owner = dns.name.from_text(name)
        with self._lock:
            for key in [key for key in self._records if key[0] == owner]:
                del self._records[key]

    # -- the query log ----------------------------------------------------------------------

    @property
    def queries(self) -> list[Query]:
        """Every question so far, oldest first (a copy)."""
        with self._lock:
            return list(self._queries)

    def count(self, name: str | None = None, rtype: str | None = None, transport: str | None = None) -> int:
        """How many questions matched (all of them with no argument)."""
        wanted = None if name is None else dns.name.from_text(name).to_text().lower()
        return sum(1 for q in self.queries
                   if (wanted is None or q.name == wanted) and (rtype is None or q.rtype == rtype.upper())
                   and (transport is None or q.transport == transport))

    # -- serving -------------------------------------------------------------------------

    def _serve(self) -> None:
        while not self._stopping.is_set():
            for key, _ in self._selector.select():
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self._wake_r:
                    return
                try:
                    if sock is self._udp:
                        self._serve_udp()
                    elif sock is self._tcp:
                        client, _ = self._tcp.accept()
                        self._clients.add(client)
                        self._selector.register(client, selectors.EVENT_READ)
                    else:
                        self._serve_tcp(sock)
                except OSError:
                    continue  # a client gone (UDP: an ICMP unreachable for an earlier answer)
                except Exception as exc:  # noqa: BLE001 - a bug here must not end the server unseen
                    self.errors.append(exc)

    def _serve_udp(self) -> None:
        wire, peer = self._udp.recvfrom(65535)
        answer = self._answer(wire, "udp")
        if answer is not None:
            self._udp.sendto(answer, peer)

    def _serve_tcp(self, client: socket.socket) -> None:
        """One length-prefixed message from a connected client, answered; EOF or a broken or
        stalled client closes the connection."""
        client.settimeout(TCP_READ_TIMEOUT)
        try:
            header = self._recv_exactly(client, 2)
            if header is not None:
                wire = self._recv_exactly(client, struct.unpack("!H", header)[0])
                answer = None if wire is None else self._answer(wire, "tcp")
                if answer is not None:
                    client.sendall(struct.pack("!H", len(answer)) + answer)
                    return  # the client may ask again on this connection
        except OSError:
            pass
        self._selector.unregister(client)
        self._clients.discard(client)
        client.close()

    @staticmethod
    def _recv_exactly(client: socket.socket, size: int) -> bytes | None:
        data = b""
        while len(data) < size:
            chunk = client.recv(size - len(data))
            if not chunk:
                return None
            data += chunk
        return data

    def _answer(self, wire: bytes, transport: str) -> bytes | None:
        """The response to one query message; None for something that is no query (dropped)."""
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        if query.flags & dns.flags.QR:
            return None  # a response: never answer one (no loops)
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if query.opcode() != dns.opcode.QUERY or len(query.question) != 1:
            response.set_rcode(dns.rcode.NOTIMP if query.opcode() != dns.opcode.QUERY else dns.rcode.FORMERR)
            return response.to_wire()
        question = query.question[0]
        rtype = dns.rdatatype.to_text(question.rdtype)
        with self._lock:
            self._queries.append(Query(question.name.to_text().lower(), rtype, transport))
            known = any(owner == question.name for owner, _ in self._records)
            answer = self._rrset(question.name, rtype)
            extra: list[dns.rrset.RRset] = []
            if answer is not None and rtype == "SRV":
                for rdata in answer:
                    for kind in ("A", "AAAA"):
                        found = self._rrset(rdata.target, kind)
                        if found is not None:
                            extra.append(found)
        if question.rdclass != dns.rdataclass.IN:
            response.set_rcode(dns.rcode.REFUSED)
        elif not known:
            response.set_rcode(dns.rcode.NXDOMAIN)
        elif answer is not None:
            response.answer.append(answer)
            response.additional.extend(extra)
        limit = 65535 if transport == "tcp" else max(UDP_SIZE, query.payload if query.edns >= 0 else 0)
        try:
            return response.to_wire(max_size=limit)
        except dns.exception.TooBig:
            response.answer.clear()
            response.additional.clear()
            response.flags |= dns.flags.TC  # the client asks again over TCP
            return response.to_wire(max_size=limit)

    def _rrset(self, name: dns.name.Name, rtype: str) -> dns.rrset.RRset | None:
        """The table's records as an RRset (the caller holds the lock)."""
        found = self._records.get((name, rtype))
        if found is None:
            return None
        rdatas, ttl = found
        return dns.rrset.from_rdata_list(name, self.ttl if ttl is None else ttl, rdatas)
