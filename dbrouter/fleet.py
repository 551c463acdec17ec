"""Breaker state shared by the processes of an application, through Redis.

`RedisBreakerStorage` is pybreaker's storage interface over Redis, made safe for a fleet.
Shared state is an optimisation (one process finding a node down spares the others), never
a dependency, so nothing read from Redis is trusted and no Redis trouble reaches a query:

- Every value read is validated: the state is ``closed``, ``open`` or ``half-open``, the
  counters are non-negative integers, ``opened_at`` is a whole second of the Redis server's
  clock that is not in its future. A bad value (corrupt, hostile, another program's) is
  ignored with one warning per key per process: the breaker uses this process's own copy of
  its state, so it still counts failures and trips a dead node. The bad value is overwritten
  with that copy at once (only if it is still bad: another process may have fixed it).
- Redis unreachable (at start or later): one warning per outage per process naming the
  server (never its password); every breaker works on its own copy, with no Redis I/O, and
  Redis is tried again every `RETRY_AFTER` seconds. When it answers, the shared values are
  the truth again, and keys it lost (a restarted Redis) are filled in from this process's copy.
- Nothing is done at construction: a Router builds without I/O (``open=False`` keeps its
  promise) and starts while Redis is down, rather than making Redis a start-up dependency.
- ``opened_at`` is written from the Redis server's clock (``TIME``), so every process
  measures an opening on the same clock whatever its host's; `snapshot` returns it with the
  server's current time. It stays pybreaker's format (whole epoch seconds), which processes
  of an older dbrouter read too.

- No Redis I/O on a caller's thread: the storage is write-behind. pybreaker reads and writes
  this process's copy only (attribute accesses, under its lock), and every write is handed to
  one thread per process, ``dbrouter-breaker-share`` (`_Sharer`), which sends it to Redis in
  order; that thread also refreshes each open router's breakers from Redis every
  ``breaker_refresh`` seconds (`RedisBreakerStorage.snapshot`, adopted into the copy). So a
  query thread of `Router` and the event loop of `AsyncRouter` alike only ever read the local
  copy: a slow or dead Redis (up to its 1 s socket timeout) costs that thread its time, never a
  caller's, and never holds pybreaker's lock (which would serialise every caller of the node's
  breaker) for a round trip. One mechanism serves both routers, rather than an async-only copy.

No lock of dbrouter's is held around any of this: the storage's only locks guard the set of
warnings already given and the thread's queue, and nothing is called under them. pybreaker
does hold its own lock while it calls the storage (its design): only attribute accesses and
queue appends happen then.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import weakref
from collections import deque
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Protocol
from urllib.parse import urlsplit

import pybreaker

if TYPE_CHECKING:
    import redis

__all__ = ["RETRY_AFTER", "RedisBreakerStorage", "SharedView", "shared_storage"]

log = logging.getLogger("dbrouter.fleet")

STATES = frozenset({pybreaker.STATE_CLOSED, pybreaker.STATE_OPEN, pybreaker.STATE_HALF_OPEN})
RETRY_AFTER = 1.0
"""Seconds a process works on its own copies after Redis failed to answer, before trying again."""
_FUTURE_SLACK = 2
"""An ``opened_at`` more seconds than this ahead of the server's clock is not an opening."""
_SHOWN = 40
"""At most this many characters of a bad value go into the warning."""

# Per process: the warnings already given (bad keys, servers down), and when each Redis
# server may be tried again. Shared by every storage of the process, so that one outage is
# one warning and one timeout, not one per node.
_warned: set[tuple[str, str]] = set()
_warned_lock = threading.Lock()
_down_until: dict[str, float] = {}


def _renew_lock() -> None:
    """In a forked child: a thread of the parent may have held a lock at the fork."""
    global _warned_lock
    _warned_lock = threading.Lock()
    _sharer._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_renew_lock)


def _first(kind: str, what: str) -> bool:
    """True for the first caller about (kind, what) in this process."""
    with _warned_lock:  # a set lookup and insert; nothing is called under it
        if (kind, what) in _warned:
            return False
        _warned.add((kind, what))
        return True


def _forget(kind: str, what: str) -> bool:
    """True if a warning about (kind, what) had been given (it may be given again)."""
    with _warned_lock:
        if (kind, what) not in _warned:
            return False
        _warned.discard((kind, what))
        return True


_MAX_QUEUED = 10_000
"""Writes waiting for Redis beyond this (Redis slow for long) are dropped: the copy keeps them."""
_IDLE_WAIT = 0.5
"""The sharing thread's longest sleep with nothing due."""


class Refreshed(Protocol):
    """What `_Sharer.follow` refreshes: a breaker reading its shared state (`NodeBreaker`)."""

    def refresh_shared(self, now: float) -> float:
        """Read the shared state (Redis I/O); return the seconds until the next read."""


class _Sharer:
    """The process's one thread for shared breaker state (see the module docstring): runs the
    writes handed to it in order, and refreshes the breakers it follows when they are due. It
    exits when it has nothing to do and nobody to follow, and starts again when needed."""

    def __init__(self) -> None:
        self._jobs: deque[Callable[[], None]] = deque()
        self._followed: weakref.WeakKeyDictionary[Refreshed, float] = weakref.WeakKeyDictionary()
        self._wake = threading.Event()
        self._lock = threading.Lock()  # guards _thread and _followed; nothing is called under it
        self._thread: threading.Thread | None = None
        self._dropped = 0

    def submit(self, job: Callable[[], None]) -> None:
        """Hand a write over (any thread, the event loop's included: an append and a wake-up)."""
        if len(self._jobs) >= _MAX_QUEUED:
            self._dropped += 1
            if _first("queue", "full"):
                log.warning("shared breaker state: %d writes wait for Redis; later ones stay in this process's "
                            "copy only until Redis catches up", _MAX_QUEUED)
            return
        self._jobs.append(job)
        self._ensure_running()
        self._wake.set()

    def follow(self, breaker: Refreshed) -> None:
        """Refresh ``breaker`` from now on (the router opened, or added its node)."""
        with self._lock:
            self._followed[breaker] = 0.0
        self._ensure_running()
        self._wake.set()

    def unfollow(self, breaker: Refreshed) -> None:
        with self._lock:
            self._followed.pop(breaker, None)

    def _ensure_running(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            thread = self._thread = threading.Thread(target=self._run, name="dbrouter-breaker-share", daemon=True)
        thread.start()  # not under the lock: starting a thread waits for it to run

    def _run(self) -> None:
        while True:
            self._wake.clear()
            while self._jobs:
                job = self._jobs.popleft()
                try:
                    job()
                except Exception:  # noqa: BLE001 - the thread must outlive any bug
                    log.exception("shared breaker state: a write failed")
            now = time.monotonic()
            with self._lock:
                followed = list(self._followed.items())
            next_due = now + _IDLE_WAIT
            for breaker, due in followed:
                if due <= now:
                    try:
                        interval = breaker.refresh_shared(now)
                    except Exception:  # noqa: BLE001 - the thread must outlive any bug
                        log.exception("shared breaker state: a refresh failed")
                        interval = _IDLE_WAIT
                    due = time.monotonic() + interval
                    with self._lock:
                        if breaker in self._followed:
                            self._followed[breaker] = due
                next_due = min(next_due, due)
            with self._lock:
                if not self._followed and not self._jobs:
                    self._thread = None
                    return
            self._wake.wait(max(0.0, next_due - time.monotonic()))

    def _after_fork_in_child(self) -> None:
        """In a forked child the thread is gone: start another when needed. The writes still
        queued are the parent's to send (an INCR sent twice would count a failure twice)."""
        self._lock = threading.Lock()
        self._thread = None
        self._wake = threading.Event()
        self._jobs.clear()


_sharer = _Sharer()


class _Local:
    """What a command returns when Redis is down or not in use yet: use the local copy."""


_LOCAL = _Local()


class _Refused:
    """What a command returns when Redis answered with an error (wrong type, not an integer...)."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


def _parse_state(raw: Any) -> str | None:
    if isinstance(raw, bytes):
        value = raw.decode("utf-8", "replace")
        if value in STATES:
            return value
    return None


def _parse_count(raw: Any) -> int | None:
    # A counter of consecutive calls: a non-negative integer that fits in 63 bits (INCR's range).
    if isinstance(raw, bytes) and raw.isdigit() and len(raw) <= 18:
        return int(raw)
    return None


def _shown(raw: Any) -> str:
    if isinstance(raw, _Refused):
        return f"<Redis: {raw.error}>"
    text = repr(raw)
    return text if len(text) <= _SHOWN else text[:_SHOWN] + "..."


class SharedView(NamedTuple):
    """One read of a node's shared breaker state (`RedisBreakerStorage.snapshot`)."""

    state: str
    failures: int
    opened_stamp: int | None
    """When the breaker last opened: a whole second of the Redis server's clock; None if unknown."""
    server_time: float | None
    """The Redis server's clock at this read (seconds); None when Redis did not answer."""
    own_stamp: int | None
    """The ``opened_at`` this process wrote last, to tell its own opening from another's."""


class RedisBreakerStorage(pybreaker.CircuitBreakerStorage):
    """pybreaker's storage for one node's breaker, shared in Redis and validated (see the module).

    ``address`` names the Redis server in log lines (never with a password); ``namespace``
    prefixes the keys (``<namespace>:pybreaker:state`` and so on, pybreaker's own layout).
    No I/O happens until `go_live` (so that building pybreaker's breaker does none).
    """

    def __init__(self, client: redis.Redis, address: str, namespace: str) -> None:
        from redis.exceptions import RedisError, ResponseError

        super().__init__("redis")
        self._client = client
        self._address = address
        self._prefix = f"{namespace}:pybreaker:"
        self._redis_error = RedisError
        self._response_error = ResponseError
        self._live = False
        # This process's own copy: every valid value read is adopted, every write lands here
        # first; it is what the breaker runs on when Redis is down or holds a bad value.
        self._state = pybreaker.STATE_CLOSED
        self._fail = 0
        self._success = 0
        self._opened_at: datetime | None = None
        self._own_stamp: int | None = None
        # Bumped by every change to the copy: a refresh whose read raced one keeps the copy
        # (the change's write is still on its way to Redis).
        self._changes = 0

    def __repr__(self) -> str:
        return f"<RedisBreakerStorage {self._prefix}* at {self._address}>"

    def go_live(self) -> None:
        """Start using Redis (until now every read and write stayed in the local copy)."""
        self._live = True

    def follow(self, breaker: Refreshed) -> None:
        """Have the sharing thread refresh ``breaker`` from Redis (its router is open)."""
        _sharer.follow(breaker)

    def unfollow(self, breaker: Refreshed) -> None:
        _sharer.unfollow(breaker)

    def local(self) -> tuple[str, int]:
        """(state, failure count) of this process's copy: no I/O."""
        return self._state, self._fail

    def _later(self, write: Callable[[], None]) -> None:
        """A change to the copy is made: send it to Redis on the sharing thread."""
        self._changes += 1
        if self._live:
            _sharer.submit(write)

    def _key(self, name: str) -> str:
        return self._prefix + name

    # -- talking to Redis ----------------------------------------------------------

    def _io(self, command: Callable[[], Any]) -> Any:
        """Run one command (or pipeline): its result, `_Refused` when Redis answered with an
        error, `_LOCAL` when Redis is down (or was, less than `RETRY_AFTER` ago)."""
        if not self._live:
            return _LOCAL
        address = self._address
        until = _down_until.get(address)
        if until is not None:
            now = time.monotonic()
            if now < until:
                return _LOCAL
            # This thread tries Redis again; the others stay on their copies meanwhile, so
            # that a server that does not answer costs one timeout, not one per thread.
            _down_until[address] = now + RETRY_AFTER
        try:
            result = command()
        except self._response_error as exc:
            result = _Refused(exc)
        except self._redis_error as exc:
            _down_until[address] = time.monotonic() + RETRY_AFTER
            if _first("down", address):
                log.warning("shared breaker state: Redis at %s does not answer (%s); breakers are local to this "
                            "process until it does (tried again every %.0f s)", address, exc, RETRY_AFTER)
            return _LOCAL
        if until is not None:
            _down_until.pop(address, None)
            if _forget("down", address):
                log.info("shared breaker state: Redis at %s answers again; breaker state is shared again", address)
        return result

    def _bad(self, name: str, raw: Any, kind: str, local: Any) -> None:
        key = self._key(name)
        if _first("bad", key):
            log.warning("shared breaker state: ignoring %s = %s in Redis at %s (not %s); this process goes on "
                        "with its own copy (%s) and overwrites the bad value", key, _shown(raw), self._address,
                        kind, local)
        else:
            log.debug("shared breaker state: %s = %s again in Redis at %s", key, _shown(raw), self._address)

    def _heal(self, name: str, value: str | int, parse: Callable[[Any], Any]) -> None:
        """Overwrite a bad (or missing) value with ``value``, unless another process has
        written a valid one meanwhile."""
        key = self._key(name)

        def swap(pipe: Any) -> None:
            try:
                current = pipe.get(key)
            except self._response_error:  # not a string at all
                current = None
            if current is not None and parse(current) is not None:
                return
            pipe.multi()
            pipe.set(key, value)

        self._io(lambda: self._client.transaction(swap, key))

    # -- pybreaker's storage interface: the local copy; writes go to Redis later ----------

    @property
    def state(self) -> str:
        return self._state

    @state.setter
    def state(self, state: str) -> None:
        self._state = state
        self._later(lambda: self._io(lambda: self._client.set(self._key("state"), state)))

    def increment_counter(self) -> None:
        self._fail += 1
        self._later(self._incrementer("fail_counter", self._fail))

    def reset_counter(self) -> None:
        self._fail = 0
        self._later(lambda: self._io(lambda: self._client.set(self._key("fail_counter"), 0)))

    def increment_success_counter(self) -> None:
        self._success += 1
        self._later(self._incrementer("success_counter", self._success))

    def reset_success_counter(self) -> None:
        self._success = 0
        self._later(lambda: self._io(lambda: self._client.set(self._key("success_counter"), 0)))

    def _incrementer(self, name: str, local: int) -> Callable[[], None]:
        changes = self._changes + 1  # as of this change (made by _later)
        return lambda: self._increment(name, local, changes)

    def _increment(self, name: str, local: int, changes: int) -> None:
        count = self._io(lambda: self._client.incr(self._key(name)))
        if isinstance(count, _Refused):  # not an integer: this process's count replaces it
            self._bad(name, count, "a count", local)
            self._heal(name, local, _parse_count)
        elif isinstance(count, int) and count >= 0 and self._changes == changes:
            # The fleet's count, unless this process changed its copy since (that change's
            # write follows, and the next refresh brings the fleet's count in).
            if name == "fail_counter":
                self._fail = count
            else:
                self._success = count

    @property
    def counter(self) -> int:
        return self._fail

    @property
    def success_counter(self) -> int:
        return self._success

    @property
    def opened_at(self) -> datetime | None:
        """When the breaker opened, for pybreaker's own check (dbrouter times it with `snapshot`):
        this process's opening, or the shared one adopted at the last refresh."""
        return self._opened_at

    @opened_at.setter
    def opened_at(self, now: datetime) -> None:
        # pybreaker passes this host's clock; the server's is the one every process shares.
        self._opened_at = now
        self._later(self._stamp_opening)

    def _stamp_opening(self) -> None:
        server = self._io(self._client.time)
        if not isinstance(server, (list, tuple)):
            self._own_stamp = None
            return
        stamp = int(server[0])
        self._own_stamp = stamp
        self._io(lambda: self._client.set(self._key("opened_at"), stamp))

    # -- dbrouter's read -------------------------------------------------------------

    def _adopt(self, field: str, raw: Any, parse: Callable[[Any], Any], local: Any, what: str) -> Any:
        """The shared value of ``field`` when it is valid; else the local copy, written to Redis
        when the key is missing and healed (with one warning) when its value is bad."""
        value = parse(raw)
        if value is not None:
            return value
        if raw is None:
            self._io(lambda: self._client.setnx(self._key(field), local))
        else:
            self._bad(field, raw, what, local)
            self._heal(field, local, parse)
        return local

    def snapshot(self) -> SharedView:
        """State, failure count and opening time in one round trip, validated, adopted into this
        process's copy; bad values are overwritten, and keys Redis lacks are filled in from the
        copy. Run by the sharing thread (Redis I/O). A change made to the copy meanwhile wins:
        its write is on its way, and the next refresh reads it back."""
        names = ("state", "fail_counter", "opened_at")
        changes = self._changes

        def read() -> list[Any]:
            pipe = self._client.pipeline(transaction=False)
            for name in names:
                pipe.get(self._key(name))
            pipe.time()
            return list(pipe.execute(raise_on_error=False))

        raw = self._io(read)
        if not isinstance(raw, list):  # Redis down: the local copy
            return SharedView(self._state, self._fail, None, None, self._own_stamp)
        raw = [_Refused(item) if isinstance(item, Exception) else item for item in raw]
        raw_state, raw_fail, raw_opened, server = raw
        server_time = float(server[0]) + float(server[1]) / 1e6 if isinstance(server, (list, tuple)) else None
        state = self._adopt("state", raw_state, _parse_state, self._state, "a breaker state")
        fail = self._adopt("fail_counter", raw_fail, _parse_count, self._fail, "a count")
        stamp = _parse_count(raw_opened)
        if stamp is not None and server_time is not None and stamp > server_time + _FUTURE_SLACK:
            stamp = None  # in the future: it would keep the node out forever
        if stamp is None and raw_opened is not None:
            self._bad("opened_at", raw_opened, "a past second of the server's clock", "unknown")
            if server_time is not None:
                now = int(server_time)
                self._heal("opened_at", now, lambda r: v if (v := _parse_count(r)) is not None and v <= now else None)
        if self._changes != changes:  # changed meanwhile: the copy, timed by this process
            return SharedView(self._state, self._fail, None, None, self._own_stamp)
        self._state, self._fail = state, fail
        if stamp is not None:
            with contextlib.suppress(ValueError, OverflowError, OSError):  # beyond the calendar: not an opening
                self._opened_at = datetime.fromtimestamp(stamp, timezone.utc)
        return SharedView(state, fail, stamp, server_time, self._own_stamp)


def redis_address(url: str) -> str:
    """``host:port`` (or the socket path) of a Redis URL, without user or password: for logs."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return parts.path
    host = parts.hostname or "localhost"
    host = f"[{host}]" if ":" in host else host
    try:
        port = parts.port or 6379
    except ValueError:
        return host
    return f"{host}:{port}"


def shared_storage(url: str, node_key: str) -> RedisBreakerStorage:
    """The shared breaker storage for one node, keyed by the node's address so that every
    process of the application that talks to that node shares one breaker. Does no I/O."""
    try:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        from .errors import ConfigurationError

        raise ConfigurationError("breaker_redis_url needs the redis package: pip install 'dbrouter[redis]'") from exc
    # One attempt per command: the storage retries by itself every RETRY_AFTER seconds, and a
    # client retry would only multiply a dead server's timeout on the caller's thread.
    client = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0, retry=Retry(NoBackoff(), 0))
    return RedisBreakerStorage(client, redis_address(url), namespace=f"dbrouter:{node_key}")
