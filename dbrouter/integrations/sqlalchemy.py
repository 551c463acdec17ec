"""SQLAlchemy engines and ORM sessions whose connections come from dbrouter's pools.

::

    import dbrouter
    from dbrouter.integrations.sqlalchemy import create_engines, routing_sessionmaker

    router = dbrouter.Router(primary_url, replica_urls)
    engines = create_engines(router)           # engines.writer (primary), engines.reader (replicas)
    Session = routing_sessionmaker(engines)
    with Session() as session:
        session.add(User(name="ada"))
        session.commit()                       # flush and commit on the primary
        session.scalars(select(User)).all()    # a replica that has replayed the commit, else the primary

**Connections.** The engines have no pool of SQLAlchemy's: each checkout borrows a
connection from a dbrouter pool and SQLAlchemy's check-in gives it back, so sizing,
liveness checks, lifetime, leak detection and statistics are dbrouter's. A
connection that SQLAlchemy invalidates (a disconnect, or ``Connection.invalidate()``)
is discarded by the dbrouter pool, never handed out again. dbrouter's connections are
in autocommit mode, but SQLAlchemy's transactions rely on the driver's own, so
autocommit is switched off at checkout (psycopg2, psycopg: an attribute, no round trip;
mysql-connector: one statement) and the dbrouter pool switches it back on when the
connection returns, after SQLAlchemy's rollback. Session settings that SQLAlchemy
sets on a PostgreSQL connection (isolation level, read only, deferrable) are put back
to the server's defaults on return.

**Failures.** Each checkout is a dbrouter lease: the node's breaker admits it, and a
connection error that SQLAlchemy sees (its ``handle_error`` event) invalidates the
connection and counts against the node when the connection comes back. A COMMIT
interrupted by a connection error raises `WriteOutcomeUnknown`, as `Router.transaction`
does: it may or may not have been applied.

**Engines.** ``writer`` checks out from the primary's pool. ``reader`` picks a node
for each checkout with the router's policy (a replica; the primary when no replica
can serve and ``fallback_to_primary`` is on). One SQLAlchemy connection stays on one
node until it is closed.

**Session routing** (`RoutingSession`), per transaction:

1. Writes go to the primary: flushes, INSERT / UPDATE / DELETE, SELECT ... FOR UPDATE
   or FOR SHARE, a SELECT with a data-modifying CTE, ``text()`` that is not one read
   statement by the rule of `Router.read` (`dbrouter.statements`: ``"SELECT 1; DELETE
   ..."`` is a write), and ``Session.connection()`` without a statement.
2. Once a transaction has used the primary for a write, everything else in it goes
   to the primary too, so its reads see its own uncommitted changes. Autoflush runs
   before a query is routed, so a query that flushes pending objects reads from the
   primary.
3. Other reads of a transaction go to one node, chosen at its first read, so they
   all see one server.
4. Read-your-writes, as in `Router.session`: when a transaction that wrote commits,
   the session reads the replication position of the primary it committed on (not of
   whichever node is primary by then). A later read goes to a
   replica only if it has replayed that position (waiting up to ``causal_wait``),
   otherwise to the primary (also when the check itself fails on an unreachable
   replica); a replica found caught up is remembered until the next commit. With
   ``sticky_seconds`` set, reads instead go to the primary for that long after the
   commit. A rolled-back or failed transaction records nothing, and a savepoint
   release is not a commit.
5. An explicit bind wins: ``session.execute(stmt, bind_arguments={"bind":
   engines.writer})`` runs on the primary and counts as a write, for a SELECT that
   calls a function with side effects (``nextval``, advisory locks).

Costs: reading the position after a commit is one round trip on the primary. A
SQLAlchemy read is BEGIN, the query and ROLLBACK (PostgreSQL; MySQL adds the two
autocommit switches and the connector's ping in ``cursor()``), where `Router.read`
is one round trip: use the router directly on hot read paths.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, TypeVar, cast

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Connection, Engine, ExceptionContext
from sqlalchemy.orm import Session, SessionTransaction, sessionmaker
from sqlalchemy.pool import NullPool
from sqlalchemy.sql.elements import TextClause
from sqlalchemy.sql.selectable import CTE, Join, TextualSelect

from .. import _fork
from ..adapters.base import ErrorKind
from ..decisions import Phase, Work
from ..errors import ConfigurationError, DbRouterError
from ..lease import take
from ..statements import is_read_statement

if TYPE_CHECKING:
    from ..router import Router
    from ..topology import Node

__all__ = ["RoutingEngines", "RoutingSession", "create_engines", "routing_sessionmaker"]

log = logging.getLogger("dbrouter.integrations.sqlalchemy")

T = TypeVar("T")

# The SQLAlchemy dialect for each dbrouter adapter's driver (a MySQL adapter's driver names
# its implementation after the package: "mysql-connector (C extension)").
_URLS = {"psycopg2": "postgresql+psycopg2://", "psycopg": "postgresql+psycopg://", "mysql-connector": "mysql+mysqlconnector://"}

# create_engine options that would configure a second pool; dbrouter's does that job.
_POOL_OPTIONS = {
    "creator": "the engines take their connections from the router's pools",
    "poolclass": "the engines take their connections from the router's pools",
    "pool": "the engines take their connections from the router's pools",
    "pool_size": "size the router's pools with [pool] min_size / max_size",
    "max_overflow": "size the router's pools with [pool] max_size",
    "pool_timeout": "use [pool] acquire_timeout",
    "pool_recycle": "use [pool] max_lifetime",
    "pool_pre_ping": "dbrouter pings connections idle longer than [pool] validation_bypass",
    "pool_use_lifo": "dbrouter already hands out the most recently used connection",
}


class _Checkouts:
    """An engine's ``creator``: borrows connections from dbrouter pools and takes them back.

    Remembers which node each borrowed connection came from, because a reader
    engine's connections come from several pools.
    """

    def __init__(self, router: Router, engine: str, intent: str, node: Node | None = None) -> None:
        self._router = router
        self._engine = engine
        self._intent = intent
        self._node = node
        self._lock = threading.Lock()
        self._owners: dict[int, Node] = {}
        self._lost: dict[int, BaseException] = {}  # connections SQLAlchemy saw fail, by id
        _fork.register(self)

    def _after_fork_in_child(self) -> None:
        # A new lock; connections borrowed before the fork go back to their pools, which
        # abandon them (SQLAlchemy's own pool here is a NullPool: it keeps none).
        self._lock = threading.Lock()

    def owner(self, conn: Any) -> Node | None:
        """The node ``conn`` was borrowed from, while it is borrowed."""
        with self._lock:
            return self._owners.get(id(conn))

    def note_lost(self, conn: Any, error: BaseException) -> None:
        """``conn`` failed with a connection error: when it comes back, the node pays for it."""
        with self._lock:
            if id(conn) in self._owners:
                self._lost[id(conn)] = error

    def __call__(self) -> Any:
        # The router's checkout honours and feeds the node's breaker (and waits for a
        # primary up to failover_wait for the writer).
        node, conn = self._router.checkout(self._intent, self._node)
        try:
            self._prepare(conn)
        except BaseException as exc:
            self._router.checkin(node, conn, exc)
            raise
        with self._lock:
            self._owners[id(conn)] = node
        return conn

    def give_back(self, conn: Any, *, broken: bool) -> None:
        """Return ``conn`` to the pool it came from; ``broken`` discards it."""
        with self._lock:
            node = self._owners.pop(id(conn), None)
            error = self._lost.pop(id(conn), None)
        if node is None:  # not borrowed through this creator: nobody else will close it
            with contextlib.suppress(Exception):  # closing a broken connection may fail; nothing to do
                conn.close()
            return
        if not broken and self._engine == "mysql":
            conn._buffered = False  # as dbrouter opened it; the pool restores autocommit
        # The pool rolls back, restores autocommit and (PostgreSQL) the session defaults.
        self._router.checkin(node, conn, error, broken=broken)

    def _prepare(self, conn: Any) -> None:
        # SQLAlchemy's transactions are the driver's: it never sends BEGIN itself.
        conn.autocommit = False
        if self._engine == "mysql":
            # SQLAlchemy 2.0 relies on buffered cursors, which it asks for when it opens
            # connections itself (2.1 asks per cursor); dbrouter opens unbuffered ones.
            conn._buffered = True


def _on_node(node: Node, op: Callable[[Any, Any], T], extra: float = 0.0) -> T:
    """``op(adapter, conn)`` on a lease from ``node``, through its breaker, fed with the outcome."""
    lease = take(node)
    try:
        result = lease.run(op, extra)
    except BaseException as exc:
        lease.release_after(exc, Phase.SENT, Work.READ)
        raise
    lease.release()
    return result


def _lost(node: Node, exc: BaseException) -> bool:
    """Whether a connection that raised ``exc`` must be discarded."""
    return not isinstance(exc, Exception) or node.adapter.classify(exc) is ErrorKind.UNREACHABLE


_COMMITTING = "dbrouter_committing"


def _committing(conn: Connection) -> None:
    conn.info[_COMMITTING] = True


def _begun(conn: Connection) -> None:
    conn.info.pop(_COMMITTING, None)


def _handle_error(creator: _Checkouts, router: Router, ctx: ExceptionContext) -> None:
    """A connection error on a dbrouter connection: SQLAlchemy invalidates it (so it comes
    back as lost and the node's breaker counts it), and a COMMIT it interrupted raises
    `WriteOutcomeUnknown`, as `Router.transaction` does, instead of the driver's error."""
    connection = ctx.connection
    fairy = connection.connection if connection is not None and not connection.invalidated else None
    dbapi = fairy.dbapi_connection if fairy is not None else None
    node = creator.owner(dbapi) if dbapi is not None else None
    error = ctx.original_exception
    if node is None or not isinstance(error, Exception) or not _lost(node, error):
        return
    ctx.is_disconnect = True
    creator.note_lost(dbapi, error)
    if connection is not None and connection.info.pop(_COMMITTING, False):
        raise router.outcome_unknown(node, error, "during COMMIT") from error


class _HandOffPool(NullPool):
    """SQLAlchemy's side of the hand-off: closing a connection gives it back to dbrouter.

    NullPool closes each connection at check-in, after SQLAlchemy's reset (rollback),
    and every close goes through ``_close_connection``, with ``terminate=True`` when
    SQLAlchemy invalidated the connection.
    """

    def _close_connection(self, connection: Any, *, terminate: bool = False) -> None:
        cast(_Checkouts, self._creator).give_back(connection, broken=terminate)

    def status(self) -> str:
        return "dbrouter hand-off (no pooling of its own)"


class RoutingEngines:
    """SQLAlchemy engines over one `Router`'s pools: ``writer`` and ``reader``.

    ``writer`` checks out from the primary's pool; ``reader`` from a node chosen per
    checkout by the router's read policy. Build with `create_engines`. The router
    stays the caller's to close; `dispose` only drops the engines.
    """

    def __init__(self, router: Router, **engine_options: Any) -> None:
        for name in engine_options:
            if name in _POOL_OPTIONS:
                raise ConfigurationError(f"create_engines: {name} is not supported: {_POOL_OPTIONS[name]}")
        adapter = router.primary.adapter
        engine, driver = adapter.engine, adapter.driver.partition(" ")[0]
        if driver not in _URLS:
            raise ConfigurationError(f"create_engines: no SQLAlchemy dialect for a {engine!r} router on {driver!r}")
        self.router = router
        self._engine = engine
        self._url = _URLS[driver]
        self._options = engine_options
        self._lock = threading.Lock()
        self._by_node: dict[str, Engine] = {}
        _fork.register(self)
        self.writer: Engine = self._make("primary", "write")
        """Bound to the primary (the current one, after a failover)."""
        self._writer_checkouts = cast(_Checkouts, cast(_HandOffPool, self.writer.pool)._creator)
        self.reader: Engine = self._make("reader", "read")
        """A node chosen by the router's read policy at each checkout."""

    def __repr__(self) -> str:
        return f"<RoutingEngines {self.router!r}>"

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()  # a thread of the parent may have held it at the fork

    def _make(self, name: str, intent: str, node: Node | None = None) -> Engine:
        options = {"logging_name": f"dbrouter-{name}", "pool_logging_name": f"dbrouter-{name}", **self._options}
        creator = _Checkouts(self.router, self._engine, intent, node)
        engine = create_engine(self._url, creator=creator, poolclass=_HandOffPool, **options)
        event.listen(engine, "commit", _committing)
        event.listen(engine, "begin", _begun)
        event.listen(engine, "handle_error", partial(_handle_error, creator, self.router))
        return engine

    def writer_node(self, connection: Connection) -> Node | None:
        """The node a ``writer`` connection was borrowed from, while it is borrowed."""
        fairy = connection.connection
        return self._writer_checkouts.owner(fairy.dbapi_connection)

    def for_node(self, node: Node) -> Engine:
        """An engine whose connections all come from ``node`` (``writer`` for the primary)."""
        if node is self.router.primary:
            return self.writer
        with self._lock:  # create_engine does no I/O
            engine = self._by_node.get(node.name)
            if engine is None:
                engine = self._by_node[node.name] = self._make(node.name, "read", node)
        return engine

    def dispose(self) -> None:
        """Drop the engines' state; connections still checked out return to dbrouter when closed."""
        with self._lock:
            engines = [self.writer, self.reader, *self._by_node.values()]
        for engine in engines:
            engine.dispose()


def create_engines(router: Router, **engine_options: Any) -> RoutingEngines:
    """SQLAlchemy engines (``.writer``, ``.reader``) whose connections come from ``router``'s pools.

    ``engine_options`` go to `sqlalchemy.create_engine` (``echo``,
    ``isolation_level``, ``execution_options``, ...); pool options raise
    `ConfigurationError`, since dbrouter's pools do that job. A checkout waits up
    to the pool's ``acquire_timeout`` and raises `PoolTimeout`; an unreachable node
    raises `ConnectError`.
    """
    return RoutingEngines(router, **engine_options)


def _is_read(clause: Any, engine: str) -> bool:
    """True for a statement a replica can run: a plain SELECT without locking or writes."""
    if clause is None:
        return False
    if isinstance(clause, TextClause):
        return is_read_statement(clause.text, engine)
    if isinstance(clause, TextualSelect):
        sql = getattr(clause.element, "text", None)  # None for SQLAlchemy 2.1's template strings
        return isinstance(sql, str) and is_read_statement(sql, engine)
    if not getattr(clause, "is_select", False):
        return False
    return not _writes(clause)


def _writes(select: Any) -> bool:
    """A SELECT that locks rows or carries a data-modifying CTE."""
    if getattr(select, "_for_update_arg", None) is not None:
        return True
    parts = getattr(select, "selects", None)  # UNION and friends
    if parts is not None and any(_writes(part) for part in parts):
        return True
    # Where a CTE can sit at the top level. get_final_froms() would find the same for
    # far more work (~170 us for an ORM select), on every routed statement.
    froms = [
        *getattr(select, "_independent_ctes", ()),
        *getattr(select, "_from_obj", ()),
        *getattr(select, "columns_clause_froms", ()),
    ]
    while froms:
        item = froms.pop()
        if isinstance(item, CTE) and getattr(item.element, "is_dml", False):
            return True
        if isinstance(item, Join):
            froms += (item.left, item.right)
    return False


class RoutingSession(Session):
    """An ORM session that writes to the primary and reads from replicas, seeing its own writes.

    The rules are in the module docstring. Not thread-safe, like any `Session`.
    Build sessions with `routing_sessionmaker`, or ``RoutingSession(engines, ...)``
    with the usual `Session` options except ``bind`` / ``binds``.
    """

    def __init__(self, engines: RoutingEngines, **options: Any) -> None:
        if options.get("bind") is not None or options.get("binds"):
            raise ConfigurationError("a RoutingSession chooses its binds itself: do not pass bind= or binds=")
        options.pop("bind", None)  # sessionmaker always passes bind=None
        super().__init__(**options)
        self.engines = engines
        self._tx_wrote = False  # the current transaction used the primary for a write
        self._tx_committed = False
        self._tx_reader: Engine | None = None  # where the current transaction reads
        self._position: str | None = None  # primary position after this session's last write
        self._position_pending = False  # a write committed but its position is not known yet
        # The node the current transaction wrote on, and the one whose position is pending:
        # the position is read there, not on whatever node is primary by then (after a
        # failover the new primary may be behind the write, and replicas that replayed it
        # would pass).
        self._tx_primary: Node | None = None
        self._position_node: Node | None = None
        self._confirmed: set[str] = set()  # replicas known to have replayed _position
        self._sticky_until = 0.0

    @property
    def position(self) -> str | None:
        """The primary's replication position after this session's last committed write."""
        return self._position

    def get_bind(
        self,
        mapper: Any = None,
        *,
        clause: Any = None,
        bind: Engine | Connection | None = None,
        **kw: Any,
    ) -> Engine | Connection:
        """The engine for one statement, by the rules in the module docstring.

        May run one replay check on a replica (up to ``causal_wait``).
        """
        engines = self.engines
        if bind is not None:
            if bind is engines.writer:
                self._tx_wrote = True
            return bind
        if self._tx_wrote or self._flushing or not _is_read(clause, engines._engine):
            self._tx_wrote = True
            return engines.writer
        if self._tx_reader is None:
            self._tx_reader = self._read_bind()
        return self._tx_reader

    def _read_bind(self) -> Engine:
        engines = self.engines
        router = engines.router
        routing = router.config.routing
        if routing.sticky_seconds is not None:
            return engines.writer if time.monotonic() < self._sticky_until else engines.reader
        if self._position_pending and not self._fetch_position():
            return engines.writer
        if self._position is None:
            return engines.reader
        node = router.choose_reader()
        if node is router.primary:
            return engines.writer
        if node.name not in self._confirmed:
            position = self._position
            try:
                caught_up = _on_node(node, lambda adapter, conn: adapter.has_replayed(conn, position, routing.causal_wait),
                                     extra=routing.causal_wait)
            except Exception as exc:
                if not isinstance(exc, DbRouterError) and not _lost(node, exc):
                    raise
                caught_up = False  # that replica failed: the primary is certain to have the write
            if not caught_up:
                return engines.writer
            self._confirmed.add(node.name)
        return engines.for_node(node)

    def _transaction_ended(self) -> None:
        wrote = self._tx_wrote and self._tx_committed
        self._tx_wrote = self._tx_committed = False
        self._tx_reader = None
        node, self._tx_primary = self._tx_primary, None
        if not wrote:
            return
        self._position_node = node
        self._confirmed.clear()
        sticky = self.engines.router.config.routing.sticky_seconds
        if sticky is not None:
            self._sticky_until = time.monotonic() + sticky
            return
        self._position_pending = True
        self._fetch_position()

    def _fetch_position(self) -> bool:
        """Read the position of the node that committed the write, now; on failure reads
        stay on the primary and it is retried."""
        node = self._position_node or self.engines.router.primary
        try:
            self._position = _on_node(node, lambda adapter, conn: adapter.replication_position(conn))
        except Exception as exc:  # noqa: BLE001 - the commit succeeded; do not fail it
            log.warning(
                "could not read the replication position of primary %s after a commit (%s): "
                "this session reads from the primary until it can", node.name, exc,
            )
            return False
        self._position_pending = False
        return True


@event.listens_for(RoutingSession, "after_commit")
def _after_commit(session: Session) -> None:
    # Fired for savepoint releases too; only the outermost commit makes writes visible.
    if isinstance(session, RoutingSession) and not session.in_nested_transaction():
        session._tx_committed = True


@event.listens_for(RoutingSession, "after_begin")
def _after_begin(session: Session, transaction: SessionTransaction, connection: Connection) -> None:
    if isinstance(session, RoutingSession) and connection.engine is session.engines.writer:
        session._tx_primary = session.engines.writer_node(connection)


@event.listens_for(RoutingSession, "after_transaction_end")
def _after_transaction_end(session: Session, transaction: SessionTransaction) -> None:
    # Fired after the transaction's connections went back to dbrouter, so reading the
    # position needs no second primary connection.
    if isinstance(session, RoutingSession) and transaction.parent is None:
        session._transaction_ended()


def routing_sessionmaker(engines: RoutingEngines, **options: Any) -> sessionmaker[RoutingSession]:
    """A `sessionmaker` of `RoutingSession` over ``engines``; ``options`` are `Session`
    options (``autoflush``, ``expire_on_commit``, ...)."""
    return sessionmaker(class_=RoutingSession, engines=engines, **options)
