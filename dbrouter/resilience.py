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

- With shared state in Redis (`dbrouter.fleet`), a breaker reads and writes its process's
  copy only; Redis is read and written on the fleet's sharing thread, every
  ``breaker_refresh`` seconds while its router is open (`share`), so that no caller waits
  for Redis, on a thread of `Router` or on `AsyncRouter`'s event loop.
- With shared state (`dbrouter.fleet`), the time an open breaker has been open is
  taken from the shared state at every refresh, not from when this process last saw it
  open: a process never offers a node for a trial early because another process opened
  it again (and never writes half-open for everyone early).

Lock order: pybreaker's lock is never taken while ``_trial_lock`` is held, and
``_trial_lock`` is held only for attribute accesses (and the memory storage's, which
are attribute loads too); no other lock of dbrouter's is ever held with either. With
any storage but the local one, nothing reads the storage under ``_trial_lock``.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

import pybreaker

from . import _fork
from .adapters._text import first_line
from .config import BreakerPolicy
from .fleet import RedisBreakerStorage, SharedView

__all__ = ["ADMITTED", "CLOSED", "HALF_OPEN", "OPEN", "REFUSED", "STATE_CODES", "TRIAL", "NodeBreaker"]

log = logging.getLogger("dbrouter.resilience")

CLOSED = pybreaker.STATE_CLOSED
OPEN = pybreaker.STATE_OPEN
HALF_OPEN = pybreaker.STATE_HALF_OPEN

_SHARED_REFRESH_FLOOR = 0.05
"""With Redis, the shortest time between two refreshes (``breaker_refresh`` may be 0)."""

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
        # Any storage given is treated as shared (Redis: I/O), read at most every
        # breaker_refresh seconds and never under _trial_lock; the local state is an
        # attribute read and needs no cache.
        self._external = storage is not None
        self._shared = storage if isinstance(storage, RedisBreakerStorage) else None
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
        # The last node failure recorded here ("Type: first line"), so that an open breaker
        # can say why: a probe failure reads apart from a lost connection.
        self.last_failure: str | None = None
        self._cb = pybreaker.CircuitBreaker(
            fail_max=policy.fail_max,
            reset_timeout=policy.reset_timeout,
            name=name,
            listeners=[_Listener(self)],
            state_storage=storage,
            throw_new_error_on_trip=False,
        )
        if self._shared is not None:
            self._shared.go_live()  # after pybreaker's constructor, which reads the state
        _fork.register(self)

    def _after_fork_in_child(self) -> None:
        """In a forked child: new locks (a thread of the parent may have held one at the
        fork: pybreaker's while calling our listener or the storage), and no trial in flight
        (the parent's trial reports to the parent). The state stays: what the parent knew of
        the node is still true. A Redis client resets its own connection pool in the child,
        never touching the parent's sockets (redis-py's ``ConnectionPool._checkpid``)."""
        self._trial_lock = threading.Lock()
        self._trial_started = None
        self._cb._lock = threading.RLock()  # pybreaker's own, which it offers no way to renew

    def __repr__(self) -> str:
        return f"<NodeBreaker {self.name} {self.state} failures={self.failures}>"

    # -- reading the state (no lock) ---------------------------------------------

    def _read(self) -> tuple[str, int]:
        """(state, failure count), from the shared storage at most every ``breaker_refresh`` s."""
        if self._shared is not None:
            # Redis: this process's copy, which the sharing thread refreshes (`dbrouter.fleet`):
            # no caller, query thread or event loop, ever waits for Redis.
            return self._shared.local()
        if not self._external:
            return self._cb.current_state, self._cb.fail_counter
        now = self._clock()
        if now - self._cached_at >= self._ttl:
            self._refresh(now)
        return self._cached

    def share(self) -> None:
        """With Redis: have the sharing thread refresh this breaker every ``breaker_refresh``
        seconds from now on (its router opened, or added its node)."""
        if self._shared is not None:
            self._shared.follow(self)

    def unshare(self) -> None:
        """Stop refreshing (its router closed, or removed its node)."""
        if self._shared is not None:
            self._shared.unfollow(self)

    def refresh_shared(self, now: float) -> float:
        """On the sharing thread: read the shared state (Redis I/O); seconds until the next read."""
        self._refresh(self._clock())
        return max(self._ttl, _SHARED_REFRESH_FLOOR)

    def _refresh(self, now: float) -> None:
        if self._shared is not None:
            view = self._shared.snapshot()  # validated; never raises (Redis down: the local copy)
            self._cached = (view.state, view.failures)
            self._track_opening(view, now)
        else:
            try:
                self._cached = (self._cb.current_state, self._cb.fail_counter)
            except Exception as exc:  # noqa: BLE001 - an unreachable storage must not stop queries
                log.warning("breaker %s: shared state unavailable (%s); keeping the last known state", self.name, exc)
        self._cached_at = now

    def _track_opening(self, view: SharedView, now: float) -> None:
        """Time an open breaker from the shared state's opening, not from this process's memory."""
        if view.state != OPEN:
            self._opened_at = None  # a later opening is timed afresh, never from this one
            return
        stamp, server_time = view.opened_stamp, view.server_time
        if stamp is None or server_time is None:
            if self._opened_at is None:  # opened at an unknown time: a full reset_timeout from now
                self._opened_at = now
            return
        if stamp == view.own_stamp and self._opened_at is not None:
            return  # this process's own opening, which it timed exactly
        # Another process's opening (or a later one than this process saw). The stamp is a
        # whole second of the server's clock: the opening was in [stamp, stamp + 1); count
        # from the end of that second, so as to be late by under a second, never early.
        self._opened_at = now - max(0.0, server_time - (stamp + 1))

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
        if self._shared is None and self._external and self._ttl:
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
        self.last_failure = f"{type(exc).__name__}: {first_line(str(exc))}"[:300]
        with self._trial_lock:
            self.clean = False
        self._end_trial()
        if self._shared is not None and self._read()[0] == OPEN and not self._elapsed_open(self._clock()):
            # Open, and not for reset_timeout yet by the shared opening time (pybreaker would
            # judge it by its own clock): nothing more to count.
            self._cached_at = float("-inf")
            return
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
        if not self._external:
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

