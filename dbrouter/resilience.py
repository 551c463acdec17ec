"""Circuit breakers: one per node, driven by outcomes, never wrapping a query.

pybreaker keeps the state, the failure count and (for fleets) the shared
storage; `NodeBreaker` decides admission around it:

- Queries never run inside pybreaker's ``call()``, which holds its lock for the
  whole call (pybreaker issue #55) and would run every query through a node one
  at a time. Outcomes are fed in afterwards (`NodeBreaker.success`,
  `NodeBreaker.failure`).
- No dbrouter lock is ever held while calling pybreaker (which may do Redis
  I/O). The only lock of this module, ``_trial_lock``, guards two attributes
  and calls nothing.
- pybreaker calls its listeners inside its own lock. Ours only hands the change
  to ``on_change``, which must not block or take a lock (the router's enqueues
  a message for the control plane, which emits events later on its own thread).
- A half-open breaker lets one trial through at a time; a trial that never
  reports back (its caller died, its checkout timed out, its connection came
  back another way) ages out after ``reset_timeout``, in `allow` and
  `available` alike. A successful monitor probe counts as a successful trial.

Lock order: pybreaker's lock is never taken while ``_trial_lock`` is held, and
``_trial_lock`` is held only for attribute accesses (and the memory storage's, which
are attribute loads too); no other lock of dbrouter's is ever held with either.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

import pybreaker

from .config import BreakerPolicy

__all__ = ["ADMITTED", "CLOSED", "HALF_OPEN", "OPEN", "REFUSED", "STATE_CODES", "TRIAL", "NodeBreaker", "shared_storage"]

log = logging.getLogger("dbrouter.resilience")

CLOSED = pybreaker.STATE_CLOSED
OPEN = pybreaker.STATE_OPEN
HALF_OPEN = pybreaker.STATE_HALF_OPEN

# Numeric breaker states, as exported to metrics (0 closed, 1 open, 2 half-open).
STATE_CODES = {CLOSED: 0, OPEN: 1, HALF_OPEN: 2}


class _Admission:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


REFUSED = _Admission("REFUSED")
"""`NodeBreaker.admit`: the node may not be used now."""
ADMITTED = _Admission("ADMITTED")
"""`NodeBreaker.admit`: a call like any other."""
TRIAL = _Admission("TRIAL")
"""`NodeBreaker.admit`: the half-open breaker's one trial; its caller must report back or abandon it."""


def _succeed() -> None:
    return None


def _fail(exc: BaseException) -> None:
    raise exc


class NodeBreaker:
    """One node's circuit breaker, driven by outcomes rather than wrapping calls.

    ``on_change(old, new)`` is called on every state change, inside pybreaker's
    lock: it must only record the change (see the module docstring). ``clock``
    is injectable so that unit tests never sleep.
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
        # Local state only: True while closed with no failure counted, so that the hot
        # path reads one attribute (nothing to check, nothing to feed on success). Set
        # False before and after every failure is recorded.
        self.clean = storage is None
        # Guards the trial's start time, and the check-and-store of ``clean`` against a
        # concurrent failure; held for attribute accesses only, never while calling out.
        self._trial_lock = threading.Lock()
        self._trial_started: float | None = None
        self._opened_at: float | None = None
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

    # -- reading the state (no lock) ---------------------------------------------

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
        opened = self._opened_at
        if opened is None:  # opened by another process sharing the storage
            self._opened_at = opened = now
        return now - opened >= self.policy.reset_timeout

    def trial_due(self) -> float | None:
        """When this open breaker's ``reset_timeout`` runs out (monotonic), or None when it is
        not open here: a node becomes eligible for a trial then, without a state change."""
        opened = self._opened_at
        return None if opened is None else opened + self.policy.reset_timeout

    def _trial_live(self, now: float) -> bool:
        started = self._trial_started
        return started is not None and now - started < self.policy.reset_timeout

    def available(self) -> bool:
        """Whether the node may be offered work now (no lock; a shared-state refresh at most)."""
        state = self._read()[0]
        if state == CLOSED:
            return True
        now = self._clock()
        if state == OPEN:
            return self._elapsed_open(now)
        return not self._trial_live(now)

    # -- admission ----------------------------------------------------------------

    def allow(self) -> bool:
        """May a call go to this node now? (`admit`, for callers that never hold a trial.)"""
        return self.clean or self.admit() is not REFUSED

    def admit(self) -> _Admission:
        """`ADMITTED` when closed; `REFUSED` while open, until ``reset_timeout`` has passed;
        then the breaker goes half-open and one call at a time is the `TRIAL` (a trial that
        never reports back ages out after ``reset_timeout``)."""
        if self.clean:
            return ADMITTED
        state = self._read()[0]  # shared state: the cached copy, refreshed every breaker_refresh
        if state == CLOSED:
            return ADMITTED
        if self._ttl:
            self._refresh(self._clock())  # not closed: decide on the current shared state
            state = self._cached[0]
            if state == CLOSED:
                return ADMITTED
        now = self._clock()
        if state == OPEN:
            if not self._elapsed_open(now) or not self._claim_trial(now):
                return REFUSED
            self._guarded(self._cb.half_open)
            return TRIAL
        return TRIAL if self._claim_trial(now) else REFUSED

    def _claim_trial(self, now: float) -> bool:
        with self._trial_lock:  # two attribute accesses; nothing is called under it
            if self._trial_live(now):
                return False
            self._trial_started = now
            return True

    def _end_trial(self) -> None:
        self._trial_started = None

    def abandon_trial(self) -> None:
        """The `TRIAL` call never reached the node (its checkout failed) or learned nothing:
        let another call be the trial instead of waiting for this one to age out."""
        self._end_trial()

    # -- outcomes -----------------------------------------------------------------

    def success(self) -> None:
        """Record a call that reached the node and got an answer (an SQL error counts)."""
        if self.clean:
            return
        state, failures = self._read()
        if state == CLOSED and failures == 0:
            return  # shared state, nothing to reset: no storage write
        self._end_trial()
        if state == OPEN:
            return  # a late answer from before it opened changes nothing
        self._guarded(self._cb.call, _succeed)
        self._after_change()

    def failure(self, exc: BaseException) -> None:
        """Record a node failure (never a caller's SQL error). ``exc`` must be an Exception."""
        if not isinstance(exc, Exception):
            return
        with self._trial_lock:
            self.clean = False
        self._end_trial()
        try:
            self._cb.call(_fail, exc)
        except pybreaker.CircuitBreakerError:
            pass  # open and its timer not run out: nothing more to count
        except Exception as raised:  # noqa: BLE001 - exc itself, re-raised by pybreaker: expected
            if raised is not exc:
                log.warning("breaker %s: could not record a failure: %s", self.name, raised)
        with self._trial_lock:
            self.clean = False  # again: a success that read the state before this failure counted
        self._cached_at = float("-inf")

    def probe_succeeded(self) -> None:
        """A monitor probe got an answer: a half-open breaker (or an open one whose
        ``reset_timeout`` has passed) closes, as if a trial call had succeeded."""
        if self.clean:
            return
        if self._ttl:
            self._cached_at = float("-inf")
        state = self._read()[0]
        if state == CLOSED:
            return
        if state == OPEN:
            if not self._elapsed_open(self._clock()):
                return
            self._guarded(self._cb.half_open)
        self._end_trial()
        self._guarded(self._cb.call, _succeed)
        self._after_change()

    def force_open(self) -> None:
        """Take the node out of rotation now (for example, it was found demoted)."""
        self.clean = False
        self._end_trial()
        if self._read()[0] != OPEN:
            self._guarded(self._cb.open)
        self._cached_at = float("-inf")

    def reset(self) -> None:
        """Close the breaker (the node proved healthy out of band, e.g. after a promotion)."""
        self._end_trial()
        if self._read() != (CLOSED, 0):
            self._guarded(self._cb.close)
        self._after_change()

    def _guarded(self, call: Callable[..., Any], *args: Any) -> None:
        """Call into pybreaker; a storage error (Redis down) is logged, never raised to a query."""
        try:
            call(*args)
        except pybreaker.CircuitBreakerError:
            pass
        except Exception as exc:  # noqa: BLE001 - shared storage unreachable
            log.warning("breaker %s: shared state not updated: %s", self.name, exc)

    def _after_change(self) -> None:
        self._cached_at = float("-inf")
        if self._ttl == 0.0:
            # Local storage: reading it is two attribute loads. Under the lock, so that a
            # failure recorded meanwhile (which clears the flag under it) is never overwritten.
            with self._trial_lock:
                self.clean = self._cb.current_state == CLOSED and self._cb.fail_counter == 0

    def _changed(self, old: str, new: str) -> None:
        """From pybreaker's listener, inside its lock: record, never block."""
        self._cached_at = float("-inf")
        if new != CLOSED:
            self.clean = False
        if new == OPEN:
            self._opened_at = self._clock()
            self.trips += 1
        else:
            self._opened_at = None
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
