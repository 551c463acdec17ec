"""NodeBreaker state machine and the retry policy (pure logic, fake clock, no sleeping)."""

from __future__ import annotations

import threading

import pytest

from dbrouter.config import BreakerPolicy, RetryPolicy
from dbrouter.resilience import NodeBreaker
from dbrouter.retrying import build_retrying


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


def test_retrying_is_bounded_by_attempts_and_retries_only_what_the_predicate_accepts() -> None:
    sleeps: list[float] = []
    policy = RetryPolicy(retry_attempts=4, retry_deadline=60, retry_backoff=0.1, retry_backoff_max=0.3)
    calls = []

    def flaky() -> None:
        calls.append(1)
        raise ConnectionError("down")

    with pytest.raises(ConnectionError):
        for attempt in build_retrying(policy, lambda e: isinstance(e, ConnectionError), sleep=sleeps.append):
            with attempt:
                flaky()
    assert len(calls) == 4 and len(sleeps) == 3
    assert all(0.1 <= s <= 0.3 + 1e-9 for s in sleeps)
    calls.clear()
    with pytest.raises(ValueError):
        for attempt in build_retrying(policy, lambda e: isinstance(e, ConnectionError), sleep=sleeps.append):
            with attempt:
                calls.append(1)
                raise ValueError("caller error")
    assert len(calls) == 1


def test_retrying_stops_at_the_deadline() -> None:
    policy = RetryPolicy(retry_attempts=100, retry_deadline=0.05, retry_backoff=0.02, retry_backoff_max=0.02)
    calls = []
    with pytest.raises(ConnectionError):
        for attempt in build_retrying(policy, lambda e: True):
            with attempt:
                calls.append(1)
                raise ConnectionError()
    assert 1 < len(calls) < 10
