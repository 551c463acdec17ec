"""The command line and the files it writes: bad numbers fail before anything starts, no
password is printed or copied into a report, and files that hold one are 0600 from the start."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import pytest

import dbrouter.chaos.runner
import dbrouter.cluster
import dbrouter.drill.runner
from dbrouter import ConfigurationError, cli
from dbrouter._files import write_private
from dbrouter.cluster._base import write_file
from dbrouter.config import load_router_config
from dbrouter.drill import DrillOptions
from dbrouter.drill.report import DrillReport
from dbrouter.drill.scenarios import DrillTarget

SECRET = "Cli-pw-7f3a-secret"


@pytest.fixture
def nothing_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any cluster, drill or chaos run that would start fails the test instead."""
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("started although the input was bad")

    monkeypatch.setattr(dbrouter.cluster, "make_cluster", refuse)
    monkeypatch.setattr(dbrouter.drill.runner.Drill, "run", refuse)
    monkeypatch.setattr(dbrouter.chaos.runner, "_Chaos", refuse)


def run(argv: list[str]) -> int:
    return cli.run(cli.build_parser().parse_args(argv))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["drill", "--local", "postgres", "--duration", "inf"], "--duration must be > 0 and <= 86400, got inf"),
        (["drill", "--local", "postgres", "--duration", "1e999"], "--duration must be > 0 and <= 86400, got inf"),
        (["drill", "--local", "postgres", "--duration", "nan"], "--duration must be a number > 0"),
        (["drill", "--local", "postgres", "--duration", "2d"], "cannot read a duration"),
        (["drill", "--local", "postgres", "--fault-at", "nan"], "--fault-at must be a number"),
        (["drill", "--local", "postgres", "--recover-after", "nan"], "--recover-after must be a number >= 0"),
        (["drill", "--local", "postgres", "--recover-after", "inf"], "--recover-after must be >= 0 and <= 86400"),
        (["drill", "--local", "postgres", "--promote-after", "inf"], "--promote-after must be >= 0 and <= 86400"),
        (["drill", "--local", "postgres", "--scenario", "latency", "--latency", "inf"], "--latency must be >= 0 and <= 60"),
        (["drill", "--local", "postgres", "--failover-wait", "1e308"], "--failover-wait must be >= 0 and <= 3600"),
        (["drill", "--local", "postgres", "--rate", "nan"], "--rate must be a number > 0"),
        (["drill", "--local", "postgres", "--rate", "inf"], "--rate must be > 0 and <= 1000000"),
        (["drill", "--local", "postgres", "--write-ratio", "nan"], "--write-ratio must be a number >= 0 and <= 1"),
        (["drill", "--local", "postgres", "--threads", "0"], "--threads must be >= 1 and <= 1024, got 0"),
        (["drill", "--local", "postgres", "--threads", "100000"], "--threads must be >= 1 and <= 1024"),
        (["drill", "--local", "postgres", "--replicas", "1000"], "--replicas must be >= 0 and <= 16"),
        (["drill", "--local", "postgres", "--max-latency", "nan"], "--max-latency must be a number"),
        (["drill", "--local", "postgres", "--min-read-availability", "101%"], "--min-read-availability must be >= 0 and <= 100"),
        (["demo", "--duration", "inf"], "--duration must be > 0 and <= 86400"),
        (["chaos", "--seed", "1", "--duration", "inf"], "duration must be >= 15 and <= 86400, got inf"),
        (["chaos", "--seed", "1", "--duration", "nan"], "duration must be a number >= 15"),
        (["chaos", "--seed", "1", "--threads", "0"], "threads must be >= 1 and <= 1024, got 0"),
        (["chaos", "--seed", "1", "--threads", "1000000"], "threads must be >= 1 and <= 1024"),
        (["status", "--config", "/nonexistent.toml", "--watch", "inf"], "--watch must be >= 0 and <= 86400, got inf"),
        (["status", "--config", "/nonexistent.toml", "--watch", "nan"], "--watch must be a number"),
        (["status", "--config", "/nonexistent.toml", "--count", "0"], "--count must be >= 1"),
        (["cluster", "up", "--replicas", "1000"], "--replicas must be >= 0 and <= 16, got 1000"),
        (["cluster", "up", "--replicas", "-1"], "--replicas must be >= 0"),
    ],
)
def test_absurd_numbers_fail_before_anything_starts(argv: list[str], message: str, nothing_starts: None,
                                                    tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DBROUTER_HOME", str(tmp_path))
    with pytest.raises(ConfigurationError) as info:
        run(argv)
    assert message in str(info.value), str(info.value)


def test_main_prints_the_error_and_exits_1(nothing_starts: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["drill", "--local", "postgres", "--duration", "inf"]) == 1
    assert "dbrouter: --duration must be > 0 and <= 86400, got inf" in capsys.readouterr().err


def test_drill_options_are_validated_before_injecting_anything(nothing_starts: None) -> None:
    options = DrillOptions(scenario="kill-primary", local="postgres", duration=float("inf"))
    with pytest.raises(ConfigurationError, match="--duration"):
        dbrouter.drill.runner.run_drill(options)


# -- files that hold a password: 0600 from the start ------------------------------------------


@pytest.fixture
def no_chmod(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Writers must not rely on a chmod after the file exists (a window where the umask's
    0644 applies), and must work under any umask."""
    monkeypatch.setattr(os, "chmod", lambda *a, **k: None)
    monkeypatch.setattr(Path, "chmod", lambda *a, **k: None)
    old = os.umask(0o002)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_write_private_is_0600_from_the_start_and_replaces_a_readable_file(tmp_path: Path, no_chmod: None) -> None:
    path = tmp_path / "secret.txt"
    path.write_text("old")
    fd = os.open(path, os.O_RDONLY)
    os.fchmod(fd, 0o644)  # os.chmod is stubbed out here
    os.close(fd)
    write_private(path, SECRET)
    assert mode(path) == 0o600 and path.read_text() == SECRET
    assert [p.name for p in tmp_path.iterdir()] == ["secret.txt"]  # no temporary file left


def test_cluster_password_file_is_0600_from_the_start(tmp_path: Path, no_chmod: None) -> None:
    write_file(tmp_path / ".pwfile", SECRET + "\n", owner=None)
    assert mode(tmp_path / ".pwfile") == 0o600


def test_router_config_of_cluster_up_is_0600_from_the_start_and_loads(tmp_path: Path, no_chmod: None) -> None:
    url = f"postgresql://dbrouter:{SECRET}@127.0.0.1:{{}}/dbrouter"
    cluster = SimpleNamespace(primary=SimpleNamespace(url=url.format(20001)),
                              replicas=[SimpleNamespace(url=url.format(20002))])
    path = tmp_path / "postgres.toml"
    cli.write_router_config(cluster, path)
    assert mode(path) == 0o600
    config = load_router_config(path)
    assert config.primary == url.format(20001) and [r.url for r in config.replicas] == [url.format(20002)]


@pytest.mark.postgres
def test_cluster_state_is_0600_even_over_a_stale_temporary_file(pg_cluster: Any, tmp_path: Path) -> None:
    path = tmp_path / "postgres.json"
    stale = path.with_name(path.name + ".tmp")
    stale.write_text("{}")
    os.chmod(stale, 0o644)
    pg_cluster.save_state(path)
    assert mode(path) == 0o600
    assert json.loads(path.read_text())["credentials"]["password"] == pg_cluster.password


@pytest.mark.postgres
def test_cluster_status_prints_no_password(pg_cluster: Any, capsys: pytest.CaptureFixture[str]) -> None:
    cli._print_status(pg_cluster, as_json=False)
    cli._print_status(pg_cluster, as_json=True)
    out = capsys.readouterr().out
    assert pg_cluster.password not in out
    assert f"{pg_cluster.primary.scheme}://dbrouter:***@127.0.0.1:{pg_cluster.primary.port}/dbrouter" in out


# -- drill reports: no command, no output, 0600 ------------------------------------------------


def test_shell_commands_are_not_copied_into_notes_or_errors() -> None:
    target = DrillTarget(command_timeout=5)
    target.run_command(f"PGPASSWORD={SECRET} true", "inject")
    assert target.notes == ["inject: the --inject command succeeded"]
    with pytest.raises(ConfigurationError) as info:
        target.run_command(f"echo 'cannot reach postgresql://app:{SECRET}@db1/app' >&2; exit 3 # {SECRET}", "recover")
    message = str(info.value)
    assert "the --recover command failed with exit code 3" in message and "cannot reach postgresql://app:***@db1/app" in message
    assert SECRET not in message
    target.command_timeout = 0.2
    with pytest.raises(ConfigurationError, match="did not finish within 0.2s") as info:
        target.run_command(f"exec sleep 5 # {SECRET}", "inject")  # exec: the kill reaches sleep
    assert SECRET not in str(info.value)


def test_a_drill_report_is_written_0600_from_the_start(tmp_path: Path, no_chmod: None) -> None:
    report = DrillReport(scenario="shell", engine="postgres", settings={}, fault_at=1.0, recover_at=None, duration=2.0,
                         timeline=[], results={}, events=[], notes=["inject: the --inject command succeeded"])
    path = tmp_path / "dbrouter-drill-shell.json"
    report.write_json(path)
    assert mode(path) == 0o600

