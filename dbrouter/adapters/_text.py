"""Message helpers shared by the adapters: keep errors short and password-free."""

from __future__ import annotations

__all__ = ["first_line", "scrub"]


def first_line(text: str) -> str:
    """The first non-empty line of a driver message (libpq adds hints below it)."""
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return text.strip()


def scrub(text: str, password: str | None) -> str:
    """Replace the password wherever a driver message might echo it."""
    if password:
        text = text.replace(password, "***")
    return text
