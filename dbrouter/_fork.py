"""After ``os.fork()``: the child starts over, the parent's connections stay the parent's.

A forked child is a copy of its parent with one thread, the one that forked. It
inherits every dbrouter object with its connections, which are the parent's very
sockets, and its locks, in whatever state the parent's other threads left them, but
none of those threads: no monitor, no prober, no housekeeping, no watchdog. Left as
it is, a child sends its statements on the parent's sockets (each process then reads
answers meant for the other, and one of them waits forever for an answer the other
took), waits forever on a lock that a thread of the parent held at the fork, and
closes the parent's connections when it exits: its pools' finalizers close what is
idle, and closing sends PostgreSQL's Terminate or MySQL's COM_QUIT, so the server
ends the parent's sessions.

So every object that owns threads, locks or connections registers here, and in a
forked child (``os.register_at_fork(after_in_child=...)``) each one, in the order
they were made, starts over: new locks, empty pools, the inherited connections
`abandon`-ed. Nothing is sent and no thread is started there: fork handlers run in
registration order, and another library's (``concurrent.futures`` re-creates the
lock its executors take on submit) may not have run yet when ours does. The threads
start again at the first use in the child, on paths that are slow anyway (a checkout
from the empty pool, a wait for the control plane): a child that never uses the
router opens nothing, and the read path pays nothing. A Router in a child of gunicorn
``--preload``, multiprocessing or Celery's prefork pool is then the child's own, with
fresh pools, as if the child had built it. This is what SQLAlchemy and psycopg tell
their users to do by hand in the child (``engine.dispose(close=False)``). The parent
is not touched. The registry holds weak references: it keeps nothing alive.

Not covered: a connection that the forking thread itself holds across the fork (a
``with router.connection()`` block, a transaction, a checkout) is the parent's. In the
child it is abandoned when it comes back and, on PostgreSQL and pure-Python MySQL,
fails at once if used; on the MySQL C extension it would still reach the parent's
session. Fork outside such blocks.
"""

from __future__ import annotations

import itertools
import logging
import os
import weakref
from typing import Any, Protocol

__all__ = ["ForkAware", "abandon", "register"]

log = logging.getLogger("dbrouter.fork")


class ForkAware(Protocol):
    def _after_fork_in_child(self) -> None:
        """Start over in a forked child: no I/O, no thread started."""


_registry: weakref.WeakValueDictionary[int, ForkAware] = weakref.WeakValueDictionary()
_order = itertools.count()  # keys in creation order: a watchdog is reset before what arms it
_kept: list[Any] = []  # abandoned connections, where one extra reference cannot be taken


def register(obj: ForkAware) -> None:
    """Have ``obj._after_fork_in_child()`` called in every forked child while ``obj`` lives."""
    _registry[next(_order)] = obj


def abandon(conn: Any, fd: int | None) -> None:
    """Forget a connection inherited from the parent without sending a byte on it.

    Closing it would end the parent's server session (Terminate, COM_QUIT), and so would
    letting it be garbage-collected: the MySQL C extension's deallocator calls
    ``mysql_close()``, which sends COM_QUIT, and the pure-Python connector's socket shuts
    itself down, which the parent shares. (psycopg2 and psycopg 3 skip the close when the
    pid changed, but their ``close()`` does not, and psycopg2's takes a mutex that a thread
    of the parent may have held at the fork.) So, in the child:

    1. When the adapter can tell the connection's descriptor (``fd``; psycopg2, psycopg 3 and
       the pure-Python connector can, the MySQL C extension cannot), it is pointed at
       /dev/null with ``dup2``: the child no longer holds the parent's socket open (a
       socket lives until its last descriptor closes, so the parent's close or crash
       reaches the server as it should), and whatever the driver might still send on it
       fails instead of reaching the parent's session. The descriptor number stays taken,
       so no later socket of the child can be written to by this connection.
    2. The object is kept alive to the end of the process, interpreter exit included:
       one reference is added and never released (``Py_IncRef``), since a module-level
       list would be cleared at exit, which would run the deallocators then. The cost is
       the memory of the connections inherited, at most ``max_size`` per node.
    """
    if fd is not None and fd >= 0:
        try:
            devnull = os.open(os.devnull, os.O_RDWR)
            try:
                os.dup2(devnull, fd, inheritable=False)
            finally:
                os.close(devnull)
        except OSError as exc:  # pragma: no cover - /dev/null missing, fd limit
            log.debug("fork: could not detach descriptor %d: %s", fd, exc)
    try:
        import ctypes

        ctypes.pythonapi.Py_IncRef(ctypes.py_object(conn))
    except (ImportError, AttributeError, OSError):  # pragma: no cover - no ctypes / pythonapi
        _kept.append(conn)


def _after_fork_in_child() -> None:
    objects = list(_registry.values())
    for obj in objects:
        try:
            obj._after_fork_in_child()
        except Exception:  # noqa: BLE001 - one object must not leave the others inherited
            log.exception("fork: %r could not start over in the child", obj)
    if objects:
        log.debug("fork: %d dbrouter objects started over in child %d", len(objects), os.getpid())


if hasattr(os, "register_at_fork"):  # every POSIX platform; Windows has no fork
    os.register_at_fork(after_in_child=_after_fork_in_child)
