"""The hung-statement watchdog.

A node that accepts connections but never answers must not keep a thread
longer than the configured timeout. Drivers without a client-side read timeout
(libpq, through psycopg2 or psycopg 3) get their statements aborted from this one background
thread when they outlive their deadline.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from . import _fork

__all__ = ["Watchdog"]

log = logging.getLogger("dbrouter.watchdog")


class Watchdog:
    """Aborts statements that run past their deadline, from one background thread.

    ``arm(deadline, abort)`` returns a token; ``disarm(token)`` returns False if
    the watchdog fired first, in which case the connection was aborted and must
    be discarded. Arming is a dict insert: cheap enough for the hot path.
    """

    def __init__(self, name: str = "dbrouter-watchdog", interval: float = 0.05) -> None:
        self._armed: dict[object, tuple[float, Callable[[], None]]] = {}
        self._interval = interval
        self._stop = threading.Event()
        self.fired = 0
        self._start_lock = threading.Lock()
        # Started on the first arm(): a router whose drivers time out by themselves
        # never needs the thread.
        self._thread: threading.Thread | None = None
        self._name = name
        _fork.register(self)

    def _after_fork_in_child(self) -> None:
        """In a forked child: forget the parent's armed statements (their aborts would shut
        down the parent's sockets, which the child shares), take new locks, and start the
        thread again on the next `arm`."""
        self._armed = {}
        self._start_lock = threading.Lock()
        stopped = self._stop.is_set()
        self._stop = threading.Event()
        if stopped:
            self._stop.set()
        self._thread = None

    def arm(self, deadline: float, abort: Callable[[], None]) -> object:
        if self._thread is None:
            self._start()
        token = object()
        self._armed[token] = (deadline, abort)
        return token

    def _start(self) -> None:
        with self._start_lock:
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()

    def disarm(self, token: object) -> bool:
        """True when the statement finished before the watchdog fired."""
        return self._armed.pop(token, None) is not None

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            now = time.monotonic()
            for token, (deadline, abort) in list(self._armed.items()):
                if deadline <= now and self._armed.pop(token, None) is not None:
                    self.fired += 1
                    log.warning("aborting a statement %.2fs past its deadline: %s", now - deadline, abort)
                    try:
                        abort()
                    except Exception:  # noqa: BLE001 - the watchdog must keep running
                        log.exception("aborting a hung statement failed")

    def stop(self) -> None:
        self._stop.set()
        with self._start_lock:
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=2)
