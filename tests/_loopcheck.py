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

Two costs are left out, being neither the callback's nor production's: the process's garbage
collections that run during a step (a full collection of a test process's heap takes tens of
ms, whoever triggers it), and the source files asyncio's debug mode reads for the tracebacks it
records (the module sources are read into `linecache` at `install`).

Even so, on a machine whose cores are all busy (this one is a VM: a virtual CPU that the
host takes away keeps counting the thread's CPU time, and a GIL wait behind a preempted
holder has lasted over a second), timings say little. `overloaded` tells whether the
cores were ``BUSY`` (90%) busy or more over the check; the tests then report the reports
instead of failing on them. On a machine with headroom (CI), they fail.
"""

from __future__ import annotations

import asyncio
import cProfile
import gc
import io
import linecache
import logging
import os
import pstats
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
        self._install_step_seen = False

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        """Call on the loop's thread before it runs the code to check."""
        _warm_linecache()
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
            profiler = cProfile.Profile() if _PROFILE_TO else None
            collected = _gc_cpu[0]
            cpu, before = time.thread_time(), resource.getrusage(_RUSAGE_THREAD)
            try:
                if profiler is not None:
                    profiler.enable()
                original(handle)
            finally:
                if profiler is not None:
                    profiler.disable()
                after = resource.getrusage(_RUSAGE_THREAD)
                # The process's garbage collections that ran on this thread meanwhile are not the
                # callback's work: a full collection of a test process's heap takes tens of ms.
                gc_cpu = _gc_cpu[0] - collected
                check._last = (time.thread_time() - cpu - gc_cpu, after.ru_nvcsw - before.ru_nvcsw,
                               after.ru_nivcsw - before.ru_nivcsw)
                if profiler is not None and check._last[0] >= check.limit:
                    _dump_profile(profiler, handle, check._last[0])

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
            if not self._install_step_seen:  # the step that called install (and warmed the cache): not measured
                self._install_step_seen = True
                return
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


_gc_cpu = [0.0]  # CPU seconds of garbage collection so far, on the threads that ran one
_gc_started: dict[int, float] = {}


def _on_gc(phase: str, info: dict[str, Any]) -> None:
    thread = threading.get_ident()
    if phase == "start":
        _gc_started[thread] = time.thread_time()
    else:
        started = _gc_started.pop(thread, None)
        if started is not None:
            _gc_cpu[0] += time.thread_time() - started


gc.callbacks.append(_on_gc)


def _warm_linecache() -> None:
    """Read the source of every module loaded so far into `linecache`, off the checked loop.

    In debug mode asyncio records where each future and handle was made, with the source
    lines: the first time a stack passes through a module, its file is read from disk then,
    on the loop (43 ms seen for one future on a failure path that had not run before). That
    is the debug mode's I/O, not the callback's, and production never pays it."""
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if path and path.endswith(".py"):
            linecache.getlines(path)

# DBROUTER_LOOPCHECK_PROFILE=<file>: profile every callback, and append the top functions of
# each one that used the CPU limit or more to <file> (finding what a failure path computes).
_PROFILE_TO = os.environ.get("DBROUTER_LOOPCHECK_PROFILE")


def _dump_profile(profiler: cProfile.Profile, handle: Any, cpu: float) -> None:
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(25)
    with open(str(_PROFILE_TO), "a") as fh:
        fh.write(f"==== {handle!r:.300} CPU {cpu * 1000:.1f} ms\n{out.getvalue()}\n")


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
