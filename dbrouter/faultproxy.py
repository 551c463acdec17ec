"""A fault-injecting TCP proxy for tests and failover drills.

`FaultProxy` sits between a client and a loopback server and can, at run
time, refuse connections, swallow traffic (a hung node), add latency (to every
chunk, or as spikes on a fraction of the replies), reset every connection, cut
one connection right after a write reached the server, or reset a fraction of
the requests (a flaky node). It exists so that tests exercise the drivers' real failure paths on
real sockets instead of mocked exceptions.

Design: one daemon thread (``dbrouter-proxy-<port>``) runs a `selectors` loop
over the listener and every connection, with non-blocking sockets, so that
100 connections cost one thread and `stop()` is bounded even when clients
hang. Every socket operation happens on that thread: the public methods send
it a command through a wake-up socket and wait (bounded) for it to be done,
so that when ``refuse()`` returns, a connect is already refused. A lock
guards only the counters.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import math
import queue
import random
import selectors
import socket
import struct
import threading
import time
from collections import deque
from typing import Any, Callable

from .errors import ConfigurationError

__all__ = [
    "FaultProxy",
    "MODE_BLACKHOLE",
    "MODE_CUT",
    "MODE_FLAKY",
    "MODE_LATENCY",
    "MODE_PASS",
    "MODE_REFUSE",
    "MODE_SPIKES",
]

log = logging.getLogger("dbrouter.faultproxy")

# Values of FaultProxy.mode.
MODE_PASS = "pass_through"
MODE_REFUSE = "refuse"
MODE_BLACKHOLE = "blackhole"
MODE_LATENCY = "latency"
MODE_CUT = "cut_after_client_sends"
MODE_SPIKES = "spikes"
MODE_FLAKY = "flaky"

# Keys of FaultProxy.stats(): stable names that tests rely on.
ACCEPTED = "connections_accepted"
ACTIVE = "connections_active"
BYTES_UP = "bytes_up"  # client -> upstream
BYTES_DOWN = "bytes_down"  # upstream -> client
RESETS = "resets"  # connections aborted by reset_connections() or a cut
UPSTREAM_ERRORS = "upstream_errors"  # upstream connects that failed or timed out

_CHUNK = 65536
_BUFFER_CAP = 1 << 20  # stop reading a side while this much waits to be written (backpressure)
_TICK = 0.5  # longest select() wait: bounds the frozen-link sweep and upstream-connect checks
_COMMAND_TIMEOUT = 2.0
_JOIN_TIMEOUT = 2.0
_LINGER_RST = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST, not FIN


def _abort(sock: socket.socket | None) -> None:
    """Close with a TCP RST, so the peer sees 'connection reset' at once, not EOF."""
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    sock.close()


def _check_loopback(host: str, port: int) -> None:
    """Refuse non-loopback upstreams: the proxy is for local tests only."""
    try:
        infos = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConfigurationError(f"faultproxy upstream {host}:{port}: cannot resolve ({exc})") from exc
    for info in infos:
        if not ipaddress.ip_address(info[4][0]).is_loopback:
            raise ConfigurationError(
                f"faultproxy upstream {host}:{port}: resolves to {info[4][0]}, not a loopback address"
            )


class _Pipe:
    """One direction of a link: chunks read from ``src`` waiting to be written to ``dst``.

    Each chunk carries the monotonic time it may be written, which is how
    latency delays chunks without reordering them.
    """

    __slots__ = ("chunks", "size", "eof", "shut", "blocked", "up")

    def __init__(self, up: bool) -> None:
        self.chunks: deque[tuple[float, bytes]] = deque()
        self.size = 0
        self.eof = False  # src sent FIN
        self.shut = False  # FIN passed on to dst
        self.blocked = False  # dst's send buffer is full; wait for EVENT_WRITE
        self.up = up

    def push(self, due: float, data: bytes) -> None:
        self.chunks.append((due, data))
        self.size += len(data)

    def next_due(self) -> float | None:
        return self.chunks[0][0] if self.chunks and not self.blocked else None

    @property
    def done(self) -> bool:
        return self.eof and self.shut and not self.chunks


class _Link:
    """An accepted client and its upstream connection (None until connected)."""

    __slots__ = ("id", "client", "upstream", "connected", "connect_deadline", "up", "down", "cut_count")

    def __init__(self, link_id: int, client: socket.socket) -> None:
        self.id = link_id
        self.client = client
        self.upstream: socket.socket | None = None
        self.connected = False
        self.connect_deadline = 0.0
        self.up = _Pipe(up=True)
        self.down = _Pipe(up=False)
        self.cut_count = 0  # bytes from the client since cut_after_client_sends() was armed


class FaultProxy:
    """A loopback TCP proxy to ``upstream`` whose fault mode can change at run time.

    Modes (see `mode`): ``pass_through``, ``refuse``, ``blackhole``,
    ``latency`` and the one-shot ``cut_after_client_sends``. Mode changes
    apply to existing connections too. Mode methods wait up to 2 s for the
    proxy thread to apply them and raise `TimeoutError` if it does not.
    """

    def __init__(
        self,
        upstream: tuple[str, int],
        listen_port: int = 0,
        *,
        listen_host: str = "127.0.0.1",
        connect_timeout: float = 5.0,
    ) -> None:
        """Configure only; nothing listens until `start()`.

        ``connect_timeout`` bounds the proxy's own connect to the upstream; a
        client whose upstream cannot be reached is reset. ``listen_port=0``
        picks a free ephemeral port; while `refuse()` has the listener closed
        and no connection holds that port, an outgoing connection could take
        it, so drills that refuse for long should pass a port below 32768.
        Raises `ConfigurationError` for a non-loopback upstream or listen host.
        """
        host, port = upstream
        if not 0 < int(port) < 65536:
            raise ConfigurationError(f"faultproxy upstream port {port!r}: must be 1-65535")
        if not 0 <= int(listen_port) < 65536:
            raise ConfigurationError(f"faultproxy listen_port {listen_port!r}: must be 0-65535")
        if not (connect_timeout > 0 and math.isfinite(connect_timeout)):
            raise ConfigurationError(f"faultproxy connect_timeout {connect_timeout!r}: must be > 0")
        _check_loopback(host, int(port))
        _check_loopback(listen_host, 0)
        self.upstream: tuple[str, int] = (host, int(port))
        self.host = listen_host
        self._requested_port = int(listen_port)
        self._port = 0
        self._connect_timeout = float(connect_timeout)

        self._mode = MODE_PASS
        self._delay = 0.0
        self._fraction = 0.0  # spikes and flaky: the share of chunks affected
        self._cut_bytes = 0

        self._lock = threading.Lock()  # guards _counts only
        self._counts = {ACCEPTED: 0, BYTES_UP: 0, BYTES_DOWN: 0, RESETS: 0, UPSTREAM_ERRORS: 0}
        self._active = 0

        # Owned by the proxy thread once started.
        self._sel: selectors.BaseSelector | None = None
        self._listener: socket.socket | None = None
        self._links: dict[int, _Link] = {}
        self._interest: dict[socket.socket, int] = {}
        self._next_id = 0
        self._last_sweep = 0.0

        self._commands: queue.SimpleQueue[tuple[Callable[[], Any], list[Any], threading.Event]] = queue.SimpleQueue()
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._stopped = False

    # -- public surface --------------------------------------------------------

    @property
    def port(self) -> int:
        """The listening port (known after `start()`; kept across refuse/pass_through)."""
        return self._port

    @property
    def address(self) -> str:
        """``host:port`` where clients connect."""
        return f"{self.host}:{self._port}"

    @property
    def mode(self) -> str:
        """The current mode: one of the ``MODE_*`` strings."""
        return self._mode

    def start(self) -> FaultProxy:
        """Bind the listener and start the proxy thread; returns self.

        Raises `OSError` if the port cannot be bound, `RuntimeError` after `stop()`.
        """
        if self._stopped:
            raise RuntimeError("faultproxy: a stopped proxy cannot be restarted")
        if self._thread is not None:
            return self
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        try:
            self._open_listener(self._requested_port)
        except OSError:
            self._sel.close()
            self._wake_r.close()
            self._wake_w.close()
            self._sel = self._wake_r = self._wake_w = None
            raise
        if self._mode == MODE_REFUSE:
            self._close_listener()
        self._thread = threading.Thread(target=self._run, name=f"dbrouter-proxy-{self._port}", daemon=True)
        self._thread.start()
        log.info("faultproxy %s: forwarding to %s:%d", self.address, *self.upstream)
        return self

    def stop(self) -> None:
        """Close the listener and every connection and join the thread (at most ~2 s).

        Idempotent. Clients still connected see the connection closed.
        """
        if self._stopped:
            return
        self._stopped = True
        thread = self._thread
        if thread is None:
            return
        self._stopping = True
        self._wake()
        thread.join(_JOIN_TIMEOUT)
        if thread.is_alive():
            log.warning("faultproxy %s: thread did not stop within %.1fs", self.address, _JOIN_TIMEOUT)
        else:
            log.info("faultproxy %s: stopped", self.address)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def pass_through(self) -> None:
        """Forward normally; re-open the listener (same port) and unfreeze connections."""
        self._set_mode(MODE_PASS)

    def refuse(self) -> None:
        """Close the listener so connects fail with ECONNREFUSED; existing connections keep working.

        `pass_through()` (or any other mode) re-opens the listener on the same port.
        """
        self._set_mode(MODE_REFUSE)

    def blackhole(self) -> None:
        """Accept connections but forward nothing either way: the hung-node case.

        Bytes stay unread in the kernel, so a later `pass_through()` delivers
        them intact. Clients see nothing until their own timeouts.
        """
        self._set_mode(MODE_BLACKHOLE)

    def latency(self, seconds: float) -> None:
        """Forward, delaying each chunk by ``seconds`` in each direction (order kept).

        Applies to chunks read from now on. Raises `ConfigurationError` for a
        negative or non-finite delay.
        """
        if not (seconds >= 0 and math.isfinite(seconds)):
            raise ConfigurationError(f"faultproxy latency {seconds!r}: must be a finite number >= 0")
        self._set_mode(MODE_LATENCY, delay=float(seconds))

    def spikes(self, fraction: float, seconds: float) -> None:
        """Forward, delaying a random ``fraction`` of the server's chunks (its replies) by
        ``seconds`` (order kept: what follows on that connection waits behind it). "A
        replica adds 200 ms to 1% of its reads" is ``spikes(0.01, 0.2)``."""
        if not (0 <= fraction <= 1) or not (seconds >= 0 and math.isfinite(seconds)):
            raise ConfigurationError(f"faultproxy spikes({fraction!r}, {seconds!r}): need 0 <= fraction <= 1 "
                                     "and a finite delay >= 0")
        self._set_mode(MODE_SPIKES, delay=float(seconds), fraction=float(fraction))

    def flaky(self, fraction: float) -> None:
        """Forward, but reset the connection (RST both sides, nothing forwarded) on a random
        ``fraction`` of the client's chunks (its requests): a node that fails that share of
        its calls, each failure a lost connection."""
        if not 0 <= fraction <= 1:
            raise ConfigurationError(f"faultproxy flaky({fraction!r}): need 0 <= fraction <= 1")
        self._set_mode(MODE_FLAKY, fraction=float(fraction))

    def cut_after_client_sends(self, n_bytes: int = 1) -> None:
        """One shot: once a client has sent ``n_bytes`` (counted from now), forward them, then cut.

        The whole chunk that reaches the threshold goes upstream and the
        upstream socket is closed after it (FIN, so the server reads every
        byte); the client is reset (RST) before any reply can come back. This
        is "the write reached the server but the answer never came". Then the
        mode returns to ``pass_through``. Until then it forwards like
        ``pass_through``.
        """
        if n_bytes < 1:
            raise ConfigurationError(f"faultproxy cut_after_client_sends n_bytes {n_bytes!r}: must be >= 1")
        self._set_mode(MODE_CUT, cut_bytes=int(n_bytes))

    def reset_connections(self) -> int:
        """Abort every existing connection with a TCP RST on both sides; the mode is unchanged.

        Returns how many connections were reset.
        """
        return int(self._call(self._reset_all))

    def stats(self) -> dict[str, int]:
        """A snapshot: connections accepted and active, bytes each way, resets, upstream errors."""
        with self._lock:
            snapshot = dict(self._counts)
            snapshot[ACTIVE] = self._active
        return snapshot

    def __repr__(self) -> str:
        return f"<FaultProxy {self.address} -> {self.upstream[0]}:{self.upstream[1]} {self._mode}>"

    # -- commands: run on the proxy thread --------------------------------------

    def _set_mode(self, mode: str, *, delay: float = 0.0, cut_bytes: int = 0, fraction: float = 0.0) -> None:
        def apply() -> None:
            old = self._mode
            if self._running():
                if mode == MODE_REFUSE:
                    self._close_listener()
                elif self._listener is None:
                    self._open_listener(self._port)  # raises OSError if the port was taken meanwhile
            # else: not started (start() applies the mode) or stopped (nothing left to change).
            self._mode = mode
            self._delay = delay if mode in (MODE_LATENCY, MODE_SPIKES) else 0.0
            self._fraction = fraction
            if mode == MODE_CUT:
                self._cut_bytes = cut_bytes
                for link in self._links.values():
                    link.cut_count = 0
            if old != mode or mode in (MODE_LATENCY, MODE_SPIKES, MODE_FLAKY):
                detail = f" ({delay:.3f}s)" if mode == MODE_LATENCY else (
                    f" ({fraction:.3g} of chunks{f', {delay:.3f}s' if mode == MODE_SPIKES else ''})"
                    if mode in (MODE_SPIKES, MODE_FLAKY) else "")
                log.info("faultproxy %s: mode %s -> %s%s", self.address, old, mode, detail)

        self._call(apply)

    def _call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the proxy thread and wait for it (bounded); inline when not running."""
        thread = self._thread
        if not self._running() or thread is None or threading.current_thread() is thread:
            return fn()  # commands check _running() and touch no sockets when it is False
        done = threading.Event()
        box: list[Any] = []
        self._commands.put((fn, box, done))
        self._wake()
        if not done.wait(_COMMAND_TIMEOUT):
            if not self._running():
                return None  # stopped while we waited: nothing left to change
            raise TimeoutError(f"faultproxy {self.address}: proxy thread did not answer within {_COMMAND_TIMEOUT}s")
        if box and isinstance(box[0], BaseException):
            raise box[0]
        return box[1] if len(box) > 1 else None

    def _wake(self) -> None:
        try:
            if self._wake_w is not None:
                self._wake_w.send(b"\0")
        except OSError:
            pass  # buffer full (a wake-up is already pending) or closed at stop

    def _running(self) -> bool:
        """True between start() and stop(): only then do commands touch sockets."""
        return self._thread is not None and not self._stopping

    def _reset_all(self) -> int:
        if not self._running():
            return 0
        links = list(self._links.values())
        for link in links:
            self._drop(link, reset=True)
        if links:
            with self._lock:
                self._counts[RESETS] += len(links)
            log.info("faultproxy %s: reset %d connection(s)", self.address, len(links))
        return len(links)

    # -- listener -------------------------------------------------------------------

    def _open_listener(self, port: int) -> None:
        assert self._sel is not None
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            # SO_REUSEADDR lets pass_through() re-bind the same port while accepted
            # connections (and TIME_WAIT ones) still use it.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, port))
            sock.listen(128)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._listener = sock
        self._port = sock.getsockname()[1]
        self._sel.register(sock, selectors.EVENT_READ, None)

    def _close_listener(self) -> None:
        if self._listener is None:
            return
        assert self._sel is not None
        self._sel.unregister(self._listener)
        self._listener.close()
        self._listener = None

    def _accept(self) -> None:
        assert self._listener is not None
        for _ in range(64):  # bounded, so one burst cannot starve the other sockets
            try:
                client, _peer = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. EMFILE: log and let the next tick retry
                log.warning("faultproxy %s: accept failed: %s", self.address, exc)
                return
            client.setblocking(False)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._next_id += 1
            link = _Link(self._next_id, client)
            self._links[link.id] = link
            with self._lock:
                self._counts[ACCEPTED] += 1
                self._active += 1
            log.debug("faultproxy %s: accepted connection %d", self.address, link.id)

    # -- the loop -------------------------------------------------------------------

    def _run(self) -> None:
        assert self._sel is not None
        try:
            while not self._stopping:
                self._run_commands()
                if self._stopping:
                    break
                now = time.monotonic()
                self._service(now)
                events = self._sel.select(self._timeout(time.monotonic()))
                for key, mask in events:
                    self._on_event(key, mask)
        except Exception:
            log.exception("faultproxy %s: proxy thread failed; closing", self.address)
        finally:
            self._shutdown()

    def _run_commands(self) -> None:
        while True:
            try:
                fn, box, done = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                box[:] = [None, fn()]
            except BaseException as exc:  # handed to the caller, which re-raises it
                box[:] = [exc]
            done.set()

    def _forwarding(self) -> bool:
        return self._mode != MODE_BLACKHOLE

    def _timeout(self, now: float) -> float:
        """Sleep until the next delayed chunk is due, at most _TICK."""
        wait = _TICK
        if self._forwarding():
            for link in self._links.values():
                for pipe in (link.up, link.down):
                    due = pipe.next_due()
                    if due is not None and due - now < wait:
                        wait = due - now
        return max(wait, 0.0)

    def _service(self, now: float) -> None:
        """Per-iteration work: start upstream connects, write due chunks, set interest."""
        forwarding = self._forwarding()
        sweep = not forwarding and now - self._last_sweep >= _TICK
        if sweep:
            self._last_sweep = now
        for link in list(self._links.values()):
            if link.upstream is None:
                if forwarding:
                    self._connect_upstream(link, now)
                elif sweep:
                    self._sweep(link)
            elif not link.connected:
                if now > link.connect_deadline:
                    self._upstream_failed(link, "timed out")
            elif forwarding:
                if not self._flush(link, link.up, now) or not self._flush(link, link.down, now):
                    continue
                if link.up.done and link.down.done:
                    self._drop(link, reset=False)
                    continue
            elif sweep:
                self._sweep(link)
            if link.id in self._links:
                self._update_interest(link, forwarding)

    def _on_event(self, key: selectors.SelectorKey, mask: int) -> None:
        sock = key.fileobj
        if sock is self._wake_r:
            try:
                while self._wake_r.recv(4096):
                    pass
            except (BlockingIOError, InterruptedError):
                pass
            return
        if sock is self._listener:
            self._accept()
            return
        link, side = key.data
        if link.id not in self._links:
            return  # dropped earlier in this batch of events
        if side == "upstream" and not link.connected:
            self._finish_connect(link)
            return
        if mask & selectors.EVENT_WRITE:
            pipe = link.up if side == "upstream" else link.down
            pipe.blocked = False
        if mask & selectors.EVENT_READ and self._forwarding():
            self._read(link, side)

    # -- per-connection work -------------------------------------------------------

    def _connect_upstream(self, link: _Link, now: float) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        link.upstream = sock
        link.connect_deadline = now + self._connect_timeout
        err = sock.connect_ex(self.upstream)
        if err == 0:
            self._connected(link)
        elif err not in (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN):
            self._upstream_failed(link, errno.errorcode.get(err, str(err)))

    def _finish_connect(self, link: _Link) -> None:
        assert link.upstream is not None
        err = link.upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._upstream_failed(link, errno.errorcode.get(err, str(err)))
        else:
            self._connected(link)

    def _connected(self, link: _Link) -> None:
        assert link.upstream is not None
        link.connected = True
        link.upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        log.debug("faultproxy %s: connection %d linked upstream", self.address, link.id)

    def _upstream_failed(self, link: _Link, why: str) -> None:
        # The closest a proxy that already accepted can get to "refused" is a reset.
        log.info("faultproxy %s: upstream %s:%d for connection %d: %s; resetting client",
                 self.address, *self.upstream, link.id, why)
        with self._lock:
            self._counts[UPSTREAM_ERRORS] += 1
        self._drop(link, reset=True)

    def _read(self, link: _Link, side: str) -> None:
        src = link.client if side == "client" else link.upstream
        pipe = link.up if side == "client" else link.down
        assert src is not None
        try:
            data = src.recv(_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            # The peer reset: pass the reset on, as a real network path would.
            log.debug("faultproxy %s: connection %d %s read failed: %s", self.address, link.id, side, exc)
            self._drop(link, reset=True)
            return
        if not data:
            pipe.eof = True
            return
        with self._lock:
            self._counts[BYTES_UP if pipe.up else BYTES_DOWN] += len(data)
        now = time.monotonic()
        mode = self._mode
        if mode == MODE_FLAKY and pipe.up and random.random() < self._fraction:
            self._drop(link, reset=True)  # the request never reaches the server
            return
        if mode == MODE_LATENCY or (mode == MODE_SPIKES and not pipe.up and random.random() < self._fraction):
            pipe.push(now + self._delay, data)
        else:
            pipe.push(now, data)
        if pipe.up and self._mode == MODE_CUT:
            link.cut_count += len(data)
            if link.cut_count >= self._cut_bytes:
                self._cut(link)
                return
        self._flush(link, pipe, now)

    def _cut(self, link: _Link) -> None:
        """Send what the client wrote upstream, FIN the upstream, RST the client."""
        assert link.upstream is not None
        data = b"".join(chunk for _due, chunk in link.up.chunks)
        link.up.chunks.clear()
        upstream, link.upstream = link.upstream, None
        try:
            upstream.settimeout(1.0)  # bounded: a few bytes into an empty loopback buffer
            upstream.sendall(data)
            upstream.shutdown(socket.SHUT_WR)
        except OSError as exc:
            log.warning("faultproxy %s: cut of connection %d: upstream send failed: %s", self.address, link.id, exc)
        self._forget(upstream)
        upstream.close()
        self._mode = MODE_PASS
        with self._lock:
            self._counts[RESETS] += 1
        log.info("faultproxy %s: cut connection %d after %d byte(s) reached upstream; mode -> %s",
                 self.address, link.id, len(data), self._mode)
        self._drop(link, reset=True)

    def _flush(self, link: _Link, pipe: _Pipe, now: float) -> bool:
        """Write the chunks that are due; False if the link was dropped."""
        dst = link.upstream if pipe.up else link.client
        assert dst is not None
        while pipe.chunks and not pipe.blocked:
            due, data = pipe.chunks[0]
            if due > now:
                break
            try:
                sent = dst.send(data)
            except (BlockingIOError, InterruptedError):
                pipe.blocked = True
                break
            except OSError as exc:
                log.debug("faultproxy %s: connection %d write failed: %s", self.address, link.id, exc)
                self._drop(link, reset=True)
                return False
            pipe.size -= sent
            if sent < len(data):
                pipe.chunks[0] = (due, data[sent:])
                pipe.blocked = True
            else:
                pipe.chunks.popleft()
        if pipe.eof and not pipe.chunks and not pipe.shut:
            pipe.shut = True
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
        return True

    def _sweep(self, link: _Link) -> None:
        """While frozen, drop links whose client is gone, so hung clients do not pile up.

        A peek that sees EOF means no unread bytes are left: nothing is lost.
        """
        if link.up.chunks:
            return
        try:
            if link.client.recv(1, socket.MSG_PEEK) != b"":
                return
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        log.debug("faultproxy %s: frozen connection %d: client went away", self.address, link.id)
        self._drop(link, reset=False)

    def _update_interest(self, link: _Link, forwarding: bool) -> None:
        client_mask = 0
        upstream_mask = 0
        if link.upstream is not None and not link.connected:
            upstream_mask = selectors.EVENT_WRITE
        elif link.connected and forwarding:
            if not link.up.eof and link.up.size < _BUFFER_CAP:
                client_mask |= selectors.EVENT_READ
            if not link.down.eof and link.down.size < _BUFFER_CAP:
                upstream_mask |= selectors.EVENT_READ
            if link.up.blocked:
                upstream_mask |= selectors.EVENT_WRITE
            if link.down.blocked:
                client_mask |= selectors.EVENT_WRITE
        self._set_interest(link.client, client_mask, (link, "client"))
        if link.upstream is not None:
            self._set_interest(link.upstream, upstream_mask, (link, "upstream"))

    def _set_interest(self, sock: socket.socket, mask: int, data: tuple[_Link, str]) -> None:
        assert self._sel is not None
        old = self._interest.get(sock, 0)
        if mask == old:
            return
        if not mask:
            self._sel.unregister(sock)
            del self._interest[sock]
        elif not old:
            self._sel.register(sock, mask, data)
            self._interest[sock] = mask
        else:
            self._sel.modify(sock, mask, data)
            self._interest[sock] = mask

    def _forget(self, sock: socket.socket) -> None:
        if self._interest.pop(sock, 0):
            assert self._sel is not None
            self._sel.unregister(sock)

    def _drop(self, link: _Link, *, reset: bool) -> None:
        """Close both sides of a link: RST when ``reset``, else an orderly close."""
        if self._links.pop(link.id, None) is None:
            return
        for sock in (link.client, link.upstream):
            if sock is None:
                continue
            self._forget(sock)
            if reset:
                _abort(sock)
            else:
                sock.close()
        with self._lock:
            self._active -= 1

    def _shutdown(self) -> None:
        """Close everything from the proxy thread as it exits."""
        self._stopping = True  # also after a crash: from now on commands touch no sockets
        for link in list(self._links.values()):
            self._drop(link, reset=False)
        if self._listener is not None:
            self._close_listener()
        # Release callers that queued a command while we were stopping.
        self._run_commands_refused()
        if self._sel is not None:
            self._sel.close()
        for sock in (self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()

    def _run_commands_refused(self) -> None:
        while True:
            try:
                _fn, box, done = self._commands.get_nowait()
            except queue.Empty:
                return
            box[:] = [None, None]
            done.set()

