"""Django database backends whose connections come from a dbrouter `Router`.

::

    DATABASES = {
        "default": {                                   # the primary alias: writes, transactions
            "ENGINE": "dbrouter.integrations.django.postgresql",   # or ".mysql" (MySQL, MariaDB)
            "NAME": "shop", "USER": "app", "PASSWORD": "...", "HOST": "db1", "PORT": "5432",
            "CONN_MAX_AGE": 0,                         # dbrouter's pool keeps the server sessions
            "OPTIONS": {
                "replicas": ["db2", "db3:5433"],       # host[:port], or {"HOST", "PORT", "weight", "name"}
                "dbrouter": {"max_replica_lag": 5, "statement_timeout": 10, "max_size": 20},
            },
        },
        "replica": {                                   # the replica alias: reads
            "ENGINE": "dbrouter.integrations.django.postgresql",
            "OPTIONS": {"replica_of": "default"},
            "TEST": {"MIRROR": "default"},             # set for you when missing
        },
    }
    DATABASE_ROUTERS = ["dbrouter.integrations.django.ReplicaRouter"]
    MIDDLEWARE = [..., "dbrouter.integrations.django.ReadYourWritesMiddleware"]

**One router per cluster.** The aliases of one cluster (the primary alias and the aliases
with ``replica_of`` naming it) share one `Router`, built at their first connection from the
primary alias's settings: ``HOST`` / ``PORT`` is the first primary, ``OPTIONS["replicas"]``
the replicas (same ``NAME``, ``USER``, ``PASSWORD``), ``OPTIONS["dbrouter"]`` the router's
flat options (``max_size``, ``statement_timeout``, ``failover_wait``, ``sticky_seconds``, ...,
as `Router` takes them; a bad one is `ImproperlyConfigured`). Other ``OPTIONS`` keys go to
the driver as URL options of every node (``sslmode``, ``ssl_ca``, ...), except Django's own
``isolation_level`` and (PostgreSQL) ``assume_role``, which the backend applies. `get_router`
gives the router of an alias, for `Router.stats`, events and metrics.

**Connections.** Django "opens" a connection by borrowing one from the router (a lease:
breaker honoured, watchdog armed for each statement) and "closes" it by giving it back, so
the pool replaces ``CONN_MAX_AGE`` and ``CONN_HEALTH_CHECKS``: with ``CONN_MAX_AGE = 0``
(recommended) each request borrows at its first query and gives back at its end, and the
pool keeps the server sessions open (``max_lifetime``, ``max_idle``), pings a connection
idle longer than ``validation_bypass`` when it is borrowed and discards broken ones.
``CONN_MAX_AGE > 0`` keeps the borrowed connection across requests as Django documents (it
stays on its node until then), and ``CONN_HEALTH_CHECKS`` pings it at the start of each
request. The primary alias borrows from the current primary (after a failover, the new
one; while there is none, waiting up to ``failover_wait`` and then raising
`NoPrimaryAvailable`). The replica alias borrows from a replica chosen by the router's
policy (the primary when none can serve).

**Errors.** What dbrouter raises reaches Django as a class that is both the dbrouter error
and ``django.db.OperationalError`` (``except dbrouter.NoPrimaryAvailable`` and ``except
django.db.OperationalError`` both catch it, and ``transaction.atomic`` rolls back on it). A
connection lost under a statement is never a raw driver error: on the primary alias an
autocommit write or a COMMIT raises `WriteOutcomeUnknown` (it may have been applied),
anything else `NodeUnavailable` (a transaction was rolled back by the server); the node's
breaker counts it, and the next query outside an atomic block borrows a new connection. A
read on the replica alias that loses its node runs again on another node (up to
``retry_attempts``), outside atomic blocks and server-side cursors.

**Routing** (`ReplicaRouter`): reads go to the replica alias of the model's cluster; writes,
``select_for_update()`` and reads while the primary alias is inside ``transaction.atomic()``
(so also with ``ATOMIC_REQUESTS``) go to the primary alias; migrations run on primary
aliases only; relations are allowed within a cluster.

**Read-your-writes** (`ReadYourWritesMiddleware`, `read_your_writes` for work outside a
request): after a statement on the primary alias that is not a read (by the rule of
`Router.read`) commits, the replica alias serves the rest of the request only from a node
that has replayed the primary's replication position (waiting up to ``causal_wait``), else
from the primary, as `Router.session` does; the position is read when the next replica read
needs it, from the node that committed the write (not whichever is primary by then). With ``sticky_seconds`` in the router's options, reads go to
the primary for that long after the write instead. Outside the middleware and the context
manager, replica reads are eventually consistent.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
import time
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Iterator, cast
from urllib.parse import quote, urlencode

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import DEFAULT_DB_ALIAS, connections
from django.db.backends.base.base import NO_DB_ALIAS
from django.db.utils import Error as DjangoError
from django.db.utils import OperationalError

from ... import _fork
from ...decisions import Failure, Phase, Work, failure_of
from ...errors import (
    ConfigurationError,
    DbRouterError,
    NodeUnavailable,
    NoPrimaryAvailable,
    PoolClosed,
    PoolTimeout,
    WriteOutcomeUnknown,
)
from ...lease import HeldLease, Lease, take
from ...routing import short

if TYPE_CHECKING:
    from ...router import Router
    from ...topology import Node

__all__ = [
    "ReadYourWritesMiddleware",
    "ReplicaRouter",
    "close_routers",
    "get_router",
    "read_your_writes",
]

log = logging.getLogger("dbrouter.integrations.django")

_REPLICATED_WAIT = 30.0  # seconds the test runner waits for the replicas to have the test database

# OPTIONS keys that are dbrouter's or Django's, never a driver URL option.
_OWN_OPTIONS = frozenset({"replicas", "dbrouter", "replica_of", "isolation_level", "assume_role"})
_SCHEMES = {"postgres": "postgresql", "mysql": "mysql"}
_UNKNOWN = "unknown"  # the position after a write could not be read: reads go to the primary


# -- routers, one per cluster ----------------------------------------------------------


class _Registry:
    """The routers built from settings, by cluster; one per process (fork-aware)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.routers: dict[tuple[Any, ...], Router] = {}
        self.databases: dict[tuple[Any, ...], str] = {}  # the database each router's nodes use
        # (engine, host, port) of every node of a router closed since -> its primary then: the
        # test runner drops the test database after closing its router, maybe after a failover.
        self.last_primaries: dict[tuple[str, str, int], tuple[str, int]] = {}
        _fork.register(self)

    def _after_fork_in_child(self) -> None:
        self.lock = threading.Lock()  # the routers themselves start over on their own


_registry = _Registry()


def _primary_settings(settings_dict: dict[str, Any]) -> dict[str, Any]:
    """The settings of the alias that describes the cluster: ``replica_of``'s, or these."""
    primary = settings_dict.get("OPTIONS", {}).get("replica_of")
    if primary is None:
        return settings_dict
    try:
        found: dict[str, Any] = connections.settings[primary]
    except Exception as exc:  # noqa: BLE001 - Django raises its own error types here
        raise ImproperlyConfigured(f"OPTIONS['replica_of'] names {primary!r}, which is not in DATABASES") from exc
    if found.get("OPTIONS", {}).get("replica_of") is not None:
        raise ImproperlyConfigured(f"OPTIONS['replica_of'] names {primary!r}, which is itself a replica alias")
    return found


def _node_url(engine: str, host: str, port: Any, source: dict[str, Any], name: str, query: dict[str, str]) -> str:
    user, password = source.get("USER") or "", source.get("PASSWORD") or ""
    auth = quote(str(user), safe="")
    if password:
        auth += ":" + quote(str(password), safe="")
    netloc = f"{auth}@{host}" if auth else host
    if port:
        netloc += f":{int(port)}"
    url = f"{_SCHEMES[engine]}://{netloc}/{quote(name, safe='')}"
    return f"{url}?{urlencode(query)}" if query else url


def _replica_entry(engine: str, item: Any, source: dict[str, Any], name: str, query: dict[str, str]) -> Any:
    if isinstance(item, str):
        if "://" in item:
            return item
        host, _, port = item.rpartition(":") if item.count(":") == 1 else (item, "", "")
        return _node_url(engine, host, port, source, name, query)
    if isinstance(item, dict):
        entry: dict[str, Any] = {"url": _node_url(engine, item.get("HOST") or "", item.get("PORT"), source, name, query)}
        for key in ("weight", "name"):
            if key in item:
                entry[key] = item[key]
        return entry
    raise ImproperlyConfigured(f"OPTIONS['replicas'] entries are 'host[:port]' or a dict with HOST/PORT, got {item!r}")


def _cluster(settings_dict: dict[str, Any], engine: str) -> tuple[tuple[Any, ...], str, list[Any], dict[str, Any]]:
    """(key, primary URL, replicas, router options) of the cluster an alias belongs to."""
    source = _primary_settings(settings_dict)
    name = settings_dict.get("NAME") or source.get("NAME")
    if not name:
        raise ImproperlyConfigured("settings.DATABASES is improperly configured: give the primary alias a NAME")
    host = source.get("HOST") or ""
    if not host or host.startswith("/"):
        raise ImproperlyConfigured("dbrouter's Django backends connect over TCP: give the primary alias a HOST name or address")
    options = source.get("OPTIONS") or {}
    if "pool" in options:
        raise ImproperlyConfigured("OPTIONS['pool']: dbrouter's pool does that job; size it with "
                                   "OPTIONS['dbrouter'] min_size / max_size")
    query = {key: str(value).lower() if isinstance(value, bool) else str(value)
             for key, value in options.items() if key not in _OWN_OPTIONS}
    if engine == "mysql":
        query["found_rows"] = "true"  # Django's save() counts the rows an UPDATE matched
    primary = _node_url(engine, host, source.get("PORT"), source, str(name), query)
    replicas = [_replica_entry(engine, item, source, str(name), query) for item in options.get("replicas") or ()]
    router_options = dict(options.get("dbrouter") or {})
    if engine == "postgres" and router_options.get("driver") not in (None, "", "psycopg2"):
        # Django's backend and dbrouter's connections must be one driver's, and Django's is psycopg2.
        raise ImproperlyConfigured("OPTIONS['dbrouter']['driver']: dbrouter's Django PostgreSQL backend runs on "
                                   f"psycopg2, got {router_options['driver']!r}")
    key = (engine, primary, repr(replicas), repr(sorted(router_options.items())))
    return key, primary, replicas, router_options


def router_for(settings_dict: dict[str, Any], engine: str) -> Router:
    """The router of the cluster ``settings_dict`` belongs to, built at its first use."""
    key, primary, replicas, options = _cluster(settings_dict, engine)
    router = _registry.routers.get(key)
    if router is not None:
        return router
    from ...router import Router

    with _registry.lock:  # building a router does no I/O (pools connect in their own threads)
        router = _registry.routers.get(key)
        if router is None:
            try:
                router = Router(primary, replicas, **options)
            except ConfigurationError as exc:
                raise ImproperlyConfigured(f"dbrouter: {exc}") from exc
            _registry.routers[key] = router
            _registry.databases[key] = str(settings_dict.get("NAME") or _primary_settings(settings_dict).get("NAME"))
    return router


def wait_for_replicas(settings_dict: dict[str, Any], engine: str, timeout: float = _REPLICATED_WAIT) -> None:
    """Wait until every replica of the cluster takes connections to ``settings_dict``'s
    database (made on the primary a moment ago, it reaches them by replication). Otherwise the
    first probes of the test database's router find the replicas refusing it, their breakers
    open, and the first tests read from the primary. Past ``timeout``, a warning: a replica
    that is down stays the tests' business."""
    from ...router import Router

    _, primary, replicas, options = _cluster(settings_dict, engine)
    if not replicas:
        return
    router = Router(primary, replicas, **{**options, "open": False})
    try:
        deadline = time.monotonic() + timeout
        for node in router.replicas:
            while True:
                try:
                    node.adapter.close(node.adapter.connect())
                    break
                except Exception as exc:  # noqa: BLE001 - tried again until the deadline
                    if time.monotonic() >= deadline:
                        log.warning("test database %s not reachable on replica %s after %.0f s: %s",
                                    settings_dict.get("NAME"), node.name, timeout, short(exc))
                        break
                    time.sleep(0.05)
    finally:
        router.close()


def get_router(alias: str = DEFAULT_DB_ALIAS) -> Router:
    """The `Router` behind Django alias ``alias`` (shared by the aliases of its cluster).

    Raises `ImproperlyConfigured` when the alias is not a dbrouter backend.
    """
    wrapper = connections[alias]
    router = getattr(wrapper, "dbrouter_router", None)
    if router is None:
        raise ImproperlyConfigured(f"database alias {alias!r} does not use a dbrouter backend")
    return router  # type: ignore[no-any-return]


def close_routers(timeout: float = 5.0, *, database: str | None = None) -> None:
    """Close the routers the Django backends built (every one, or those on ``database``):
    at process exit, or before a database is dropped (the test runner's teardown)."""
    for wrapper in connections.all(initialized_only=True):  # this thread's: the test runner's mirrors
        if isinstance(wrapper, RoutedWrapper) and not wrapper._direct and wrapper._lease is not None and (
                database is None or wrapper.settings_dict.get("NAME") == database):
            cast(Any, wrapper).close()
    with _registry.lock:
        keys = [key for key, name in _registry.databases.items() if database is None or name == database]
        routers = [_registry.routers.pop(key) for key in keys]
        for key in keys:
            del _registry.databases[key]
        for router in routers:
            primary = router.primary.adapter.address
            for node in router.nodes:
                address = node.adapter.address
                _registry.last_primaries[(node.adapter.engine, address.host, address.port)] = (primary.host, primary.port)
    for router in routers:
        router.close(timeout)


class RoutedCreation:
    """Mixed into each backend's ``DatabaseCreation``: the test database is made on the
    primary and waited for on the replicas, and before it is dropped the routers on it close
    their pools (PostgreSQL refuses to drop a database in use)."""

    connection: Any

    def _create_test_db(self, verbosity: int, autoclobber: bool, keepdb: bool = False) -> Any:
        name = super()._create_test_db(verbosity, autoclobber, keepdb)  # type: ignore[misc]
        wait_for_replicas(dict(self.connection.settings_dict, NAME=name), self.connection.engine)
        return name

    def _destroy_test_db(self, test_database_name: str, verbosity: int) -> None:
        close_routers(database=test_database_name)
        super()._destroy_test_db(test_database_name, verbosity)  # type: ignore[misc]


# -- read-your-writes ------------------------------------------------------------------


class _ClusterState:
    """What one request (or unit of work) wrote to one cluster."""

    __slots__ = ("position", "pending", "confirmed", "sticky_until", "version")

    def __init__(self) -> None:
        self.position: str | None = None  # the primary's position after the last write
        # The node that committed a write whose position is not read yet: its position is
        # read there, not on whatever node is primary by then (after a failover the new
        # primary may be behind the write, and replicas that replayed it would pass).
        self.pending: Node | None = None
        self.confirmed: set[str] = set()  # replicas known to have replayed `position`
        self.sticky_until = 0.0
        self.version = 0  # counts the writes: a replica connection knows what it was checked for


class _Context:
    __slots__ = ("clusters",)

    def __init__(self) -> None:
        self.clusters: dict[int, _ClusterState] = {}

    def state(self, router: Router) -> _ClusterState:
        state = self.clusters.get(id(router))
        if state is None:
            state = self.clusters[id(router)] = _ClusterState()
        return state


_current: contextvars.ContextVar[_Context | None] = contextvars.ContextVar("dbrouter_django_ryw", default=None)


@contextlib.contextmanager
def read_your_writes() -> Iterator[None]:
    """Within the block, reads through replica aliases see the writes made through primary
    aliases in the block (by replication position, or ``sticky_seconds``). For work outside
    a request: Celery tasks, management commands. Nested blocks share the outer one's state."""
    if _current.get() is not None:
        yield
        return
    token = _current.set(_Context())
    try:
        yield
    finally:
        _current.reset(token)


class ReadYourWritesMiddleware:
    """Gives each request read-your-writes (see `read_your_writes`). Put it before any
    middleware that queries the database."""

    sync_capable = True
    async_capable = False

    def __init__(self, get_response: Callable[[Any], Any]) -> None:
        self.get_response = get_response

    def __call__(self, request: Any) -> Any:
        with read_your_writes():
            return self.get_response(request)


def _state(router: Router) -> _ClusterState | None:
    context = _current.get()
    return None if context is None else context.state(router)


def _fetch_position(router: Router, state: _ClusterState) -> None:
    """Read the position of the node that committed the write (on a lease of its own)."""
    node = state.pending or router.primary
    try:
        lease = take(node)
    except Exception as exc:  # noqa: BLE001 - reads then go to the primary
        log.warning("could not read the replication position of primary %s after a write (%s): "
                    "reads in this request go to the primary", node.name, short(exc))
        state.position, state.pending = _UNKNOWN, None
        return
    try:
        position = lease.run(lambda adapter, conn: adapter.replication_position(conn))
    except BaseException as exc:
        lease.release_after(exc, Phase.SENT, Work.READ)
        if not isinstance(exc, Exception):
            raise
        log.warning("could not read the replication position of primary %s after a write (%s): "
                    "reads in this request go to the primary", node.name, short(exc))
        state.position, state.pending = _UNKNOWN, None
        return
    lease.release()
    state.position, state.pending = str(position), None


# -- errors ------------------------------------------------------------------------------

_flavours: dict[type[BaseException], type[BaseException]] = {}


def for_django(exc: DbRouterError) -> BaseException:
    """``exc`` as an instance of a class that is both its own and Django's OperationalError
    (ImproperlyConfigured for a configuration error)."""
    if isinstance(exc, ConfigurationError):
        return cast(BaseException, ImproperlyConfigured(str(exc)))
    if isinstance(exc, DjangoError):
        return cast(BaseException, exc)
    cls = type(exc)
    flavour = _flavours.get(cls)
    if flavour is None:
        flavour = _flavours.setdefault(cls, type(cls.__name__, (cls, OperationalError), {
            "__module__": __name__,
            "__doc__": f"`dbrouter.{cls.__name__}` as a Django ``OperationalError``.",
        }))
    new: BaseException = flavour.__new__(flavour)
    new.__dict__.update(exc.__dict__)
    new.args = exc.args
    return new


def _driver_error(exc: BaseException) -> BaseException:
    """The driver's exception behind Django's wrapper of it."""
    cause: BaseException | None = exc.__cause__
    if isinstance(exc, DjangoError) and not isinstance(exc, DbRouterError) and cause is not None:
        return cause
    return exc


# -- the backends' shared part -----------------------------------------------------------


class RoutedWrapper:
    """Mixed into each backend's ``DatabaseWrapper``: connections are dbrouter leases.

    The engine part (``engine``, ``_prepare``, ``_raw_cursor``, ``_direct_params``) is in
    each backend's module.
    """

    engine = ""
    # Set by Django's BaseDatabaseWrapper; declared for the type checker.
    alias: str
    settings_dict: dict[str, Any]
    connection: Any
    autocommit: bool
    in_atomic_block: bool
    errors_occurred: bool

    def _init_routing(self) -> None:
        self._direct = self.alias == NO_DB_ALIAS  # test database creation: a plain connection
        self._lease: Lease | None = None
        self._lost: DbRouterError | None = None  # the lease was lost under Django: why
        self._wrote = False  # the open transaction ran a statement that is not a read
        # The request state and write count this replica connection was chosen or checked for.
        self._fresh_for: tuple[_ClusterState | None, int] = (None, -1)
        self._open_named = 0  # server-side cursors open on the connection
        self._router_cache: tuple[tuple[Any, ...], Router] | None = None
        options = self.settings_dict.get("OPTIONS") or {}
        self._replica = options.get("replica_of") is not None
        if self._direct:
            self.settings_dict["OPTIONS"] = {k: v for k, v in options.items() if k not in _OWN_OPTIONS}
        elif self._replica and not self.settings_dict.get("TEST", {}).get("MIRROR"):
            # Django's test runner must not create a test database for it: the replicas get
            # the primary's by replication.
            self.settings_dict.setdefault("TEST", {})["MIRROR"] = options["replica_of"]

    # -- what the alias is on ----------------------------------------------------------

    @property
    def dbrouter_router(self) -> Router:
        """The router of this alias's cluster."""
        # Kept while the database name stays (the test runner switches it to the test database).
        source = _primary_settings(self.settings_dict)
        key = (self.settings_dict.get("NAME"), source.get("NAME"), source.get("HOST"), source.get("PORT"))
        cached = self._router_cache
        if cached is not None and cached[0] == key and not cached[1]._closed:
            return cached[1]
        router = router_for(self.settings_dict, self.engine)
        self._router_cache = (key, router)
        return router

    @property
    def dbrouter_node(self) -> Node | None:
        """The node the open connection is on (None when none is open)."""
        lease = self._lease
        return None if lease is None else lease.node

    @property
    def dbrouter_replica_alias(self) -> bool:
        """Whether this alias reads from replicas (``OPTIONS["replica_of"]``)."""
        return self._replica

    def dbrouter_shell_settings(self) -> dict[str, Any]:
        """The settings ``dbshell`` connects with: the cluster's current primary."""
        source = _primary_settings(self.settings_dict)
        host, port = self.current_primary()
        return {**source, "NAME": self.settings_dict.get("NAME") or source.get("NAME"), "HOST": host, "PORT": port,
                "OPTIONS": {k: v for k, v in (source.get("OPTIONS") or {}).items() if k not in _OWN_OPTIONS}}

    def current_primary(self) -> tuple[str, int]:
        """Host and port of the cluster's current primary, as the router sees it."""
        if self._direct:
            # A router already built for this cluster knows the current primary; none is
            # built here (this connection exists to create or drop databases).
            host, port = str(self.settings_dict.get("HOST")), int(self.settings_dict.get("PORT") or 0)
            with _registry.lock:
                routers = list(_registry.routers.values())
            for router in routers:
                if router.primary.adapter.engine != self.engine:
                    continue
                if any(node.adapter.address.host == host and (not port or node.adapter.address.port == port)
                       for node in router.nodes):
                    address = router.primary.adapter.address
                    return address.host, address.port
            return _registry.last_primaries.get((self.engine, host, port), (host, port))
        address = self.dbrouter_router.primary.adapter.address
        return address.host, address.port

    # -- connecting --------------------------------------------------------------------

    def _take(self, exclude: tuple[Node, ...] = ()) -> Lease:
        router = self.dbrouter_router
        try:
            return self._take_read(router, exclude) if self._replica else self._take_primary(router)
        except DbRouterError as exc:
            raise for_django(exc) from exc

    def _take_primary(self, router: Router) -> Lease:
        """A lease on the primary, waiting up to ``failover_wait`` for one that answers."""
        deadline = time.monotonic() + router.config.routing.failover_wait
        while True:
            node, version = router.choose_writer(deadline)
            try:
                return take(node, kind=HeldLease)
            except (NodeUnavailable, PoolClosed):
                now = time.monotonic()
                if now >= deadline:
                    raise
                router.topology.wake()
                router.topology.wait_for_change(version, min(deadline, now + router.config.monitor.health_interval))

    def _take_read(self, router: Router, exclude: tuple[Node, ...]) -> Lease:
        """A lease on a node that may serve this request's reads (see the module docstring)."""
        state = _state(router)
        routing = router.config.routing
        self._fresh_for = (state, -1 if state is None else state.version)
        if state is not None and routing.sticky_seconds is not None and time.monotonic() < state.sticky_until:
            return self._take_primary(router)
        if state is not None and state.pending is not None:
            _fetch_position(router, state)
        position = None if state is None else state.position
        if position == _UNKNOWN:
            router.counts.causal_primary_reads.inc()
            return self._take_primary(router)
        tried = list(exclude)
        last: Exception | None = None
        wait = routing.causal_wait  # the first replica asked waits for the write; the others are asked at once
        for _ in range(router.config.retry.retry_attempts + len(router.replicas)):
            if tried and not [node for node in router.topology.snapshot.readable if node not in tried]:
                break  # every replica was tried: the primary, without a fallback_to_primary event
            try:
                node = router.choose_reader(tried)
            except DbRouterError:
                break
            if node is router.primary:
                return self._take_primary(router)
            tried.append(node)
            try:
                lease = take(node, kind=HeldLease)
            except (NodeUnavailable, PoolClosed, PoolTimeout) as exc:
                last = exc
                continue
            if position is None or state is None or node.name in state.confirmed:
                return lease
            if self._replayed(lease, position, wait):
                state.confirmed.add(node.name)
                return lease
            wait = 0.0
        if position is not None:
            router.counts.causal_primary_reads.inc()
        try:
            return self._take_primary(router)
        except DbRouterError:
            if last is not None:
                raise last from None
            raise

    @staticmethod
    def _replayed(lease: Lease, position: str, wait: float) -> bool:
        """Whether the lease's node has replayed ``position`` (waiting up to ``wait``); the
        lease is released when it has not."""
        try:
            done = bool(lease.run(lambda adapter, conn: adapter.has_replayed(conn, position, wait), extra=wait))
        except BaseException as exc:
            lease.release_after(exc, Phase.SENT, Work.READ)
            if not isinstance(exc, Exception):
                raise
            return False
        if not done:
            lease.release()
        return done

    def get_new_connection(self, conn_params: dict[str, Any]) -> Any:
        """A dbrouter lease's connection; a plain one for test database creation (``_direct``)."""
        if self._direct:
            return cast(Any, super()).get_new_connection(conn_params)  # the backend's own DatabaseWrapper
        return self._open_lease()

    def _open_lease(self) -> Any:
        lease = self._take()
        try:
            self._prepare(lease.conn)
        except BaseException as exc:
            lease.release_after(exc, Phase.BEFORE_SEND, Work.READ)
            raise
        self._lease, self._lost = lease, None
        return lease.conn

    def _prepare(self, conn: Any) -> None:  # noqa: B027 - engine hook
        """Make a pooled connection ready for Django (engine part)."""

    def _give_back(self) -> None:
        lease, self._lease = self._lease, None
        self._open_named = 0
        if lease is not None:
            lease.release()

    # -- statements ------------------------------------------------------------------------

    def _in_transaction(self) -> bool:
        return self.in_atomic_block or not self.autocommit

    def _may_reroute(self, sql: str) -> bool:
        return self._replica and not self._in_transaction() and self.dbrouter_router.is_read(sql)

    def _statement_done(self, sql: str) -> None:
        """After a statement on the primary alias: note a write for read-your-writes."""
        if self._replica or _current.get() is None or self.dbrouter_router.is_read(sql):
            return
        if self._in_transaction():
            self._wrote = True
        else:
            self._write_committed(self._lease)

    def _write_committed(self, lease: Lease | None) -> None:
        router = self.dbrouter_router
        state = _state(router)
        if state is None:
            return
        state.version += 1
        state.confirmed.clear()
        sticky = router.config.routing.sticky_seconds
        if sticky is not None:
            state.sticky_until = time.monotonic() + sticky
        else:
            # Read when a replica read needs it, on the node that committed.
            state.pending = lease.node if lease is not None else router.primary

    def _run(self, op: Callable[[], Any], sql: str, phase: Phase = Phase.SENT) -> Any:
        """``op()`` on the leased connection under the hung-statement guard; a lost
        connection becomes a dbrouter error (see `_lose`)."""
        lease = self._lease
        if lease is None:
            if self._lost is not None:
                raise for_django(self._lost)
            raise for_django(NodeUnavailable(f"database alias {self.alias!r} has no open connection"))
        try:
            return lease.run(lambda adapter, conn: op())
        except BaseException as exc:
            self._judge(lease, exc, sql, phase)
            raise

    def _judge(self, lease: Lease, exc: BaseException, sql: str, phase: Phase) -> None:
        """After ``exc`` on the leased connection: when it says the node failed (lost,
        hung, read-only), give the lease back as such and raise a dbrouter error."""
        error = _driver_error(exc)
        if isinstance(error, DbRouterError) and not lease.foreign(error):
            failure = Failure.HUNG if isinstance(error, NodeUnavailable) else failure_of(error, lease.node.adapter)
        else:
            failure = failure_of(error, lease.node.adapter) if isinstance(error, Exception) else Failure.INTERRUPTED
        if failure not in (Failure.NODE_DOWN, Failure.HUNG, Failure.READ_ONLY):
            return  # the caller's error: Django handles it as usual
        if failure is Failure.READ_ONLY and self._replica:
            return  # a write sent to a replica alias: the caller's, not a demotion
        node = lease.node
        router = self.dbrouter_router
        in_transaction = self._in_transaction()
        is_read = bool(sql) and router.is_read(sql)
        work = Work.BLOCK if phase is Phase.COMMIT or in_transaction else (Work.READ if is_read else Work.WRITE)
        self._lease = None
        self._open_named = 0
        lease.release_after(error, phase, work)
        if failure is Failure.READ_ONLY:
            lost: DbRouterError = NoPrimaryAvailable(
                f"node {node.name} refused the statement as read-only (no longer the primary): "
                f"not applied{'; the transaction was rolled back' if in_transaction else ''}")
        elif phase is Phase.COMMIT:
            lost = router.outcome_unknown(node, error, "during COMMIT")
        elif work is Work.WRITE and not self._replica:
            lost = router.outcome_unknown(node, error, "after the write was sent")
        else:
            lost = NodeUnavailable(
                f"connection to {node.role} {node.name} lost ({short(error)})"
                f"{': the transaction was rolled back by the server' if in_transaction else ''}", node=node.name)
        self._lost = lost
        self.errors_occurred = True
        raise for_django(lost) from error

    # -- Django's hooks --------------------------------------------------------------------

    def ensure_connection(self) -> None:
        if (not self._direct and self.connection is not None and not self.in_atomic_block
                and (self._lost is not None or self._lease is None)):
            # Lost under Django outside a transaction, or given back while Django still holds
            # the handle (closed inside an atomic block, which keeps `connection` set): the
            # next query borrows anew. Before, the second case raised "has no open connection"
            # on every later request of the thread.
            self.connection = None
            self._lost = None
        super().ensure_connection()  # type: ignore[misc]

    def create_cursor(self, name: str | None = None) -> Any:
        if self._direct:
            return super().create_cursor(name)  # type: ignore[misc]
        if self._lease is None:
            raise for_django(self._lost or NodeUnavailable(f"database alias {self.alias!r} has no open connection"))
        if self._replica:
            self._freshen()
        return _Cursor(self, name)

    def _freshen(self) -> None:
        """Before a replica alias's statement: a connection kept from another request (the
        test client, ``CONN_MAX_AGE``) is chosen again; if this request wrote since the
        connection was chosen, make sure its node has the write, else move to one that has it."""
        lease = self._lease
        router = self.dbrouter_router
        state = _state(router)
        if lease is None or state is None or self._open_named or self.in_atomic_block or not self.autocommit:
            return
        chosen_for, version = self._fresh_for
        if chosen_for is state and version == state.version:
            return
        fresh = False
        if chosen_for is state:
            node = lease.node
            routing = router.config.routing
            fresh = node is router.primary
            if not fresh and routing.sticky_seconds is None:
                if state.pending is not None:
                    _fetch_position(router, state)
                position = state.position
                if node.name in state.confirmed:
                    fresh = True
                elif position is not None and position != _UNKNOWN:
                    try:
                        fresh = bool(lease.run(
                            lambda adapter, conn: adapter.has_replayed(conn, position, routing.causal_wait),
                            extra=routing.causal_wait))
                    except Exception as exc:  # noqa: BLE001 - judged by the lease; the connection is replaced
                        self._lease = None
                        lease.release_after(exc, Phase.SENT, Work.READ)
                        lease = None
                    if fresh:
                        state.confirmed.add(node.name)
        if fresh:
            self._fresh_for = (state, state.version)
            return
        if lease is not None:
            self._lease = None
            lease.release()
        self.connection = self._open_lease()

    def _reroute(self) -> None:
        """After a read lost its replica: a connection on another node (outside transactions)."""
        self.connection = self._open_lease()

    def _commit(self) -> None:
        if self._direct:
            return super()._commit()  # type: ignore[misc,no-any-return]
        if self._lost is not None:
            raise for_django(self._lost)
        lease = self._lease
        try:
            super()._commit()  # type: ignore[misc]
        except BaseException as exc:
            if lease is not None:
                self._judge(lease, exc, "", Phase.COMMIT)
            raise
        if self._wrote:
            self._wrote = False
            self._write_committed(lease)

    def _rollback(self) -> None:
        self._wrote = False
        if self._direct:
            return super()._rollback()  # type: ignore[misc,no-any-return]
        if self._lost is not None:
            return None  # the server rolled it back when the connection broke
        lease = self._lease
        try:
            super()._rollback()  # type: ignore[misc]
        except BaseException as exc:
            if lease is not None:
                self._judge(lease, exc, "", Phase.SENT)
            raise
        return None

    def _set_autocommit(self, autocommit: bool) -> None:
        if not self._direct and (self._lost is not None or self._lease is None):
            return  # nothing to switch on a connection that was lost
        super()._set_autocommit(autocommit)  # type: ignore[misc]

    def _close(self) -> None:
        if self._direct:
            return super()._close()  # type: ignore[misc,no-any-return]
        self._wrote = False
        self._lost = None
        self._close_named()
        self._give_back()
        return None

    def _close_named(self) -> None:  # noqa: B027 - engine hook
        """Close the server-side cursors left open on the connection (engine part)."""

    def is_usable(self) -> bool:
        if self._direct:
            return bool(super().is_usable())  # type: ignore[misc]
        lease = self._lease
        if lease is None or self._lost is not None:
            return False
        try:
            lease.run(lambda adapter, conn: adapter.ping(conn))
        except Exception:  # noqa: BLE001 - Django asks whether to keep it; the pool judges it on return
            return False
        return True


class _Cursor:
    """A driver cursor of a leased connection: statements under the hung-statement guard,
    failures judged by dbrouter, replica reads moved to another node when theirs is lost."""

    __slots__ = ("_db", "_cursor", "_name", "_closed")

    def __init__(self, db: RoutedWrapper, name: str | None) -> None:
        self._db = db
        self._name = name
        self._closed = False
        self._cursor = db._raw_cursor(name)  # type: ignore[attr-defined]
        if name:
            db._open_named += 1

    def execute(self, sql: str, params: Any = None) -> Any:
        db = self._db
        for attempt in range(db.dbrouter_router.config.retry.retry_attempts):
            execute = self._cursor.execute
            try:
                # execute(sql) and execute(sql, None) differ: only the latter reads % as a placeholder.
                result = db._run(partial(execute, sql) if params is None else partial(execute, sql, params), sql)
            except (NodeUnavailable, WriteOutcomeUnknown):
                if self._name or not db._may_reroute(sql) or attempt + 1 >= db.dbrouter_router.config.retry.retry_attempts:
                    raise
                db._reroute()
                self._cursor = db._raw_cursor(None)  # type: ignore[attr-defined]
                continue
            db._statement_done(sql)
            return result
        raise AssertionError("unreachable")  # pragma: no cover

    def executemany(self, sql: str, param_list: Any) -> Any:
        db = self._db
        cursor = self._cursor
        result = db._run(lambda: cursor.executemany(sql, param_list), sql)
        db._statement_done(sql)
        return result

    def fetchone(self) -> Any:
        if self._name:
            return self._db._run(self._cursor.fetchone, "")
        return self._cursor.fetchone()

    def fetchmany(self, size: int | None = None) -> Any:
        cursor = self._cursor
        if self._name:
            return self._db._run(lambda: cursor.fetchmany(size) if size is not None else cursor.fetchmany(), "")
        return cursor.fetchmany(size) if size is not None else cursor.fetchmany()

    def fetchall(self) -> Any:
        if self._name:
            return self._db._run(self._cursor.fetchall, "")
        return self._cursor.fetchall()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._name and self._db._open_named:
            self._db._open_named -= 1
        with contextlib.suppress(Exception):  # a cursor of a connection that was lost
            self._cursor.close()

    def __iter__(self) -> Iterator[Any]:
        if not self._name:
            return iter(self._cursor)
        return iter(lambda: self.fetchone(), None)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cursor, name)

    def __enter__(self) -> _Cursor:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


class ReplicaRouter:
    """A ``DATABASE_ROUTERS`` entry: reads to the replica alias, everything else to the primary.

    Replica aliases are those whose ``OPTIONS["replica_of"]`` names a primary alias. Reads
    go to the replica alias of the model's cluster (the instance's alias when Django passes
    one, else ``default``), except while the primary alias is inside ``transaction.atomic``
    on this thread, when they go to the primary. Writes (``select_for_update()`` included,
    which Django routes as a write) go to the primary alias. Migrations run on primary
    aliases only; relations are allowed within one cluster.
    """

    def __init__(self) -> None:
        self.replica_of: dict[str, str] = {}
        self.replicas: dict[str, str] = {}
        for alias, config in settings.DATABASES.items():
            primary = (config.get("OPTIONS") or {}).get("replica_of")
            if primary is not None:
                self.replica_of[alias] = primary
                self.replicas.setdefault(primary, alias)

    def _primary(self, hints: dict[str, Any]) -> str:
        instance = hints.get("instance")
        db = getattr(getattr(instance, "_state", None), "db", None) or DEFAULT_DB_ALIAS
        return str(self.replica_of.get(db, db))

    def db_for_read(self, model: Any, **hints: Any) -> str | None:
        primary = self._primary(hints)
        replica = self.replicas.get(primary)
        if replica is None:
            return None
        if connections[primary].in_atomic_block:
            return primary  # a transaction reads its own writes, on its own connection
        return replica

    def db_for_write(self, model: Any, **hints: Any) -> str | None:
        primary = self._primary(hints)
        return primary if primary in self.replicas else None

    def allow_relation(self, obj1: Any, obj2: Any, **hints: Any) -> bool | None:
        first, second = (self.replica_of.get(obj._state.db, obj._state.db) for obj in (obj1, obj2))
        if first in self.replicas or second in self.replicas:
            return bool(first == second)
        return None

    def allow_migrate(self, db: str, app_label: str, model_name: str | None = None, **hints: Any) -> bool | None:
        return False if db in self.replica_of else None
