"""`AsyncRouter`: the router for asyncio, with the sync router's rules.

One set of rules, two kinds of I/O. What decides is shared with `Router`, not
copied: the nodes, breakers, control plane (topology, prober, snapshot,
events, discovery), balancing, statement rule, decision table, retry policy and
budget, and the lease's release all come from the sync router's own code (an
`AsyncRouter` holds a `Router` built with asyncio pools, `_Control`, and never
calls its request methods). What is written again here is only the order of the
awaited steps of a call: checkout, statement, release, retry. That twin is kept
small on purpose, and where the sync version changes, this one is read beside it
(`dbrouter.routing`, `dbrouter.transactions`, `dbrouter.session`). A generated
twin (psycopg_pool's way) would pay off once this file is as large as the sync
side; it is not.

A call's deadline is the sync router's too: the context variable and the counting scope
of `dbrouter.deadline` and `Core.scoped`, the retry and failover bounds of
`dbrouter.routing`, the checkout's of `dbrouter.lease`; only the cut of a statement at
the deadline is the loop's (`dbrouter.aio.lease`). Hedged reads use the control router's
`HedgePolicy` (threshold, budget, counts); the race is `dbrouter.aio.hedging`.

The prober and the control plane run in threads with the same driver's sync
flavour (the `AsyncAdapter.sync` twin), so a probe or a listener never runs on the
loop, and a node that hangs cannot slow the loop down. Listeners registered with
`AsyncRouter.on` run on the control thread, as they do for `Router`.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from typing import Any, AsyncIterable, Awaitable, Callable, Iterable, Mapping, Sequence, TypeVar, cast

from ..adapters import Adapter, make_async_adapter
from ..adapters.aio import AsyncAdapter
from ..adapters.base import Rows
from ..bulk import BatchReport
from ..config import SECTIONS, RouterConfig, build_router_config, check_wait, load_router_config
from ..deadline import CANCELLER, Deadline
from ..deadline import current as current_deadline
from ..decisions import Action, Failure, Phase, Work, failure_of
from ..errors import (
    ConfigurationError,
    DbRouterError,
    NoPrimaryAvailable,
    NoReplicaAvailable,
    PoolError,
    SplitBrain,
    UsageError,
)
from ..events import Event
from ..lease import Outcome, answered, not_taken
from ..retrying import Retry
from ..router import Router, _fields
from ..routing import (
    _NODE_FAILURES,
    _in_transaction,
    _ran_out,
    _retry_or_raise,
    _until,
    refuse_read,
    short,
    write_failed,
)
from ..statements import UNSEEN
from ..topology import REPLICA, Node
from ..transactions import Results
from ..url import NodeAddress
from .bulk import write_many
from .hedging import AsyncHedger
from .lease import AsyncHeldLease, AsyncLease, take
from .lease import statement as _statement
from .pool import AsyncPool

__all__ = ["AsyncRouter", "AsyncSession", "AsyncTransaction"]

log = logging.getLogger("dbrouter.router")

T = TypeVar("T")

_UNKNOWN = "unknown"  # a session's position after a write it could not read: reads go to the primary
_NOT_REPLAYED = object()


class _Control(Router):
    """The sync router's construction and control plane over asyncio pools (see the module
    docstring). Its request methods (read, write, ...) are never called."""

    def _make_adapter(self, address: NodeAddress, config: RouterConfig) -> Adapter:
        adapter = make_async_adapter(address, config.connect)
        self._async_adapters[id(adapter.sync)] = adapter
        return adapter.sync

    def _make_pool(self, adapter: Adapter, config: RouterConfig, node_name: str) -> Any:
        return AsyncPool(self._async_adapters.pop(id(adapter)), config.pool, name=node_name,
                         on_event=lambda event, message, **data: self.events.emit(
                             event, node_name, message, level=logging.WARNING, **data))

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._async_adapters: dict[int, AsyncAdapter] = {}
        self._loop: asyncio.AbstractEventLoop | None = None  # the AsyncRouter's, once open
        self._loop_thread: int | None = None
        self._drains: set[asyncio.Task[None]] = set()  # removed nodes' pools closing: tasks of the loop
        super().__init__(*args, **kwargs)

    def _open_added(self, node: Node) -> None:
        """A node added while the router runs (by the discovery thread, or `AsyncRouter.add_replica`
        through a worker thread): its pool, made off the loop, opens on the router's loop."""
        loop, thread = self._loop, self._loop_thread
        if loop is None or thread is None:
            raise UsageError("the AsyncRouter is not open: await router.open() before changing its nodes")
        cast(AsyncPool, node.pool).open_soon(loop, thread)

    def _drain(self, node: Node, timeout: float, wait: bool) -> None:
        """A removed node's pool closes on the loop (the pool's state is the loop's alone): from
        another thread (the discovery thread's removals) `drain_on_loop` is handed to it."""
        loop = self._loop
        if loop is None:
            cast(AsyncPool, node.pool).close(timeout, removed=True)  # never opened: nothing to wait for
            return
        if threading.get_ident() == self._loop_thread:
            self.drain_on_loop(node, timeout)  # the loop cannot wait for itself: drained in the task
            return
        if wait:
            asyncio.run_coroutine_threadsafe(self._drained(node, timeout), loop).result(timeout + 5.0)
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: the router closed every pool
            loop.call_soon_threadsafe(self.drain_on_loop, node, timeout)

    async def _drained(self, node: Node, timeout: float) -> None:
        await asyncio.shield(self.drain_on_loop(node, timeout))

    def drain_on_loop(self, node: Node, timeout: float) -> asyncio.Task[None]:
        """On the loop: close ``node``'s pool once its borrowed connections are back (up to
        ``timeout``), in a task the router's `AsyncRouter.close` waits for."""
        assert self._loop is not None
        pool = cast(AsyncPool, node.pool)
        loop = self._loop

        async def drain() -> None:
            await pool.aclose(timeout, removed=True)
            # Its kept cancel connection (a sync one: closed off the loop).
            await loop.run_in_executor(None, CANCELLER.forget, node.adapter)

        task = loop.create_task(drain(), name=f"dbrouter-drain-{node.name}")
        self._drains.add(task)
        task.add_done_callback(self._drains.discard)
        return task


class AsyncRouter:
    """Routes statements for one primary and its replicas, in asyncio.

    ``AsyncRouter(primary, replicas, **options)`` takes the options of `Router`
    (``driver`` aside: PostgreSQL goes through psycopg 3, MySQL/MariaDB through
    mysql.connector.aio). Build it anywhere; it starts on its first call, or with
    ``await router.open()`` / ``async with AsyncRouter(...) as router``, on the running
    loop, which it is bound to from then on. Errors, events, retries and write-outcome
    rules are `Router`'s, and so are per-call deadlines (``timeout=``, `deadline`,
    ``call_timeout``: `dbrouter.deadline`) and hedged reads (``hedge_after``,
    ``hedge_budget``: `dbrouter.aio.hedging`). With ``discovery``, building it asks the
    provider for its first members (blocking I/O): build it off the loop, at start-up. Nodes that come and go
    (discovery, `add_replica`, `remove_replica`) get pools that open and close on that loop.
    """

    def __init__(self, primary: str | Mapping[str, Any] | None = None, replicas: Sequence[Any] | str = (), *,
                 config: RouterConfig | None = None, **options: Any) -> None:
        if config is None:
            config = build_router_config(primary, replicas, options)
        elif primary is not None or replicas or options:
            raise ConfigurationError("give either config= or primary/replicas/options, not both")
        self._control = control = _Control(config=config, open=False)
        self.config = config
        self.events = control.events
        self.topology = control.topology
        self.counts = control.counts
        self._hedger = None if control.hedger is None else AsyncHedger(control.hedger)
        """Hedged reads (``hedge_after``): the control router's policy, budget and counts."""
        self._opened = False
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._leases: dict[int, AsyncLease] = {}
        self._open_transactions: contextvars.ContextVar[int] = contextvars.ContextVar(
            f"dbrouter_transactions_{id(self)}", default=0)
        # Where the control plane's blocking calls run (starting and stopping its threads,
        # waiting for probe rounds): one thread, started here, off the loop, because starting
        # a thread from the loop waits for it to run.
        self._blocking = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dbrouter-async-control")
        self._blocking.submit(lambda: None).result()

    @classmethod
    def from_config(cls, source: Mapping[str, Any] | str | Any = None, **overrides: Any) -> AsyncRouter:
        """As `Router.from_config`: a mapping, a TOML file path, or the environment."""
        config = load_router_config(source)
        if overrides:
            sections = {name: _fields(getattr(config, name)) for name in SECTIONS}
            primary = {"url": config.primary, "name": config.primary_name} if config.primary_name else config.primary
            config = build_router_config(primary, config.replicas, overrides, sections)
        return cls(config=config)

    def __repr__(self) -> str:
        return f"<AsyncRouter primary={self.primary.name} replicas={[n.name for n in self.replicas]}>"

    # -- life ---------------------------------------------------------------------------

    async def open(self) -> AsyncRouter:
        """Start the pools (``min_size`` connections, on this loop) and the control plane; idempotent."""
        if self._closed:
            raise PoolError("the router is closed")
        if not self._opened:
            self._opened = True
            self._loop = loop = asyncio.get_running_loop()
            control = self._control
            control._opened = True
            control._loop, control._loop_thread = loop, threading.get_ident()  # for nodes added later
            for node in control.topology.nodes:  # on the loop: the pools' tasks are its
                node.pool.open()
                await asyncio.sleep(0)  # one pool per step: in debug mode making tasks is not cheap
            await loop.run_in_executor(self._blocking, self._start_threads)
        return self

    def _start_threads(self) -> None:
        """In the control worker, off the loop: the control plane's threads."""
        self._control._start_control()

    def _check_loop(self) -> None:
        if not self._opened:
            raise UsageError("the AsyncRouter is not open: await router.open() or use async with")
        if asyncio.get_running_loop() is not self._loop:
            raise UsageError("an AsyncRouter is bound to the event loop it was opened on; make one per loop")

    async def close(self, timeout: float = 5.0) -> None:
        """Stop the control plane and close every pool, waiting up to ``timeout`` for borrowed
        connections. The control plane's threads are stopped in a worker thread."""
        check_wait("timeout", timeout)
        if self._closed:
            return
        self._closed = True
        control = self._control
        deadline = time.monotonic() + timeout
        pools = [cast(AsyncPool, node.pool) for node in control.topology.nodes]
        if self._hedger is not None:
            self._hedger.close()
        try:
            if self._opened:
                await asyncio.gather(*(pool.aclose(timeout) for pool in pools))
                if control._drains:  # removed nodes' pools still closing
                    await asyncio.wait(list(control._drains), timeout=max(0.05, deadline - time.monotonic()))
                await asyncio.get_running_loop().run_in_executor(
                    self._blocking, lambda: control.close(max(0.0, deadline - time.monotonic())))
            else:
                control.close(0)
        finally:
            self._blocking.shutdown(wait=False)

    async def __aenter__(self) -> AsyncRouter:
        return await self.open()

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    # -- who serves ---------------------------------------------------------------------------

    @property
    def primary(self) -> Node:
        return self.topology.snapshot.primary

    @property
    def replicas(self) -> list[Node]:
        return list(self.topology.snapshot.replicas)

    @property
    def nodes(self) -> list[Node]:
        return list(self.topology.nodes)

    # -- membership ---------------------------------------------------------------------------

    async def add_replica(self, url: str, *, name: str | None = None, weight: float = 1.0,
                          timeout: float = 10.0) -> Node:
        """As `Router.add_replica`, awaited: the control plane applies the change on its thread,
        and the wait for it runs in a worker thread, not on the loop. The node's pool opens on
        this loop; the node serves reads from its first successful probe."""
        self._check_membership()
        control = self._control
        return await asyncio.get_running_loop().run_in_executor(
            self._blocking, lambda: control.add_replica(url, name=name, weight=weight, timeout=timeout))

    async def remove_replica(self, name: str, *, timeout: float = 30.0, wait: bool = True) -> None:
        """As `Router.remove_replica`, awaited: no new read goes to the node once the control
        plane has applied the change (waited for in a worker thread); reads in flight finish;
        then its pool closes on this loop, up to ``timeout`` later. ``wait=False`` returns once
        no read goes to it, the pool closing in a task that `close` waits for."""
        self._check_membership()
        check_wait("timeout", timeout)
        control = self._control
        node = await asyncio.get_running_loop().run_in_executor(
            self._blocking, lambda: control.topology.remove(name, min(timeout, 10.0) if timeout else 10.0))
        node.breaker.unshare()
        drain = control.drain_on_loop(node, timeout)
        if wait:
            await asyncio.shield(drain)  # cancelled, the caller stops waiting; the pool still closes

    def _check_membership(self) -> None:
        self._check_loop()
        if self._closed:
            raise UsageError("the router is closed")

    def choose_reader(self, exclude: Sequence[Node] = ()) -> Node:
        """As `Router.choose_reader` (no I/O)."""
        return self._control.choose_reader(exclude)

    async def choose_writer(self, failover_deadline: float) -> tuple[Node, int]:
        """As `Router.choose_writer`, the wait for a new primary awaited."""
        control = self._control
        while True:
            snapshot = self.topology.snapshot
            try:
                return control.choose_writer(0.0)  # raises at once unless the primary can take writes
            except (NoPrimaryAvailable, SplitBrain):
                if time.monotonic() >= failover_deadline:
                    # Past the wait: the sync call raises at once, its error or the call's deadline's.
                    return control.choose_writer(failover_deadline)
            waited = time.monotonic()
            await self._wait_for_change(snapshot.version, failover_deadline)
            deadline = current_deadline()
            if deadline is not None:
                deadline.note("waiting for a primary", time.monotonic() - waited)

    async def _wait_for_change(self, version: int, deadline: float) -> None:
        """Until the snapshot changes or ``deadline`` (polled: the control plane is threads)."""
        topology = self.topology
        topology.wake()
        until = min(deadline, time.monotonic() + self.config.monitor.health_interval)
        while topology.snapshot.version == version:
            remaining = until - time.monotonic()
            if remaining <= 0:
                return
            await asyncio.sleep(min(0.01, remaining))

    def on(self, event: str, listener: Callable[[Event], None]) -> Callable[[], None]:
        """As `Router.on`: listeners run on the control thread, with no dbrouter lock held;
        use ``loop.call_soon_threadsafe`` in them to reach the loop."""
        return self.events.on(event, listener)

    async def wait_for_probes(self, rounds: int = 1, timeout: float = 10.0) -> bool:
        """As `Router.wait_for_probes`, awaited (the wait runs in a worker thread)."""
        control = self._control
        return await asyncio.get_running_loop().run_in_executor(
            self._blocking, lambda: control.wait_for_probes(rounds, timeout))

    def stats(self) -> dict[str, Any]:
        """As `Router.stats`."""
        return self._control.stats()

    # -- one attempt ------------------------------------------------------------------------

    async def run_on(self, node: Node, op: Callable[[AsyncLease], Awaitable[T]], work: Work, *,
                     phase: Phase = Phase.SENT, keep: bool = False, kind: type[AsyncLease] = AsyncLease) -> T:
        """As `Core.run_on`, awaited."""
        try:
            lease = await take(node, kind=kind)
        except Exception as exc:
            retry = _retry_or_raise(node, exc, work)
            if retry is exc:
                raise
            raise retry from exc
        try:
            result = await op(lease)
        except BaseException as exc:
            decision = lease.release_after(exc, phase, work)
            if decision.action is Action.RETRY:
                raise Retry(node, exc, failure_of(exc, node.adapter), phase, decision) from exc
            if decision.action is Action.UNKNOWN:
                control = self._control
                if work is Work.UNCHECKED:
                    raise control.outcome_unknown(
                        node, exc, "after a statement read() did not check (unchecked=True) was sent",
                        "; pass idempotent=True too if it may run twice") from exc
                raise control.outcome_unknown(node, exc, "after the write was sent") from exc
            raise
        if not keep:
            lease.release()
        return result

    # -- reads ---------------------------------------------------------------------------------

    async def read(self, sql: str, params: Any = None, *, unchecked: bool = False, idempotent: bool = False,
                   timeout: float | None = None) -> Rows:
        """As `Router.read`, awaited; ``timeout`` bounds the whole call (`DeadlineExceeded`)."""
        self._check_loop()
        control = self._control
        if timeout is not None or self.config.routing.call_timeout is not None:
            scope = control.call_scope(timeout)
            if scope is not None:
                with scope:
                    return await self.read(sql, params, unchecked=unchecked, idempotent=idempotent)
        if unchecked:
            self.counts.reads.inc()
            return await self.read_with(self.choose_reader(), _statement(sql, params),
                                        Work.READ if idempotent else Work.UNCHECKED)
        verdicts = control._read_verdicts
        problem = verdicts.get(sql, UNSEEN)
        if problem is not None:
            if problem is UNSEEN:
                problem = verdicts.judge(sql)
            if problem is not None:
                refuse_read(problem, params)
        self.counts.reads.inc()
        node = self.choose_reader()
        hedger = self._hedger
        if hedger is not None and node.role == REPLICA:
            return await hedger.read(self, node, sql, params)
        if (not node.breaker.clean or cast(AsyncPool, node.pool).adapter.guard_timeout is not None
                or current_deadline() is not None):
            return await self.read_with(node, _statement(sql, params))
        # The hot path, as Core.read's: no lease object while the breaker is clean.
        pool = cast(AsyncPool, node.pool)
        try:
            entry = await pool.borrow()
        except Exception as exc:
            not_taken(node, exc)
            first = _retry_or_raise(node, exc, Work.READ)
            if not isinstance(first, Retry):
                raise
            return await self.read_again(first, _statement(sql, params))
        try:
            rows, _ = await pool.adapter.execute(entry.conn, sql, params)
        except BaseException as exc:
            lease = AsyncLease(node, entry)
            if isinstance(exc, asyncio.CancelledError):
                lease._aborted = True
                pool.adapter.abort(entry.conn)
            decision = lease.release_after(exc, Phase.SENT, Work.READ)
            if decision.action is not Action.RETRY:
                raise
            first = Retry(node, exc, failure_of(exc, node.adapter), Phase.SENT, decision)
            return await self.read_again(first, _statement(sql, params))
        answered(node, entry, True)
        return rows or []

    async def read_with(self, node: Node, op: Callable[[AsyncLease], Awaitable[tuple[Any, int]]],
                        work: Work = Work.READ) -> Rows:
        try:
            rows, _ = await self.run_on(node, op, work)
        except Retry as first:
            return await self.read_again(first, op, work)
        return rows or []

    async def read_again(self, first: Retry, op: Callable[[AsyncLease], Awaitable[tuple[Any, int]]],
                         work: Work = Work.READ) -> Rows:
        """As `Core.read_again`: the read that failed on ``first.node``, on the other nodes."""
        control = self._control
        executor = control._executor
        tried: list[Node] = [first.node]
        errors = {first.node.name: first.cause}
        if not executor.admit(first):
            raise NoReplicaAvailable(
                f"read failed on {first.node.name} ({short(first.cause)}); not retried: the retry budget is spent "
                f"(retries may add {self.config.retry.retry_budget:.0%} to the requests of the last 10s, plus "
                f"{self.config.retry.retry_budget_floor:g} a second)"
            ) from first.cause
        self.counts.retries.inc()

        async def attempt() -> Any:
            node = self.choose_reader(exclude=tried)
            try:
                return await self.run_on(node, op, work)
            except Retry as again:
                tried.append(node)
                errors[node.name] = again.cause
                raise

        try:
            rows, _ = await executor.run_async(attempt, attempts=max(1, self.config.retry.retry_attempts - 1),
                                               deadline=_until(self.config.retry.retry_deadline),
                                               on_retry=self.counts.retries.inc)
        except Retry as last:
            ran_out = _ran_out(last)
            if ran_out is not None:
                raise ran_out from last.cause
            summary = "; ".join(f"{name}: {short(err)}" for name, err in errors.items())
            spent = "; no more retries: the retry budget is spent" if last.budget_spent else ""
            raise NoReplicaAvailable(f"read failed on every node tried ({summary}){spent}") from last.cause
        return rows or []

    # -- writes --------------------------------------------------------------------------------

    async def write(self, sql: str, params: Any = None, *, idempotent: bool = False,
                    outside_transaction: bool = False, timeout: float | None = None) -> int:
        """As `Router.write`, awaited (`UsageError` inside this task's open transaction);
        ``timeout`` bounds the whole call, a failover wait included (`DeadlineExceeded`,
        `DeadlineExceededAfterWrite` when the write was sent and cut)."""
        self._check_loop()
        if timeout is not None or self.config.routing.call_timeout is not None:
            scope = self._control.call_scope(timeout)
            if scope is not None:
                with scope:
                    return await self.write(sql, params, idempotent=idempotent,
                                            outside_transaction=outside_transaction)
        self._refuse_in_transaction("router.write()", outside_transaction)
        self.counts.writes.inc()
        _, count = await self.on_primary(_statement(sql, params), Work.IDEMPOTENT if idempotent else Work.WRITE)
        return count

    def _refuse_in_transaction(self, call: str, outside_transaction: bool) -> None:
        if not outside_transaction and self._open_transactions.get():
            raise _in_transaction(call)

    async def on_primary(self, op: Callable[[AsyncLease], Awaitable[T]], work: Work, *, phase: Phase = Phase.SENT,
                         keep: bool = False) -> T:
        """As `Core.on_primary`, awaited."""
        routing, retry = self.config.routing, self.config.retry
        start = time.monotonic()
        failover_deadline = _until(routing.failover_wait, start)
        deadline = max(_until(retry.retry_deadline, start), failover_deadline)
        version = [0]

        async def attempt() -> T:
            node, version[0] = await self.choose_writer(failover_deadline)
            return await self.run_on(node, op, work, phase=phase, keep=keep)

        try:
            return await attempt()
        except Retry as failed:
            first = failed

        def keep_going(last: Retry) -> bool:
            return time.monotonic() < failover_deadline

        def give_up(last: Retry) -> bool:
            return (last.decision.demoted or last.phase is Phase.CONNECT
                    or last.failure is Failure.HUNG or last.failure is Failure.REFUSED)

        async def pause(last: Retry, seconds: float) -> None:
            if routing.failover_wait > 0 and (last.failure in _NODE_FAILURES or last.decision.demoted):
                await self._wait_for_change(version[0], failover_deadline)
            elif seconds > 0:
                await asyncio.sleep(seconds)

        try:
            return await self._control._executor.run_async(
                attempt, after=first, deadline=deadline, keep_going=keep_going, give_up=give_up, pause=pause,
                on_retry=self.counts.retries.inc)
        except Retry as failed:
            last = failed
        ran_out = _ran_out(last)
        if ran_out is not None:
            raise ran_out from last.cause
        error = write_failed(last)
        if error is last.cause:
            raise error  # a deadlock or serialization failure that outlived the retries, as it was
        raise error from last.cause

    # -- transactions and sessions ------------------------------------------------------------------

    def deadline(self, seconds: float) -> AbstractContextManager[Deadline]:
        """``with router.deadline(s):`` (a plain ``with``: it sets a context variable, no I/O),
        as `Router.deadline`: every call in the block, in this task and the tasks it starts,
        ends within ``seconds``; nested blocks, and a deadline set by the sync API, only
        shorten it. Raises `DeadlineExceeded` (counted once)."""
        return self._control.scoped(seconds)

    def transaction(self, *, outside_transaction: bool = False, timeout: float | None = None) -> _TransactionBlock:
        """``async with router.transaction() as tx``: as `Router.transaction`; ``timeout``
        bounds the block from BEGIN to COMMIT (`DeadlineExceeded`, or
        `DeadlineExceededAfterWrite` if it was the COMMIT)."""
        return _TransactionBlock(self, Work.BLOCK, None, "router.transaction()", outside_transaction, timeout)

    async def run_transaction(self, fn: Callable[[AsyncTransaction], Awaitable[T]], *,
                              outside_transaction: bool = False, timeout: float | None = None) -> T:
        """``await fn(tx)`` in a transaction, run again as `Router.run_transaction` runs it;
        ``timeout`` bounds it all, reruns included (`DeadlineExceeded`)."""
        self._check_loop()
        with self._control.call_scope(timeout) or nullcontext():
            return await self._retry(lambda: self._run_transaction_once(fn, outside_transaction))

    async def _run_transaction_once(self, fn: Callable[[AsyncTransaction], Awaitable[T]],
                                    outside_transaction: bool) -> T:
        async with _TransactionBlock(self, Work.RERUN, None, "router.run_transaction()", outside_transaction) as tx:
            return await fn(tx)

    async def _retry(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """As `Core.retry`, awaited: ``attempt()``, then through the retry executor if it
        raised `Retry`, stopping at the call's deadline; the last cause is raised."""
        try:
            return await attempt()
        except Retry as failed:
            first = failed
        try:
            return await self._control._executor.run_async(
                attempt, after=first, deadline=_until(self.config.retry.retry_deadline),
                on_retry=self.counts.retries.inc)
        except Retry as last:
            ran_out = _ran_out(last)
            if ran_out is not None:
                raise ran_out from last.cause
            raise last.cause from None

    async def write_many(self, sql: str, rows: Iterable[Any] | AsyncIterable[Any], *, batch_size: int = 1000,
                         workers: int = 4, outside_transaction: bool = False,
                         progress: Callable[[BatchReport], object] | None = None, timeout: float | None = None) -> int:
        """As `Router.write_many` (the same batches, reports and `BulkWriteError`), with the
        batches as tasks; ``rows`` may be an async iterable. Multi-row INSERTs: COPY is the
        sync router's for now (`dbrouter.aio.bulk`). ``timeout`` bounds the whole call:
        batches cut by it fail with `DeadlineExceeded` (unknown when cut in their COMMIT)."""
        self._check_loop()
        with self._control.call_scope(timeout) or nullcontext():
            return await write_many(self, sql, rows, batch_size=batch_size, workers=workers,
                                    outside_transaction=outside_transaction, progress=progress)

    def session(self) -> AsyncSession:
        """A read-your-writes session (as `Router.session`), for one task."""
        return AsyncSession(self)

    # -- connections for integrations ---------------------------------------------------------------

    def connection(self, intent: str = "read") -> _ConnectionBlock:
        """``async with router.connection("read" | "write") as conn``: a driver connection for a
        block, with the node's breaker honoured and fed (as `Router.connection`)."""
        return _ConnectionBlock(self, intent)

    async def lease(self, intent: str = "read", node: Node | None = None) -> AsyncLease:
        """As `Router.lease`, awaited."""
        self._check_loop()
        if intent != "read" and intent != "write":
            raise ConfigurationError(f"connection intent must be 'read' or 'write', got {intent!r}")
        if node is None:
            if intent == "read":
                node = self.choose_reader()
            else:
                node = (await self.choose_writer(time.monotonic() + self.config.routing.failover_wait))[0]
        lease = await take(node, kind=AsyncHeldLease)
        (self.counts.reads if intent == "read" else self.counts.writes).inc()
        return lease

    async def checkout(self, intent: str = "read", node: Node | None = None) -> tuple[Node, Any]:
        """As `Router.checkout`, awaited; give the connection back with `checkin`."""
        lease = await self.lease(intent, node)
        self._leases[id(lease.conn)] = lease
        return lease.node, lease.conn

    def checkin(self, node: Node, conn: Any, error: BaseException | None = None, *, broken: bool = False) -> None:
        """As `Router.checkin` (no wait: a connection that needs a reset gets a task)."""
        lease = self._leases.get(id(conn))
        if lease is None or lease.conn is not conn or lease.node is not node:
            raise PoolError(f"connection returned to node {node.name} was not checked out from it or was returned twice")
        del self._leases[id(conn)]
        if error is not None:
            lease.release_after(error, Phase.SENT, Work.BLOCK)
        elif broken:
            lease.release(Outcome.DISCARDED)
        else:
            lease.release()


class AsyncTransaction(Results):
    """Statements inside `AsyncRouter.transaction`: all on the primary, on one connection."""

    def __init__(self, lease: AsyncLease) -> None:
        self._lease = lease
        self._closed = False
        self._failed: BaseException | None = None

    @property
    def connection(self) -> Any:
        return self._lease.conn

    @property
    def node(self) -> Node:
        return self._lease.node

    async def run(self, op: Callable[[AsyncAdapter, Any], Awaitable[T]]) -> T:
        """``await op(adapter, conn)`` inside the transaction, under the hung-statement guard."""
        if self._closed:
            raise DbRouterError("the transaction has ended; start a new one")
        try:
            return await self._lease.run(op)
        except BaseException as exc:
            self._failed = exc
            raise

    async def execute(self, sql: str, params: Any = None) -> int:
        rows, count = await self.run(lambda adapter, conn: adapter.execute(conn, sql, params))
        self._keep(rows)
        return count

    async def read(self, sql: str, params: Any = None) -> Rows:
        await self.execute(sql, params)
        return self.fetchall()

    async def write(self, sql: str, params: Any = None) -> int:
        return await self.execute(sql, params)


async def _begin(lease: AsyncLease) -> AsyncLease:
    await lease.run(lambda adapter, conn: adapter.begin(conn))
    return lease


class _TransactionBlock:
    """``async with``: BEGIN on the primary, COMMIT at the end, the failures judged as
    `dbrouter.transactions.transaction` judges them."""

    def __init__(self, router: AsyncRouter, work: Work, after_commit: Callable[[AsyncLease], Awaitable[None]] | None,
                 call: str, outside_transaction: bool, timeout: float | None = None) -> None:
        self._router = router
        self._work = work
        self._after_commit = after_commit
        self._call = call
        self._outside = outside_transaction
        self._timeout = timeout
        self._scope: AbstractContextManager[Deadline] | None = None
        self._tx: AsyncTransaction | None = None
        self._token: contextvars.Token[int] | None = None

    async def __aenter__(self) -> AsyncTransaction:
        router = self._router
        router._check_loop()
        # The block's deadline scope (Core.call_scope) spans BEGIN to COMMIT: entered here,
        # left in __aexit__, in the same task.
        self._scope = scope = router._control.call_scope(self._timeout)
        if scope is None:
            return await self._begin()
        scope.__enter__()
        try:
            return await self._begin()
        except BaseException as exc:
            self._scope = None
            scope.__exit__(type(exc), exc, exc.__traceback__)  # counts a deadline's error; never swallows one
            raise

    async def _begin(self) -> AsyncTransaction:
        router = self._router
        router._refuse_in_transaction(self._call, self._outside)
        lease = await router.on_primary(_begin, self._work, phase=Phase.BEFORE_SEND, keep=True)
        self._tx = AsyncTransaction(lease)
        self._token = router._open_transactions.set(router._open_transactions.get() + 1)
        return self._tx

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        scope, self._scope = self._scope, None
        if scope is None:
            await self._end(exc)
            return
        try:
            await self._end(exc)
        except BaseException as error:
            scope.__exit__(type(error), error, error.__traceback__)  # counts a deadline's error; never swallows one
            raise
        # The block's own error, if any, goes on: it leaves the scope too (and is counted there).
        if exc is None:
            scope.__exit__(None, None, None)
        else:
            scope.__exit__(type(exc), exc, tb)

    async def _end(self, exc: BaseException | None) -> None:
        router, tx = self._router, self._tx
        assert tx is not None and self._token is not None
        router._open_transactions.reset(self._token)
        lease = tx._lease
        tx._closed = True
        if exc is not None:
            await self._settle(lease, tx, exc, Phase.SENT)
            return
        try:
            await lease.run(lambda adapter, conn: adapter.commit(conn))
        except BaseException as error:
            await self._settle(lease, tx, error, Phase.COMMIT)
            raise
        router.counts.writes.inc()
        if self._after_commit is None:
            lease.release()
            return
        try:
            await self._after_commit(lease)
        except BaseException as error:
            lease.release_after(error, Phase.SENT, Work.READ)
            if not isinstance(error, Exception):
                raise
            log.debug("after COMMIT on %s: %s", lease.node.name, error)
            return
        lease.release()

    async def _settle(self, lease: AsyncLease, tx: AsyncTransaction, exc: BaseException, phase: Phase) -> None:
        """As `dbrouter.transactions._settle`: raise what the decision table says instead of ``exc``."""
        node = lease.node
        if phase is Phase.SENT and exc is not tx._failed and lease.foreign(exc):
            try:
                await lease.run(lambda adapter, conn: adapter.rollback(conn))
            except BaseException as rollback_error:
                lease.release_after(rollback_error, Phase.SENT, Work.BLOCK)
                if not isinstance(rollback_error, Exception):
                    raise
                return
            lease.release()
            return
        decision = lease.release_after(exc, phase, self._work)
        if decision.action is Action.UNKNOWN and isinstance(exc, Exception):
            raise self._router._control.outcome_unknown(node, exc, "during COMMIT") from exc
        if decision.action is Action.RETRY and self._work is Work.RERUN and isinstance(exc, Exception):
            raise Retry(node, exc, failure_of(exc, node.adapter), phase, decision) from exc


class _ConnectionBlock:
    __slots__ = ("_router", "_intent", "_lease")

    def __init__(self, router: AsyncRouter, intent: str) -> None:
        self._router = router
        self._intent = intent
        self._lease: AsyncLease | None = None

    async def __aenter__(self) -> Any:
        self._lease = await self._router.lease(self._intent)
        return self._lease.conn

    async def __aexit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        lease, self._lease = self._lease, None
        assert lease is not None
        if exc is None:
            lease.release()
        else:
            lease.release_after(exc, Phase.SENT, Work.BLOCK)


class AsyncSession(Results):
    """Read-your-writes for one task, as `dbrouter.session.Session`: after a write, a read goes
    to a replica only once it has replayed the write's position (waiting up to
    ``causal_wait``, awaited), else to the primary."""

    def __init__(self, router: AsyncRouter) -> None:
        self._router = router
        self._position: str | None = None
        self._confirmed: set[str] = set()
        self._sticky_until = 0.0

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        return None

    @property
    def position(self) -> str | None:
        return self._position

    async def _wrote(self, lease: AsyncLease) -> None:
        routing = self._router.config.routing
        if routing.sticky_seconds is not None:
            self._sticky_until = time.monotonic() + routing.sticky_seconds
            return
        self._confirmed.clear()
        self._position = _UNKNOWN
        self._position = await lease.run(lambda adapter, conn: adapter.replication_position(conn))

    async def write(self, sql: str, params: Any = None, *, idempotent: bool = False,
                    outside_transaction: bool = False) -> int:
        router = self._router
        router._check_loop()
        router._refuse_in_transaction("session.write()", outside_transaction)
        router.counts.writes.inc()

        async def write_keeping_lease(lease: AsyncLease) -> tuple[AsyncLease, int]:
            _, count = await lease.execute(sql, params)
            return lease, count

        lease, count = await router.on_primary(write_keeping_lease, Work.IDEMPOTENT if idempotent else Work.WRITE,
                                               keep=True)
        try:
            await self._wrote(lease)
        except BaseException as exc:
            lease.release_after(exc, Phase.SENT, Work.READ)
            if not isinstance(exc, Exception):
                raise
            return count
        lease.release()
        return count

    def transaction(self, *, outside_transaction: bool = False) -> _TransactionBlock:
        return _TransactionBlock(self._router, Work.BLOCK, self._wrote, "session.transaction()", outside_transaction)

    async def read(self, sql: str, params: Any = None, *, unchecked: bool = False, idempotent: bool = False) -> Rows:
        router = self._router
        router._check_loop()
        control = router._control
        if not unchecked:
            control.check_read(sql, params)
        work = Work.UNCHECKED if unchecked and not idempotent else Work.READ
        routing = router.config.routing
        primary = router.topology.snapshot.primary
        if routing.sticky_seconds is not None:
            if time.monotonic() < self._sticky_until:
                router.counts.reads.inc()
                return await self._read_on(primary, sql, params, work)
            return await router.read(sql, params, unchecked=unchecked, idempotent=idempotent)
        position = self._position
        if position is None:
            return await router.read(sql, params, unchecked=unchecked, idempotent=idempotent)
        router.counts.reads.inc()
        node = router.choose_reader()
        if position != _UNKNOWN and node is not primary and node.name not in self._confirmed:
            async def read_if_replayed(lease: AsyncLease) -> Any:
                async def run(adapter: AsyncAdapter, conn: Any) -> Any:
                    if not await adapter.has_replayed(conn, position, routing.causal_wait):
                        return _NOT_REPLAYED
                    return await adapter.execute(conn, sql, params)

                return await lease.run(run, extra=routing.causal_wait)

            try:
                result = await router.run_on(node, read_if_replayed, work)
            except Retry:
                result = _NOT_REPLAYED
            if result is not _NOT_REPLAYED:
                self._confirmed.add(node.name)
                rows: Rows = result[0] or []
                return rows
            router.counts.causal_primary_reads.inc()
            node = primary
        elif position == _UNKNOWN:
            router.counts.causal_primary_reads.inc()
            node = primary
        return await self._read_on(node, sql, params, work, fallback=primary)

    async def _read_on(self, node: Node, sql: str, params: Any, work: Work, fallback: Node | None = None) -> Rows:
        targets = [node] if fallback is None or fallback is node else [node, fallback]
        last: Retry | None = None
        for target in targets:
            try:
                rows, _ = await self._router.run_on(target, _statement(sql, params), work)
                return rows or []
            except Retry as failed:
                last = failed
        assert last is not None
        raise last.cause

