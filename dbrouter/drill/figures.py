"""How a drill's figures are shown to people: units and precision, for the HTML page and
``dbrouter drill compare`` alike, so that both say the same thing the same way."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["format_difference", "format_figure", "is_number"]

SECONDS = ("time_to_detect", "time_to_new_primary", "write_unavailability", "duration", "fault_at", "recover_at",
           "failover_wait")


def is_number(value: Any) -> bool:
    """An int or a finite float, not a bool (JSON's true would otherwise count as 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return math.isfinite(value)


def _unit(key: str) -> tuple[float, str, int] | None:
    """(scale, unit, decimals) for a figure measured in a unit, None for a plain number."""
    if key.endswith("_availability"):
        return 1.0, "%", 3
    if key.endswith("_latency"):
        return 1000.0, "ms", 1
    if key in SECONDS:
        return 1.0, "s", 2
    if key == "write_ratio":
        return 100.0, "%", 0
    return None


def format_figure(key: str, value: Any) -> str:
    """A result or setting as people read it: availabilities in percent, times in s or ms,
    outages as spans, errors as ``kind: count``; None (not measured, not set) is "none", and
    for lost or duplicated writes "not checked" (the writes could not be read back)."""
    if value is None:
        return "not checked" if key in ("lost_writes", "duplicated_writes") else "none"
    if key == "write_outages":
        return ", ".join(f"{begin:.2f} s to {end:.2f} s" for begin, end in value) or "none"
    if key == "errors_by_kind":
        return ", ".join(f"{kind}: {count}" for kind, count in sorted(value.items())) or "none"
    unit = _unit(key)
    if unit is not None and is_number(value):
        scale, name, decimals = unit
        return f"{value * scale:.{decimals}f} {name}"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def format_difference(key: str, first: Any, second: Any) -> str:
    """``second - first`` with its sign and unit (percentage points for percentages), at the
    precision of `format_figure`; "" when either is not a number."""
    if not (is_number(first) and is_number(second)):
        return ""
    delta = second - first
    unit = _unit(key)
    if unit is not None:
        scale, name, decimals = unit
        text = f"{delta * scale:+.{decimals}f}"
        suffix = " pp" if name == "%" else f" {name}"
    elif isinstance(delta, int):
        text, suffix = f"{delta:+d}", ""
    else:
        text, suffix = f"{delta:+.3g}", ""
    if float(text) == 0:
        text = text[1:]  # no sign on a difference that rounds to nothing
    return text + suffix
