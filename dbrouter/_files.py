"""Files that may hold a password (configs, cluster state, password files) or name your
hosts (drill reports): created with mode 0600 from the start.

``path.write_text(); path.chmod(0o600)`` leaves a window in which the file is readable
under the umask (0644 by default), and keeps the mode of a file that already exists.
`write_private` writes a new file opened with the mode (the umask can only take bits
away), sets the mode exactly with ``fchmod``, and renames it over the target, so the
target never exists with other permissions.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["write_private"]


def write_private(path: str | os.PathLike[str], text: str, *, mode: int = 0o600) -> None:
    """Write ``text`` to ``path`` atomically, readable by the owner only (``mode``)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    tmp.unlink(missing_ok=True)  # a stale one from a process that died: O_EXCL would refuse it
    fd = os.open(tmp, flags, mode)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            fd = -1
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
