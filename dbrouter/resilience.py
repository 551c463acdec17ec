"""Circuit breakers, retries and the hung-statement watchdog, in one place.

- `NodeBreaker` wraps a pybreaker `CircuitBreaker` thinly. pybreaker's
  ``call()`` holds the breaker's lock while the guarded function runs, which
  would run every query through a node one at a time; so queries are never run
  inside it. The router asks `NodeBreaker.allow` before using a node and feeds
  outcomes back; pybreaker keeps the state, the failure count, the listeners
  and (for fleets) the shared storage. The lock is only taken for the
  trivial functions that record an outcome, and the fast path (closed, no
  failures) takes no lock at all.
- `build_retrying` composes a tenacity policy: exponential backoff with
  jitter, bounded by attempts *and* a deadline, with an explicit predicate.
- `Watchdog` aborts statements that outlive their deadline on the client
  side: a node that accepts connections but never answers cannot keep a
  thread longer than the configured timeout.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

import pybreaker
from tenacity import Retrying, retry_if_exception, stop_after_attempt, stop_after_delay, wait_exponential, wait_random

from .config import BreakerPolicy, RetryPolicy

__all__ = ["NodeBreaker", "Watchdog", "build_retrying", "shared_storage"]

log = logging.getLogger("dbrouter.resilience")

CLOSED = pybreaker.STATE_CLOSED
OPEN = pybreaker.STATE_OPEN
HALF_OPEN = pybreaker.STATE_HALF_OPEN

# Numeric breaker states, as exported to metrics (0 closed, 1 open, 2 half-open).
STATE_CODES = {CLOSED: 0, OPEN: 1, HALF_OPEN: 2}


def _succeed() -> None:
    return None


def _fail(exc: BaseException) -> None:
    raise exc


class NodeBreaker:
    """One node's circuit breaker, driven by outcomes rather than wrapping calls.

    ``on_change(old, new)`` is called on every state change (from the thread that
    caused it). ``clock`` is injectable so unit tests never sleep.
    """

    def __init__(
        self,
        name: str,
        policy: BreakerPolicy,
        *,
        on_change: Callable[[str, str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        storage: pybreaker.CircuitBreakerStorage | None = None,
    ) -> None:
        self.name = name
        self.policy = policy
        self._on_change = on_change
        self._clock = clock
        # Shared (Redis) state is read at most every breaker_refresh seconds; local
        # state is an attribute read and needs no cache.
        self._ttl = policy.breaker_refresh if storage is not None else 0.0
        self._cached: tuple[str, int] = (CLOSED, 0)
        self._cached_at = float("-inf")
        # Local state only: True while closed with no failure counted. Every change of
        # local state goes through this object, so the hot path reads one attribute.
        self._clean = storage is None
        self._lock = threading.Lock()
        self._opened_at: float | None = None
        self._trial_started: float | None = None
        self.trips = 0
        self._cb = pybreaker.CircuitBreaker(
            fail_max=policy.fail_max,
            reset_timeout=policy.reset_timeout,
            name=name,
            listeners=[_Listener(self)],
            state_storage=storage,
            throw_new_error_on_trip=False,
        )

    def __repr__(self) -> str:
        return f"<NodeBreaker {self.name} {self.state} failures={self.failures}>"

    def _read(self) -> tuple[str, int]:
        """(state, failure count), from the shared storage at most every ``breaker_refresh`` s."""
        if not self._ttl:
            return self._cb.current_state, self._cb.fail_counter
        now = self._clock()
        if now - self._cached_at >= self._ttl:
            self._refresh(now)
        return self._cached

    def _refresh(self, now: float) -> None:
        try:
            self._cached = (self._cb.current_state, self._cb.fail_counter)
        except Exception as exc:  # noqa: BLE001 - an unreachable Redis must not stop queries
            log.warning("breaker %s: shared state unavailable (%s); keeping the last known state", self.name, exc)
        self._cached_at = now

    @property
    def state(self) -> str:
        """``closed``, ``open`` or ``half-open``."""
        return self._read()[0]

    @property
    def failures(self) -> int:
        """Consecutive node failures counted so far."""
        return self._read()[1]

    def _elapsed_open(self, now: float) -> bool:
        if self._opened_at is None:  # opened by another process sharing the storage
            self._opened_at = now
        return now - self._opened_at >= self.policy.reset_timeout

    def available(self) -> bool:
        """Whether the node may be offered work now (no lock, no I/O beyond a shared-state refresh)."""
        state = self._read()[0]
        if state == CLOSED:
            return True
        if state == OPEN:
            return self._elapsed_open(self._clock())
        return self._trial_started is None

    def allow(self) -> bool:
        """May a call go to this node now? Closed: yes. Open: no, until
        ``reset_timeout`` has passed; then the breaker goes half-open and exactly
        one trial call is let through until its outcome is recorded."""
        if self._clean or self._read()[0] == CLOSED:
            return True
        with self._lock:
            now = self._clock()
            if self._ttl:
                self._refresh(now)
            state = self._read()[0]
            if state == CLOSED:
                return True
            if state == OPEN:
                if not self._elapsed_open(now):
                    return False
                self._cb.half_open()
            trial = self._trial_started
            # A trial that never reported back (its thread died) must not block the node forever.
            if trial is not None and now - trial < self.policy.reset_timeout:
                return False
            self._trial_started = now
            return True

    def success(self) -> None:
        """Record a call that reached the node and got an answer."""
        if self._clean or self._read() == (CLOSED, 0):
            return  # the hot path: nothing to reset, no lock, no storage write
        with self._lock:
            self._trial_started = None
            try:
                self._cb.call(_succeed)
            except pybreaker.CircuitBreakerError:
                pass  # still open: a late success from before it opened changes nothing
            except Exception as exc:  # noqa: BLE001 - shared storage unreachable
                log.warning("breaker %s: could not record a success: %s", self.name, exc)
            self._cached_at = float("-inf")
            self._mark_clean()

    def failure(self, exc: BaseException) -> None:
        """Record a node failure (never a caller's SQL error)."""
        with self._lock:
            self._clean = False
            self._trial_started = None
            try:
                self._cb.call(_fail, exc)
            except BaseException:  # noqa: BLE001 - the error is the caller's to raise
                pass
            self._cached_at = float("-inf")

    def force_open(self) -> None:
        """Take the node out of rotation now (for example, it was found demoted)."""
        with self._lock:
            self._clean = False
            if self._cb.current_state != OPEN:
                self._cb.open()

    def reset(self) -> None:
        """Close the breaker (the node proved healthy out of band, e.g. after a promotion)."""
        with self._lock:
            self._trial_started = None
            if self._cb.current_state != CLOSED:
                self._cb.close()
            self._mark_clean()

    def _mark_clean(self) -> None:
        if self._ttl == 0.0:
            self._clean = self._cb.current_state == CLOSED and self._cb.fail_counter == 0

    def _changed(self, old: str, new: str) -> None:
        self._cached_at = float("-inf")
        if new != CLOSED:
            self._clean = False
        if new == OPEN:
            self._opened_at = self._clock()
            self.trips += 1
        if self._on_change is not None and old != new:
            self._on_change(old, new)


class _Listener(pybreaker.CircuitBreakerListener):
    def __init__(self, owner: NodeBreaker) -> None:
        self._owner = owner

    def state_change(self, cb: pybreaker.CircuitBreaker, old_state: Any, new_state: Any) -> None:
        old = old_state.name if old_state is not None else CLOSED
        self._owner._changed(old, new_state.name)


def shared_storage(url: str, node_key: str) -> pybreaker.CircuitBreakerStorage:
    """pybreaker's Redis storage for one node, keyed by the node's address so that every
    process of the application that talks to that node shares one breaker."""
    try:
        import redis
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        from .errors import ConfigurationError

        raise ConfigurationError("breaker_redis_url needs the redis package: pip install 'dbrouter[redis]'") from exc
    client = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
    return pybreaker.CircuitRedisStorage(CLOSED, client, namespace=f"dbrouter:{node_key}")


def build_retrying(
    policy: RetryPolicy,
    should_retry: Callable[[BaseException], bool],
    *,
    deadline: float | None = None,
    sleep: Callable[[float], None] = time.sleep,
    before_sleep: Callable[[Any], None] | None = None,
) -> Retrying:
    """A tenacity controller: backoff with jitter, stopped by attempts or the deadline,
    retrying only what ``should_retry`` accepts, re-raising the last error."""
    budget = policy.retry_deadline if deadline is None else deadline
    return Retrying(
        stop=stop_after_attempt(policy.retry_attempts) | stop_after_delay(max(0.0, budget)),
        # backoff, 2 x backoff, 4 x backoff ... plus up to one backoff of jitter, never above the max
        wait=wait_exponential(multiplier=policy.retry_backoff, max=max(0.0, policy.retry_backoff_max - policy.retry_backoff))
        + wait_random(0, min(policy.retry_backoff, policy.retry_backoff_max)),
        retry=retry_if_exception(should_retry),
        reraise=True,
        sleep=sleep,
        before_sleep=before_sleep,
    )


class Watchdog:
    """Aborts statements that run past their deadline, from one background thread.

    ``arm(deadline, abort)`` returns a token; ``disarm(token)`` returns False if
    the watchdog fired first, in which case the connection was aborted and must
    be discarded. Arming is a dict insert: cheap enough for the hot path.
    """

    def __init__(self, name: str = "dbrouter-watchdog", interval: float = 0.05) -> None:
        self._armed: dict[object, tuple[float, Callable[[], None]]] = {}
        self._interval = interval
        self._stop = threading.Event()
        self.fired = 0
        self._start_lock = threading.Lock()
        # Started on the first arm(): a router whose drivers time out by themselves
        # never needs the thread.
        self._thread: threading.Thread | None = None
        self._name = name

    def arm(self, deadline: float, abort: Callable[[], None]) -> object:
        if self._thread is None:
            self._start()
        token = object()
        self._armed[token] = (deadline, abort)
        return token

    def _start(self) -> None:
        with self._start_lock:
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()

    def disarm(self, token: object) -> bool:
        """True when the statement finished before the watchdog fired."""
        return self._armed.pop(token, None) is not None

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            now = time.monotonic()
            for token, (deadline, abort) in list(self._armed.items()):
                if deadline <= now and self._armed.pop(token, None) is not None:
                    self.fired += 1
                    log.warning("aborting a statement %.2fs past its deadline: %s", now - deadline, abort)
                    try:
                        abort()
                    except Exception:  # noqa: BLE001 - the watchdog must keep running
                        log.exception("aborting a hung statement failed")

    def stop(self) -> None:
        self._stop.set()
        with self._start_lock:
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=2)
