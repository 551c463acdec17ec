"""The loop check that the asyncio tests rely on catches what it must (tests/_loopcheck.py)."""

from __future__ import annotations

import asyncio
import socket
import time

from ._loopcheck import LoopCheck


def checked(body: object) -> list[str]:
    check = LoopCheck()

    async def main() -> None:
        check.install(asyncio.get_running_loop())
        await asyncio.sleep(0)  # the body runs in a step of its own, measured
        await body()  # type: ignore[operator]
        await asyncio.sleep(0)

    try:
        asyncio.run(main(), debug=True)
    finally:
        check.uninstall()
    return check.problems


def test_computation_on_the_loop_is_caught() -> None:
    async def busy() -> None:
        end = time.thread_time() + 0.02
        while time.thread_time() < end:
            pass

    problems = checked(busy)
    assert problems and "CPU" in problems[0]


def test_a_long_blocking_wait_is_caught() -> None:
    async def blocking() -> None:
        time.sleep(0.6)  # Python 3.12 audits time.sleep; 3.11 shows a voluntary wait of 0.6 s

    problems = checked(blocking)
    assert problems and ("time.sleep" in problems[0] or "voluntary" in problems[0]), problems


def test_a_blocking_connect_is_caught() -> None:
    async def blocking() -> None:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        with socket.create_connection(listener.getsockname(), timeout=1):
            pass
        listener.close()

    problems = checked(blocking)
    assert any("socket.connect" in p for p in problems), problems


def test_awaiting_is_not_caught() -> None:
    async def polite() -> None:
        await asyncio.sleep(0.02)
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        reader, writer = await asyncio.open_connection(*listener.getsockname())
        writer.close()
        await writer.wait_closed()
        listener.close()

    assert checked(polite) == []


def test_a_garbage_collection_is_not_the_callbacks_doing() -> None:
    """A full collection of the process's heap that happens to run in a step is left out
    (tens of ms in a test process); the step's own computation still counts."""
    import gc

    heap = [[object() for _ in range(10)] for _ in range(100_000)]  # a heap that takes a while to collect

    async def collects() -> None:
        started = time.thread_time()
        gc.collect()
        assert time.thread_time() - started > 0.005, "the collection was too quick to show anything"

    assert checked(collects) == []

    async def collects_and_computes() -> None:
        gc.collect()
        end = time.thread_time() + 0.02
        while time.thread_time() < end:
            pass

    problems = checked(collects_and_computes)
    assert problems and "CPU" in problems[0], problems
    del heap
