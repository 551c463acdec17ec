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
        # repr() is "count(N)", N the next value, without advancing it (count.__reduce__
        # did the same but is deprecated since Python 3.12 and gone in 3.14).
        return int(repr(self._count)[6:-1])
