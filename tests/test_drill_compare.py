"""``dbrouter drill compare``: real drill reports side by side, reports of an older version,
and files that are no drill report.

Two real drills, run once for the module: a kill-and-promote on a local cluster of its own,
and a shell drill whose fault does nothing on the session's PostgreSQL cluster (no second
cluster to start).
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from dbrouter import cli
from dbrouter.cli import write_router_config
from dbrouter.drill import DrillOptions, run_drill
from dbrouter.drill.figures import format_difference, format_figure

CLI = [sys.executable, "-m", "dbrouter.cli"]


@pytest.fixture(scope="module")
def reports(pg_cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(A, B): A a kill-primary-promote on its own cluster, B a shell drill with no fault."""
    base = tmp_path_factory.mktemp("compare")
    run_drill(DrillOptions(scenario="kill-primary-promote", local="postgres", duration=4.0, fault_at=1.0,
                           promote_after=0.5, recover_after=None, threads=4, live=False, out=base / "a"),
              io.StringIO())
    config = base / "dbrouter.toml"
    write_router_config(pg_cluster, config)
    run_drill(DrillOptions(scenario="shell", config=str(config), inject="true", recover_after=None, duration=2.0,
                           fault_at=0.5, threads=2, failover_wait=1.5, live=False, out=base / "b",
                           table="dbrouter_drill_compare"), io.StringIO())
    return base / "a" / "dbrouter-drill-kill-primary-promote.json", base / "b" / "dbrouter-drill-shell.json"


def compare(capsys: pytest.CaptureFixture[str], *paths: Path | str) -> tuple[int, str, str]:
    code = cli.main(["drill", "compare", *map(str, paths)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def row(table: str, label: str) -> list[str]:
    """The cells of the row whose label is ``label`` (cells are 3 or more spaces apart)."""
    for line in table.splitlines():
        if line.strip().startswith(label) and re.match(rf"\s*{re.escape(label)}(\s{{3}}|$)", line):
            return re.split(r"\s{3,}", line.strip())[1:]
    raise AssertionError(f"no row {label!r} in\n{table}")


@pytest.mark.postgres
@pytest.mark.slow
def test_two_real_drills_side_by_side_with_the_difference(reports: tuple[Path, Path],
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    a_path, b_path = reports
    a, b = (json.loads(path.read_text()) for path in reports)
    code, out, err = compare(capsys, a_path, b_path)
    assert code == 0 and err == ""
    header = out.split("\n---", 1)[0]
    for shown in ("A", "B", "B - A", "kill-primary-promote", "shell", "postgres", "dbrouter-drill-shell.json"):
        assert shown in header, shown
    for report in (a, b):  # the date of each run, from the report
        assert datetime.fromisoformat(report["started"]).strftime("%Y-%m-%d %H:%M UTC") in header

    # The figures are the reports', with the HTML page's units; B - A where both are numbers.
    for label, key in (("read availability", "read_availability"), ("write availability", "write_availability"),
                       ("write unavailability", "write_unavailability")):
        first, second = a["results"][key], b["results"][key]
        assert row(out, label) == [format_figure(key, first), format_figure(key, second),
                                   format_difference(key, first, second)]
    assert row(out, "read availability")[0].endswith(" %") and row(out, "write availability")[2].endswith(" pp")
    failovers = sum(e["name"] == "failover" for e in a["events"])
    assert failovers >= 1
    assert row(out, "failovers") == [str(failovers), "0", str(-failovers)]
    new_primary = row(out, "time to new primary")
    assert new_primary[0].endswith(" s") and 0 < float(new_primary[0][:-2]) < 3 and new_primary[1] == "no failover"
    assert row(out, "lost writes")[:2] == [str(a["results"]["lost_writes"]), "0"]
    assert row(out, "NoPrimaryAvailable")[0] == str(a["results"]["errors_by_kind"]["NoPrimaryAvailable"])
    assert row(out, "NoPrimaryAvailable")[1] == "0"  # B has the figure: no such error
    for label in ("read p50", "read p99", "read max", "write p50", "write p99", "write max", "all p99"):
        cells = row(out, label)
        assert cells[0].endswith(" ms") and cells[1].endswith(" ms") and cells[2].endswith(" ms"), (label, cells)
    assert row(out, "failover_wait") == ["0.00 s", "1.50 s", "+1.50 s"]
    assert row(out, "threads") == ["4", "2", "-2"]
    assert row(out, "write outages")[0] == format_figure("write_outages", a["results"]["write_outages"][:1])
    # Aligned: every row of the body is as wide as the header's rule at most, each column right-aligned.
    lines = out.rstrip("\n").splitlines()
    rule = next(line for line in lines if set(line) == {"-"})
    assert all(len(line) <= len(rule) for line in lines)
    ends = {tuple(m.end() for m in re.finditer(r"\S+(?: \S+)*", line))[1:]
            for line in lines for label in ("threads", "failovers", "read availability", "failover_wait")
            if line.strip().startswith(label)}
    assert len(ends) == 1 and len(next(iter(ends))) == 3, ends


@pytest.mark.postgres
@pytest.mark.slow
def test_the_command_line_with_three_reports_has_no_difference_column(reports: tuple[Path, Path]) -> None:
    a_path, b_path = reports
    done = subprocess.run([*CLI, "drill", "compare", str(a_path), str(b_path), str(a_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    header = done.stdout.split("\n---", 1)[0]
    assert header.split("\n")[0].split() == ["A", "B", "C"] and "B - A" not in header
    assert header.count("kill-primary-promote") == 2 and header.count("promote.json") == 2  # A and C


@pytest.mark.postgres
@pytest.mark.slow
def test_a_report_of_an_older_version_shows_dashes_not_a_crash(reports: tuple[Path, Path], tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    a_path, _ = reports
    old = json.loads(a_path.read_text())
    for key in ("started", "settings", "events"):
        del old[key]
    for key in list(old["results"]):
        if re.match(r"(read|write)_(p50|p99|max)_latency$", key):
            del old["results"][key]
    old["results"]["write_outages"] = "1.0-2.0"  # a figure of another shape
    old["results"]["read_availability"] = "high"
    del old["results"]["errors_by_kind"]
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    code, out, err = compare(capsys, path, a_path)
    assert code == 0 and err == ""
    for label in ("read p50", "write max", "failovers", "time to new primary", "threads", "failover_wait",
                  "write outages", "read availability", "NoPrimaryAvailable", "unknown-outcome writes"):
        cells = row(out, label)
        assert cells[0] == "-" and cells[1] != "-", (label, cells)
        assert len(cells) == 2, (label, cells)  # no difference with a missing figure
    assert row(out, "lost writes")[0] == str(old["results"]["lost_writes"])  # what it has is shown
    assert "(file time)" in out.split("\n---", 1)[0]  # no date in the report: the file's


def write(path: Path, data: Any) -> Path:
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def minimal(path: Path) -> Path:
    return write(path, {"scenario": "kill-primary", "engine": "mariadb", "results": {"read_availability": 99.5}})


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.json", None, "no such file"),
        ("text.json", "drill: kill-primary on postgres\n", "not JSON (Expecting value: line 1 column 1"),
        ("truncated.json", '{"scenario": "x", "results": {', "not JSON"),
        ("binary.json", b"\xff\xfe\x00garbage", "not JSON"),
        ("list.json", [1, 2], "not a drill report (a JSON list, not an object)"),
        ("chaos.json", {"seed": 7, "engine": "postgres"}, "not a drill report (no 'scenario' or 'results')"),
        ("odd.json", {"scenario": "x", "engine": "postgres", "results": [1]}, "not a drill report (no 'results')"),
        ("adir", "dir", "cannot read it"),
    ],
)
def test_a_file_that_is_no_drill_report_is_one_line_naming_it_and_exit_2(
        name: str, content: Any, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = minimal(tmp_path / "good.json")
    bad = tmp_path / name
    if content == "dir":
        bad.mkdir()
    elif isinstance(content, bytes):
        bad.write_bytes(content)
    elif content is not None:
        write(bad, content)
    for order in ((good, bad), (bad, good)):
        code, out, err = compare(capsys, *order)
        assert code == 2 and out == ""
        assert err.count("\n") == 1 and err.startswith(f"dbrouter: {bad}: "), err
        assert message in err, err


def test_handmade_reports_compare_without_drills(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for run in ("x", "y"):
        (tmp_path / run).mkdir()
    first = minimal(tmp_path / "x" / "dbrouter-drill-kill-primary.json")
    second = write(tmp_path / "y" / "dbrouter-drill-kill-primary.json",
                   {"scenario": "kill-primary", "engine": "mariadb", "started": "2025-03-04T05:06:07+00:00",
                    "results": {"read_availability": 99.75, "time_to_detect": None, "errors_by_kind": {}}})
    code, out, err = compare(capsys, first, second)
    assert code == 0, err
    header = out.split("\n---", 1)[0]
    assert "2025-03-04 05:06 UTC" in header
    assert "x/dbrouter-drill-kill-" in header and "y/dbrouter-drill-kill-" in header  # one file name: the folders
    assert row(out, "read availability") == ["99.500 %", "99.750 %", "+0.250 pp"]
    assert row(out, "time to detect the fault") == ["-", "not detected"]
    assert row(out, "(none)") == ["-", "0"]  # no error in either; only B has the figure


def test_compare_takes_no_drill_options_and_needs_two_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = minimal(tmp_path / "good.json")
    assert cli.main(["drill", "--quiet", "--threads", "3", "compare", str(good), str(good)]) == 2
    assert "drill compare takes no drill options (got --quiet, --threads)" in capsys.readouterr().err
    assert cli.main(["drill", "compare", str(good)]) == 2
    assert "needs at least two reports" in capsys.readouterr().err


def test_drill_without_compare_parses_as_before() -> None:
    args = cli.build_parser().parse_args(["drill", "--local", "postgres", "--scenario", "kill-primary", "--inject",
                                          "compare", "--out", "compare"])
    assert args.drill_action is None and args.inject == "compare" and args.local == "postgres"
    assert not hasattr(cli.build_parser().parse_args(["demo"]), "drill_action")


def test_differences_have_a_sign_and_the_unit() -> None:
    assert format_difference("read_availability", 99.0, 99.5) == "+0.500 pp"
    assert format_difference("write_unavailability", 2.0, 1.25) == "-0.75 s"
    assert format_difference("p99_latency", 0.010, 0.0123) == "+2.3 ms"
    assert format_difference("lost_writes", 3, 1) == "-2"
    assert format_difference("time_to_detect", 0.5, 0.501) == "0.00 s"  # rounds to nothing: no sign
    assert format_difference("time_to_detect", None, 0.5) == ""
    assert format_difference("sync", True, False) == ""
    assert format_figure("write_ratio", 0.3) == "30 %"
