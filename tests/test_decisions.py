"""The decision table and the retry executor (pure logic: no server, no sleeping)."""

from __future__ import annotations

import itertools

import pytest

from dbrouter.config import RetryPolicy
from dbrouter.decisions import Action, Failure, Phase, Work, decide
from dbrouter.retrying import Retry, RetryExecutor

ALL = list(itertools.product(Failure, Phase, Work))
LOST = (Failure.NODE_DOWN, Failure.HUNG)


@pytest.mark.parametrize(("failure", "phase", "work"), ALL, ids=lambda v: v.value)
def test_every_cell_is_decided_and_consistent(failure: Failure, phase: Phase, work: Work) -> None:
    decision = decide(failure, phase, work)
    assert isinstance(decision.action, Action)
    if decision.blame_node:
        assert decision.connection_lost, "a node blamed for a connection that is kept"
    if decision.demoted:
        assert failure is Failure.READ_ONLY and not decision.blame_node


@pytest.mark.parametrize(("failure", "phase", "work"), ALL, ids=lambda v: v.value)
def test_nothing_that_may_have_been_applied_runs_again(failure: Failure, phase: Phase, work: Work) -> None:
    """A plain write, an unchecked read or a transaction block runs again only while nothing of
    it reached the server."""
    decision = decide(failure, phase, work)
    if work in (Work.WRITE, Work.BLOCK, Work.UNCHECKED) and phase in (Phase.SENT, Phase.COMMIT):
        # A conflict or a read-only refusal is the server's own "not applied".
        assert decision.action is not Action.RETRY or (work is Work.WRITE and failure in (Failure.CONFLICT, Failure.READ_ONLY))
    if phase is Phase.COMMIT and failure in LOST and work not in (Work.IDEMPOTENT, Work.READ):
        assert decision.action is Action.UNKNOWN
    if work is Work.UNCHECKED and phase is Phase.SENT and failure in LOST:
        assert decision.action is Action.UNKNOWN  # issue 13 item 3: never replayed, like a write


@pytest.mark.parametrize("phase", list(Phase), ids=lambda v: v.value)
@pytest.mark.parametrize("work", list(Work), ids=lambda v: v.value)
def test_who_pays(phase: Phase, work: Work) -> None:
    for failure in LOST:
        assert decide(failure, phase, work).blame_node
    for failure in (Failure.REFUSED, Failure.BUSY, Failure.CONFLICT, Failure.READ_ONLY, Failure.TIMEOUT,
                    Failure.CALLER, Failure.INTERRUPTED, Failure.UNROUTABLE):
        assert not decide(failure, phase, work).blame_node, failure
    assert decide(Failure.INTERRUPTED, phase, work).connection_lost
    for failure in (Failure.CALLER, Failure.TIMEOUT):
        decision = decide(failure, phase, work)
        assert decision.action is Action.RAISE and not decision.connection_lost


def test_reads_go_elsewhere_after_any_node_failure_and_writes_only_when_safe() -> None:
    for phase in Phase:
        assert decide(Failure.NODE_DOWN, phase, Work.READ).action is Action.RETRY
        assert decide(Failure.NODE_DOWN, phase, Work.IDEMPOTENT).action is Action.RETRY
    assert decide(Failure.NODE_DOWN, Phase.CONNECT, Work.WRITE).action is Action.RETRY
    assert decide(Failure.NODE_DOWN, Phase.SENT, Work.WRITE).action is Action.UNKNOWN
    assert decide(Failure.NODE_DOWN, Phase.SENT, Work.RERUN).action is Action.RETRY  # rolled back by the server
    assert decide(Failure.NODE_DOWN, Phase.SENT, Work.BLOCK).action is Action.RAISE
    assert decide(Failure.REFUSED, Phase.CONNECT, Work.WRITE).action is Action.RETRY
    assert decide(Failure.BUSY, Phase.CONNECT, Work.READ).action is Action.RETRY
    assert decide(Failure.BUSY, Phase.CONNECT, Work.WRITE).action is Action.RAISE
    assert decide(Failure.READ_ONLY, Phase.SENT, Work.WRITE).demoted
    assert not decide(Failure.READ_ONLY, Phase.SENT, Work.READ).demoted  # nextval() on a replica


def test_an_unchecked_read_goes_elsewhere_only_until_it_was_sent() -> None:
    for failure in (Failure.NODE_DOWN, Failure.HUNG, Failure.REFUSED, Failure.BUSY):
        assert decide(failure, Phase.CONNECT, Work.UNCHECKED).action is Action.RETRY, failure
    for failure in (Failure.NODE_DOWN, Failure.HUNG):
        assert decide(failure, Phase.SENT, Work.UNCHECKED).action is Action.UNKNOWN
    assert decide(Failure.CONFLICT, Phase.SENT, Work.UNCHECKED).action is Action.RAISE
    assert not decide(Failure.READ_ONLY, Phase.SENT, Work.UNCHECKED).demoted


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.pauses.append(seconds)
        self.now += seconds

    pauses: list[float]


def make_executor(**policy: float) -> tuple[RetryExecutor, Clock]:
    clock = Clock()
    clock.pauses = []
    settings = {"retry_attempts": 4, "retry_deadline": 60.0, "retry_backoff": 0.1, "retry_backoff_max": 0.3, **policy}
    return RetryExecutor(RetryPolicy(**settings), sleep=clock.sleep, clock=clock), clock


def failing(calls: list[int], error: BaseException | None = None) -> Retry:
    calls.append(1)
    cause = error or ConnectionError("down")
    from dbrouter.decisions import Decision

    raise Retry("n1", cause, Failure.NODE_DOWN, Phase.CONNECT, Decision(Action.RETRY))


def test_executor_is_bounded_by_attempts_with_jittered_backoff() -> None:
    executor, clock = make_executor()
    calls: list[int] = []
    with pytest.raises(Retry):
        executor.run(lambda: failing(calls))
    assert len(calls) == 4 and len(clock.pauses) == 3
    assert all(0.1 <= s <= 0.3 + 1e-9 for s in clock.pauses)


def test_executor_stops_at_the_deadline_and_never_sleeps_past_it() -> None:
    executor, clock = make_executor(retry_attempts=100, retry_deadline=0.5, retry_backoff=0.2, retry_backoff_max=0.2)
    calls: list[int] = []
    with pytest.raises(Retry):
        executor.run(lambda: failing(calls))
    assert clock.now <= 0.5 + 1e-9 and len(calls) >= 2 and all(p <= 0.2 + 1e-9 for p in clock.pauses)


def test_executor_raises_anything_but_retry_at_once() -> None:
    executor, clock = make_executor()
    calls: list[int] = []

    def caller_error() -> None:
        calls.append(1)
        raise ValueError("syntax")

    with pytest.raises(ValueError):
        executor.run(caller_error)
    assert calls == [1] and clock.pauses == []


def test_executor_window_and_give_up() -> None:
    executor, clock = make_executor(retry_attempts=2)
    calls: list[int] = []
    # While the window is open the attempt count does not stop the call.
    with pytest.raises(Retry):
        executor.run(lambda: failing(calls), keep_going=lambda last: clock.now < 1.0,
                     pause=lambda last, s: clock.sleep(0.25))
    assert len(calls) == 5 and clock.now == pytest.approx(1.0)
    calls.clear()
    with pytest.raises(Retry):
        executor.run(lambda: failing(calls), give_up=lambda last: True)
    assert calls == [1]


def test_executor_returns_the_first_success() -> None:
    executor, _ = make_executor()
    calls: list[int] = []

    def second_time_lucky() -> str:
        if not calls:
            failing(calls)
        return "rows"

    assert executor.run(second_time_lucky) == "rows"
