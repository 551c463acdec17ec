"""Which event-loop callbacks blocked the loop, as far as a test can tell on a busy machine.

asyncio's debug mode logs every callback that ran longer than ``slow_callback_duration``
("Executing <Handle ...> took 0.012 seconds"). On a machine with other load most such
reports are not the callback's doing: a 1 ms callback preempted for 20 ms, or waiting for
the GIL while a thread of dbrouter's control plane (whose holder the kernel preempted) has
it, which has been seen to last 200 ms on two busy cores. So `LoopCheck` measures each
callback (``Handle._run`` wrapped, on the loop's thread only) and counts a report when:

- the callback used ``limit`` (5 ms) of CPU or more: it computed on the loop;
- or it made a blocking call there, seen by an audit hook: ``time.sleep``, a connect or a
  name lookup on a blocking socket, starting a process (a non-blocking socket's connect,
  asyncio's own, is fine);
- or it waited of its own accord (a voluntary context switch: a lock, a blocking read) and
  took ``wait_limit`` (0.5 s) or more, longer than any GIL wait seen.

Even so, on a machine whose cores are all busy (this one is a VM: a virtual CPU that the
host takes away keeps counting the thread's CPU time, and a GIL wait behind a preempted
holder has lasted over a second), timings say little. `overloaded` tells whether the
cores were ``BUSY`` (90%) busy or more over the check; the tests then report the reports
instead of failing on them. On a machine with headroom (CI), they fail.
"""

from __future__ import annotations

import asyncio
import logging
import re
import resource
import sys
import threading
import time
from typing import Any, Callable

__all__ = ["BUSY", "LoopCheck"]

_RUSAGE_THREAD = getattr(resource, "RUSAGE_THREAD", None)  # Linux
_TOOK = re.compile(r" took ([0-9.]+) seconds")


class LoopCheck(logging.Handler):
    """Install on a loop with `install` (from the loop's thread), read `reports` after."""

    def __init__(self, limit: float = 0.005, wait_limit: float = 0.5) -> None:
        super().__init__(logging.WARNING)
        self.limit = limit
        self.wait_limit = wait_limit
        self.blocking_calls: list[str] = []
        self.reports: list[str] = []
        self.excused = 0
        self._thread: int | None = None
        self._last: tuple[float, int, int] | None = None
        self._original: Callable[[Any], None] | None = None
        self._ticks = (0, 0)

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        """Call on the loop's thread before it runs the code to check."""
        self._ticks = _cpu_ticks()
        loop.set_debug(True)
        loop.slow_callback_duration = self.limit
        self._thread = threading.get_ident()
        original = asyncio.events.Handle._run
        check = self

        def run(handle: Any) -> None:
            if threading.get_ident() != check._thread or _RUSAGE_THREAD is None:
                original(handle)
                return
            cpu, before = time.thread_time(), resource.getrusage(_RUSAGE_THREAD)
            try:
                original(handle)
            finally:
                after = resource.getrusage(_RUSAGE_THREAD)
                check._last = (time.thread_time() - cpu, after.ru_nvcsw - before.ru_nvcsw,
                               after.ru_nivcsw - before.ru_nivcsw)

        self._original = original
        asyncio.events.Handle._run = run  # type: ignore[method-assign]
        logging.getLogger("asyncio").addHandler(self)
        _watched[self._thread] = self
        _audit_once()

    def uninstall(self) -> None:
        if self._thread is not None:
            _watched.pop(self._thread, None)
        if self._original is not None:
            asyncio.events.Handle._run = self._original  # type: ignore[method-assign]
            self._original = None
        logging.getLogger("asyncio").removeHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if not (message.startswith("Executing ") and " took " in message):
            return
        if threading.get_ident() != self._thread:
            return
        if "run_coroutine_threadsafe" in message:
            return  # a test harness hand-over that only makes the task
        last, self._last = self._last, None
        if last is None:
            self.reports.append(message)
            return
        cpu, waited, preempted = last
        took = _TOOK.search(message)
        wall = float(took.group(1)) if took else float("inf")
        if cpu < self.limit and (not waited or wall < self.wait_limit):
            self.excused += 1
            return
        self.reports.append(f"{message} (CPU {cpu * 1000:.1f} ms, {waited} voluntary and {preempted} "
                            "involuntary context switches)")


    @property
    def overloaded(self) -> bool:
        """Whether every core was at least ``BUSY`` busy since `install` (servers, us, anyone)."""
        busy0, total0 = self._ticks
        busy1, total1 = _cpu_ticks()
        return (busy1 - busy0) / max(1, total1 - total0) >= BUSY

    @property
    def problems(self) -> list[str]:
        """The reports that count, and the blocking calls made on the loop."""
        return self.reports + [f"blocking call on the loop: {call}" for call in self.blocking_calls]


BUSY = 0.9


def _cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all cores, from /proc/stat (idle and iowait are not busy)."""
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    return sum(fields) - fields[3] - fields[4], sum(fields)


_watched: dict[int, LoopCheck] = {}  # loop thread -> its check
_audit_installed = False
_BLOCKING_EVENTS = frozenset({"time.sleep", "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr",
                              "subprocess.Popen", "os.system"})


def _audit(event: str, args: tuple[Any, ...]) -> None:
    check = _watched.get(threading.get_ident()) if _watched else None
    if check is None:
        return
    if event == "socket.connect":
        sock = args[0]
        if sock.gettimeout() != 0.0:  # a blocking socket: connect waits for the peer
            check.blocking_calls.append(f"socket.connect{args[1:]!r}")
    elif event in _BLOCKING_EVENTS:
        if event == "time.sleep" and args and args[0] == 0:
            return
        check.blocking_calls.append(f"{event}{args!r}")


def _audit_once() -> None:
    global _audit_installed
    if not _audit_installed:
        _audit_installed = True
        sys.addaudithook(_audit)
