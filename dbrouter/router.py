"""The router: one per database cluster, writes to the primary, reads to replicas.

`Router` puts the pieces together: nodes (adapter, pool, breaker), the
control plane (`dbrouter.topology`), the routing core (`dbrouter.routing`),
transactions, sessions and bulk writes. The failure rules are in
`dbrouter.routing` and the decision table in `dbrouter.decisions`.

Consistency: outside a session, replica reads are eventually consistent. See
`dbrouter.session` for read-your-writes.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import fields
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, TypeVar, cast

from .adapters import Adapter, make_adapter
from .balancing import make_balancer
from .bulk import BatchReport, write_many
from .config import SECTIONS, ReplicaSpec, RouterConfig, build_router_config, check_range, check_wait, load_router_config
from .deadline import CANCELLER, Deadline
from .decisions import Phase, Work
from .discovery import PRIMARY as MEMBER_PRIMARY
from .discovery import Member, Provider, ask
from .discovery.loop import DiscoveryLoop, member_address
from .errors import ConfigurationError, PoolError
from .events import Event, Events
from .fleet import shared_storage
from .hedging import Hedger
from .lease import HeldLease, Lease, Outcome, take
from .pool import Pool
from .resilience import NodeBreaker
from .retrying import Retry, RetryBudget, RetryExecutor
from .routing import Core, Counts, OpenTransactions, short
from .session import Session
from .statements import is_read_statement, verdicts
from .stream import Stream
from .topology import PRIMARY, REPLICA, Node, Topology
from .transactions import Transaction, run_transaction, transaction
from .url import NodeAddress, parse_address, resolve_driver
from .watchdog import Watchdog

__all__ = ["Router", "is_read_statement"]

log = logging.getLogger("dbrouter.router")

T = TypeVar("T")


class Router(Core):
    """Routes statements for one primary and its replicas.

    ``Router(primary, replicas, **options)`` takes flat options (for example
    ``max_size``, ``policy``, ``max_replica_lag``, ``statement_timeout``,
    ``fail_max``, ``failover_wait``); see `RouterConfig` and the README's
    configuration reference. Raises `ConfigurationError` at construction for
    any invalid value. The pools and the control plane start at once unless
    ``open=False``; then call `open`. Neither waits for the servers: a problem
    found by probing them (two nodes that are one server) is raised by
    `wait_for_probes` and by writes.

    A router built before ``os.fork()`` is the child's own in a forked child: fresh pools,
    its threads started again at its first use there; the parent's connections are left
    alone (see `dbrouter._fork`).
    """

    def __init__(
        self,
        primary: str | Mapping[str, Any] | None = None,
        replicas: Sequence[Any] | str = (),
        *,
        config: RouterConfig | None = None,
        open: bool = True,  # noqa: A002 - the psycopg_pool spelling
        **options: Any,
    ) -> None:
        if config is None:
            config = build_router_config(primary, replicas, options)
        elif primary is not None or replicas or options:
            raise ConfigurationError("give either config= or primary/replicas/options, not both")
        self.config = config
        self.events = Events()
        self.counts = Counts()
        self.open_transactions = OpenTransactions()
        self._closed = False
        self._opened = False
        self._leases: dict[int, Lease] = {}  # checkout() -> checkin(): by id of the connection
        self._watchdog = Watchdog()
        self._draining: list[threading.Thread] = []  # remove_replica(wait=False): pools being drained
        self._draining_lock = threading.Lock()  # guards _draining; nothing is called under it
        self._template = parse_address(config.primary)
        provider = self._make_provider(config)
        members = _first_members(provider, config.connect.connect_timeout) if provider is not None else []
        nodes, discovered = self._build_nodes(config, members)
        self.topology = Topology(nodes, config.routing, config.monitor, self.events,
                                 probe_timeout=max(1.0, config.connect.connect_timeout), watchdog=self._watchdog)
        self.discovery: DiscoveryLoop | None = None
        """Follows the provider (``discovery`` option) while the router is open; None when static."""
        if provider is not None:
            self.discovery = DiscoveryLoop(
                provider, interval=config.discovery.discovery_interval, timeout=config.connect.connect_timeout,
                topology=self.topology, events=self.events, template=self._template,
                add=lambda address, name: self._add_node(address, name, 1.0, 10.0),
                remove=lambda name: self.remove_replica(name, wait=False), discovered=discovered)
        self._read_verdicts = verdicts(nodes[0].adapter.engine)
        self._balancer = make_balancer(config.routing.policy)
        self._executor = RetryExecutor(config.retry, budget=self._retry_budget(config), on_refused=self._retry_refused)
        routing = config.routing
        if routing.hedge_after is not None:
            self.hedger = Hedger(self, routing.hedge_after, routing.hedge_budget)
        self._budget_event_at = float("-inf")
        if open:
            self.open()

    def open(self) -> Router:
        """Start the pools (``min_size`` connections) and the control plane; idempotent."""
        if not self._opened:
            self._opened = True
            self._open_pools()
            self._start_control()
        return self

    def _open_pools(self) -> None:
        try:
            for node in self.topology.nodes:
                node.pool.open()
        except BaseException:
            self._close_pools(0)
            raise

    def _start_control(self) -> None:
        for node in self.topology.nodes:
            node.breaker.share()  # with breaker_redis_url: refreshed from Redis while open
        self.topology.start()
        if self.discovery is not None:
            self.discovery.start()

    @classmethod
    def from_config(cls, source: Mapping[str, Any] | str | Any = None, **overrides: Any) -> Router:
        """A router from a mapping, a TOML file path, or the environment (``DBROUTER_*``) when
        ``source`` is None. ``overrides`` are flat options applied on top."""
        config = load_router_config(source)
        if overrides:
            sections = {name: _fields(getattr(config, name)) for name in SECTIONS}
            primary = {"url": config.primary, "name": config.primary_name} if config.primary_name else config.primary
            config = build_router_config(primary, config.replicas, overrides, sections)
        return cls(config=config)

    def _retry_budget(self, config: RouterConfig) -> RetryBudget | None:
        ratio = config.retry.retry_budget
        if ratio is None:
            return None
        counts = self.counts
        return RetryBudget(ratio, config.retry.retry_budget_floor, lambda: counts.reads.value + counts.writes.value)

    def _retry_refused(self, failed: Retry) -> None:
        """The retry budget refused a retry: counted, and said once per budget window."""
        self.counts.retries_refused.inc()
        now = time.monotonic()
        if now - self._budget_event_at >= 10.0:
            self._budget_event_at = now
            self.events.emit("retry_budget_exhausted", failed.node.name,
                             f"retry budget spent: calls raise their error instead of retrying ({short(failed.cause)})",
                             level=logging.WARNING)

    def _make_provider(self, config: RouterConfig) -> Provider | None:
        """The topology provider the ``discovery`` option names, or None for ``static``."""
        kind = config.discovery.discovery
        if not isinstance(kind, str):
            return cast(Provider, kind)
        if kind == "patroni":
            from .discovery.patroni import PatroniProvider

            return PatroniProvider(config.discovery.discovery_endpoints)
        if kind == "dns":
            from .discovery.dns import DnsProvider

            return DnsProvider(config.discovery.discovery_endpoints, self._template.port,
                               config.discovery.discovery_nameservers)
        if kind == "mysql":
            if self._template.engine != "mysql":
                raise ConfigurationError("discovery = 'mysql' asks a MySQL/MariaDB primary for its replicas; "
                                         f"the primary {self._template.redacted} is {self._template.engine}")
            from .discovery.mysql import MySQLReplicaProvider

            configured = (config.primary_name or self._template.name, self._template)

            def primary() -> tuple[str, NodeAddress]:
                topology = getattr(self, "topology", None)
                if topology is None:
                    return configured
                node = topology.snapshot.primary
                return node.name, node.address

            return MySQLReplicaProvider(primary, config.connect)
        return None

    def _build_nodes(self, config: RouterConfig, members: Sequence[Member] = ()) -> tuple[list[Node], list[str]]:
        """The nodes to start with, and the names of those the provider brought.

        With a provider that names a primary (Patroni), that member is the primary and the
        primary URL only lends its user, password, database and options; otherwise the
        primary URL is the primary, and the members not already configured are replicas.
        """
        template = self._template
        lead = next((m for m in members if m.role == MEMBER_PRIMARY), None)
        specs: list[tuple[NodeAddress, float, str | None, str]]
        if lead is not None:
            specs = [(member_address(template, lead), 1.0, lead.name, PRIMARY)]
        else:
            specs = [(template, 1.0, config.primary_name, PRIMARY)]
        specs += [(parse_address(r.url), r.weight, r.name, REPLICA) for r in config.replicas]
        taken = {(address.host, address.port) for address, *_ in specs}
        names = {name for _, _, name, _ in specs if name}
        discovered = [lead.name] if lead is not None else []
        for member in members:
            if member is lead or (member.host, member.port) in taken or member.name in names:
                continue
            taken.add((member.host, member.port))
            names.add(member.name)
            specs.append((member_address(template, member), 1.0, member.name, REPLICA))
            discovered.append(member.name)
        nodes: list[Node] = []
        try:
            for address, weight, name, role in specs:
                nodes.append(self._build_node(config, nodes, address, weight, name, role))
        except BaseException:
            for node in nodes:
                node.pool.close(timeout=0)
            raise
        return nodes, discovered

    def _build_node(self, config: RouterConfig, nodes: list[Node], address: NodeAddress, weight: float,
                    name: str | None, role: str) -> Node:
        """One node: its adapter, breaker and pool (not connecting yet)."""
        primary_address = self._template
        if address.engine != primary_address.engine:
            raise ConfigurationError(
                f"replica {address.redacted} is a {address.engine} node but the primary "
                f"{primary_address.redacted} is {primary_address.engine}: one router serves one engine"
            )
        driver, primary_driver = (resolve_driver(a, config.connect.driver) for a in (address, primary_address))
        if driver != primary_driver:
            raise ConfigurationError(
                f"replica {address.redacted} would use the {driver} driver but the primary "
                f"{primary_address.redacted} uses {primary_driver}: one router uses one driver "
                f"(name it in the driver option or in every URL's scheme)"
            )
        node_name = name or address.name
        if any(node.name == node_name for node in nodes):
            raise ConfigurationError(f"node {node_name} is listed twice; give each node a distinct name")
        adapter = self._make_adapter(address, config)
        storage = None
        if config.breaker.breaker_redis_url:
            key = f"{address.engine}:{address.name}/{address.database or ''}"
            try:
                storage = shared_storage(config.breaker.breaker_redis_url, key)
            except ValueError as exc:
                if isinstance(exc, ConfigurationError):
                    raise
                # redis-py's messages quote parts of the URL (its port, for one): with an
                # unencoded '/' in the password, that would be part of the password.
                raise ConfigurationError(
                    "breaker_redis_url is not a valid Redis URL: check its port, database number and "
                    "options, and percent-encode the password"
                ) from None
        # The breaker reports its changes to the node, which hands them to the control plane.
        holder: list[Node] = []
        breaker = NodeBreaker(node_name, config.breaker, storage=storage,
                              on_change=lambda old, new: holder[0].breaker_changed(old, new))
        pool = self._make_pool(adapter, config, node_name)
        node = Node(node_name, address, adapter, pool, breaker, role, weight, watchdog=self._watchdog)
        holder.append(node)
        return node

    def _make_adapter(self, address: NodeAddress, config: RouterConfig) -> Adapter:
        """A node's driver adapter (`AsyncRouter`: the sync twin of its asyncio one)."""
        return make_adapter(address, config.connect)

    def _make_pool(self, adapter: Adapter, config: RouterConfig, node_name: str) -> Pool:
        """A node's pool, not open yet (`AsyncRouter` makes asyncio ones)."""
        return Pool(adapter, config.pool, name=node_name, watchdog=self._watchdog, open=False,
                    on_event=lambda event, message, **data: self.events.emit(
                        event, node_name, message, level=logging.WARNING, **data),
                    after_fork=self._revive)

    def __repr__(self) -> str:
        return f"<Router primary={self.primary.name} replicas={[n.name for n in self.replicas]}>"

    # -- who serves -----------------------------------------------------------

    @property
    def primary(self) -> Node:
        """The node writes go to now (changes after a failover)."""
        return self.topology.snapshot.primary

    @property
    def replicas(self) -> list[Node]:
        """Every node that is not the primary, serving reads or not."""
        return list(self.topology.snapshot.replicas)

    @property
    def nodes(self) -> list[Node]:
        return list(self.topology.nodes)

    # -- membership ---------------------------------------------------------------

    def add_replica(self, url: str, *, name: str | None = None, weight: float = 1.0, timeout: float = 10.0) -> Node:
        """Add a replica at ``url`` (same engine as the primary) while the router runs.

        Returns once the routing snapshot has it; it serves reads from its first
        successful probe (within about one ``health_interval``), and its pool opens
        ``min_size`` connections in the background. Raises `ConfigurationError` for a bad
        URL, another engine, or a name already in use; `UsageError` when the router is
        not open.
        """
        check_wait("timeout", timeout)
        spec = ReplicaSpec(url=url, weight=weight, name=name)  # validated like a configured replica
        return self._add_node(parse_address(spec.url), spec.name, spec.weight, timeout)

    def _add_node(self, address: NodeAddress, name: str | None, weight: float, timeout: float) -> Node:
        # The name is checked by the control plane, which alone knows the nodes as of now.
        node = self._build_node(self.config, [], address, weight, name, REPLICA)
        self._open_added(node)
        try:
            self.topology.add(node, timeout)
        except BaseException:
            node.pool.close(0)
            raise
        node.breaker.share()
        return node

    def _open_added(self, node: Node) -> None:
        """Open the pool of a node added while the router runs (`AsyncRouter`: on its loop)."""
        node.pool.open()

    def remove_replica(self, name: str, *, timeout: float = 30.0, wait: bool = True) -> None:
        """Drain the replica called ``name`` out of the router.

        No new read goes to it once this returns (a read that had already chosen it goes
        to another node, nothing sent); reads in flight on it finish; its pool is closed
        once they have given their connections back, waiting up to ``timeout`` seconds
        for them (stragglers are closed as they come back). ``wait=False`` returns at
        once and drains in the background. Raises `ConfigurationError` for an unknown
        name, `UsageError` for the current primary (remove it after a failover) or when
        the router is not open.
        """
        check_wait("timeout", timeout)
        node = self.topology.remove(name, min(timeout, 10.0) if timeout else 10.0)
        node.breaker.unshare()
        self._drain(node, timeout, wait)

    def _drain(self, node: Node, timeout: float, wait: bool) -> None:
        """Close a removed node's pool once its borrowed connections are back (`AsyncRouter`:
        on its loop)."""

        def drain() -> None:
            node.pool.close(timeout, removed=True)
            CANCELLER.forget(node.adapter)

        if wait:
            drain()
            return
        thread = threading.Thread(target=drain, name=f"dbrouter-drain-{node.name}", daemon=True)
        with self._draining_lock:
            self._draining = [t for t in self._draining if t.is_alive()]
            self._draining.append(thread)
        thread.start()

    def on(self, event: str, listener: Callable[[Event], None]) -> Callable[[], None]:
        """Subscribe to an event (see `dbrouter.events.EVENT_NAMES`, or ``"*"``); returns an unsubscribe
        function. Listeners run with no dbrouter lock held, mostly on the control thread."""
        return self.events.on(event, listener)

    def wait_for_probes(self, rounds: int = 1, timeout: float = 10.0) -> bool:
        """Block until ``rounds`` more probe rounds have been folded in; False on timeout.

        Raises `ConfigurationError` when probing found two configured nodes to be one
        server (the same server under two names): call it at start-up to learn of it
        before the first write does.
        """
        check_range("", "rounds", rounds, low=1, high=1_000_000, integer=True)
        check_wait("timeout", timeout)
        done = self.topology.wait_rounds(rounds, timeout)
        error = self.topology.configuration_error()
        if error is not None:
            raise error
        return done

    # -- transactions, sessions, bulk ------------------------------------------------

    @contextmanager
    def deadline(self, seconds: float) -> Iterator[Deadline]:
        """Every call in the block (on any router, in this thread or task) ends within
        ``seconds`` from now, retries, failover waits and statements included: a statement
        still running then is cut (and cancelled on the server), and the call raises
        `DeadlineExceeded`, saying where the time went. Nested blocks only shorten it.
        """
        with self.scoped(seconds) as deadline:
            yield deadline

    def run_transaction(self, fn: Callable[[Transaction], T], *, outside_transaction: bool = False,
                        timeout: float | None = None) -> T:
        """Run ``fn(tx)`` in a transaction on the primary and return its result, retrying the
        whole function on serialization failures and deadlocks, and when the connection
        was lost before the commit (the server rolled it back). A failure during the
        commit itself raises `WriteOutcomeUnknown`. Raises `UsageError` inside another
        transaction of this router on the same thread, as `transaction` does. ``timeout``
        bounds it all, reruns included (`DeadlineExceeded`).
        """
        with self.call_scope(timeout) or nullcontext():
            return run_transaction(self, fn, outside_transaction=outside_transaction)

    @contextmanager
    def transaction(self, *, outside_transaction: bool = False, timeout: float | None = None) -> Iterator[Transaction]:
        """A transaction on the primary: reads inside it go to the primary too.

        Commits when the block ends, rolls back if it raises. If the connection is
        lost during the commit, raises `WriteOutcomeUnknown`.

        While the block runs, `write`, `write_many`, `run_transaction`, another
        `transaction` and a session's writes on the same thread raise `UsageError` at
        once: they would run on another connection, outside this transaction, and wait
        for its locks. Use ``tx.execute``. Pass ``outside_transaction=True`` to one of
        them to run it on a connection of its own anyway, committed apart. Reads,
        `connection`, `checkout` and `lease` are not checked.

        ``timeout`` (seconds) bounds the whole block, from BEGIN to COMMIT: a statement
        running when it passes is cut, and the block raises `DeadlineExceeded` (the server
        rolls the transaction back), or `DeadlineExceededAfterWrite` if it was the COMMIT.
        """
        with self.call_scope(timeout) or nullcontext(), transaction(self, outside_transaction=outside_transaction) as tx:
            yield tx

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A unit of work whose reads see its own writes (see `dbrouter.session`)."""
        yield Session(self)

    def write_many(self, sql: str, rows: Iterable[Any], *, batch_size: int = 1000, workers: int = 4,
                   outside_transaction: bool = False, progress: Callable[[BatchReport], object] | None = None,
                   timeout: float | None = None) -> int:
        """Run ``sql`` for every parameter row of ``rows`` (any iterable, read as it goes), in
        batches of ``batch_size`` spread over ``workers`` pooled primary connections.

        Each batch is its own transaction: a failed batch is rolled back alone, the others
        commit. A plain ``INSERT INTO t (cols) VALUES (%s, ...)`` goes by the engine's fast
        path (PostgreSQL ``COPY ... FROM STDIN``, MySQL/MariaDB multi-row INSERTs sized to
        ``max_allowed_packet``). At most ``workers x batch_size`` rows are held at once.
        A batch whose connection was lost before its COMMIT is run again (the server rolled
        it back), waiting up to ``failover_wait`` for a new primary; one lost during its COMMIT
        is reported unknown. ``progress(report)`` is called on this thread after each batch
        with a `BatchReport`. Returns the total rowcount; when a batch did not commit, raises
        `BulkWriteError` (after the others finished) with the committed, failed and unknown
        batches. Raises `UsageError` inside a `transaction` of this router on the same thread,
        unless ``outside_transaction=True``. ``timeout`` bounds the whole call: batches cut
        by it fail with `DeadlineExceeded` (unknown when cut in their COMMIT).
        """
        with self.call_scope(timeout) or nullcontext():
            return write_many(self, sql, rows, batch_size=batch_size, workers=workers,
                              outside_transaction=outside_transaction, progress=progress)

    def stream(self, sql: str, params: Any = None, *, batch_size: int = 1000) -> Stream:
        """The rows of one read statement, fetched ``batch_size`` at a time, for a ``with`` block::

            with router.stream("SELECT id, body FROM events WHERE day = %s", (day,)) as rows:
                for row in rows:
                    ...

        It runs where `read` would (a replica by the routing rules, the primary as the
        fallback), on a server-side cursor (PostgreSQL) or an unbuffered result
        (MySQL/MariaDB), and holds that connection until the block ends (``leak_threshold``
        applies). ``sql`` must pass `read`'s rule (`NotAReadStatement` otherwise). Failures
        before the first rows are retried on another node like a read; once rows were handed
        out, a lost node raises `StreamInterrupted`, and the stream is never started again.
        """
        return Stream(self, sql, params, batch_size=batch_size)

    # -- connections for other libraries ------------------------------------------

    def connection(self, intent: str = "read") -> _Checkout:
        """A pooled DB-API connection for other libraries, for a ``with`` block:
        ``"read"`` (a replica) or ``"write"`` (the primary).

        The connection is in autocommit mode; anything left open is rolled back on return.
        The node's breaker is honoured and fed, as for `read` and `write`. dbrouter does not
        see the statements run on it: the read rule of `read` does not apply, and nothing
        is retried (a lost connection raises the driver's error). With
        mysql-connector, ``conn.cursor()`` pings the server first (a driver habit): for
        single statements `read` and `write` make one round trip instead of two.
        """
        return _Checkout(self, intent)

    def checkout(self, intent: str = "read", node: Node | None = None) -> tuple[Node, Any]:
        """Borrow a connection for ``intent`` (or from ``node``); give it back with `checkin`.

        For integrations that hold connections themselves. Raises `NodeUnavailable` when
        the node's breaker is open, `ConnectError`, `PoolTimeout`, and for writes
        `NoPrimaryAvailable` / `SplitBrain` (after ``failover_wait``).
        """
        lease = self.lease(intent, node)
        self._leases[id(lease.conn)] = lease
        return lease.node, lease.conn

    def checkin(self, node: Node, conn: Any, error: BaseException | None = None, *, broken: bool = False) -> None:
        """Return a connection from `checkout`; ``error`` is what failed on it, if anything.

        A connection error discards the connection and counts against the node's breaker.
        ``broken=True`` without an error discards it without blaming the node (the caller
        invalidated it for reasons of its own).
        """
        lease = self._leases.get(id(conn))
        if lease is None or lease.conn is not conn or lease.node is not node:
            raise PoolError(f"connection returned to node {node.name} was not checked out from it or was returned twice")
        del self._leases[id(conn)]
        if error is not None:
            lease.release_after(error, Phase.SENT, Work.BLOCK)  # judged only if it is this connection's
        elif broken:
            lease.release(Outcome.DISCARDED)
        else:
            lease.release()

    def lease(self, intent: str = "read", node: Node | None = None) -> Lease:
        """A lease for ``intent`` (or on ``node``); release it with its outcome (see `dbrouter.lease`)."""
        if intent != "read" and intent != "write":
            raise ConfigurationError(f"connection intent must be 'read' or 'write', got {intent!r}")
        if node is None:
            if intent == "read":
                node = self.choose_reader()
            else:
                node = self.choose_writer(time.monotonic() + self.config.routing.failover_wait)[0]
        lease = take(node, kind=HeldLease)
        (self.counts.reads if intent == "read" else self.counts.writes).inc()
        return lease

    # -- observation and shutdown ---------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """A snapshot: per node role, health, breaker, lag, latency, pool numbers and driver; router totals."""
        nodes = {}
        snapshot = self.topology.snapshot
        for node in self.topology.nodes:
            nodes[node.name] = {
                "role": node.role,
                "healthy": node.healthy,
                "breaker": node.breaker.state,
                "breaker_failures": node.breaker.failures,
                "breaker_trips": node.breaker.trips,
                "breaker_last_failure": node.breaker.last_failure,
                "probe_latency": node.probe_latency,
                "lag": node.lag,
                "lag_excluded": node.lag_excluded,
                "slow_ejected": bool(node.slow_until),
                "latency": node.latency,
                "weight": node.weight,
                "last_error": node.last_error,
                "serving_reads": node in snapshot.readable,
                "pool": node.pool.stats(),
                "driver": node.pool.adapter.driver,
            }
        counts = self.counts
        return {
            "nodes": nodes,
            "primary": snapshot.primary.name,
            "split_brain": list(snapshot.split_brain),
            "same_server": [list(group) for group in snapshot.same_server],
            "reads": counts.reads.value,
            "writes": counts.writes.value,
            "retries": counts.retries.value,
            "retries_refused": counts.retries_refused.value,
            "fallbacks": counts.fallbacks.value,
            "failovers": self.topology.failovers.value,
            "causal_primary_reads": counts.causal_primary_reads.value,
            "write_outcome_unknown": counts.write_outcome_unknown.value,
            "deadline_exceeded": counts.deadline_exceeded.value,
            "hedges": 0 if self.hedger is None else self.hedger.sent.value,
            "hedges_won": 0 if self.hedger is None else self.hedger.won.value,
            "hedges_refused": 0 if self.hedger is None else self.hedger.refused.value,
            "discovery": None if self.discovery is None else self.discovery.stats(),
        }

    def close(self, timeout: float = 5.0) -> None:
        """Stop the control plane and close every pool (waiting up to ``timeout`` for borrowed connections)."""
        check_wait("timeout", timeout)
        if self._closed:
            return
        self._closed = True
        if self.discovery is not None:
            self.discovery.stop(timeout)
        self.topology.stop(timeout)
        if self.hedger is not None:
            self.hedger.close()
        for node in self.topology.nodes:
            node.breaker.unshare()
        self._close_pools(timeout)
        for node in self.topology.nodes:
            CANCELLER.forget(node.adapter)
        self._watchdog.stop()

    def _revive(self) -> None:
        """In a forked child, the first checkout from any pool: the whole router wakes up
        there, with its control plane and every pool's housekeeping and ``min_size``
        connections (see `dbrouter._fork`)."""
        self.topology.revive()
        if self.discovery is not None:
            self.discovery.revive()
        for node in self.topology.nodes:
            node.breaker.share()  # the sharing thread, started again in this process
        for node in self.topology.nodes:
            node.pool._revive(tell_owner=False)

    def _close_pools(self, timeout: float) -> None:
        for node in self.topology.nodes:
            node.pool.close(timeout)
        with self._draining_lock:
            draining = list(self._draining)
        deadline = time.monotonic() + timeout
        for thread in draining:
            thread.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> Router:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


class _Checkout:
    """``with router.connection(intent) as conn``: a lease for a block."""

    __slots__ = ("_router", "_work", "_intent", "_lease")

    def __init__(self, router: Router, intent: str) -> None:
        self._router = router
        self._intent = intent
        self._work = Work.READ if intent == "read" else Work.BLOCK
        self._lease: Lease | None = None

    def __enter__(self) -> Any:
        self._lease = self._router.lease(self._intent)
        return self._lease.conn

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        lease, self._lease = self._lease, None
        if lease is None:
            return
        if exc is None:
            lease.release()
        else:
            lease.release_after(exc, Phase.SENT, self._work)  # judged only if it is this connection's


def _first_members(provider: Provider, timeout: float) -> list[Member]:
    """The provider's first answer, which the router starts from: without it there is
    nothing to route to, so its failure is the constructor's."""
    try:
        return ask(provider, timeout)
    except BaseException:
        provider.close()
        raise


def _fields(section: Any) -> dict[str, Any]:
    return {f.name: getattr(section, f.name) for f in fields(section)}

