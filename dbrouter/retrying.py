"""The one retry executor: tenacity, bounded by attempts and a deadline, with jitter.

Reads, writes and `run_transaction` all retry through `RetryExecutor.run`.
What may run again is the decision table's call (`dbrouter.decisions`): an
attempt raises `Retry` to ask for another go and anything else to stop. The
sleep is injectable (tests record the pauses instead of sleeping), and a call
may replace the pause, as writes do to wait for a failover instead of sleeping.
"""

from __future__ import annotations

import time
from typing import Any, Callable, TypeVar

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    wait_exponential,
    wait_random,
)
from tenacity.wait import wait_base

from .config import RetryPolicy
from .decisions import Decision, Failure, Phase

__all__ = ["Retry", "RetryExecutor", "backoff"]

T = TypeVar("T")


class Retry(Exception):
    """Raised by an attempt that the decision table says may run again."""

    def __init__(self, node: Any, cause: BaseException, failure: Failure, phase: Phase, decision: Decision) -> None:
        super().__init__(str(cause))
        self.node = node
        self.cause = cause
        self.failure = failure
        self.phase = phase
        self.decision = decision


def backoff(policy: RetryPolicy) -> wait_base:
    """backoff, 2 x backoff, 4 x backoff ... plus up to one backoff of jitter, never above the max."""
    return (wait_exponential(multiplier=policy.retry_backoff, max=max(0.0, policy.retry_backoff_max - policy.retry_backoff))
            + wait_random(0, min(policy.retry_backoff, policy.retry_backoff_max)))


class RetryExecutor:
    """Runs an attempt until it returns, raises something other than `Retry`, or the
    budget (attempts and deadline) is spent; then the last `Retry` is raised."""

    def __init__(self, policy: RetryPolicy, *, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self._sleep = sleep
        self._clock = clock
        self._wait = backoff(policy)

    def run(
        self,
        attempt: Callable[[], T],
        *,
        attempts: int | None = None,
        deadline: float | None = None,
        after: Retry | None = None,
        keep_going: Callable[[Retry], bool] | None = None,
        give_up: Callable[[Retry], bool] | None = None,
        pause: Callable[[Retry, float], None] | None = None,
        on_retry: Callable[[], object] | None = None,
    ) -> T:
        """``attempts`` (default ``retry_attempts``) and ``deadline`` (monotonic; default
        ``retry_deadline`` from now) bound the attempts, except while ``keep_going(last)``
        says the call's own window is open (a write waiting for a failover); past it,
        ``give_up(last)`` ends the call at once. ``pause(last,
        seconds)`` replaces the sleep between attempts; no pause runs past the deadline.
        ``after``: the caller already made the first attempt (outside the executor, which
        costs nothing when it succeeds) and it failed so; it counts as attempt 1."""
        clock = self._clock
        limit = self.policy.retry_attempts if attempts is None else attempts
        until = clock() + self.policy.retry_deadline if deadline is None else deadline
        last: list[Retry] = []

        def stop(state: RetryCallState) -> bool:
            outcome = state.outcome
            error = outcome.exception() if outcome is not None else None
            if not isinstance(error, Retry):
                return True
            last[:] = [error]
            if keep_going is not None and keep_going(error):
                return False
            if give_up is not None and give_up(error):
                return True
            return state.attempt_number >= limit or clock() >= until

        def sleep(seconds: float) -> None:
            if on_retry is not None:
                on_retry()
            seconds = max(0.0, min(seconds, until - clock()))
            if pause is not None and last:
                pause(last[0], seconds)
            elif seconds > 0:
                self._sleep(seconds)

        retrying = Retrying(stop=stop, wait=self._wait, retry=retry_if_exception_type(Retry), reraise=True, sleep=sleep)
        if after is None:
            return retrying(attempt)
        replay = [after]

        def attempt_after_first() -> T:
            if replay:
                raise replay.pop()
            return attempt()

        return retrying(attempt_after_first)
