"""The router: writes to the primary, reads to replicas, and what to do when a node fails.

One `Router` per database cluster. Its hot path (`Router.read`,
`Router.write`) is a breaker check, a pool checkout, one statement and a
return: no lock is held across I/O, no extra round trip is made when the
connection is warm and clean, and retries cost nothing until something fails.

Failure rules:

- A read that fails because its node failed (connection refused or lost, no
  answer within the statement timeout, breaker open) is retried on another
  node, with backoff, bounded by ``retry_attempts`` and ``retry_deadline``.
- A write is retried only when it provably never reached the server (it
  failed while getting a connection, or the node refused it as read-only), or
  when the caller marks it ``idempotent=True``. A write whose connection broke
  after it was sent raises `WriteOutcomeUnknown`: it may or may not have been
  applied, and it is never replayed silently.
- Without a usable primary a write fails at once with `NoPrimaryAvailable`,
  or waits up to ``failover_wait`` seconds for the monitor to find a new one.

Consistency: outside a session, replica reads are eventually consistent. See
`dbrouter.session` for read-your-writes.
"""

from __future__ import annotations

import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

from ._counter import Counter
from .adapters import ErrorKind, make_adapter
from .balancing import make_balancer
from .config import SECTIONS, RouterConfig, build_router_config, load_router_config
from .errors import (
    BulkWriteError,
    ConfigurationError,
    ConnectError,
    NodeUnavailable,
    NoPrimaryAvailable,
    NoReplicaAvailable,
    PoolTimeout,
    SplitBrain,
    WriteOutcomeUnknown,
)
from .events import Event, Events
from .pool import Pool
from .resilience import CLOSED, HALF_OPEN, OPEN, NodeBreaker, Watchdog, build_retrying, shared_storage
from .session import Session, Transaction
from .topology import _LATENCY_ALPHA, PRIMARY, REPLICA, Monitor, Node, Topology
from .url import parse_address

__all__ = ["Router", "is_read_statement"]

log = logging.getLogger("dbrouter.router")

T = TypeVar("T")
Rows = list  # list of row tuples

# Statements that only read, by their first keyword. Anything else (including
# WITH, which can hide a data-modifying CTE) is treated as a write.
_READ_KEYWORDS = frozenset({"select", "show", "explain", "describe", "desc", "values", "table"})
_LEADING_COMMENTS = re.compile(r"^(?:\s+|--[^\n]*\n|/\*.*?\*/)*", re.S)
_LOCKING_OR_INTO = re.compile(r"\bfor\s+(?:update|share|no\s+key\s+update|key\s+share)\b|\binto\b", re.I)

_BREAKER_EVENTS = {OPEN: "breaker_open", HALF_OPEN: "breaker_half_open", CLOSED: "breaker_closed"}


def is_read_statement(sql: str) -> bool:
    """True for a statement that can run on a replica: a plain SELECT / SHOW / EXPLAIN."""
    text = sql[_LEADING_COMMENTS.match(sql).end():]  # type: ignore[union-attr]
    first = text.split(None, 1)[0].lower() if text.strip() else ""
    return first in _READ_KEYWORDS and not _LOCKING_OR_INTO.search(text)


class _BreakerOpen(NodeUnavailable):
    """The node's breaker refused the call: nothing was sent."""


class _NotSent(Exception):
    """Internal: a write failed before reaching the server, so retrying it is safe."""

    def __init__(self, node: Node, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.node = node
        self.cause = cause


class Router:
    """Routes statements for one primary and its replicas.

    ``Router(primary, replicas, **options)`` takes flat options (for example
    ``max_size``, ``policy``, ``max_replica_lag``, ``statement_timeout``,
    ``fail_max``, ``failover_wait``); see `RouterConfig` and the README's
    configuration reference. Raises `ConfigurationError` at construction for
    any invalid value.
    """

    def __init__(
        self,
        primary: str | Mapping[str, Any] | None = None,
        replicas: Sequence[Any] | str = (),
        *,
        config: RouterConfig | None = None,
        **options: Any,
    ) -> None:
        if config is None:
            config = build_router_config(primary, replicas, options)
        elif primary is not None or replicas or options:
            raise ConfigurationError("give either config= or primary/replicas/options, not both")
        self.config = config
        self.events = Events()
        self._closed = False
        self._watchdog = Watchdog()
        nodes = self._build_nodes(config)
        self.topology = Topology(nodes, config.routing, config.monitor, self.events)
        self._balancer = make_balancer(config.routing.policy)
        self._reads = Counter()
        self._writes = Counter()
        self._retries = Counter()
        self._fallbacks = Counter()
        self._causal_primary_reads = Counter()
        self._write_outcome_unknown = Counter()
        self._monitor = Monitor(
            lambda: self.topology.nodes,
            config.monitor,
            self.topology.apply,
            probe_timeout=max(1.0, config.connect.connect_timeout),
            watchdog=self._watchdog,
        )
        self._monitor.start()

    @classmethod
    def from_config(cls, source: Mapping[str, Any] | str | Any = None, **overrides: Any) -> Router:
        """A router from a mapping, a TOML file path, or the environment (``DBROUTER_*``) when
        ``source`` is None. ``overrides`` are flat options applied on top."""
        config = load_router_config(source)
        if overrides:
            sections = {name: _fields(getattr(config, name)) for name in SECTIONS}
            config = build_router_config(config.primary, config.replicas, overrides, sections)
        return cls(config=config)

    def _build_nodes(self, config: RouterConfig) -> list[Node]:
        primary_address = parse_address(config.primary)
        nodes: list[Node] = []
        specs = [(config.primary, 1.0, config.primary_name, PRIMARY)]
        specs += [(r.url, r.weight, r.name, REPLICA) for r in config.replicas]
        try:
            for url, weight, name, role in specs:
                nodes.append(self._build_node(config, primary_address, nodes, url, weight, name, role))
        except BaseException:
            for node in nodes:  # the pools already open connections: close them
                node.pool.close(timeout=0)
            raise
        return nodes

    def _build_node(self, config: RouterConfig, primary_address: Any, nodes: list[Node], url: str,
                    weight: float, name: str | None, role: str) -> Node:
        """One node: its adapter, breaker and (last, as it starts connecting) its pool."""
        address = primary_address if role == PRIMARY else parse_address(url)
        if address.engine != primary_address.engine:
            raise ConfigurationError(
                f"replica {address.redacted} is a {address.engine} node but the primary "
                f"{primary_address.redacted} is {primary_address.engine}: one router serves one engine"
            )
        node_name = name or address.name
        if any(node.name == node_name for node in nodes):
            raise ConfigurationError(f"node {node_name} is listed twice; give each node a distinct name")
        adapter = make_adapter(address, config.connect)
        storage = None
        if config.breaker.breaker_redis_url:
            key = f"{address.engine}:{address.name}/{address.database or ''}"
            storage = shared_storage(config.breaker.breaker_redis_url, key)
        breaker = NodeBreaker(node_name, config.breaker, on_change=partial(self._breaker_changed, node_name),
                              storage=storage)
        pool = Pool(adapter, config.pool, name=node_name, watchdog=self._watchdog,  # last: it connects
                    on_event=partial(self._pool_event, node_name))
        return Node(node_name, address, adapter, pool, breaker, role, weight)

    def __repr__(self) -> str:
        return f"<Router primary={self.primary.name} replicas={[n.name for n in self.replicas]}>"

    # -- who serves -----------------------------------------------------------

    @property
    def primary(self) -> Node:
        """The node writes go to now (changes after a failover)."""
        return self.topology.primary

    @property
    def replicas(self) -> list[Node]:
        """Every node that is not the primary, serving reads or not."""
        return list(self.topology.replicas)

    @property
    def nodes(self) -> list[Node]:
        return list(self.topology.nodes)

    def on(self, event: str, listener: Callable[[Event], None]) -> Callable[[], None]:
        """Subscribe to an event (see `dbrouter.events.EVENT_NAMES`, or ``"*"``); returns an unsubscribe function."""
        return self.events.on(event, listener)

    def _pool_event(self, node_name: str, name: str, message: str, **data: Any) -> None:
        self.events.emit(name, node_name, message, level=logging.WARNING, **data)

    def _breaker_changed(self, node_name: str, old: str, new: str) -> None:
        node = next((n for n in self.topology.nodes if n.name == node_name), None)
        level = logging.WARNING if new == OPEN else logging.INFO
        failures = node.breaker.failures if node is not None else 0
        self.events.emit(_BREAKER_EVENTS[new], node_name, f"circuit breaker {old} -> {new}", level=level,
                         old=old, new=new, failures=failures)
        if hasattr(self, "topology"):
            self.topology.refresh_readable()

    def _reader(self, exclude: Sequence[Node] = ()) -> Node:
        """A replica chosen by the policy, or the primary when none can serve (if allowed)."""
        topology = self.topology
        readable = topology.readable
        if exclude:
            readable = tuple(n for n in readable if n not in exclude)
        if readable:
            node: Node = self._balancer.choose(readable)  # type: ignore[assignment]
            return node
        if not topology.replicas:
            return topology.primary
        if not self.config.routing.fallback_to_primary:
            raise NoReplicaAvailable(
                f"no replica can serve reads ({topology.reasons(topology.replicas)}) and fallback_to_primary is off"
            )
        self._fallbacks.inc()
        if topology.note_fallback():
            self.events.emit("fallback_to_primary", topology.primary.name,
                             f"no replica can serve reads ({topology.reasons(topology.replicas)}): reading from the primary",
                             level=logging.WARNING)
        return topology.primary

    # -- one attempt on one node --------------------------------------------------

    def _attempt(self, node: Node, sql: str, params: Any, op: Callable[[Any, Any], T] | None = None, extra: float = 0.0) -> Any:
        """Run one statement (or ``op(adapter, conn)``) on ``node``, feeding its breaker.

        Raises `NodeUnavailable` when the breaker is open or the node did not answer
        within the statement timeout; `ConnectError` when no connection could be made.
        """
        entry = _take(node)
        breaker, pool, adapter = node.breaker, node.pool, node.adapter
        guard = node.guard
        token = None
        if guard is not None:
            token = self._watchdog.arm(time.monotonic() + guard + extra, partial(adapter.abort, entry.conn))
        try:
            result = adapter.execute(entry.conn, sql, params) if op is None else op(adapter, entry.conn)
        except BaseException as exc:
            aborted = token is not None and not self._watchdog.disarm(token)
            if self._give_back(node, entry, exc, aborted) and aborted and isinstance(exc, Exception):
                raise NodeUnavailable(
                    f"node {node.name} did not answer within {guard + extra:.3g}s "
                    "(statement timeout plus grace): hung or unreachable", node=node.name,
                ) from exc
            raise
        if token is not None and not self._watchdog.disarm(token):
            returned = pool._checkin(entry, broken=True)  # aborted just as it finished: the socket is gone
        else:
            returned = pool._checkin(entry)
        # Moving average of the statement time, from the pool's clock readings (inlined:
        # this is the hot path; Node.latency is read by the latency policy and stats).
        elapsed, latency = returned - entry.borrowed_at, node.latency
        node.latency = elapsed if latency == 0.0 else latency + _LATENCY_ALPHA * (elapsed - latency)
        if not breaker._clean:
            breaker.success()
        return result

    # -- reads -----------------------------------------------------------------

    def read(self, sql: str, params: Any = None) -> Rows:
        """Run a read on a replica chosen by the policy; returns the rows (a list of tuples).

        Retried on another node when a node fails. Falls back to the primary when
        no replica can serve (if ``fallback_to_primary``), else raises `NoReplicaAvailable`.
        """
        self._reads.inc()
        node = self._reader()
        try:
            rows, _ = self._attempt(node, sql, params)
            return rows or []
        except Exception as exc:
            if not self._read_retryable(exc):
                raise
            first_failure = exc
        rows, _ = self._retry_read(node, first_failure, lambda n: self._attempt(n, sql, params))
        return rows or []

    def _read_retryable(self, exc: BaseException) -> bool:
        if isinstance(exc, (NodeUnavailable, PoolTimeout)):
            return True
        if isinstance(exc, (NoReplicaAvailable, NoPrimaryAvailable)) or not isinstance(exc, Exception):
            return False
        kind = self.topology.primary.adapter.classify(exc)
        return kind is ErrorKind.UNREACHABLE or kind is ErrorKind.CONFLICT

    def _retry_read(self, failed: Node, first: BaseException, run: Callable[[Node], T]) -> T:
        tried = [failed]
        errors = {failed.name: first}
        result: Any = None
        retrying = build_retrying(
            _fewer_attempts(self.config.retry), self._read_retryable, before_sleep=lambda _state: self._retries.inc()
        )
        self._retries.inc()
        try:
            for attempt in retrying:
                with attempt:
                    node = self._reader(exclude=tried)
                    try:
                        result = run(node)
                    except Exception as exc:
                        tried.append(node)
                        errors[node.name] = exc
                        raise
        except Exception as exc:
            if not self._read_retryable(exc):
                raise
            summary = "; ".join(f"{name}: {_short(err)}" for name, err in errors.items())
            raise NoReplicaAvailable(f"read failed on every node tried ({summary})") from exc
        return result  # type: ignore[no-any-return]

    # -- writes ----------------------------------------------------------------------

    def write(self, sql: str, params: Any = None, *, idempotent: bool = False) -> int:
        """Run one statement on the primary in its own committed transaction; returns the rowcount.

        Raises `NoPrimaryAvailable` when no primary can take it (after waiting up to
        ``failover_wait``), `SplitBrain` when two nodes accept writes, and
        `WriteOutcomeUnknown` when the connection broke after the statement was sent
        (unless ``idempotent=True``, which allows a retry).
        """
        self._writes.inc()
        _, count = self._on_primary(lambda node: self._attempt(node, sql, params), idempotent)
        return count

    def _on_primary(self, run: Callable[[Node], T], idempotent: bool = False) -> T:
        """Run a write on the primary, with the retry rules of the module docstring."""
        routing, retry = self.config.routing, self.config.retry
        start = time.monotonic()
        failover_deadline = start + routing.failover_wait
        deadline = max(start + retry.retry_deadline, failover_deadline)
        attempts = 0
        while True:
            node, version = self._writer(failover_deadline)
            attempts += 1
            try:
                return self._write_once(node, run, idempotent)
            except _NotSent as failure:
                last = failure
            now = time.monotonic()
            cause = last.cause
            refused = not _is_node_failure(cause) and last.node.adapter.classify(cause) is ErrorKind.READ_ONLY
            if refused and now >= failover_deadline:
                raise NoPrimaryAvailable(
                    f"primary {last.node.name} refused the write as read-only (demoted?): {_short(cause)}"
                ) from cause
            if now >= failover_deadline and (attempts >= retry.retry_attempts or now >= deadline or _is_node_failure(cause)):
                if _is_node_failure(cause) or last.node.adapter.classify(cause) is ErrorKind.READ_ONLY:
                    raise NoPrimaryAvailable(f"write not sent: primary {last.node.name}: {_short(cause)}") from cause
                raise cause  # a deadlock or serialization failure that outlived the retries
            self._retries.inc()
            if routing.failover_wait > 0 and _is_node_failure(cause):
                self._monitor.wake()
                self.topology.wait_for_change(version, min(failover_deadline, now + max(0.05, self.config.monitor.health_interval)))
            else:
                time.sleep(min(retry.retry_backoff_max, retry.retry_backoff * 2 ** (attempts - 1)))

    def _write_once(self, node: Node, run: Callable[[Node], T], idempotent: bool) -> T:
        try:
            return run(node)
        except PoolTimeout:
            raise  # the primary is up but busy: acquire_timeout was the caller's whole budget
        except (ConnectError, _BreakerOpen) as exc:
            raise _NotSent(node, exc) from exc
        except NodeUnavailable as exc:
            lost: BaseException = exc  # hung after the statement was sent
        except Exception as exc:
            kind = node.adapter.classify(exc)
            if kind is ErrorKind.READ_ONLY:
                # The node refused the write: it is no longer the primary. Safe to retry.
                node.breaker.force_open()
                self._monitor.wake()
                raise _NotSent(node, exc) from exc
            if kind is ErrorKind.CONFLICT:
                raise _NotSent(node, exc) from exc  # rolled back by the server: safe to retry
            if kind is not ErrorKind.UNREACHABLE:
                raise
            lost = exc
        if idempotent:
            raise _NotSent(node, lost) from lost
        self._write_outcome_unknown.inc()
        raise WriteOutcomeUnknown(
            f"connection to primary {node.name} broke after the write was sent: it may or may not "
            f"have been applied ({_short(lost)}); not retried"
        ) from lost

    def _writer(self, failover_deadline: float) -> tuple[Node, int]:
        """The primary and the topology version, waiting up to the deadline for one that can take writes."""
        topology = self.topology
        while True:
            version = topology.version
            problem = topology.primary_problem()
            if problem is None:
                return topology.primary, version
            if topology.split_brain and time.monotonic() >= failover_deadline:
                raise SplitBrain(f"writes stopped: {problem}; make all but one node read-only")
            if time.monotonic() >= failover_deadline:
                raise NoPrimaryAvailable(f"no primary can take writes: {problem}")
            self._monitor.wake()
            topology.wait_for_change(version, min(failover_deadline, time.monotonic() + self.config.monitor.health_interval))

    def run_transaction(self, fn: Callable[[Transaction], T]) -> T:
        """Run ``fn(tx)`` in a transaction on the primary and return its result, retrying the
        whole function on serialization failures and deadlocks, and when the connection
        was lost before the commit (the server rolled it back). A failure during the
        commit itself raises `WriteOutcomeUnknown`.
        """
        def retryable(exc: BaseException) -> bool:
            if isinstance(exc, (WriteOutcomeUnknown, NoPrimaryAvailable, SplitBrain)) or not isinstance(exc, Exception):
                return False
            if isinstance(exc, NodeUnavailable):
                return True
            kind = self.topology.primary.adapter.classify(exc)
            return kind is ErrorKind.CONFLICT or kind is ErrorKind.UNREACHABLE

        result: Any = None
        for attempt in build_retrying(self.config.retry, retryable, before_sleep=lambda _state: self._retries.inc()):
            with attempt:
                with self.transaction() as tx:
                    result = fn(tx)
        return result  # type: ignore[no-any-return]

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """A transaction on the primary: reads inside it go to the primary too.

        Commits when the block ends, rolls back if it raises. If the connection is
        lost during the commit, raises `WriteOutcomeUnknown`.
        """
        with self._transaction(None) as tx:
            yield tx

    @contextmanager
    def _transaction(self, after_commit: Callable[[Node, Any], None] | None) -> Iterator[Transaction]:
        node, entry = self._on_primary(self._begin)
        adapter = node.adapter
        tx = Transaction(node, entry.conn, self._watchdog)
        broken = False
        committing = False
        try:
            yield tx
            tx._closed = True
            committing = True
            tx._guarded(lambda a, c: a.commit(c))
            self._writes.inc()
            if after_commit is not None:
                after_commit(node, entry.conn)
        except BaseException as exc:
            tx._closed = True
            broken = _connection_lost(node, exc, isinstance(exc, NodeUnavailable))
            if not broken and not committing:
                try:
                    adapter.rollback(entry.conn)
                except Exception:  # noqa: BLE001 - the connection is discarded instead
                    broken = True
            if committing and broken and isinstance(exc, Exception):
                self._write_outcome_unknown.inc()
                raise WriteOutcomeUnknown(
                    f"connection to primary {node.name} broke during COMMIT: the transaction may or "
                    f"may not have been applied ({_short(exc)}); not retried"
                ) from exc
            raise
        finally:
            node.pool._checkin(entry, broken=broken)

    def _begin(self, node: Node) -> tuple[Node, Any]:
        """Check out a primary connection and open a transaction on it (nothing written yet)."""
        entry = _take(node)
        try:
            node.adapter.begin(entry.conn)
        except Exception as exc:
            lost = _connection_lost(node, exc)
            node.pool._checkin(entry, broken=lost)
            if lost:
                raise ConnectError(f"cannot begin a transaction on {node.name}: {_short(exc)}", node=node.name) from exc
            raise
        return node, entry

    def connection(self, intent: str = "read") -> _Checkout:
        """A pooled DB-API connection for other libraries, for a ``with`` block:
        ``"read"`` (a replica) or ``"write"`` (the primary).

        The connection is in autocommit mode; anything left open is rolled back on return.
        The node's breaker is honoured and fed, as for `read` and `write`. With
        mysql-connector, ``conn.cursor()`` pings the server first (a driver habit): for
        single statements `read` and `write` make one round trip instead of two.
        """
        return _Checkout(self, intent)

    def choose_reader(self) -> Node:
        """The node a read would go to now (policy, lag, health and breakers applied)."""
        return self._reader()

    def checkout(self, intent: str = "read", node: Node | None = None) -> tuple[Node, Any]:
        """Borrow a connection for ``intent`` (or from ``node``); give it back with `checkin`.

        For integrations that hold connections themselves. Raises `NodeUnavailable` when
        the node's breaker is open, `ConnectError`, `PoolTimeout`, and for writes
        `NoPrimaryAvailable` / `SplitBrain` (after ``failover_wait``).
        """
        node, entry = self._borrow(intent, node)
        return node, entry.conn

    def checkin(self, node: Node, conn: Any, error: BaseException | None = None) -> None:
        """Return a connection from `checkout`; ``error`` is what failed on it, if anything.

        A connection error discards the connection and counts against the node's breaker.
        """
        self._give_back(node, node.pool._entry_of(conn), error)

    def _borrow(self, intent: str, node: Node | None = None) -> tuple[Node, Any]:
        """`checkout`, returning the pool's entry (so that the return needs no lookup)."""
        if node is None:
            if intent == "read":
                node = self._reader()
            elif intent == "write":
                node = self._writer(time.monotonic() + self.config.routing.failover_wait)[0]
        if intent != "read" and intent != "write":
            raise ConfigurationError(f"connection intent must be 'read' or 'write', got {intent!r}")
        entry = _take(node)
        (self._reads if intent == "read" else self._writes).inc()
        return node, entry

    @staticmethod
    def _give_back(node: Node, entry: Any, error: BaseException | None, aborted: bool = False) -> bool:
        """Return a borrowed entry after ``error`` (or none), feeding the breaker; True when the
        connection was lost. An answer from the node, even an error, counts as a success."""
        lost = error is not None and _connection_lost(node, error, aborted)
        if not lost and not node.breaker._clean:
            node.breaker.success()
        node.pool._checkin(entry, broken=lost)
        return lost

    def write_many(self, sql: str, rows: Sequence[Any], *, batch_size: int = 1000, workers: int = 4) -> int:
        """Run ``sql`` for every parameter row, in batches spread over pooled primary connections.

        Each batch is its own transaction: a failed batch is rolled back alone, the
        others commit. Returns the total rowcount; when a batch fails, raises
        `BulkWriteError` carrying the failed batch indexes, their errors and the
        rowcount of the batches that committed.
        """
        if batch_size < 1 or workers < 1:
            raise ConfigurationError(f"write_many needs batch_size >= 1 and workers >= 1, got {batch_size} and {workers}")
        rows = list(rows)
        batches = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
        if not batches:
            return 0

        def run(batch: list[Any]) -> int:
            with self.transaction() as tx:
                return tx._guarded(lambda adapter, conn: adapter.execute_many(conn, sql, batch))

        results: dict[int, int] = {}
        failures: dict[int, BaseException] = {}
        with ThreadPoolExecutor(max_workers=min(workers, len(batches)), thread_name_prefix="dbrouter-bulk") as pool:
            futures = {pool.submit(run, batch): index for index, batch in enumerate(batches)}
            for future, index in futures.items():
                try:
                    results[index] = future.result()
                except Exception as exc:  # noqa: BLE001 - reported per batch below
                    failures[index] = exc
        total = sum(results.values())
        if failures:
            first = min(failures)
            raise BulkWriteError(
                f"{len(failures)} of {len(batches)} batches failed (first: batch {first}, rows "
                f"{first * batch_size}-{min(len(rows), (first + 1) * batch_size) - 1}: {_short(failures[first])}); "
                f"{len(results)} batches committed {total} rows",
                failures=failures, rowcount=total, committed=sorted(results),
            ) from failures[first]
        return total

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A unit of work whose reads see its own writes (see `dbrouter.session`)."""
        yield Session(self)

    # -- observation and shutdown ---------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """A snapshot: per node role, health, breaker, lag, latency and pool numbers; router totals."""
        nodes = {}
        for node in self.topology.nodes:
            nodes[node.name] = {
                "role": node.role,
                "healthy": node.healthy,
                "breaker": node.breaker.state,
                "breaker_failures": node.breaker.failures,
                "breaker_trips": node.breaker.trips,
                "probe_latency": node.probe_latency,
                "lag": node.lag,
                "lag_excluded": node.lag_excluded,
                "latency": node.latency,
                "weight": node.weight,
                "last_error": node.last_error,
                "pool": node.pool.stats(),
            }
        return {
            "nodes": nodes,
            "primary": self.topology.primary.name,
            "split_brain": list(self.topology.split_brain),
            "reads": self._reads.value,
            "writes": self._writes.value,
            "retries": self._retries.value,
            "fallbacks": self._fallbacks.value,
            "failovers": self.topology.failovers.value,
            "causal_primary_reads": self._causal_primary_reads.value,
            "write_outcome_unknown": self._write_outcome_unknown.value,
        }

    def close(self, timeout: float = 5.0) -> None:
        """Stop the monitor and close every pool (waiting up to ``timeout`` for borrowed connections)."""
        if self._closed:
            return
        self._closed = True
        self._monitor.stop()
        for node in self.topology.nodes:
            node.pool.close(timeout)
        self._watchdog.stop()

    def __enter__(self) -> Router:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


class _Checkout:
    """``with router.connection(intent) as conn``: `Router.checkout` / `Router.checkin`."""

    __slots__ = ("_router", "_intent", "_node", "_entry")

    def __init__(self, router: Router, intent: str) -> None:
        self._router = router
        self._intent = intent
        self._node: Node | None = None
        self._entry: Any = None

    def __enter__(self) -> Any:
        self._node, self._entry = self._router._borrow(self._intent)
        return self._entry.conn

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        node, self._node = self._node, None
        if node is not None:
            entry, self._entry = self._entry, None
            self._router._give_back(node, entry, exc)


def _take(node: Node) -> Any:
    """A pool entry from ``node`` if its breaker allows; a refused connect counts against it."""
    breaker = node.breaker
    if not breaker._clean and not breaker.allow():  # _clean: closed, no failure counted
        raise _BreakerOpen(
            f"node {node.name}: circuit breaker {breaker.state} after {breaker.failures} failures", node=node.name
        )
    try:
        return node.pool._checkout(None)
    except ConnectError as exc:
        breaker.failure(exc)
        raise


def _connection_lost(node: Node, exc: BaseException, aborted: bool = False) -> bool:
    """Whether ``exc`` (or a watchdog abort) cost the connection; if the node's error says so,
    the node is treated as lost (`_node_lost`). Anything but an Exception is lost too."""
    kind = node.adapter.classify(exc) if isinstance(exc, Exception) else None
    lost = aborted or kind is None or kind is ErrorKind.UNREACHABLE
    if lost and kind is not None:
        _node_lost(node, exc)
    return lost


def _node_lost(node: Node, exc: BaseException) -> None:
    """A connection to ``node`` broke: count it against the breaker and retire its other
    connections, which most likely broke with it (a crashed or restarted server)."""
    node.breaker.failure(exc)
    node.pool.invalidate(f"connection to {node.name} lost")


def _is_node_failure(exc: BaseException) -> bool:
    return isinstance(exc, (ConnectError, NodeUnavailable))


def _fewer_attempts(policy: Any) -> Any:
    """The retry policy minus the attempt the caller already made."""
    from dataclasses import replace

    return replace(policy, retry_attempts=max(1, policy.retry_attempts - 1))


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _fields(section: Any) -> dict[str, Any]:
    from dataclasses import fields

    return {f.name: getattr(section, f.name) for f in fields(section)}
