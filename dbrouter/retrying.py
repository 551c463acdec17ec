"""The one retry executor: tenacity, bounded by attempts, a deadline and a budget, with jitter.

Reads, writes and `run_transaction` all retry through `RetryExecutor.run`.
A `RetryBudget` caps what all of a router's retries add to its traffic, so
that clients do not bury an overloaded database in their own retries.
What may run again is the decision table's call (`dbrouter.decisions`): an
attempt raises `Retry` to ask for another go and anything else to stop. The
sleep is injectable (tests record the pauses instead of sleeping), and a call
may replace the pause, as writes do to wait for a failover instead of sleeping.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from typing import Any, Awaitable, Callable, TypeVar

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    wait_exponential,
    wait_random,
)
from tenacity.wait import wait_base

from .config import RetryPolicy
from .decisions import Decision, Failure, Phase

__all__ = ["Retry", "RetryBudget", "RetryExecutor", "backoff"]

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
        self.budget_spent = False  # set when the retry budget refused to run it again


def backoff(policy: RetryPolicy) -> wait_base:
    """backoff, 2 x backoff, 4 x backoff ... plus up to one backoff of jitter, never above the max."""
    return (wait_exponential(multiplier=policy.retry_backoff, max=max(0.0, policy.retry_backoff_max - policy.retry_backoff))
            + wait_random(0, min(policy.retry_backoff, policy.retry_backoff_max)))


class RetryBudget:
    """Finagle's retry budget: over the last ``window`` seconds, retries may add at most
    ``ratio`` of the requests made, plus ``floor`` retries per second (so that a quiet
    router can still retry).

    Costs nothing per request: it reads the router's request counter (``requests()``,
    a running total) only when a retry asks, remembering the totals at most once a
    second; between two such marks, requests are taken as evenly spread.
    """

    def __init__(self, ratio: float, floor: float, requests: Callable[[], int], *, window: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ratio = ratio
        self.floor = floor
        self.window = window
        self._requests = requests
        self._clock = clock
        self._lock = threading.Lock()  # guards the marks and the total; nothing is called under it but the counter
        self._retries = 0  # retries allowed, in all
        self._marks: deque[tuple[float, int, int]] = deque([(clock(), requests(), 0)])  # (time, requests, retries)

    def allow(self) -> bool:
        """Whether one more retry fits in the budget; if it does, it is counted."""
        now = self._clock()
        requests = self._requests()
        with self._lock:
            marks = self._marks
            while len(marks) > 1 and marks[1][0] <= now - self.window:
                marks.popleft()  # keep one mark at or before the window's start
            start = max(marks[0][0], now - self.window)
            # The totals at the window's start: interpolated between the points around it
            # (of points at the same time, the first: retries made since came after it).
            points = [*marks, (now, requests, self._retries)]
            before, after = points[0], None
            for point in points[1:]:
                if point[0] > start:
                    after = point
                    break
                if point[0] > before[0]:
                    before = point
            base_requests, base_retries = float(before[1]), float(before[2])
            if after is not None:
                share = (start - before[0]) / (after[0] - before[0])
                base_requests += (after[1] - before[1]) * share
                base_retries += (after[2] - before[2]) * share
            made, retried = requests - base_requests, self._retries - base_retries
            allowed = retried + 1 <= self.ratio * made + self.floor * max(1.0, now - start)
            if allowed:
                self._retries += 1
            if now - marks[-1][0] >= 1.0:
                marks.append((now, requests, self._retries))
            return allowed


class RetryExecutor:
    """Runs an attempt until it returns, raises something other than `Retry`, or the
    budget (attempts and deadline) is spent; then the last `Retry` is raised."""

    def __init__(self, policy: RetryPolicy, *, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic, budget: RetryBudget | None = None,
                 on_refused: Callable[[Retry], object] | None = None) -> None:
        self.policy = policy
        self._sleep = sleep
        self._clock = clock
        self._wait = backoff(policy)
        self._budget = budget
        self._on_refused = on_refused

    def admit(self, failed: Retry) -> bool:
        """Whether a retry after ``failed`` fits in the budget (a caller that retries on its
        own, outside `run`, asks first)."""
        if self._budget is None or self._budget.allow():
            return True
        failed.budget_spent = True
        if self._on_refused is not None:
            self._on_refused(failed)
        return False

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
        costs nothing when it succeeds) and it failed so; it counts as attempt 1.
        Every retry but those inside ``keep_going``'s window (which wait for a new primary
        rather than try a node again) draws on the budget; when it is spent, the call
        ends with the last `Retry` as if its attempts were used up."""
        clock = self._clock
        until = clock() + self.policy.retry_deadline if deadline is None else deadline
        last: list[Retry] = []
        stop = self._stop(attempts, until, keep_going, give_up, last)

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

    def _stop(self, attempts: int | None, until: float, keep_going: Callable[[Retry], bool] | None,
              give_up: Callable[[Retry], bool] | None, last: list[Retry]) -> Callable[[RetryCallState], bool]:
        """When to stop, shared by `run` and `run_async` (``last`` gets the latest `Retry`)."""
        clock = self._clock
        limit = self.policy.retry_attempts if attempts is None else attempts

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
            if state.attempt_number >= limit or clock() >= until:
                return True
            return not self.admit(error)

        return stop

    async def run_async(
        self,
        attempt: Callable[[], Awaitable[T]],
        *,
        attempts: int | None = None,
        deadline: float | None = None,
        after: Retry | None = None,
        keep_going: Callable[[Retry], bool] | None = None,
        give_up: Callable[[Retry], bool] | None = None,
        pause: Callable[[Retry, float], Awaitable[None]] | None = None,
        on_retry: Callable[[], object] | None = None,
    ) -> T:
        """`run` for an awaited ``attempt`` (the asyncio router): the same stop rules and
        backoff; the pauses are awaited (``asyncio.sleep`` unless ``pause`` replaces it)."""
        clock = self._clock
        until = clock() + self.policy.retry_deadline if deadline is None else deadline
        last: list[Retry] = []
        stop = self._stop(attempts, until, keep_going, give_up, last)

        async def sleep(seconds: float) -> None:
            if on_retry is not None:
                on_retry()
            seconds = max(0.0, min(seconds, until - clock()))
            if pause is not None and last:
                await pause(last[0], seconds)
            elif seconds > 0:
                await asyncio.sleep(seconds)

        retrying = AsyncRetrying(stop=stop, wait=self._wait, retry=retry_if_exception_type(Retry), reraise=True,
                                 sleep=sleep)
        replay = [after] if after is not None else []

        async def attempt_after_first() -> T:
            if replay:
                raise replay.pop()
            return await attempt()

        result: T = await retrying(attempt_after_first)
        return result
