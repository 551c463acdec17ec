"""The router: writes to the primary, reads to replicas, consistency you choose.

One `Router` per database cluster. Its hot path (`read`, `write`) is a pool
checkout, one statement and a return: no lock is held across I/O, and no
extra round trip is made when the connection is warm and clean.

Consistency: outside a session, replica reads are eventually consistent (a
read right after a write may not see it). Inside `Router.session`, reads see
the session's own writes: the session remembers the primary's replication
position after each write, and a replica serves a later read only once it has
replayed that position (waiting up to ``causal_wait``); otherwise the primary
serves it. With ``sticky_seconds`` set, sessions instead read from the primary
for that long after their last write.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, Sequence

from ._counter import Counter
from .adapters import ErrorKind, make_adapter
from .balancing import make_balancer
from .config import RouterConfig, build_router_config, load_router_config
from .errors import BulkWriteError, ConfigurationError, DbRouterError, NoReplicaAvailable
from .events import Event, Events
from .pool import Pool
from .topology import PRIMARY, REPLICA, Monitor, Node
from .url import parse_address

__all__ = ["Router", "Session", "Transaction"]

log = logging.getLogger("dbrouter.router")

Rows = list  # list of row tuples

# Statements that only read, by their first keyword. Anything else (including
# WITH, which can hide a data-modifying CTE) is treated as a write.
_READ_KEYWORDS = frozenset({"select", "show", "explain", "describe", "desc", "values", "table"})
_LEADING_COMMENTS = re.compile(r"^(?:\s+|--[^\n]*\n|/\*.*?\*/)*", re.S)
_LOCKING_OR_INTO = re.compile(r"\bfor\s+(?:update|share|no\s+key\s+update|key\s+share)\b|\binto\b", re.I)


def is_read_statement(sql: str) -> bool:
    """True for a statement that can run on a replica: a plain SELECT / SHOW / EXPLAIN."""
    text = sql[_LEADING_COMMENTS.match(sql).end():]  # type: ignore[union-attr]
    first = text.split(None, 1)[0].lower() if text.strip() else ""
    return first in _READ_KEYWORDS and not _LOCKING_OR_INTO.search(text)


class Router:
    """Routes statements for one primary and its replicas.

    ``Router(primary, replicas, **options)`` takes flat options (for example
    ``max_size``, ``policy``, ``max_replica_lag``, ``causal_wait``); see
    `RouterConfig` and the README's configuration reference. Raises
    `ConfigurationError` at construction for any invalid value.
    """

    def __init__(
        self,
        primary: str | None = None,
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
        self._nodes = self._build_nodes(config)
        self._primary = self._nodes[0]
        self._replicas = self._nodes[1:]
        self._balancer = make_balancer(config.routing.policy)
        self._readable: tuple[Node, ...] = tuple(self._replicas)
        self._falling_back = False
        self._state_lock = threading.Lock()
        self._reads = Counter()
        self._writes = Counter()
        self._fallbacks = Counter()
        self._causal_primary_reads = Counter()
        self._monitor = Monitor(
            lambda: self._nodes, config.monitor, config.routing, self.events, self._refresh_readable
        )
        self._monitor.start()

    @classmethod
    def from_config(cls, source: Mapping[str, Any] | str | Any = None, **overrides: Any) -> Router:
        """A router from a mapping, a TOML file path, or the environment (``DBROUTER_*``) when
        ``source`` is None. ``overrides`` are flat options applied on top."""
        config = load_router_config(source)
        if overrides:
            sections = {name: _fields(getattr(config, name)) for name in ("pool", "connect", "routing", "monitor")}
            config = build_router_config(config.primary, config.replicas, overrides, sections)
        return cls(config=config)

    def _build_nodes(self, config: RouterConfig) -> list[Node]:
        primary_address = parse_address(config.primary)
        nodes: list[Node] = []
        specs = [(config.primary, 1.0, None, PRIMARY)] + [(r.url, r.weight, r.name, REPLICA) for r in config.replicas]
        for url, weight, name, role in specs:
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
            nodes.append(Node(node_name, address, adapter, None, role, weight))  # type: ignore[arg-type]
        for node in nodes:
            node.pool = Pool(node.adapter, config.pool, name=node.name)
        return nodes

    def __repr__(self) -> str:
        return f"<Router primary={self._primary.name} replicas={[n.name for n in self._replicas]}>"

    # -- who serves -----------------------------------------------------------

    @property
    def primary(self) -> Node:
        return self._primary

    @property
    def replicas(self) -> list[Node]:
        return list(self._replicas)

    @property
    def nodes(self) -> list[Node]:
        return list(self._nodes)

    def on(self, event: str, listener: Callable[[Event], None]) -> Callable[[], None]:
        """Subscribe to an event (see `dbrouter.events.EVENT_NAMES`, or ``"*"``)."""
        return self.events.on(event, listener)

    def _refresh_readable(self) -> None:
        """Recompute the replicas that may serve reads (called by the monitor on a change)."""
        with self._state_lock:
            self._readable = tuple(n for n in self._replicas if n.why_not_serving(self.config.routing.max_replica_lag) is None)
            if self._readable and self._falling_back:
                self._falling_back = False
                self.events.emit("replicas_restored", None, f"replicas serving reads again: {', '.join(n.name for n in self._readable)}")

    def _reader(self) -> Node:
        readable = self._readable
        if readable:
            return self._balancer.choose(readable)  # type: ignore[return-value]
        if not self._replicas:
            return self._primary
        reasons = "; ".join(
            f"{n.name}: {n.why_not_serving(self.config.routing.max_replica_lag) or 'not serving'}" for n in self._replicas
        )
        if not self.config.routing.fallback_to_primary:
            raise NoReplicaAvailable(f"no replica can serve reads ({reasons}) and fallback_to_primary is off")
        self._fallbacks.inc()
        if not self._falling_back:
            self._falling_back = True
            self.events.emit("fallback_to_primary", self._primary.name,
                             f"no replica can serve reads ({reasons}): reading from the primary", level=logging.WARNING)
        return self._primary

    # -- statements -------------------------------------------------------------

    def read(self, sql: str, params: Any = None) -> Rows:
        """Run a read on a replica chosen by the policy; returns the rows (a list of tuples).

        Falls back to the primary when no replica can serve (if enabled), else raises
        `NoReplicaAvailable`. Waits up to ``acquire_timeout`` for a connection.
        """
        self._reads.inc()
        rows, _ = self._run(self._reader(), sql, params)
        return rows or []

    def write(self, sql: str, params: Any = None) -> int:
        """Run one statement on the primary in its own committed transaction; returns the rowcount."""
        self._writes.inc()
        _, count = self._run(self._primary, sql, params)
        return count

    def _run(self, node: Node, sql: str, params: Any) -> tuple[Rows | None, int]:
        pool = node.pool
        entry = pool._checkout(None)
        started = time.monotonic()
        try:
            result = node.adapter.execute(entry.conn, sql, params)
        except Exception as exc:
            pool._checkin(entry, broken=node.adapter.classify(exc) is ErrorKind.UNREACHABLE)
            raise
        except BaseException:
            pool._checkin(entry, broken=True)  # interrupted mid-statement: state unknown
            raise
        node.observe_latency(time.monotonic() - started)
        pool._checkin(entry)
        return result

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """A transaction on the primary: reads inside it go to the primary too.

        Commits when the block ends, rolls back if it raises.
        """
        with self._transaction(None) as tx:
            yield tx

    @contextmanager
    def _transaction(self, after_commit: Callable[[Node, Any], None] | None) -> Iterator[Transaction]:
        node = self._primary
        entry = node.pool._checkout(None)
        adapter = node.adapter
        broken = False
        try:
            adapter.begin(entry.conn)
            tx = Transaction(node, entry.conn)
            yield tx
            tx._closed = True
            adapter.commit(entry.conn)
            self._writes.inc()
            if after_commit is not None:
                after_commit(node, entry.conn)
        except BaseException as exc:
            broken = not isinstance(exc, Exception) or adapter.classify(exc) is ErrorKind.UNREACHABLE
            if not broken:
                try:
                    adapter.rollback(entry.conn)
                except Exception:  # noqa: BLE001 - the connection is discarded instead
                    broken = True
            raise
        finally:
            node.pool._checkin(entry, broken=broken)

    @contextmanager
    def connection(self, intent: str = "read") -> Iterator[Any]:
        """A pooled DB-API connection for other libraries: ``"read"`` (a replica) or ``"write"`` (the primary).

        The connection is in autocommit mode; anything left open is rolled back on return.
        """
        if intent not in ("read", "write"):
            raise ConfigurationError(f"connection intent must be 'read' or 'write', got {intent!r}")
        node = self._reader() if intent == "read" else self._primary
        with node.pool.connection() as conn:
            yield conn

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
            with self._transaction(None) as tx:
                return tx._node.adapter.execute_many(tx._conn, sql, batch)

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
                f"{first * batch_size}-{min(len(rows), (first + 1) * batch_size) - 1}: {failures[first]}); "
                f"{len(results)} batches committed {total} rows",
                failures=failures, rowcount=total, committed=sorted(results),
            ) from failures[first]
        return total

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A unit of work whose reads see its own writes (see the module docstring)."""
        yield Session(self)

    # -- observation and shutdown ---------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """A snapshot: per node role, health, lag, latency and pool numbers; router totals."""
        nodes = {}
        for node in self._nodes:
            nodes[node.name] = {
                "role": node.role,
                "healthy": node.healthy,
                "lag": node.lag,
                "lag_excluded": node.lag_excluded,
                "latency": node.latency,
                "weight": node.weight,
                "pool": node.pool.stats(),
            }
        return {
            "nodes": nodes,
            "reads": self._reads.value,
            "writes": self._writes.value,
            "fallbacks": self._fallbacks.value,
            "causal_primary_reads": self._causal_primary_reads.value,
        }

    def close(self, timeout: float = 5.0) -> None:
        """Stop the monitor and close every pool (waiting up to ``timeout`` for borrowed connections)."""
        if self._closed:
            return
        self._closed = True
        self._monitor.stop()
        for node in self._nodes:
            node.pool.close(timeout)

    def __enter__(self) -> Router:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


class _Results:
    """The rows of the last statement, handed out by fetchone / fetchall like a cursor."""

    _rows: Rows | None = None
    _cursor = 0

    def _keep(self, rows: Rows | None) -> None:
        self._rows, self._cursor = rows, 0

    def fetchone(self) -> tuple[Any, ...] | None:
        """The next row of the last statement, or None."""
        if not self._rows or self._cursor >= len(self._rows):
            return None
        row = self._rows[self._cursor]
        self._cursor += 1
        return row

    def fetchall(self) -> Rows:
        """The remaining rows of the last statement."""
        rows = (self._rows or [])[self._cursor:]
        self._cursor = len(self._rows or [])
        return rows


class Transaction(_Results):
    """Statements inside `Router.transaction`: all on the primary, on one connection."""

    def __init__(self, node: Node, conn: Any) -> None:
        self._node = node
        self._conn = conn
        self._closed = False

    @property
    def connection(self) -> Any:
        """The underlying DB-API connection (for libraries that need one)."""
        return self._conn

    def execute(self, sql: str, params: Any = None) -> int:
        """Run a statement; its rows, if any, are available through fetchone / fetchall. Returns the rowcount."""
        if self._closed:
            raise DbRouterError("the transaction has ended; start a new one")
        rows, count = self._node.adapter.execute(self._conn, sql, params)
        self._keep(rows)
        return count


    def read(self, sql: str, params: Any = None) -> Rows:
        self.execute(sql, params)
        return self.fetchall()

    def write(self, sql: str, params: Any = None) -> int:
        return self.execute(sql, params)


class Session(_Results):
    """Reads that see this session's writes; see `Router.session`."""

    def __init__(self, router: Router) -> None:
        self._router = router
        self._position: str | None = None
        self._confirmed: set[str] = set()  # replicas known to have replayed _position
        self._sticky_until = 0.0

    @property
    def position(self) -> str | None:
        """The primary's replication position after this session's last write."""
        return self._position

    def _wrote(self, node: Node, conn: Any) -> None:
        routing = self._router.config.routing
        if routing.sticky_seconds is not None:
            self._sticky_until = time.monotonic() + routing.sticky_seconds
        else:
            self._position = node.adapter.replication_position(conn)
            self._confirmed.clear()

    def write(self, sql: str, params: Any = None) -> int:
        """Run a write on the primary (committed at once) and remember where it landed."""
        router = self._router
        node = router._primary
        router._writes.inc()
        with node.pool.connection() as conn:
            _, count = node.adapter.execute(conn, sql, params)
            self._wrote(node, conn)
        return count

    def read(self, sql: str, params: Any = None) -> Rows:
        """Run a read that sees this session's writes: on a replica that has them, else on the primary."""
        router = self._router
        router._reads.inc()
        routing = router.config.routing
        if routing.sticky_seconds is not None:
            node = router._primary if time.monotonic() < self._sticky_until else router._reader()
            rows, _ = router._run(node, sql, params)
            return rows or []
        node = router._reader()
        if self._position is None or node is router._primary or node.name in self._confirmed:
            rows, _ = router._run(node, sql, params)
            return rows or []
        entry = node.pool._checkout(None)
        try:
            caught_up = node.adapter.has_replayed(entry.conn, self._position, routing.causal_wait)
            if caught_up:
                self._confirmed.add(node.name)
                rows, _ = node.adapter.execute(entry.conn, sql, params)
        except Exception as exc:
            node.pool._checkin(entry, broken=node.adapter.classify(exc) is ErrorKind.UNREACHABLE)
            raise
        node.pool._checkin(entry)
        if caught_up:
            return rows or []
        router._causal_primary_reads.inc()
        rows, _ = router._run(router._primary, sql, params)
        return rows or []

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """A transaction on the primary; later reads in the session see what it committed."""
        with self._router._transaction(self._wrote) as tx:
            yield tx

    def execute(self, sql: str, params: Any = None) -> int:
        """A read (SELECT, SHOW, EXPLAIN: rows via fetchone / fetchall, returns their count)
        or a write (anything else, on the primary: returns the rowcount)."""
        if is_read_statement(sql):
            rows = self.read(sql, params)
            self._keep(rows)
            return len(rows)
        self._keep(None)
        return self.write(sql, params)



def _fields(section: Any) -> dict[str, Any]:
    from dataclasses import fields

    return {f.name: getattr(section, f.name) for f in fields(section)}
