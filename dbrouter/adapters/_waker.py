"""A thread's wake-up line: how a hedged read that lost is told to stop waiting without its
connection being cut (`dbrouter.hedging`, for drivers whose wait dbrouter can run: psycopg 3
and the pure-Python MySQL connector).

Each thread that runs hedged reads has one `Waker`: a pipe whose read end the read's wait
polls beside the connection's socket. A read arms it (`arm`, with a token of its own); the
hedge that beat it fires it with that token. A firing meant for an earlier read of the same
thread (a race decided just as that read ended) finds another token armed and is ignored.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
import weakref
from typing import Any

__all__ = ["Overtaken", "Waker", "thread_waker"]


class Overtaken(Exception):  # noqa: N818 - not an error: the read was beaten, its statement is still in flight
    """Raised out of a statement's wait when a hedge answered first: the statement is still in
    flight on the connection, which must be drained (`Adapter.drain`) before it is pooled."""


class Waker:
    """One thread's wake-up pipe (see the module docstring)."""

    __slots__ = ("fd", "_write_fd", "armed", "fired", "written", "poller", "__weakref__")

    def __init__(self) -> None:
        self.fd, self._write_fd = os.pipe()
        os.set_blocking(self.fd, False)
        os.set_blocking(self._write_fd, False)
        self.armed: Any = None  # the token of the read now waiting
        self.fired: Any = None  # the token the last firing was for
        self.written = False  # bytes may be in the pipe (spares `arm` a read that finds none)
        # The thread's waits poll this, its pipe registered once: a wait registers its socket
        # and unregisters it when done (a thread waits on one socket at a time).
        self.poller = select.poll()
        self.poller.register(self.fd, select.POLLIN)

    def arm(self, token: Any) -> None:
        """A read with ``token`` starts waiting: forget earlier firings."""
        self.armed = token
        if self.written:
            self.clear()

    def fire(self, token: Any) -> None:
        """Tell the read with ``token`` to stop waiting (from another thread)."""
        self.fired = token  # before the byte: the woken reader compares it
        self.written = True
        with contextlib.suppress(OSError):  # full (the bytes pending wake it anyway) or closed
            os.write(self._write_fd, b"x")

    def clear(self) -> None:
        self.written = False  # before reading: a byte written meanwhile is read, or seen next time
        try:
            while os.read(self.fd, 64):
                pass
        except (BlockingIOError, OSError):
            pass

    def meant_for_armed(self) -> bool:
        """After a wake-up: whether it was for the read now waiting (else a stale one)."""
        self.clear()
        return self.fired is not None and self.fired is self.armed


_local = threading.local()


def thread_waker() -> Waker:
    """The calling thread's `Waker` (made at its first hedged read; its pipe is closed when
    the thread's locals go)."""
    try:
        waker: Waker = _local.waker
    except AttributeError:
        waker = _local.waker = Waker()
        weakref.finalize(waker, _close_fds, waker.fd, waker._write_fd)
    return waker


def _close_fds(*fds: int) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _after_fork_in_child() -> None:
    # The forking thread's pipe is shared with the parent: a child's wake-ups must not take
    # the parent's bytes. The child's copies are closed with the old locals.
    global _local
    _local = threading.local()


os.register_at_fork(after_in_child=_after_fork_in_child)
