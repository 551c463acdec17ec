"""Drill reports side by side: ``dbrouter drill compare A.json B.json [C.json ...]``.

One column per report, one row per figure, with the units of the HTML page
(`figures.format_figure`); with two reports, a column B - A. A figure a report
does not have (an older version, another scenario) shows as "-"; "none" means
the report has it and says nothing happened (not detected, no recovery).
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import ConfigurationError
from .figures import format_difference, format_figure, is_number

__all__ = ["LoadedReport", "load_report", "render_comparison"]

MISSING = "-"
HEADER_WIDTH = 28  # a longer file name is wrapped after a hyphen


@dataclass
class LoadedReport:
    """A drill report read from a file: ``data`` is its JSON, checked only for its shape."""

    path: Path
    data: dict[str, Any]
    modified: float  # the file's mtime: the date of a report written before reports carried one


def load_report(path: Path) -> LoadedReport:
    """Read a drill report. Raises `ConfigurationError` with one line naming the file when it
    is missing, unreadable, not JSON, or not a drill report (a JSON object with a scenario,
    an engine and a results object)."""
    try:
        raw = path.read_bytes()
        modified = path.stat().st_mtime
    except FileNotFoundError:
        raise ConfigurationError(f"{path}: no such file") from None
    except OSError as exc:
        raise ConfigurationError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    try:
        data = json.loads(raw)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ConfigurationError(f"{path}: not JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigurationError(f"{path}: not a drill report (a JSON {type(data).__name__}, not an object)")
    wrong = [key for key, kind in (("scenario", str), ("engine", str), ("results", dict))
             if not isinstance(data.get(key), kind)]
    if wrong:
        raise ConfigurationError(f"{path}: not a drill report (no {' or '.join(repr(key) for key in wrong)})")
    return LoadedReport(path=path, data=data, modified=modified)


# -- figures: each reads one value from a report, or _ABSENT -------------------------------


class _Missing:
    pass


_ABSENT = _Missing()


def _get(data: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return _ABSENT
        data = data[key]
    return data


def _result(key: str) -> Callable[[dict[str, Any]], Any]:
    return lambda data: _get(data, "results", key)


def _setting(key: str) -> Callable[[dict[str, Any]], Any]:
    return lambda data: _get(data, "settings", key)


def _top(key: str) -> Callable[[dict[str, Any]], Any]:
    return lambda data: _get(data, key)


def _error_count(kind: str) -> Callable[[dict[str, Any]], Any]:
    def count(data: dict[str, Any]) -> Any:
        errors = _get(data, "results", "errors_by_kind")
        return errors.get(kind, 0) if isinstance(errors, dict) else _ABSENT
    return count


def _failover_events(data: dict[str, Any]) -> list[dict[str, Any]] | None:
    events = data.get("events")
    if not isinstance(events, list):
        return None
    return [e for e in events if isinstance(e, dict) and e.get("name") == "failover" and is_number(e.get("t"))]


def _failovers(data: dict[str, Any]) -> Any:
    failovers = _failover_events(data)
    return _ABSENT if failovers is None else len(failovers)


def _time_to_new_primary(data: dict[str, Any]) -> Any:
    """From the fault to the first failover after it: when the router knew the new primary."""
    failovers, fault_at = _failover_events(data), data.get("fault_at")
    if failovers is None or not is_number(fault_at):
        return _ABSENT
    after = [e["t"] - fault_at for e in failovers if e["t"] >= fault_at]
    return min(after) if after else None


@dataclass(frozen=True)
class _Figure:
    label: str
    key: str  # the unit and the precision: see figures.format_figure
    read: Callable[[dict[str, Any]], Any]
    kind: str = "number"  # number | spans | bool
    none: str = "none"  # how a None reads in this row


def _figures(reports: Sequence[LoadedReport]) -> list[tuple[str, list[_Figure]]]:
    kinds: set[str] = set()
    for report in reports:
        found = _get(report.data, "results", "errors_by_kind")
        if isinstance(found, dict):
            kinds.update(str(kind) for kind in found)
    # No error in any report: one row that says so (0), or "-" for a report without the figure.
    errors = [_Figure(kind, "errors", _error_count(kind)) for kind in sorted(kinds)] or [
        _Figure("(none)", "errors", _error_count(""))]
    latency = [_Figure(f"{kind} {q}", f"{kind}_{q}_latency", _result(f"{kind}_{q}_latency"), none="no " + kind + "s")
               for kind in ("read", "write") for q in ("p50", "p99", "max")]
    latency += [_Figure("all p99", "p99_latency", _result("p99_latency")),
                _Figure("all max", "max_latency", _result("max_latency"))]
    return [
        ("results", [
            _Figure("operations", "operations", _result("operations")),
            _Figure("  reads", "reads", _result("reads")),
            _Figure("  writes", "writes", _result("writes")),
            _Figure("acknowledged writes", "acknowledged_writes", _result("acknowledged_writes")),
            _Figure("read availability", "read_availability", _result("read_availability")),
            _Figure("write availability", "write_availability", _result("write_availability")),
            _Figure("write unavailability", "write_unavailability", _result("write_unavailability")),
            _Figure("write outages", "write_outages", _result("write_outages"), kind="spans"),
            _Figure("failovers", "failovers", _failovers),
            _Figure("time to detect the fault", "time_to_detect", _result("time_to_detect"), none="not detected"),
            _Figure("time to new primary", "time_to_new_primary", _time_to_new_primary, none="no failover"),
            _Figure("lost writes", "lost_writes", _result("lost_writes")),
            _Figure("duplicated writes", "duplicated_writes", _result("duplicated_writes")),
            _Figure("unknown-outcome writes", "unknown_writes", _error_count("WriteOutcomeUnknown")),
        ]),
        ("errors by kind", errors),
        ("latency", latency),
        ("settings", [
            _Figure("duration", "duration", _top("duration")),
            _Figure("fault at", "fault_at", _top("fault_at")),
            _Figure("recovery at", "recover_at", _top("recover_at"), none="no recovery"),
            _Figure("threads", "threads", _setting("threads")),
            _Figure("write ratio", "write_ratio", _setting("write_ratio")),
            _Figure("rate (ops/s)", "rate", _setting("rate"), none="flat out"),
            _Figure("replicas", "replicas", _setting("replicas")),
            _Figure("sync", "sync", _setting("sync"), kind="bool"),
            _Figure("failover_wait", "failover_wait", _setting("failover_wait")),
        ]),
    ]


def _spans(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(s, list) and len(s) == 2 and all(is_number(t) for t in s)
                                           for s in value)


def _cell(figure: _Figure, value: Any) -> list[str]:
    """The lines of one cell: a value of the wrong type (a report from another version) is MISSING."""
    if value is _ABSENT:
        return [MISSING]
    if value is None:
        return [figure.none]
    if figure.kind == "spans":
        if not _spans(value):
            return [MISSING]
        return [format_figure(figure.key, [span]) for span in value] or ["none"]
    if figure.kind == "bool":
        return [("yes" if value else "no") if isinstance(value, bool) else MISSING]
    return [format_figure(figure.key, value) if is_number(value) else MISSING]


# -- the table ---------------------------------------------------------------------------------


def _names(reports: Sequence[LoadedReport]) -> list[str]:
    """File names; when two files share one (each drill writes dbrouter-drill-<scenario>.json),
    as many of the last parts of their paths as tell them apart."""
    paths = [r.path.parts for r in reports]
    distinct = set(paths)
    for keep in range(1, max(len(parts) for parts in paths) + 1):
        if len({parts[-keep:] for parts in distinct}) == len(distinct):
            return ["/".join(parts[-keep:]) for parts in paths]
    return [r.path.name for r in reports]  # not reached: distinct paths differ somewhere


def _date(report: LoadedReport) -> str:
    started = report.data.get("started")
    if isinstance(started, str):
        try:
            when = datetime.fromisoformat(started)
        except ValueError:
            return MISSING
        if when.tzinfo is None:
            return MISSING
        return when.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    # Reports before "started": the file is written when the drill ends.
    return datetime.fromtimestamp(report.modified, timezone.utc).strftime("%Y-%m-%d %H:%M UTC (file time)")


def render_comparison(reports: Sequence[LoadedReport]) -> str:
    """The aligned table, as text. With two reports, a last column B - A for the numbers."""
    letters = [chr(ord("A") + i) if i < 26 else f"#{i + 1}" for i in range(len(reports))]
    names = [textwrap.wrap(name, HEADER_WIDTH, break_on_hyphens=True) for name in _names(reports)]
    tall = max(len(lines) for lines in names)  # scenario, engine and date on the same lines in every column
    headers = [[letter, *lines, *[""] * (tall - len(lines)), str(r.data["scenario"]), str(r.data["engine"]), _date(r)]
               for letter, lines, r in zip(letters, names, reports, strict=True)]
    two = len(reports) == 2
    if two:
        headers.append(["B - A"])
    rows: list[tuple[str, list[list[str]]]] = []
    for section, figures in _figures(reports):
        rows.append((section, []))
        for figure in figures:
            values = [figure.read(r.data) for r in reports]
            cells = [_cell(figure, value) for value in values]
            if two:
                difference = format_difference(figure.key, values[0], values[1]) if figure.kind == "number" else ""
                cells.append([difference])
            rows.append(("  " + figure.label, cells))
    label_width = max(len(label) for label, _ in rows)
    widths = [max(len(line) for line in header) for header in headers]
    for _, cells in rows:
        for i, cell in enumerate(cells):
            widths[i] = max(widths[i], *(len(line) for line in cell))
    out = []
    height = max(len(header) for header in headers)
    for n in range(height):
        out.append(_line("", [header[n] if n < len(header) else "" for header in headers], label_width, widths))
    out.append("-" * len(out[0]))
    for label, cells in rows:
        if not cells:
            out.append(label)
            continue
        for n in range(max(len(cell) for cell in cells)):
            out.append(_line(label if n == 0 else "", [cell[n] if n < len(cell) else "" for cell in cells],
                             label_width, widths))
    return "\n".join(line.rstrip() for line in out)


def _line(label: str, cells: list[str], label_width: int, widths: list[int]) -> str:
    return f"{label:<{label_width}}" + "".join(f"   {cell:>{width}}" for cell, width in zip(cells, widths, strict=True))
