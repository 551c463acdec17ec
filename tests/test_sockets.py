"""Cutting a socket the driver does not hand out (`dbrouter.adapters._sockets`): never the
wrong one, even when the descriptor was closed and reused meanwhile."""

from __future__ import annotations

import os
import socket

from dbrouter.adapters import _sockets


class _Conn:
    """Stands for a C-extension connection (a plain object `claim` can mark)."""


def _pair() -> tuple[socket.socket, socket.socket]:
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    server.close()
    return client, accepted


def test_a_claimed_socket_is_cut_and_a_reused_descriptor_is_left_alone() -> None:
    client, peer = _pair()
    conn = _Conn()
    fd = client.fileno()
    _sockets.claim(conn, fd, os.readlink(f"/proc/self/fd/{fd}"))
    _sockets.shutdown_claimed(conn)
    assert peer.recv(1) == b""  # cut: the peer sees the end
    client.close()
    peer.close()

    first, first_peer = _pair()
    conn = _Conn()
    fd = first.fileno()
    _sockets.claim(conn, fd, os.readlink(f"/proc/self/fd/{fd}"))
    first.close()  # the connection closes; its descriptor number is free
    second, second_peer = _pair()
    copied = second.fileno() != fd  # not given the same number: put it there
    if copied:
        os.dup2(second.fileno(), fd)
    try:
        _sockets.shutdown_claimed(conn)  # the descriptor is another socket now: left alone
        second_peer.sendall(b"x")
        with socket.socket(fileno=os.dup(fd)) as same:
            assert same.recv(1) == b"x"
            same.sendall(b"y")
        assert second_peer.recv(1) == b"y"
    finally:
        for sock in (second, second_peer, first_peer):
            sock.close()
        if copied:
            os.close(fd)


def test_a_remembered_descriptor_reused_by_another_socket_is_left_alone() -> None:
    """`Adapter.abort`'s path for drivers that tell their descriptor: it may be closed and its
    number given to another connection between reading it and cutting it."""
    first, first_peer = _pair()
    conn = _Conn()
    fd = first.fileno()
    _sockets.remember(conn, fd)
    first.close()
    second, second_peer = _pair()
    copied = second.fileno() != fd
    if copied:
        os.dup2(second.fileno(), fd)
    try:
        _sockets.shutdown(fd, conn._dbrouter_link)  # type: ignore[attr-defined]
        second_peer.sendall(b"x")
        with socket.socket(fileno=os.dup(fd)) as same:
            assert same.recv(1) == b"x"
    finally:
        for sock in (second, second_peer, first_peer):
            sock.close()
        if copied:
            os.close(fd)
