"""The node table behind ``dbrouter status``: one row per node, for people and scripts."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .aio import AsyncRouter
    from .router import Router

__all__ = ["node_rows", "render_table"]

COLUMNS = ("node", "role", "reachable", "lag", "latency", "breaker", "pool")


def node_rows(router: Router | AsyncRouter) -> list[dict[str, Any]]:
    """What the router (sync or asyncio) knows of each node after its last probe round."""
    stats = router.stats()
    rows = []
    for name, info in stats["nodes"].items():
        pool = info["pool"]
        rows.append(
            {
                "node": name,
                "role": info["role"],
                "reachable": info["healthy"],
                "lag": info["lag"] if info["role"] != "primary" else 0.0,
                "latency": info["probe_latency"],
                "breaker": info["breaker"],
                "pool": {"in_use": pool["in_use"], "idle": pool["idle"], "size": pool["size"], "max_size": pool["max_size"]},
                "error": info["last_error"],
                "driver": info["driver"],
            }
        )
    return rows


def _cell(column: str, row: dict[str, Any]) -> str:
    value = row[column]
    if column == "reachable":
        return "yes" if value else "NO"
    if column == "lag":
        return "?" if value is None else f"{value:.2f}s"
    if column == "latency":
        return "-" if value is None else f"{value * 1000:.1f}ms"
    if column == "pool":
        return f"{value['in_use']}/{value['size']} (max {value['max_size']})"
    return str(value)


def render_table(rows: list[dict[str, Any]], *, split_brain: list[str] | None = None) -> str:
    """A fixed-width table; unreachable nodes get their last error underneath, and the
    driver (with its implementation: mysql-connector's C extension or pure Python) follows."""
    cells = [[_cell(c, row) for c in COLUMNS] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(COLUMNS)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths, strict=True)).rstrip()]
    for row, line in zip(rows, cells, strict=True):
        lines.append("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip())
        if not row["reachable"] and row.get("error"):
            lines.append(f"    {row['error']}")
    drivers = sorted({row["driver"] for row in rows})
    if len(drivers) == 1:
        lines.append(f"driver: {drivers[0]}")
    elif drivers:
        lines.append("drivers: " + ", ".join(f"{row['node']} {row['driver']}" for row in rows))
    if split_brain:
        lines.append(f"SPLIT BRAIN: {', '.join(split_brain)} all accept writes")
    return "\n".join(lines)
