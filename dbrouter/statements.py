"""What a statement is, from its text: may it run on a replica?"""

from __future__ import annotations

import re

__all__ = ["is_read_statement"]

# Statements that only read, by their first keyword. Anything else (including
# WITH, which can hide a data-modifying CTE) is treated as a write.
_READ_KEYWORDS = frozenset({"select", "show", "explain", "describe", "desc", "values", "table"})
_LEADING_COMMENTS = re.compile(r"^(?:\s+|--[^\n]*\n|/\*.*?\*/)*", re.S)
_LOCKING_OR_INTO = re.compile(r"\bfor\s+(?:update|share|no\s+key\s+update|key\s+share)\b|\binto\b", re.I)


def is_read_statement(sql: str) -> bool:
    """True for a statement that can run on a replica: a plain SELECT / SHOW / EXPLAIN."""
    match = _LEADING_COMMENTS.match(sql)
    text = sql[match.end():] if match is not None else sql
    first = text.split(None, 1)[0].lower() if text.strip() else ""
    return first in _READ_KEYWORDS and not _LOCKING_OR_INTO.search(text)
