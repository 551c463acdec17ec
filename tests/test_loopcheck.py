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
