"""A mixed read/write workload through a router, recording what the application saw.

Used by failover drills and by the resilience tests. Every write inserts a row
with a unique id, and the ids the router acknowledged are kept, so that after
a fault one can count lost writes (acknowledged but absent) and duplicated
writes (present more than once; the table has no unique key on purpose, so a
write applied twice would show).

Two ways to run it, one model: `Workload` runs threads through a `Router`,
`AsyncWorkload` runs asyncio tasks through an `AsyncRouter` on an event loop in a
thread of its own. Both record every operation as an `Op` and check the writes
with `BaseWorkload`'s code.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import logging
import random
import resource
import sys
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Generic, TypeVar

from .adapters.base import Rows
from .aio.router import AsyncRouter
from .errors import DbRouterError
from .router import Router

__all__ = ["AsyncWorkload", "BaseWorkload", "Op", "Workload"]

log = logging.getLogger("dbrouter.workload")

DEFAULT_TABLE = "dbrouter_drill"
SLOW_CALLBACK = 0.005
"""Seconds: with asyncio's debug mode on, a callback that runs this long on the loop is reported."""

R = TypeVar("R")
T = TypeVar("T")


@dataclass(frozen=True)
class Op:
    """One operation as the application saw it."""

    kind: str  # "read" or "write"
    start: float  # monotonic seconds
    end: float
    error: str | None = None  # exception class name, None when it succeeded
    row_id: int | None = None  # the id a write inserted
    detail: str | None = None  # the first line of the error message

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def latency(self) -> float:
        return self.end - self.start


@dataclass
class BaseWorkload(Generic[R]):
    """What both workloads share: the settings, the statements, the write ids, the record
    of operations and the check of the writes. `Workload` and `AsyncWorkload` add the
    workers (threads or tasks); see `Workload` for the settings.
    """

    router: R
    threads: int = 8
    write_ratio: float = 0.3
    rate: float | None = None
    duration: float = 60.0
    table: str = DEFAULT_TABLE
    ops: list[Op] = field(default_factory=list)
    _ids: Any = field(default_factory=lambda: itertools.count(1))
    _lock: threading.Lock = field(default_factory=threading.Lock)
    started_at: float = 0.0

    kind = ""
    """``threads`` or ``asyncio``: how the workers run (for reports)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.write_ratio <= 1.0:
            raise ValueError(f"write_ratio must be between 0 and 1, got {self.write_ratio}")
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")

    @property
    def writers(self) -> int:
        """How many of the workers only write (the others only read)."""
        if self.write_ratio == 0.0 or self.threads == 1:
            return 0 if self.write_ratio == 0.0 else 1
        if self.write_ratio == 1.0:
            return self.threads
        return min(self.threads - 1, max(1, round(self.threads * self.write_ratio)))

    def _role(self, index: int) -> str:
        """``write``, ``read``, or ``mixed`` (a single worker does both)."""
        return "mixed" if self.threads == 1 else "write" if index < self.writers else "read"

    def _writes_next(self, role: str, rng: random.Random) -> bool:
        return role == "write" or (role == "mixed" and rng.random() < self.write_ratio)

    @property
    def _interval(self) -> float:
        """Seconds between one worker's operations under ``rate``; 0 runs flat out."""
        return self.threads / self.rate if self.rate else 0.0

    # -- the statements -------------------------------------------------------------

    def _setup_statements(self) -> list[str]:
        """The table, empty, with no key: duplicates must show."""
        return [f"DROP TABLE IF EXISTS {self.table}",
                f"CREATE TABLE {self.table} (id bigint NOT NULL, worker int NOT NULL)"]

    def _insert(self, index: int) -> tuple[int, str, tuple[int, int]]:
        """A new write id, and the statement that writes it."""
        row_id = next(self._ids)
        return row_id, f"INSERT INTO {self.table} (id, worker) VALUES (%s, %s)", (row_id, index)

    def _select(self, rng: random.Random) -> tuple[str, tuple[int]]:
        return f"SELECT count(*) FROM {self.table} WHERE id = %s", (rng.randrange(1, 1_000_000),)

    @property
    def _ids_statement(self) -> str:
        return f"SELECT id FROM {self.table}"

    # -- the record --------------------------------------------------------------------

    def _record(self, op: Op) -> None:
        with self._lock:
            self.ops.append(op)

    def _done(self, kind: str, start: float, exc: BaseException | None = None, row_id: int | None = None) -> None:
        """Record an operation begun at ``start`` that ended now, failed with ``exc`` or not."""
        end = time.monotonic()
        if exc is None:
            self._record(Op(kind, start, end, None, row_id))
        else:
            self._record(Op(kind, start, end, type(exc).__name__, row_id, _first_line(exc)))

    def snapshot(self) -> list[Op]:
        with self._lock:
            return list(self.ops)

    @property
    def acknowledged(self) -> list[int]:
        """Ids of the writes the router reported as committed."""
        return [op.row_id for op in self.snapshot() if op.kind == "write" and op.ok and op.row_id is not None]

    def check_writes(self, rows: list[tuple[Any, ...]]) -> tuple[list[int], list[int]]:
        """Compare ``rows`` (``SELECT id FROM table`` on the primary) with the acknowledged
        writes: returns (lost ids, duplicated ids)."""
        counts: dict[int, int] = {}
        for (row_id,) in rows:
            counts[int(row_id)] = counts.get(int(row_id), 0) + 1
        lost = sorted(i for i in self.acknowledged if i not in counts)
        duplicated = sorted(i for i, n in counts.items() if n > 1)
        return lost, duplicated


@dataclass
class Workload(BaseWorkload[Router]):
    """``threads`` workers issuing reads and writes through a `Router` until `stop` or ``duration``.

    ``write_ratio`` is the share of writes, given to separate workers: that share of
    the threads only writes and the rest only reads, so that writes waiting out a
    failover cannot starve the reads unseen (with one thread, it does both). ``rate``
    (operations per second over all threads) paces the workers, None runs them flat
    out. Bounded: every worker stops at ``duration`` seconds after `start` at the latest.
    """

    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)

    kind = "threads"

    def prepare(self) -> None:
        """Create the table (empty) on the primary. The table has no key: duplicates must show."""
        for statement in self._setup_statements():
            self.router.write(statement)

    def start(self) -> None:
        self.started_at = time.monotonic()
        self._stop.clear()
        for index in range(self.threads):
            worker = threading.Thread(target=self._work, args=(index, self._role(index)),
                                      name=f"dbrouter-workload-{index}", daemon=True)
            worker.start()
            self._workers.append(worker)

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop the workers; True when all of them finished within ``timeout``."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for worker in self._workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        return not any(worker.is_alive() for worker in self._workers)

    def read_ids(self) -> Rows:
        """``SELECT id`` of the table, in a transaction on the primary (for `check_writes`)."""
        with self.router.transaction() as tx:
            return tx.read(self._ids_statement)

    def _work(self, index: int, role: str) -> None:
        rng = random.Random(index)
        interval = self._interval
        next_at = time.monotonic()
        end = self.started_at + self.duration
        while not self._stop.is_set() and time.monotonic() < end:
            if interval:
                next_at += interval
                delay = next_at - time.monotonic()
                if delay > 0 and self._stop.wait(delay):
                    break
            if self._writes_next(role, rng):
                self._write(index)
            else:
                self._read(rng)

    def _write(self, index: int) -> None:
        row_id, sql, params = self._insert(index)
        start = time.monotonic()
        try:
            self.router.write(sql, params)
        except Exception as exc:  # noqa: BLE001 - the drill reports every kind of failure
            self._done("write", start, exc, row_id)
        else:
            self._done("write", start, None, row_id)

    def _read(self, rng: random.Random) -> None:
        sql, params = self._select(rng)
        start = time.monotonic()
        try:
            self.router.read(sql, params)
        except Exception as exc:  # noqa: BLE001
            self._done("read", start, exc)
        else:
            self._done("read", start)


@dataclass
class AsyncWorkload(BaseWorkload[AsyncRouter]):
    """`Workload` as asyncio tasks: ``threads`` tasks issue the reads and writes through an
    `AsyncRouter`, on one event loop that runs in a thread of its own
    (``dbrouter-workload-loop``), so that the caller's threads (a drill's fault
    injection and live view) go on as they do for `Workload`.

    The settings, the statements, the record and the check of the writes are
    `BaseWorkload`'s; ``threads`` counts tasks. `open` starts the loop and opens the
    router there, `close` closes the router there and stops the loop: call them from
    another thread, as every public method here. An operation that raises (a
    cancellation too) is recorded as that operation's error; a task that dies outside an
    operation is listed in `failures`.

    ``debug`` turns asyncio's debug mode on for the loop, with `SLOW_CALLBACK` as its
    slow-callback threshold: its "Executing ... took" reports from the loop are kept off the
    console, where they would bury a drill's live view, and counted in `slow_callbacks` (the
    first few kept in `slow_callback_reports`), then told apart by what the callback's thread
    did meanwhile (its CPU time, garbage collections left out, the blocking calls an audit hook
    saw it make, and its context switches): `slow_computed`, `slow_blocking`, `slow_waited`,
    `slow_preempted`.
    """

    debug: bool = False
    slow_callbacks: int = 0
    """Callbacks that took `SLOW_CALLBACK` or more on the loop (asyncio's reports), of which:"""
    slow_computed: int = 0
    """... used that much CPU (garbage collections left out): work done on the loop;"""
    slow_blocking: int = 0
    """... made a blocking call on the loop (a sleep, a name lookup, a blocking connect, a
    process started), whatever else they did;"""
    slow_waited: int = 0
    """... waited meanwhile, with no blocking call: a lock or the GIL (on a busy machine);"""
    slow_preempted: int = 0
    """... neither: the thread was preempted, or a garbage collection ran."""
    slow_callback_reports: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _stopping: asyncio.Event | None = None
    _filter: logging.Filter | None = None

    kind = "asyncio"

    # -- the loop and the router ---------------------------------------------------------

    def open(self, timeout: float = 30.0) -> None:
        """Start the loop in its thread and open the router on it. Raises the router's error,
        or `DbRouterError` when it has not opened within ``timeout``; call `close` after
        either way."""
        if self._loop is not None:
            raise DbRouterError("the workload's event loop was started already")
        loop = asyncio.new_event_loop()
        if self.debug:
            loop.set_debug(True)
            loop.slow_callback_duration = SLOW_CALLBACK
        self._loop = loop
        self._thread = threading.Thread(target=self._run_loop, args=(loop,), name="dbrouter-workload-loop",
                                        daemon=True)
        if self.debug:
            self._filter = _SlowCallbacks(self)
            logging.getLogger("asyncio").addFilter(self._filter)
            _CallbackCpu.install(self._thread)
        self._thread.start()
        self.call(self.router.open, timeout)

    @staticmethod
    def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            # What is left (only after a close that timed out: the router's pools close
            # their own tasks) is cancelled and given a moment, then the loop is closed.
            # No wait for the default executor: a thread stuck in it must not hold this up.
            try:
                pending = asyncio.all_tasks(loop)
                for task in pending:
                    task.cancel()
                if pending:
                    loop.run_until_complete(asyncio.wait(pending, timeout=_CANCEL_GRACE))
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

    def call(self, fn: Callable[[], Awaitable[T]], timeout: float) -> T:
        """``await fn()`` on the workload's loop, from another thread, and return its result
        (raise its exception). `DbRouterError` when it takes longer than ``timeout`` (the
        call is then cancelled) or the loop is not running."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive() or loop.is_closed():
            raise DbRouterError("the workload's event loop is not running")

        async def run() -> T:
            return await fn()

        run.__qualname__ = f"AsyncWorkload.call({getattr(fn, '__qualname__', type(fn).__name__)})"  # in loop reports
        future = asyncio.run_coroutine_threadsafe(run(), loop)
        try:
            return future.result(timeout)
        except FutureTimeout:
            if future.done():
                raise  # fn's own timeout: its error
            future.cancel()
            raise DbRouterError(f"the workload's event loop did not answer within {timeout:g}s") from None

    def close(self, timeout: float = 30.0) -> bool:
        """Close the router on the loop, stop the loop and join its thread; True when all that
        finished within ``timeout``. Safe in any state (a router never opened is closed
        too: it holds a thread from its construction)."""
        deadline = time.monotonic() + timeout
        loop, thread = self._loop, self._thread
        clean = True
        try:
            if loop is None or thread is None:
                asyncio.run(self.router.close(0))  # never opened: only its construction's thread to stop
                return True
            if not thread.is_alive():
                log.warning("the workload's event loop had stopped before close: the router was not closed")
                return False
            try:
                # The router gets most of the time; the loop's own shut down the rest.
                self.call(lambda: self.router.close(max(0.1, 0.8 * (deadline - time.monotonic()) - 1.0)),
                          max(0.1, deadline - time.monotonic() - _CANCEL_GRACE))
            except Exception as exc:  # noqa: BLE001 - the loop is stopped whatever happened
                log.warning("closing the router on the workload's event loop: %s", exc)
                clean = False
            loop.call_soon_threadsafe(loop.stop)
            thread.join(max(0.0, deadline - time.monotonic()) + _CANCEL_GRACE)
            if thread.is_alive():
                log.warning("the workload's event loop did not stop within %.1fs", timeout)
                clean = False
            return clean
        finally:
            if self._filter is not None:
                logging.getLogger("asyncio").removeFilter(self._filter)
                self._filter = None
                _CallbackCpu.uninstall(self._thread)

    # -- the workload ----------------------------------------------------------------------

    def prepare(self, timeout: float = 60.0) -> None:
        """Create the table (empty) on the primary. The table has no key: duplicates must show."""
        async def prepare() -> None:
            for statement in self._setup_statements():
                await self.router.write(statement)

        self.call(prepare, timeout)

    def start(self) -> None:
        self.started_at = time.monotonic()

        async def start() -> None:
            self._stopping = asyncio.Event()
            for index in range(self.threads):
                task = asyncio.create_task(self._work(index, self._role(index)), name=f"dbrouter-workload-{index}")
                task.add_done_callback(self._task_done)
                self._tasks.append(task)

        self.call(start, 30.0)

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop the tasks: each ends after its current operation; those still in one at
        ``timeout`` are cancelled (the operation is recorded as cancelled). True when all
        ended within ``timeout`` without being cancelled."""
        if not self._tasks:
            return True
        tasks = list(self._tasks)

        async def stop() -> bool:
            assert self._stopping is not None
            self._stopping.set()
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=_CANCEL_GRACE)
            return not pending

        try:
            return self.call(stop, timeout + _CANCEL_GRACE + 5.0)
        except DbRouterError as exc:
            log.warning("stopping the workload's tasks: %s", exc)
            return False

    def read_ids(self, timeout: float = 30.0) -> Rows:
        """``SELECT id`` of the table, in a transaction on the primary (for `check_writes`)."""
        # In pages of ids: the driver decodes a result on the loop, and the whole table at
        # once (10,000 rows) would hold it for 100 ms. Grouped by id, so that a page boundary
        # never splits an id's copies; each id comes back as many times as it is there.
        page = f"SELECT id, count(*) FROM {self.table} WHERE id > %s GROUP BY id ORDER BY id LIMIT {_ID_PAGE}"

        async def read_ids() -> Rows:
            ids: Rows = []
            last = -1
            async with self.router.transaction() as tx:
                while True:
                    rows = await tx.read(page, (last,))
                    for row_id, copies in rows:
                        ids.extend([(row_id,)] * int(copies))
                    if len(rows) < _ID_PAGE:
                        return ids
                    last = rows[-1][0]

        return self.call(read_ids, timeout)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            error = task.exception()
            self.failures.append(f"{task.get_name()}: {type(error).__name__}: {error}")
            log.error("workload task %s failed outside an operation", task.get_name(), exc_info=error)

    async def _work(self, index: int, role: str) -> None:
        rng = random.Random(index)
        interval = self._interval
        next_at = time.monotonic()
        end = self.started_at + self.duration
        stopping = self._stopping
        assert stopping is not None
        while not stopping.is_set() and time.monotonic() < end:
            if interval:
                next_at += interval
                delay = next_at - time.monotonic()
                if delay > 0:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(stopping.wait(), delay)
                    if stopping.is_set():
                        break
            if self._writes_next(role, rng):
                await self._write(index)
            else:
                await self._read(rng)
            # A call that fails without waiting (no primary, an open breaker) returns without
            # giving the loop up; the other tasks get their turn before the next one (threads
            # get theirs from the interpreter's switch interval).
            await asyncio.sleep(0)

    async def _write(self, index: int) -> None:
        row_id, sql, params = self._insert(index)
        start = time.monotonic()
        try:
            await self.router.write(sql, params)
        except BaseException as exc:
            self._done("write", start, exc, row_id)  # a cancelled write too: its outcome is not known
            if not isinstance(exc, Exception):
                raise
        else:
            self._done("write", start, None, row_id)

    async def _read(self, rng: random.Random) -> None:
        sql, params = self._select(rng)
        start = time.monotonic()
        try:
            await self.router.read(sql, params)
        except BaseException as exc:
            self._done("read", start, exc)
            if not isinstance(exc, Exception):
                raise
        else:
            self._done("read", start)


_CANCEL_GRACE = 2.0
"""Seconds the loop gives cancelled tasks to end."""
_KEPT_REPORTS = 5
_ID_PAGE = 200
"""Ids read per statement by `AsyncWorkload.read_ids`: a page decodes in about 3 ms in debug mode."""


class _SlowCallbacks(logging.Filter):
    """On the ``asyncio`` logger: counts the slow-callback reports of one workload's loop
    (emitted on its thread) and drops them; every other record passes."""

    def __init__(self, workload: AsyncWorkload) -> None:
        super().__init__()
        self._workload = workload

    def filter(self, record: logging.LogRecord) -> bool:
        workload = self._workload
        thread = workload._thread
        if thread is None or record.thread != thread.ident:
            return True
        message = record.getMessage()
        if not (message.startswith("Executing ") and " took " in message):
            return True
        workload.slow_callbacks += 1  # only the loop's thread gets here
        measured = _CallbackCpu.last.pop(thread, None)
        if measured is not None:
            cpu, waits, blocking = measured
            if cpu >= SLOW_CALLBACK:
                workload.slow_computed += 1
            elif blocking:
                workload.slow_blocking += 1
            elif waits:
                workload.slow_waited += 1
            else:
                workload.slow_preempted += 1
            detail = f" (CPU {cpu * 1000:.1f} ms, {waits} voluntary waits" + (
                f", blocking calls: {', '.join(blocking[:3])})" if blocking else ")")
        else:
            detail = ""
        if len(workload.slow_callback_reports) < _KEPT_REPORTS:
            # Debug mode's handle reprs run long (where each task was made): keep the head, which
            # names the callback, and the tail, which says how long it took.
            workload.slow_callback_reports.append((message if len(message) <= 300 else
                                                   f"{message[:220]} ... {message[-90:]}") + detail)
        return False

class _CallbackCpu:
    """The thread CPU each callback of a watched loop thread used, garbage collections left
    out (a collection of the whole heap can take tens of ms, whoever triggers it): asyncio's
    ``Handle._run`` is wrapped while a debug workload runs (process-wide: the other threads'
    callbacks run as they were)."""

    last: dict[threading.Thread, tuple[float, int, list[str]]] = {}
    """loop thread -> its last callback's (CPU s, voluntary switches, blocking calls)"""
    _watched: set[threading.Thread] = set()
    _blocking: dict[threading.Thread, list[str]] = {}  # loop thread -> blocking calls of its running callback
    _audit_installed = False
    _original: Callable[[Any], None] | None = None
    _gc_cpu: dict[threading.Thread, float] = {}  # thread -> CPU seconds of the collections it ran
    _gc_started: dict[threading.Thread, float] = {}

    @classmethod
    def install(cls, thread: threading.Thread) -> None:
        cls._watched.add(thread)
        if cls._original is not None:
            return
        original = cls._original = asyncio.events.Handle._run
        watched, last, gc_cpu, blocking = cls._watched, cls.last, cls._gc_cpu, cls._blocking
        if not cls._audit_installed:  # an audit hook cannot be removed: one for the process
            cls._audit_installed = True
            sys.addaudithook(cls._audit)

        def run(handle: Any) -> None:
            me = threading.current_thread()
            if me not in watched:
                original(handle)
                return
            collected, started = gc_cpu.get(me, 0.0), time.thread_time()
            switches = _voluntary_switches()
            calls = blocking[me] = []
            try:
                original(handle)
            finally:
                blocking.pop(me, None)
                last[me] = (time.thread_time() - started - (gc_cpu.get(me, 0.0) - collected),
                            _voluntary_switches() - switches, calls)

        setattr(asyncio.events.Handle, "_run", run)  # noqa: B010 - a method replaced, not an attribute set
        gc.callbacks.append(cls._on_gc)

    @classmethod
    def uninstall(cls, thread: threading.Thread | None) -> None:
        if thread is not None:
            cls._watched.discard(thread)
            cls.last.pop(thread, None)
            cls._gc_cpu.pop(thread, None)
        if not cls._watched and cls._original is not None:
            setattr(asyncio.events.Handle, "_run", cls._original)  # noqa: B010 - as in install
            cls._original = None
            with contextlib.suppress(ValueError):
                gc.callbacks.remove(cls._on_gc)

    @classmethod
    def _audit(cls, event: str, args: tuple[Any, ...]) -> None:
        """Blocking calls made by a watched loop's running callback (the events of
        `_BLOCKING_EVENTS`, and a connect on a socket that blocks)."""
        calls = cls._blocking.get(threading.current_thread()) if cls._blocking else None
        if calls is None:
            return
        if event == "socket.connect":
            if args[0].gettimeout() != 0.0:  # a blocking socket: connect waits for the peer
                calls.append(f"socket.connect{args[1:]!r}")
        elif event in _BLOCKING_EVENTS and not (event == "time.sleep" and args and args[0] == 0):
            calls.append(f"{event}{args!r}"[:120])

    @classmethod
    def _on_gc(cls, phase: str, info: dict[str, Any]) -> None:
        me = threading.current_thread()
        if me not in cls._watched:
            return
        if phase == "start":
            cls._gc_started[me] = time.thread_time()
        else:
            started = cls._gc_started.pop(me, None)
            if started is not None:
                cls._gc_cpu[me] = cls._gc_cpu.get(me, 0.0) + time.thread_time() - started


_BLOCKING_EVENTS = frozenset({"time.sleep", "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr",
                              "subprocess.Popen", "os.system"})


def _voluntary_switches() -> int:
    """This thread's voluntary context switches so far (Linux; 0 elsewhere)."""
    who = getattr(resource, "RUSAGE_THREAD", None)
    return 0 if who is None else resource.getrusage(who).ru_nvcsw


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__
