"""A self-contained HTML page with SVG charts of a drill: no script, no network, opens anywhere."""

from __future__ import annotations

import html
import math
from typing import Any, Sequence

from .figures import format_figure
from .report import BUCKET, DrillReport, leader_story

__all__ = ["render_html"]

WIDTH, HEIGHT, LEFT, RIGHT, TOP, BOTTOM = 900, 170, 60, 20, 22, 28
# The router's events marked on every chart: a short tick (a tall line for a role change),
# its name, node and time in the tooltip.
EVENT_COLORS = {"failover": "#000", "split_brain": "#d62728", "breaker_open": "#d62728", "breaker_closed": "#2ca02c",
                "node_down": "#9467bd", "node_up": "#17becf"}
PATRONI_COLOR = "#ff7f0e"  # Patroni's own timeline: its outages shaded, its leader changes dashed
COLORS = ["#d62728", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]


def _polyline(points: Sequence[tuple[float, float]], color: str, label: str) -> str:
    coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
    return f'<polyline fill="none" stroke="{color}" stroke-width="1.6" points="{coords}"><title>{html.escape(label)}</title></polyline>'


def _panel(title: str, unit: str, series: dict[str, list[float]], report: DrillReport, colors: dict[str, str], log: bool = False) -> str:
    n = len(report.timeline)
    duration = max(BUCKET, n * BUCKET)
    top = max((max(values, default=0.0) for values in series.values()), default=0.0) or 1.0
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(t: float) -> float:
        return LEFT + plot_w * t / duration

    def y(v: float) -> float:
        if log:
            low = 0.1
            v, hi = max(v, low), max(top, low * 10)
            return TOP + plot_h * (1 - (math.log10(v) - math.log10(low)) / (math.log10(hi) - math.log10(low)))
        return TOP + plot_h * (1 - v / top)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" role="img" aria-label="{html.escape(title)}">',
             f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="#fafafa" stroke="#ccc"/>',
             f'<text x="{LEFT}" y="15" font-size="13" font-weight="bold">{html.escape(title)}</text>',
             f'<text x="{LEFT - 5}" y="{TOP + 10}" font-size="10" text-anchor="end">{top:.4g}</text>',
             f'<text x="{LEFT - 5}" y="{TOP + plot_h}" font-size="10" text-anchor="end">{"0.1" if log else "0"}</text>',
             f'<text x="{LEFT - 5}" y="{TOP + plot_h / 2}" font-size="10" text-anchor="end">{html.escape(unit)}</text>']
    step = max(1, int(duration / 10))
    for second in range(0, int(duration) + 1, step):
        parts.append(f'<text x="{x(second):.1f}" y="{HEIGHT - 10}" font-size="10" text-anchor="middle">{second}s</text>')
    for name, values in series.items():
        points = [(x((i + 0.5) * BUCKET), y(v)) for i, v in enumerate(values)]
        parts.append(_polyline(points, colors[name], name))
    if report.patroni is not None:
        for begin, end in report.patroni["write_outages"]:
            what = html.escape(f"Patroni: no running leader from {begin:.2f}s to {end:.2f}s")
            parts.append(f'<rect class="patroni-outage" x="{x(begin):.1f}" y="{TOP}" width="{max(1.0, x(end) - x(begin)):.1f}" '
                         f'height="{plot_h}" fill="{PATRONI_COLOR}" fill-opacity="0.15"><title>{what}</title></rect>')
        for change in report.patroni["leader_changes"][1:]:
            where, who = x(change["t"]), change["leader"] or "none"
            what = html.escape(f'Patroni leader: {who} at {change["t"]:.2f}s')
            parts.append(f'<line class="patroni-leader" x1="{where:.1f}" x2="{where:.1f}" y1="{TOP}" y2="{TOP + plot_h}" '
                         f'stroke="{PATRONI_COLOR}" stroke-width="1.5" stroke-dasharray="2,2"><title>{what}</title></line>')
            parts.append(f'<text x="{where + 3:.1f}" y="{TOP + plot_h - 4}" font-size="10" fill="{PATRONI_COLOR}">'
                         f'{html.escape(who)}</text>')
    for at, label, color in ((report.fault_at, "fault", "#d62728"), (report.recover_at, "recovery", "#2ca02c")):
        if at is not None:
            parts.append(f'<line class="marker {label}" x1="{x(at):.1f}" x2="{x(at):.1f}" y1="{TOP}" y2="{TOP + plot_h}" '
                         f'stroke="{color}" stroke-width="2" stroke-dasharray="5,3"/>')
            parts.append(f'<text x="{x(at) + 3:.1f}" y="{TOP + 11}" font-size="11" fill="{color}">{label}</text>')
    for event in report.events:
        mark = EVENT_COLORS.get(event["name"])
        if mark is None:
            continue
        at, name = x(event["t"]), event["name"]
        what = html.escape(f'{name} {event.get("node") or ""} at {event["t"]:.2f}s')
        tall = name in ("failover", "split_brain")
        parts.append(f'<line class="event {name}" x1="{at:.1f}" x2="{at:.1f}" y1="{TOP if tall else TOP + plot_h - 10}" '
                     f'y2="{TOP + plot_h}" stroke="{mark}" stroke-width="{2 if tall else 1.5}"><title>{what}</title></line>')
        if tall:
            parts.append(f'<text x="{at + 3:.1f}" y="{TOP + 24}" font-size="10" fill="{mark}">{html.escape(name.replace("_", " "))}</text>')
    legend_x = WIDTH - RIGHT - 10
    for i, name in enumerate(series):
        parts.append(f'<text x="{legend_x}" y="{TOP + 14 + 12 * i}" font-size="10" text-anchor="end" fill="{colors[name]}">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def render_html(report: DrillReport) -> str:
    """The page: headline numbers, then throughput, errors and latency over time with the fault marked."""
    per_second = 1 / BUCKET
    timeline: list[dict[str, Any]] = report.timeline
    throughput = {
        "reads/s": [slot["reads"] * per_second for slot in timeline],
        "writes/s": [slot["writes"] * per_second for slot in timeline],
    }
    kinds = sorted({kind for slot in timeline for kind in slot["errors"]})
    errors = {kind: [slot["errors"].get(kind, 0) * per_second for slot in timeline] for kind in kinds} or {"errors/s": [0.0] * len(timeline)}
    latency = {"p50 ms": [slot["p50"] * 1000 for slot in timeline], "p99 ms": [slot["p99"] * 1000 for slot in timeline],
               "max ms": [slot["max"] * 1000 for slot in timeline]}
    colors = {"reads/s": "#1f77b4", "writes/s": "#2ca02c", "p50 ms": "#1f77b4", "p99 ms": "#ff7f0e", "max ms": "#d62728",
              "errors/s": "#999"}
    colors.update({kind: COLORS[i % len(COLORS)] for i, kind in enumerate(kinds)})
    rows = "".join(f"<tr><td>{html.escape(k.replace('_', ' '))}</td><td>{html.escape(format_figure(k, v))}</td></tr>"
                   for k, v in report.results.items() if not k.endswith("_ids"))
    errors_html = "".join(f"<li>{html.escape(error)}</li>" for error in report.errors)
    limits = "".join(f"<li>{html.escape(limit.describe())}</li>" for limit in report.limits)
    notes = "".join(f"<li>{html.escape(note)}</li>" for note in report.notes)
    title = f"dbrouter drill: {report.scenario} on {report.engine}"
    workload = report.workload_line()
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:20px;color:#222}} table{{border-collapse:collapse}} td{{border:1px solid #ddd;padding:2px 8px;font-size:13px}}</style>
</head><body>
<h1>{html.escape(title)}</h1>
<p>fault at {report.fault_at:.1f}s{f", recovery at {report.recover_at:.1f}s" if report.recover_at is not None else ""}; duration {report.duration:.1f}s{html.escape(f"; workload: {workload}" if workload else "")}</p>
{_panel("Throughput", "ops/s", throughput, report, colors)}
{_panel("Errors by kind", "errors/s", errors, report, colors)}
{_panel("Latency", "ms (log)", latency, report, colors, log=True)}
<p style="font-size:12px">Marks: {" ".join(f'<span style="color:{c}">&#9646; {n.replace("_", " ")}</span>' for n, c in EVENT_COLORS.items())} (hover for node and time)</p>
{_patroni_table(report)}
<h2>Results</h2><table>{rows}</table>
{f"<h2>Limits</h2><ul>{limits}</ul>" if limits else ""}
{f"<h2>Notes</h2><ul>{notes}</ul>" if notes else ""}
{f"<h2>Failed</h2><ul>{errors_html}</ul>" if errors_html else ""}
</body></html>
"""


def _patroni_table(report: DrillReport) -> str:
    """dbrouter's numbers beside Patroni's own, from its REST API in the same run."""
    p = report.patroni
    if p is None:
        return ""
    r = report.results
    failovers = ", ".join(f'{e.get("node") or "?"} at {e["t"]:.2f}s' for e in report.events if e["name"] == "failover")
    rows = [
        ("write unavailability", format_figure("write_unavailability", r["write_unavailability"]),
         format_figure("write_unavailability", p["write_unavailability"])),
        ("outages", format_figure("write_outages", r["write_outages"]), format_figure("write_outages", p["write_outages"])),
        ("primary / leader changes", failovers or "none", leader_story(p["leader_changes"])),
    ]
    cells = "".join(f"<tr><td>{html.escape(a)}</td><td>{html.escape(b)}</td><td>{html.escape(c)}</td></tr>"
                    for a, b, c in rows)
    changes = "".join(f'<li>{m["t"]:.2f}s {html.escape(m["member"])}: {html.escape(str(m["role"]))} '
                      f'{html.escape(m["state"])}</li>' for m in p["member_changes"])
    return (f'<h2>dbrouter and Patroni</h2><p style="font-size:12px">Patroni: every member\'s REST API asked every '
            f'{p["interval"] * 1000:.0f} ms; down when no member is a running primary (shaded on the charts, '
            f'its leader changes dashed).</p>'
            f"<table><tr><td></td><td><b>dbrouter (the application)</b></td><td><b>Patroni (its REST API)</b></td></tr>"
            f"{cells}</table><details><summary>Patroni member changes</summary><ul>{changes}</ul></details>")

