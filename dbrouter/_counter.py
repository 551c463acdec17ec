"""A counter that many threads can increment without a lock."""

from __future__ import annotations

import itertools

__all__ = ["Counter"]


class Counter:
    """``next()`` on an ``itertools.count`` is atomic under the GIL, unlike ``x += 1``."""

    __slots__ = ("_count",)

    def __init__(self) -> None:
        self._count = itertools.count()

    def inc(self) -> None:
        next(self._count)

    @property
    def value(self) -> int:
        # count.__reduce__() returns (count, (next_value,)) without advancing it.
        return int(self._count.__reduce__()[1][0])
