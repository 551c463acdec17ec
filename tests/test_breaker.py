"""NodeBreaker state machine and the retry policy (pure logic, fake clock, no sleeping)."""

from __future__ import annotations

import threading

from dbrouter.config import BreakerPolicy
from dbrouter.resilience import NodeBreaker


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(fail_max: int = 3, reset_timeout: float = 5.0):
    clock = Clock()
    changes: list[tuple[str, str]] = []
    breaker = NodeBreaker("n1", BreakerPolicy(fail_max=fail_max, reset_timeout=reset_timeout),
                          on_change=lambda old, new: changes.append((old, new)), clock=clock)
    return breaker, clock, changes


def test_opens_after_fail_max_consecutive_failures() -> None:
    breaker, _clock, changes = make(fail_max=3)
    for _ in range(2):
        breaker.failure(OSError("refused"))
    assert breaker.state == "closed" and breaker.failures == 2
    breaker.success()  # a success in between resets the count
    assert breaker.failures == 0
    for _ in range(3):
        assert breaker.allow()
        breaker.failure(OSError("refused"))
    assert breaker.state == "open"
    assert changes == [("closed", "open")]
    assert breaker.trips == 1
    assert not breaker.allow() and not breaker.available()


def test_one_trial_after_reset_timeout_then_close() -> None:
    breaker, clock, changes = make(fail_max=1, reset_timeout=5.0)
    breaker.failure(OSError())
    clock.now += 4.9
    assert not breaker.allow()
    clock.now += 0.2
    assert breaker.available()
    assert breaker.allow()  # the trial
    assert breaker.state == "half-open"
    assert not breaker.allow()  # only one trial at a time
    assert not breaker.available()
    breaker.success()
    assert breaker.state == "closed" and breaker.allow()
    assert changes == [("closed", "open"), ("open", "half-open"), ("half-open", "closed")]


def test_failed_trial_reopens_and_restarts_the_timer() -> None:
    breaker, clock, _ = make(fail_max=1, reset_timeout=5.0)
    breaker.failure(OSError())
    clock.now += 6
    assert breaker.allow()
    breaker.failure(OSError())
    assert breaker.state == "open"
    clock.now += 4
    assert not breaker.allow()
    clock.now += 2
    assert breaker.allow()


def test_a_lost_trial_does_not_block_forever() -> None:
    breaker, clock, _ = make(fail_max=1, reset_timeout=5.0)
    breaker.failure(OSError())
    clock.now += 6
    assert breaker.allow()
    clock.now += 6  # the trial never reported back
    assert breaker.allow()


def test_success_on_a_closed_breaker_takes_no_lock() -> None:
    breaker, _, _ = make()
    breaker._trial_lock.acquire()  # if success() needed the lock this would deadlock
    try:
        done = threading.Event()
        t = threading.Thread(target=lambda: (breaker.success(), done.set()))
        t.start()
        assert done.wait(2)
    finally:
        breaker._trial_lock.release()


def test_force_open_and_reset() -> None:
    breaker, _, changes = make()
    breaker.force_open()
    assert breaker.state == "open"
    breaker.reset()
    assert breaker.state == "closed"
    assert changes == [("closed", "open"), ("open", "closed")]


def test_the_trial_is_one_call_and_only_its_holder_abandons_it() -> None:
    from dbrouter.resilience import ADMITTED, REFUSED, TRIAL

    breaker, clock, _ = make(fail_max=1, reset_timeout=5.0)
    assert breaker.admit() is ADMITTED
    breaker.failure(OSError())
    assert breaker.admit() is REFUSED
    clock.now += 5.1
    assert breaker.admit() is TRIAL
    assert breaker.admit() is REFUSED and not breaker.available()
    breaker.abandon_trial()  # the trial's checkout failed: another call may try
    assert breaker.available() and breaker.admit() is TRIAL


def test_a_lost_trial_ages_out_of_available_too() -> None:
    """Routing asks available() first: a trial that never reported back must not keep the
    node out of rotation for good."""
    breaker, clock, _ = make(fail_max=1, reset_timeout=5.0)
    breaker.failure(OSError())
    clock.now += 5.1
    assert breaker.allow()
    assert not breaker.available()
    clock.now += 5.1
    assert breaker.available()


def test_a_successful_probe_closes_a_half_open_breaker_and_an_open_one_past_its_timeout() -> None:
    breaker, clock, changes = make(fail_max=1, reset_timeout=5.0)
    breaker.failure(OSError())
    breaker.probe_succeeded()
    assert breaker.state == "open"  # before reset_timeout a probe changes nothing
    clock.now += 5.1
    breaker.probe_succeeded()
    assert breaker.state == "closed" and breaker.clean
    breaker.failure(OSError())
    clock.now += 5.1
    assert breaker.allow() and breaker.state == "half-open"
    breaker.probe_succeeded()
    assert breaker.state == "closed"
    assert changes[-2:] == [("open", "half-open"), ("half-open", "closed")]


def test_a_shared_closed_breaker_is_read_from_the_cache() -> None:
    """With shared (Redis) state, a closed breaker costs no round trip per call."""
    import pybreaker

    class Counting(pybreaker.CircuitMemoryStorage):
        reads = 0

        @property
        def state(self) -> str:
            Counting.reads += 1
            return super().state

        @state.setter
        def state(self, value: str) -> None:
            pybreaker.CircuitMemoryStorage.state.fset(self, value)  # type: ignore[attr-defined]

    clock = Clock()
    breaker = NodeBreaker("n1", BreakerPolicy(fail_max=3, breaker_refresh=0.5), clock=clock,
                          storage=Counting(pybreaker.STATE_CLOSED))
    Counting.reads = 0
    for _ in range(1000):
        assert breaker.allow()
        breaker.success()
    assert Counting.reads <= 2
    clock.now += 0.6
    assert breaker.allow() and Counting.reads <= 3


def test_failure_does_not_swallow_what_it_is_not_given() -> None:
    breaker, _, _ = make(fail_max=1)
    breaker.failure(KeyboardInterrupt())  # not a node failure: not counted, not raised
    assert breaker.state == "closed" and breaker.failures == 0


def test_a_shared_breaker_read_every_time_keeps_reading_the_shared_state() -> None:
    """breaker_refresh = 0 with shared storage: two breakers on one storage stand for two
    processes. Before: after a failure then a success, the first one computed its "clean"
    flag from the storage (a Redis read under its lock) and from then on ignored the shared
    state: the other's trip never reached it."""
    import pybreaker

    shared = pybreaker.CircuitMemoryStorage(pybreaker.STATE_CLOSED)
    clock = Clock()
    policy = BreakerPolicy(fail_max=1, reset_timeout=5.0, breaker_refresh=0)
    first = NodeBreaker("n1", BreakerPolicy(fail_max=2, reset_timeout=5.0, breaker_refresh=0), clock=clock,
                        storage=shared)
    second = NodeBreaker("n1", policy, clock=clock, storage=shared)
    first.failure(OSError("refused"))
    first.success()
    assert first.allow() and first.state == "closed"
    second.failure(OSError("refused"))
    assert second.state == "open"
    assert first.state == "open"
    assert not first.allow() and not first.available()
