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
