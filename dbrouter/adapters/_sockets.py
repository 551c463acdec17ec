"""Finding and cutting a driver's socket when the driver does not hand it out.

mysql-connector's C extension keeps its socket inside libmysqlclient. dbrouter needs it
to cut a statement from another thread (a call's deadline, a node that stopped answering
its probes) and to leave a forked parent's connections alone: right after a connect, the
socket is found among the process's descriptors by the server address it is connected
to. Descriptors that another live connection already claimed are skipped; when more than
one candidate is left (two connects to one server at the same moment), the caller pings
on its connection and keeps the candidate whose received bytes grew (`received`). (Asking
the server for the session's client port would name a proxy's port behind ProxySQL or a
load balancer.)

Linux only (``/proc/self/fd``); elsewhere nothing is found, and such connections are cut
only by their driver's own timeouts.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import weakref
from typing import Any

__all__ = ["candidates", "claim", "claimed_fd", "received", "remember", "shutdown"]

_FD_DIR = "/proc/self/fd"
_TCP_INFO_SIZE = 256
_BYTES_RECEIVED = 128  # struct tcp_info: tcpi_bytes_received (u64), Linux 4.1 and later
_claims: dict[str, weakref.ref[Any]] = {}  # "socket:[inode]" -> the connection that owns it
_claims_lock = threading.Lock()  # guards _claims; nothing is called under it


def _link(fd: int) -> str | None:
    try:
        return os.readlink(f"{_FD_DIR}/{fd}")
    except OSError:
        return None


def _owned(link: str) -> bool:
    with _claims_lock:
        owner = _claims.get(link)
        return owner is not None and owner() is not None


def candidates(peer_port: int) -> list[tuple[int, str, int]]:
    """``(fd, link, local port)`` of each unclaimed TCP socket connected to ``peer_port``."""
    try:
        names = os.listdir(_FD_DIR)
    except OSError:
        return []
    found = []
    for name in names:
        fd = int(name)
        link = _link(fd)
        if link is None or not link.startswith("socket:") or _owned(link):
            continue
        try:
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        try:
            if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.getpeername()[1] == peer_port:
                found.append((fd, link, int(sock.getsockname()[1])))
        except OSError:
            pass
        finally:
            sock.close()
    return found


def received(fd: int) -> int | None:
    """Bytes the TCP socket behind ``fd`` has received so far (Linux ``TCP_INFO``)."""
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
    except OSError:
        return None
    finally:
        sock.close()
    if len(info) < _BYTES_RECEIVED + 8:
        return None
    return int(struct.unpack_from("Q", info, _BYTES_RECEIVED)[0])


def claim(conn: Any, fd: int, link: str) -> None:
    """Record that ``conn``'s socket is ``fd`` (while its link stays ``link``)."""
    with _claims_lock:
        for key in [key for key, owner in _claims.items() if owner() is None]:
            del _claims[key]
        _claims[link] = weakref.ref(conn)
    conn._dbrouter_socket = fd
    conn._dbrouter_link = link  # as `remember` records it: `shutdown` checks it before cutting


def claimed_fd(conn: Any) -> int | None:
    """The descriptor `claim` recorded for ``conn``, if it is still that socket."""
    fd = getattr(conn, "_dbrouter_socket", None)
    if fd is None:
        return None
    return fd if _link(fd) == conn._dbrouter_link else None


def shutdown(fd: int | None, link: str | None = None) -> None:
    """Shut the socket behind ``fd`` down both ways: a thread blocked reading it wakes at
    once with a lost connection. Safe from any thread; the descriptor stays open. With
    ``link`` (``socket:[inode]``), only if ``fd`` is still that socket, checked on a
    duplicate of it, so that a descriptor closed and reused meanwhile is left alone."""
    if fd is None:
        return
    try:
        dup = os.dup(fd)
    except OSError:
        return
    try:
        if link is not None and f"socket:[{os.fstat(dup).st_ino}]" != link:
            os.close(dup)
            return
        sock = socket.socket(fileno=dup)
    except OSError:
        os.close(dup)
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.close()


def remember(conn: Any, fd: int | None) -> None:
    """Record which socket ``conn``'s descriptor ``fd`` is, for `shutdown` from another thread."""
    if fd is not None:
        conn._dbrouter_link = _link(fd)
