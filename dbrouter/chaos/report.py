"""The result of a chaos run: seed first, then operations, faults and each invariant."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .faults import FaultRun
from .invariants import Invariant

__all__ = ["ChaosReport"]


@dataclass
class ChaosReport:
    """What a chaos run did and whether every invariant held (`passed`)."""

    seed: int
    engine: str
    duration: float
    threads: int
    settings: dict[str, Any] = field(default_factory=dict)
    operations: dict[str, dict[str, int]] = field(default_factory=dict)  # op -> {"ok" | error kind: count}
    faults: list[FaultRun] = field(default_factory=list)
    failovers: list[tuple[float, str, str]] = field(default_factory=list)  # (seconds, old, new)
    events: dict[str, int] = field(default_factory=dict)
    invariants: list[Invariant] = field(default_factory=list)
    stacks: str = ""  # every thread's stack, when a stall was detected
    unexpected: list[str] = field(default_factory=list)
    interrupted: bool = False

    @property
    def passed(self) -> bool:
        return bool(self.invariants) and all(i.passed for i in self.invariants) and not self.interrupted

    @property
    def failures(self) -> list[str]:
        """One line per failed invariant, each naming the seed (for test messages and logs)."""
        return [f"seed {self.seed} ({self.engine}): FAIL {i.name}: " + " | ".join(i.details) for i in self.invariants
                if not i.passed]

    def human(self) -> str:
        lines = [f"seed {self.seed}", f"dbrouter chaos: {self.engine}, {self.duration:g}s, {self.threads} threads "
                 f"(replay: dbrouter chaos --engine {self.engine} --duration {self.duration:g} --seed {self.seed} "
                 f"--threads {self.threads})"]
        if self.settings:
            lines.append("router: " + ", ".join(f"{k}={v}" for k, v in self.settings.items()))
        lines.append("")
        lines.append("operations:")
        for op, counts in sorted(self.operations.items()):
            errors = {k: v for k, v in counts.items() if k != "ok"}
            text = ", ".join(f"{k} {v}" for k, v in sorted(errors.items(), key=lambda kv: -kv[1]))
            lines.append(f"  {op:<20} ok {counts.get('ok', 0):>6}" + (f"   errors: {text}" if text else ""))
        lines.append("")
        lines.append(f"faults ({sum(1 for f in self.faults if not f.skipped)} injected, "
                     f"{sum(1 for f in self.faults if f.skipped)} skipped):")
        for run in self.faults:
            lines.append(f"  {run.describe()}")
            for check in run.checks:
                lines.append(f"      {'ok  ' if check.ok else 'FAIL'} {check.describe()}")
        if self.failovers:
            lines.append("failovers seen by the router: " + ", ".join(f"{old} -> {new} at {t:.2f}s"
                                                                      for t, old, new in self.failovers))
        if self.events:
            lines.append("router events: " + ", ".join(f"{k} {v}" for k, v in sorted(self.events.items())))
        lines.append("")
        lines.append("invariants:")
        for inv in self.invariants:
            lines.append(f"  {'PASS' if inv.passed else 'FAIL'}  {inv.name}")
            for detail in inv.details:
                lines.append(f"          {detail}")
        if self.unexpected:
            lines.append("")
            lines.append("unexpected errors (first ones):")
            lines.extend("  " + u.replace("\n", "\n  ") for u in self.unexpected[:5])
        if self.stacks:
            lines.append("")
            lines.append("stacks of every thread at the stall:")
            lines.append(self.stacks)
        lines.append("")
        verdict = "interrupted" if self.interrupted else ("every invariant held" if self.passed else "INVARIANTS FAILED")
        lines.append(f"seed {self.seed}: {verdict}")
        return "\n".join(lines)
