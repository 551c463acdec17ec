"""Cutting a socket from another thread (`dbrouter.adapters._sockets`, `Adapter.abort`): never
the wrong one, even when the descriptor was closed and its number reused meanwhile."""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from typing import Callable, Iterator

from dbrouter.adapters import _sockets


class _Conn:
    """Stands for a driver's connection (a plain object the functions can mark)."""


def _pair() -> tuple[socket.socket, socket.socket]:
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    server.close()
    return client, accepted


@contextmanager
def _taken_over(fd: int) -> Iterator[socket.socket]:
    """Another connection's socket under descriptor number ``fd`` (closed just before); yields
    its peer."""
    second, peer = _pair()
    copied = second.fileno() != fd  # not given the same number: put it there
    if copied:
        os.dup2(second.fileno(), fd)
    try:
        yield peer
    finally:
        second.close()
        peer.close()
        if copied:
            os.close(fd)


def _left_alone(fd: int, peer: socket.socket) -> None:
    """The socket under ``fd`` still carries data both ways."""
    peer.sendall(b"x")
    with socket.socket(fileno=os.dup(fd)) as same:
        assert same.recv(1) == b"x"
        same.sendall(b"y")
    assert peer.recv(1) == b"y"


def _recorded_by_claim(conn: _Conn, fd: int) -> None:
    _sockets.claim(conn, fd, os.readlink(f"/proc/self/fd/{fd}"))


def _cut_claimed(conn: _Conn, fd: int) -> None:
    _sockets.shutdown(_sockets.claimed_fd(conn), conn._dbrouter_link)  # type: ignore[attr-defined]


def _cut_remembered(conn: _Conn, fd: int) -> None:
    _sockets.shutdown(fd, conn._dbrouter_link)  # type: ignore[attr-defined]


PATHS: list[tuple[Callable[[_Conn, int], None], Callable[[_Conn, int], None]]] = [
    (_recorded_by_claim, _cut_claimed),  # the C extension's socket, found at connect
    (_sockets.remember, _cut_remembered),  # drivers that tell their descriptor: abort reads it, then cuts
]


def test_a_claimed_socket_is_cut() -> None:
    client, peer = _pair()
    conn = _Conn()
    _recorded_by_claim(conn, client.fileno())
    _cut_claimed(conn, client.fileno())
    assert peer.recv(1) == b""  # cut: the peer sees the end
    client.close()
    peer.close()


def test_a_descriptor_reused_by_another_socket_is_left_alone() -> None:
    for record, cut in PATHS:
        first, first_peer = _pair()
        conn = _Conn()
        fd = first.fileno()
        record(conn, fd)
        first.close()  # the connection closes; its descriptor number is free
        try:
            with _taken_over(fd) as peer:
                cut(conn, fd)  # the descriptor is another socket now: left alone
                _left_alone(fd, peer)
        finally:
            first_peer.close()
