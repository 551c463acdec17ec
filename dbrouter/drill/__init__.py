"""Failover drills: what would the application have seen? See `run_drill`."""

from __future__ import annotations

from .report import DrillReport, Limit
from .runner import Drill, DrillOptions, run_drill
from .scenarios import SCENARIOS, scenario_names

__all__ = ["SCENARIOS", "Drill", "DrillOptions", "DrillReport", "Limit", "run_drill", "scenario_names"]
