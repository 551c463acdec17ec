"""The README's references match the code: every option and its range, every error and event, the
bad-input table, and the CI command."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

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
        integer = name in ("max_size", "max_waiting", "keepalive_count", "fail_max", "retry_attempts")
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
    assert checked == 33  # every numeric option but min_size (0 to max_size)


def bad_input_rows() -> list[tuple[str, str, str]]:
    text = section("Error reference")
    table = text.split("### Bad input", 1)[1]
    rows = re.findall(r"^\| `(.+?)` \| `(\w+)` \| `(.+)` \|$", table, re.M)
    assert len(rows) >= 25, rows
    return rows


@pytest.mark.parametrize(("given", "error", "message"), bad_input_rows())
def test_the_bad_input_table_is_what_the_code_raises(given: str, error: str, message: str,
                                                     monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import functools

    import dbrouter
    import dbrouter.chaos.runner
    import dbrouter.cluster
    import dbrouter.drill.runner
    from dbrouter import cli
    from dbrouter.config import load_router_config

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"{given!r} started something instead of failing")

    monkeypatch.setattr(dbrouter.cluster, "make_cluster", refuse)
    monkeypatch.setattr(dbrouter.drill.runner.Drill, "run", refuse)
    monkeypatch.setattr(dbrouter.chaos.runner, "_Chaos", refuse)
    monkeypatch.setenv("DBROUTER_HOME", str(tmp_path))
    expected = getattr(dbrouter, error)
    with pytest.raises(expected) as info:
        if given.startswith("dbrouter "):
            cli.run(cli.build_parser().parse_args(shlex.split(given)[1:]))
        elif given.startswith("DBROUTER_"):
            load_router_config(None, env=dict(pair.split("=", 1) for pair in shlex.split(given)))
        else:  # a Python call; open=False, so that a row that fails to fail connects to nothing
            eval(given, {"Router": functools.partial(dbrouter.Router, open=False)})  # noqa: S307 - the README's own rows
    assert type(info.value) is expected
    assert message in str(info.value), str(info.value)
