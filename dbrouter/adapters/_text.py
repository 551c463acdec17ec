"""Message helpers shared by the adapters: keep errors short and password-free."""

from __future__ import annotations

import re

__all__ = ["first_line", "scrub", "split_insert_values"]

# "INSERT INTO t (a, b) VALUES (%s, %s) [ON CONFLICT ... | ON DUPLICATE KEY ... | RETURNING ...]"
# with plain %s placeholders only: such statements are sent as one multi-row INSERT.
_INSERT_VALUES = re.compile(
    r"(?is)^(\s*INSERT\s+(?:IGNORE\s+)?INTO\s+.+?\s+VALUES\s*)"
    r"\(((?:\s*%s\s*,)*\s*%s\s*)\)"
    r"(\s*(?:ON\s+CONFLICT\b.*|ON\s+DUPLICATE\s+KEY\b.*|RETURNING\b.*)?)$"
)


def split_insert_values(sql: str) -> tuple[str, int, str] | None:
    """``(head, placeholders per row, tail)`` for a single-row INSERT ... VALUES (%s, ...), else None."""
    match = _INSERT_VALUES.match(sql)
    if match is None:
        return None
    return match.group(1), match.group(2).count("%s"), match.group(3)


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
