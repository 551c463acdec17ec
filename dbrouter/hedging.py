"""Budgeted hedged reads: a read still running after ``hedge_after`` is also sent to another
replica; the first answer wins and the other is cut and cancelled, or with psycopg 3 and
pure-Python MySQL, drained.

Opt-in (``hedge_after`` seconds, or ``"auto"``: the first node's recent p95 read time), for
`Router.read` only: never for writes, transactions, sessions, streams or ``unchecked``
reads, and only to another replica (never the primary). ``hedge_budget`` caps the extra
reads (5% of reads over the last 10 s, plus one a second): past it a slow read just waits.

Nearly every read ends long before its threshold, so what a hedged read costs when no hedge
is sent is kept to a few allocations: the read puts a `_Flight` in its thread's slot (an
attribute store: a thread runs one read at a time) when its statement starts, and settles it
when it ends (a ``list.pop``, atomic under the GIL: whoever pops the flight's one claim first
decides, the read that finished or the watcher that found it late). No lock, no timer heap
and no thread wake-up per read: one watcher thread per router looks at the slots (one per
reading thread), and sleeps until the earliest threshold of the reads still running.
(A timer armed and disarmed per read, the first design, doubled the median read time of 4
threads on 2 cores and raised p99 7-fold in the bench's spikes scenario; a queue of every
read, the second, had the watcher drop a few hundred ended reads at each wake-up, about a
hundred times a second on a busy client.)

`HedgePolicy` is what is not I/O (the threshold, the budget, the counts, where a hedge goes),
shared with the asyncio router's hedged reads (`dbrouter.aio.hedging`), which use the same
object.

Only a flight found late gets a `_Race`, whose lock decides between the two answers:
whoever finishes first marks the race won, and marks the other's lease cut before shutting
its socket down, so the loser's lease is discarded (not pooled with a dead socket) and its
node not blamed; the server is asked to cancel the loser's statement. A lease is marked won
or cut only before its statement's result leaves the operation that ran it, so a connection
is never cut after it went back to its pool.

With a driver whose wait dbrouter runs (`Adapter.overtakes`: psycopg 3, pure-Python MySQL),
the first read is not cut when the hedge wins: its lease is marked overtaken and its
thread's `Waker` fired (`dbrouter.adapters._waker`), so its wait raises `Overtaken` and the
read returns the hedge's rows; the lease hands the connection, its statement still in
flight, to a drain thread (the rest of the answer read, pooled again: `dbrouter.lease`). Cutting
cost a login per hedge won (the replacement connection), which on a busy client slowed the
reads beside it more than the hedge saved. The hedge's own lease, when the first read wins,
is still cut: it runs on a worker, and that is rare.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from . import _fork
from ._counter import Counter
from .adapters._waker import Waker, thread_waker
from .decisions import Phase, Work
from .lease import Lease, take
from .retrying import Retry, RetryBudget
from .routing import statement

if TYPE_CHECKING:
    from .pool import _Entry
    from .routing import Core
    from .topology import Node

__all__ = ["HedgePolicy", "Hedger"]

log = logging.getLogger("dbrouter.hedging")

AUTO = "auto"
_SAMPLES = 256  # recent read times per node, for "auto"
_MIN_SAMPLES = 32  # fewer: no auto threshold yet, no hedge
_AUTO_FLOOR = 0.010  # seconds: a hedge that wins costs its loser's connection (a reconnect, ~5 ms);
# below this, scheduling jitter on a busy client would set hedges off that cannot pay for themselves
_AUTO_REFRESH = 0.5  # seconds between recomputations of a node's p95


class HedgePolicy:
    """When a read is hedged, and how many may be: the threshold (seconds, or "auto"), the
    budget and the counts (`Router.stats`' hedges, hedges_won, hedges_refused). No I/O:
    the sync router's `Hedger` is one, and the asyncio router's hedges use the same object."""

    def __init__(self, core: Core, hedge_after: float | str, budget: float) -> None:
        self._core = core
        self._after = hedge_after
        counts = core.counts
        self.budget = RetryBudget(budget, 1.0, lambda: counts.reads.value)
        self.sent = Counter()
        self.won = Counter()
        self.refused = Counter()
        self._p95: dict[str, tuple[float, float | None]] = {}  # node name -> (computed at, p95 or None)

    def admit(self) -> bool:
        """Whether a hedge may start now (the budget allows it); a refusal is counted. The
        caller counts the hedge in ``sent`` once it started."""
        if self.budget.allow():
            return True
        self.refused.inc()
        return False

    def other_replica(self, node: Node) -> Node | None:
        """Where a hedge of a read on ``node`` goes: another replica serving reads, by the
        router's policy; None when there is none."""
        core = self._core
        snapshot = core.topology.snapshot
        others = [n for n in snapshot.readable if n is not node and n in snapshot.replicas]
        if not others:
            return None
        chosen: Node = core._balancer.choose(others)  # type: ignore[assignment]
        return chosen

    def threshold(self, node: Node) -> float | None:
        """Seconds after which a read on ``node`` is hedged (None: not hedged now)."""
        after = self._after
        if not isinstance(after, str):
            return after
        now = time.monotonic()
        computed = self._p95.get(node.name)
        if (computed is None or now - computed[0] >= _AUTO_REFRESH
                or (computed[1] is None and len(node.read_times) >= _MIN_SAMPLES)):
            samples = sorted(node.read_times)
            p95 = None if len(samples) < _MIN_SAMPLES else max(_AUTO_FLOOR, samples[int(0.95 * (len(samples) - 1))])
            computed = (now, p95)
            self._p95[node.name] = computed
        return computed[1]


class Hedger(HedgePolicy):
    """A sync router's hedged reads: the policy, the watcher, and the workers that run the hedges."""

    def __init__(self, core: Core, hedge_after: float | str, budget: float, workers: int = 4) -> None:
        super().__init__(core, hedge_after, budget)
        self._workers = workers
        self._executor: ThreadPoolExecutor | None = None
        self._start_lock = threading.Lock()  # guards the watcher's and the executor's creation; nothing is called under it
        # One slot per thread that reads (copied on write under _start_lock: the watcher reads
        # it without a lock); dead threads' slots are dropped by the watcher.
        self._slots: list[_Slot] = []
        self._local = threading.local()
        self._watcher: threading.Thread | None = None
        self._idle = True  # the watcher waits for a first flight (set it going with _kick)
        self._kick = threading.Event()
        self._closed = False
        _fork.register(self)

    def _after_fork_in_child(self) -> None:
        self._executor = None  # the parent's threads do not exist here
        self._watcher = None
        self._start_lock = threading.Lock()
        self._slots = []  # the parent's threads
        self._local = threading.local()  # the forking thread's slot would be watched by no one
        self._idle = True
        self._kick = threading.Event()

    def close(self) -> None:
        self._closed = True
        self._kick.set()
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)

    def fly(self, node: Node, entry: _Entry, sql: str, params: Any, after: float) -> _Flight:
        """`Core.read`'s fast path: its statement on ``entry`` starts now, hedged past ``after``
        (settle the flight when it ends)."""
        flight = _Flight(self, node, sql, params, after)
        flight.entry = entry
        flight.start(entry.conn)
        return flight

    def read_leased(self, node: Node, sql: str, params: Any, after: float) -> list[tuple[Any, ...]]:
        """``sql`` as a read on ``node`` through a lease (a breaker that is not clean, the
        hung-statement guard or a deadline: what `Core.read`'s fast path leaves out), hedged
        on another replica past ``after``."""
        core = self._core
        flight = _Flight(self, node, sql, params, after)
        try:
            rows, _ = core.run_on(node, flight.first, Work.READ)
        except BaseException as exc:
            race = flight.settle()
            if race is not None:
                won = race.hedge_rows()
                if won is not None:
                    return won  # the hedge answered first (and cut this read, or it failed on its own)
                race.call_off()
            if isinstance(exc, Retry):  # the first node failed: the usual retries
                return core.read_again(exc, statement(sql, params))
            raise
        return rows or []

    # -- the watcher -------------------------------------------------------------------

    def enlist(self, flight: _Flight) -> None:
        """A read's statement starts: the watcher looks at it once its threshold passed."""
        try:
            slot: _Slot = self._local.slot
        except AttributeError:
            slot = self._local.slot = _Slot()
            with self._start_lock:
                self._slots = [*self._slots, slot]
        slot.flight = flight
        if self._idle:  # read after the store: see _watch
            if self._watcher is None:
                self._start_watcher()
            self._kick.set()

    def _start_watcher(self) -> None:
        with self._start_lock:
            if self._watcher is not None or self._closed:
                return
            watcher = self._watcher = threading.Thread(target=self._watch, name="dbrouter-hedge-watch", daemon=True)
        watcher.start()  # not under the lock: starting a thread waits for it to run

    def _watch(self) -> None:
        kick = self._kick
        while not self._closed:
            earliest = self._scan()
            if earliest is None:
                self._idle = True  # published before the slots are looked at again: a read
                if self._scan() is None:  # that starts after this look sees it and kicks
                    kick.wait()
                kick.clear()
                self._idle = False
                continue
            wait = earliest - time.monotonic()
            if wait > 0:
                kick.wait(wait)
                kick.clear()

    def _scan(self) -> float | None:
        """Hedge the reads found late; the earliest threshold of the others still running
        (None: none runs)."""
        now = time.monotonic()
        earliest = None
        dead = False
        for slot in self._slots:
            flight = slot.flight
            if flight is None or not flight.claim:  # none yet, or ended (or already hedged)
                dead = dead or not slot.alive()
                continue
            due = flight.due
            if due <= now:
                try:
                    self._late(flight)
                except Exception:  # noqa: BLE001 - the watcher must keep running
                    log.exception("starting a hedged read failed")
            elif earliest is None or due < earliest:
                earliest = due
        if dead:
            with self._start_lock:
                self._slots = [slot for slot in self._slots if slot.alive()]
        return earliest

    def _late(self, flight: _Flight) -> None:
        """``flight`` is still running past its threshold: hedge it, if the budget allows."""
        race = flight.race = _Race(self, flight)  # before the claim: the read finds it there
        try:
            flight.claim.pop()
        except IndexError:
            return  # it ended meanwhile
        if not self.admit():
            race.call_off()
            return
        if self._submit(race):
            self.sent.inc()
        else:
            race.call_off()

    def _submit(self, race: _Race) -> bool:
        executor = self._executor
        if executor is None:
            with self._start_lock:
                executor = self._executor
                if executor is None:
                    if self._closed:
                        return False
                    executor = self._executor = ThreadPoolExecutor(self._workers, thread_name_prefix="dbrouter-hedge")
        try:
            executor.submit(contextvars.copy_context().run, race.run_hedge)
        except RuntimeError:  # shut down: the router is closing
            return False
        return True


class _Slot:
    """A reading thread's read in flight (the last one; a thread runs one read at a time)."""

    __slots__ = ("flight", "thread")

    def __init__(self) -> None:
        self.flight: _Flight | None = None
        self.thread = threading.current_thread()  # kept until the watcher drops the slot

    def alive(self) -> bool:
        return self.thread.is_alive()


class _Flight:
    """One hedgeable read: its statement, its lease once it started, when it is late, and
    its one claim (`settle` and the watcher each try to pop it; only one can)."""

    __slots__ = ("hedger", "node", "sql", "params", "after", "due", "claim", "lease", "entry", "race", "waker", "conn")

    def __init__(self, hedger: Hedger, node: Node, sql: str, params: Any, after: float) -> None:
        self.hedger = hedger
        self.node = node
        self.sql = sql
        self.params = params
        self.after = after
        self.due = 0.0
        self.claim = [True]
        self.lease: Lease | None = None  # through `Hedger.read_leased`
        self.entry: _Entry | None = None  # on `Core.read`'s fast path
        self.race: _Race | None = None
        self.waker: Waker | None = None  # armed while the statement runs, when the driver `overtakes`
        self.conn: Any = None  # the connection the waker is set on

    def first(self, lease: Lease) -> Any:
        """`Hedger.read_leased`: run the read on ``lease`` (an operation for `Core.run_on`). Timed from the statement's
        start: a read that waits for a connection is not hedged (a hedge that wins costs its
        loser's connection, and a pool short of connections would feed on that)."""
        self.lease = lease
        self.start(lease.conn)
        result = lease.execute(self.sql, self.params)
        race = self.settle()
        if race is not None:
            race.first_done()  # decided while the lease is still held
        return result

    def start(self, conn: Any) -> None:
        """The statement starts now on ``conn``: the watcher looks at it once ``after`` has
        passed. A driver whose wait a hedge can end (`Adapter.overtakes`) gets the thread's
        `Waker`, armed for this read."""
        self.due = time.monotonic() + self.after
        adapter = self.node.adapter
        if adapter.overtakes:
            waker = self.waker = thread_waker()
            waker.arm(self)
            adapter.watch(conn, waker)
            self.conn = conn
        self.hedger.enlist(self)

    def settle(self) -> _Race | None:
        """The read ended: None when no hedge was started (nor will be), else its race."""
        conn = self.conn
        if conn is not None:  # disarmed: the connection's next statement waits as the driver does
            waker = self.waker
            self.conn = None
            self.node.adapter.unwatch(conn, waker)
            waker.armed = None  # type: ignore[union-attr]
        try:
            self.claim.pop()
        except IndexError:
            return self.race
        self.params = None  # the watcher may hold this flight until the threshold: keep it small
        self.lease = self.entry = None
        return None


_RUNNING, _FIRST_WON, _HEDGE_WON, _CALLED_OFF = 0, 1, 2, 3


class _Race:
    """One hedged read found late: the first read's lease, the hedge's, and who won (under ``_lock``)."""

    def __init__(self, hedger: Hedger, flight: _Flight) -> None:
        self._hedger = hedger
        self._node = flight.node
        self._sql = flight.sql
        self._params = flight.params
        self._lock = threading.Lock()  # guards the fields below; only flags are set under it
        self._state = _RUNNING
        # The fast path has no lease: the race makes one (the first read's, released by it).
        # Read once: the read may settle meanwhile and clear it (the claim then tells).
        entry = flight.entry
        self._first = flight.lease if entry is None else Lease(flight.node, entry, timed=True)
        self._waker = flight.waker  # set: the first read's wait can be ended without a cut
        self._flight = flight  # the token the waker is armed with
        self._hedge: Lease | None = None
        self._rows: list[tuple[Any, ...]] | None = None

    # -- the first read's side ----------------------------------------------------------

    def first_done(self) -> None:
        """The first read answered: it wins unless the hedge did (then its lease is marked cut)."""
        loser = None
        with self._lock:
            if self._state == _RUNNING:
                self._state = _FIRST_WON
                loser = self._claim_cut(self._hedge)
        _cut(loser)

    @property
    def first_lease(self) -> Lease | None:
        return self._first

    def first_answered(self) -> None:
        """The fast path's first read answered: the race decided, its connection given back
        (discarded when the hedge won and cut it)."""
        self.first_done()
        assert self._first is not None
        self._first.release()

    def hedge_rows(self) -> list[tuple[Any, ...]] | None:
        with self._lock:
            return self._rows if self._state == _HEDGE_WON else None

    def call_off(self) -> None:
        """No hedge after all (the budget, a closing router), or the first read failed on its
        own: the hedge, if any, is cut (the caller retries)."""
        with self._lock:
            if self._state != _RUNNING:
                return
            self._state = _CALLED_OFF
            loser = self._claim_cut(self._hedge)
        _cut(loser)

    # -- the hedge's side ----------------------------------------------------------------

    def run_hedge(self) -> None:
        node = self._hedger.other_replica(self._node)
        if node is None:
            return
        try:
            lease = take(node)
        except Exception as exc:  # noqa: BLE001 - a hedge that cannot start changes nothing
            log.debug("hedge on %s not started: %s", node.name, exc)
            return
        with self._lock:
            if self._state != _RUNNING:
                lease.release()
                return
            self._hedge = lease
        try:
            rows, _ = lease.execute(self._sql, self._params)
        except BaseException as exc:
            lease.release_after(exc, Phase.SENT, Work.READ)
            if not isinstance(exc, Exception):
                raise
            return
        won, loser, overtake = False, None, False
        with self._lock:
            if self._state == _RUNNING:
                self._state, won = _HEDGE_WON, True
                self._rows = rows or []
                first = self._first
                if self._waker is not None and first is not None and not first.released:
                    first.mark_overtaken()
                    overtake = True
                else:
                    loser = self._claim_cut(first)
        lease.release()
        if won:
            self._hedger.won.inc()
        if overtake:
            assert self._waker is not None
            self._waker.fire(self._flight)  # its wait ends; its connection is drained, not lost
        _cut(loser)

    @staticmethod
    def _claim_cut(lease: Lease | None) -> Lease | None:
        """Mark the loser's lease cut (under the race's lock, before its socket is): its
        owner then discards the connection instead of pooling it."""
        if lease is None or lease.released:
            return None
        lease.mark_cut()
        return lease


def _cut(lease: Lease | None) -> None:
    if lease is not None:
        lease.cut_now()
