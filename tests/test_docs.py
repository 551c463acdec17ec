"""The README's references match the code: every option, error and event, and the CI command."""

from __future__ import annotations

import re
from pathlib import Path

import dbrouter.errors
from dbrouter.config import FLAT_OPTIONS
from dbrouter.events import EVENT_NAMES

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, re.S | re.M)
    assert match, f"README has no section {title!r}"
    return match.group(1)


def first_column(text: str) -> list[str]:
    return re.findall(r"^\| `([A-Za-z_]+)` \|", text, re.M)


def test_every_option_is_in_the_configuration_reference_and_nothing_else() -> None:
    documented = first_column(section("Configuration reference"))
    assert sorted(documented) == sorted(FLAT_OPTIONS)
    rows = re.findall(r"^\| `([a-z_]+)` \| (\w+) \|", section("Configuration reference"), re.M)
    assert {name: sec for name, sec in rows} == FLAT_OPTIONS


def test_every_error_is_in_the_error_reference_and_nothing_else() -> None:
    documented = first_column(section("Error reference"))
    assert sorted(documented) == sorted(dbrouter.errors.__all__)


def test_every_event_is_documented() -> None:
    text = section("Observability")
    for name in EVENT_NAMES:
        assert f"`{name}`" in text, name


def test_ci_runs_the_readme_test_command() -> None:
    commands = re.findall(r"^(bash scripts/setup\.sh && .+)$", section("Two commands"), re.M)
    assert len(commands) == 2
    demo, tests = commands
    assert demo.endswith("dbrouter demo")
    assert tests in (ROOT / ".ci" / "run").read_text()


def test_the_ranges_in_the_configuration_reference_are_the_code_s() -> None:
    """Each numeric option's documented bounds are accepted, and just beyond them refused."""
    import math

    from dbrouter import ConfigurationError
    from dbrouter.config import build_router_config

    def builds(name: str, value: float) -> bool:
        try:
            build_router_config("postgresql://app@db1/app", (), {name: value, **({"min_size": 0} if name == "max_size" else {})})
        except ConfigurationError:
            return False
        return True

    rows = re.findall(r"^\| `([a-z_]+)` \| \w+ \| [^|]+ \| ([^|]+) \|", section("Configuration reference"), re.M)
    checked = 0
    for name, text in rows:
        inclusive = re.fullmatch(r"([\d.]+) to ([\d.]+)(, or none)?", text.strip())
        open_low = re.fullmatch(r"> ([\d.]+), <= ([\d.]+)(, or none)?", text.strip())
        if not (inclusive or open_low):
            continue
        low, high = (float(g) for g in (inclusive or open_low).groups()[:2])  # type: ignore[union-attr]
        integer = name in ("max_size", "keepalive_count", "fail_max", "retry_attempts")
        cast = int if integer else float
        step = 1 if integer else max(1e-6, high * 1e-9)
        assert builds(name, cast(high)), name
        assert not builds(name, cast(high + step)), name
        assert not builds(name, math.inf) and not builds(name, math.nan), name
        if inclusive:
            assert builds(name, cast(low)), name
            assert not builds(name, cast(low - step)), name
        else:
            assert not builds(name, cast(low)) and builds(name, cast(low + step)), name
        checked += 1
    assert checked == 24  # every numeric option but min_size (0 to max_size)
