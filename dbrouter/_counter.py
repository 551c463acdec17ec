"""A counter that many threads can increment without a lock."""

from __future__ import annotations

import itertools

__all__ = ["Counter"]


class Counter:
    """``next()`` on an ``itertools.count`` is atomic under the GIL, unlike ``x += 1``.

    ``inc`` is the count's own ``__next__``: a C call, the cheapest increment there is.
    """

    __slots__ = ("_count", "inc")

    def __init__(self) -> None:
        self._count = itertools.count()
        self.inc = self._count.__next__

    @property
    def value(self) -> int:
        # count.__reduce__() returns (count, (next_value,)) without advancing it.
        return int(self._count.__reduce__()[1][0])
