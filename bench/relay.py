"""A loopback TCP relay that counts what the client sends.

Round trips, not Python, dominate a pooled query (see shared/NOTES.md), so the
bench counts them on the wire instead of trusting what a library says it does.
Two numbers per link:

* turns: how many times the client starts talking after the server has
  answered. A request/response protocol waits for the answer before the next
  request, so this is the number of round trips, whatever the framing.
* messages: the client's protocol messages, labelled, so that a report can say
  *which* round trips happen (``BEGIN``, ``SELECT``, ``ROLLBACK``, ``PING`` ...).
  PostgreSQL: 1-byte type + 4-byte length (untyped startup packets first).
  MySQL/MariaDB: 3-byte length + 1-byte sequence; a command is a packet with
  sequence 0, labelled by its command byte.

Only loopback: the relay listens on 127.0.0.1 and forwards to 127.0.0.1.
"""

from __future__ import annotations

import collections
import socket
import struct
import threading

__all__ = ["CountingRelay"]

_CHUNK = 65536

# PostgreSQL untyped packets before the startup message (request codes).
_PG_SSL_REQUEST = 80877103
_PG_GSSENC_REQUEST = 80877104
_PG_CANCEL_REQUEST = 80877102
_PG_TYPES = {
    "P": "Parse", "B": "Bind", "D": "Describe", "E": "Execute", "S": "Sync", "H": "Flush",
    "C": "Close", "X": "Terminate", "p": "Auth", "F": "FunctionCall", "d": "CopyData",
    "c": "CopyDone", "f": "CopyFail",
}

_MYSQL_COMMANDS = {
    0x01: "QUIT", 0x02: "INIT_DB", 0x0E: "PING", 0x11: "CHANGE_USER", 0x16: "STMT_PREPARE",
    0x17: "STMT_EXECUTE", 0x19: "STMT_CLOSE", 0x1A: "STMT_RESET", 0x1B: "SET_OPTION",
    0x1F: "RESET_CONNECTION",
}


def _first_word(sql: bytes) -> str:
    text = sql.decode("utf-8", "replace").strip().rstrip("\x00")
    return (text.split(None, 1)[0] if text else "").upper()


class _PgParser:
    """Labels the client's PostgreSQL messages; startup packets have no type byte."""

    def __init__(self) -> None:
        self.buf = b""
        self.started = False

    def feed(self, data: bytes) -> list[str]:
        self.buf += data
        out: list[str] = []
        while True:
            if not self.started:
                if len(self.buf) < 8:
                    return out
                length, code = struct.unpack("!ii", self.buf[:8])
                if len(self.buf) < length:
                    return out
                self.buf = self.buf[length:]
                if code == _PG_SSL_REQUEST:
                    out.append("SSLRequest")
                elif code == _PG_GSSENC_REQUEST:
                    out.append("GSSENCRequest")
                elif code == _PG_CANCEL_REQUEST:
                    out.append("CancelRequest")
                else:
                    out.append("Startup")
                    self.started = True
                continue
            if len(self.buf) < 5:
                return out
            kind = chr(self.buf[0])
            (length,) = struct.unpack("!i", self.buf[1:5])
            if len(self.buf) < 1 + length:
                return out
            body = self.buf[5:1 + length]
            self.buf = self.buf[1 + length:]
            out.append(f"Q:{_first_word(body)}" if kind == "Q" else _PG_TYPES.get(kind, kind))


class _MySQLParser:
    """Labels the client's MySQL packets: sequence 0 starts a command."""

    def __init__(self) -> None:
        self.buf = b""

    def feed(self, data: bytes) -> list[str]:
        self.buf += data
        out: list[str] = []
        while len(self.buf) >= 4:
            length = self.buf[0] | self.buf[1] << 8 | self.buf[2] << 16
            seq = self.buf[3]
            if len(self.buf) < 4 + length:
                break
            payload = self.buf[4:4 + length]
            self.buf = self.buf[4 + length:]
            if seq != 0 or not payload:
                out.append("(handshake)")
            elif payload[0] == 0x03:
                out.append(f"QUERY:{_first_word(payload[1:])}")
            else:
                out.append(_MYSQL_COMMANDS.get(payload[0], f"COM_0x{payload[0]:02x}"))
        return out


class _Link:
    """One client connection: its two sockets and whose turn it was last."""

    def __init__(self, client: socket.socket, upstream: socket.socket, parser: _PgParser | _MySQLParser) -> None:
        self.client = client
        self.upstream = upstream
        self.parser = parser
        self.last = "down"  # the server speaks first (MySQL) or the client's first send counts as a turn


class CountingRelay:
    """Forwards 127.0.0.1:<port> to 127.0.0.1:<upstream_port>, counting client turns and messages.

    ``engine`` is ``"postgres"`` or ``"mysql"`` (the framing to parse). Threads
    are daemons; `stop` closes every socket and joins them with a timeout.
    """

    def __init__(self, upstream_port: int, engine: str) -> None:
        self.upstream_port = upstream_port
        self.engine = engine
        self._lock = threading.Lock()
        self._turns = 0
        self._messages: collections.Counter[str] = collections.Counter()
        self._links: list[_Link] = []
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(256)
        self.port = self._listener.getsockname()[1]
        self._accepter = threading.Thread(target=self._accept, name=f"bench-relay-{self.port}", daemon=True)
        self._accepter.start()

    def url_for(self, url: str) -> str:
        """``url`` with its port replaced by the relay's."""
        return url.replace(f":{self.upstream_port}/", f":{self.port}/")

    def reset(self) -> None:
        """Zero the counters (links stay open)."""
        with self._lock:
            self._turns = 0
            self._messages.clear()

    def snapshot(self) -> tuple[int, collections.Counter[str]]:
        with self._lock:
            return self._turns, collections.Counter(self._messages)

    def stop(self) -> None:
        self._closed = True
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() below; close() alone would not
        except OSError:
            pass
        self._listener.close()
        with self._lock:
            links = list(self._links)
        for link in links:
            for sock in (link.client, link.upstream):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
        for thread in [self._accepter, *self._threads]:
            thread.join(timeout=2.0)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5.0)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            link = _Link(client, upstream, _PgParser() if self.engine == "postgres" else _MySQLParser())
            up = threading.Thread(target=self._pump_up, args=(link,), daemon=True)
            down = threading.Thread(target=self._pump_down, args=(link,), daemon=True)
            with self._lock:
                self._links.append(link)
                self._threads += [up, down]
            up.start()
            down.start()

    def _pump_up(self, link: _Link) -> None:
        """Client -> server: count a turn when the client speaks after the server did."""
        while True:
            try:
                data = link.client.recv(_CHUNK)
            except OSError:
                data = b""
            if not data:
                _close_quietly(link.upstream)
                return
            labels = link.parser.feed(data)
            with self._lock:
                if link.last != "up":
                    self._turns += 1
                    link.last = "up"
                self._messages.update(labels)
            try:
                link.upstream.sendall(data)
            except OSError:
                _close_quietly(link.client)
                return

    def _pump_down(self, link: _Link) -> None:
        """Server -> client: mark the turn before forwarding, so the client's next send follows it."""
        while True:
            try:
                data = link.upstream.recv(_CHUNK)
            except OSError:
                data = b""
            if not data:
                _close_quietly(link.client)
                return
            link.last = "down"
            try:
                link.client.sendall(data)
            except OSError:
                _close_quietly(link.upstream)
                return


def _close_quietly(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
