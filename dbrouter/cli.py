"""The ``dbrouter`` command: local clusters and the demo."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import dbrouter  # noqa: F401 - loads the mysql C extension before anything imports ssl

from ._files import write_private
from .config import check_range
from .errors import ConfigurationError, DbRouterError

if TYPE_CHECKING:
    from .cluster import LocalCluster

__all__ = ["main"]

ENGINES = ("postgres", "mariadb")


def _state_path(engine: str, given: str | None) -> Path:
    if given:
        return Path(given)
    base = Path(os.environ.get("DBROUTER_HOME", Path.home() / ".dbrouter"))
    return base / "clusters" / f"{engine}.json"


def _cluster_up(args: argparse.Namespace) -> int:
    from .cluster import make_cluster

    state = _state_path(args.engine, args.state)
    if state.exists():
        print(f"a cluster is already recorded in {state}; run 'dbrouter cluster down' first", file=sys.stderr)
        return 2
    start = time.monotonic()
    cluster = make_cluster(args.engine, replicas=args.replicas, sync=args.sync,
                           base_dir=Path(args.dir) if args.dir else None)
    cluster.start()
    state.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    cluster.save_state(state)
    config = state.with_suffix(".toml")
    write_router_config(cluster, config)
    cluster.detach()
    print(f"{args.engine} cluster up in {time.monotonic() - start:.1f}s (state: {state})")
    _print_status(cluster, as_json=False)
    print(f"router config: {config}  (dbrouter status --config {config})")
    return 0


def write_router_config(cluster, path: Path) -> None:  # type: ignore[no-untyped-def]
    """A dbrouter TOML config for a local cluster, created with mode 0600 (it holds the password)."""
    replicas = ", ".join(json.dumps(node.url) for node in cluster.replicas)  # a JSON string is a TOML string
    text = (
        "# written by dbrouter cluster up\n"
        f"primary = {json.dumps(cluster.primary.url)}\n"
        f"replicas = [{replicas}]\n\n"
        "[monitor]\nhealth_interval = 1.0\n"
    )
    write_private(path, text)


def _load(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from .cluster import LocalCluster

    state = _state_path(args.engine, args.state)
    if not state.exists():
        raise DbRouterError(f"no {args.engine} cluster recorded in {state}; run 'dbrouter cluster up' first")
    return LocalCluster.load_state(state), state


def _cluster_down(args: argparse.Namespace) -> int:
    cluster, state = _load(args)
    cluster.destroy()
    state.unlink()
    state.with_suffix(".toml").unlink(missing_ok=True)
    print(f"{cluster.engine} cluster stopped and removed")
    return 0


def _cluster_status(args: argparse.Namespace) -> int:
    cluster, _state = _load(args)
    _print_status(cluster, as_json=args.json)
    cluster.detach()
    return 0


def _print_status(cluster: LocalCluster, *, as_json: bool) -> None:
    rows = cluster.status()
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'node':<10} {'role':<8} {'port':>6} {'pid':>8}  url (the password is in the router config)")
    for row, node in zip(rows, cluster.nodes, strict=True):  # status() has one row per node
        print(f"{row['name']:<10} {row['role']:<8} {row['port']:>6} {row['pid'] or '-':>8}  {node.redacted_url}")


def _status(args: argparse.Namespace) -> int:
    """Probe every node of a configured cluster and print the table (or JSON)."""
    from .router import Router
    from .status import node_rows, render_table

    check_range("", "--watch", args.watch, low=0, high=86400)
    check_range("", "--count", args.count, low=1, high=10**9, integer=True)

    # Pools stay empty (min_size 0): the status probes nodes, it does not load them.
    router = Router.from_config(args.config, min_size=0)
    try:
        timeout = router.config.connect.connect_timeout + 5
        for refresh in range(args.count if args.watch else 1):
            if refresh:
                time.sleep(args.watch)
            router.wait_for_probes(1, timeout=timeout)
            rows = node_rows(router)
            split = router.stats()["split_brain"]
            if args.json:
                print(json.dumps({"nodes": rows, "primary": router.primary.name, "split_brain": split}), flush=True)
            else:
                if args.watch:
                    print(f"\n{time.strftime('%H:%M:%S')}", flush=True)
                print(render_table(rows, split_brain=split), flush=True)
        unreachable = [row for row in node_rows(router) if not row["reachable"]]
        return 3 if unreachable else 0
    finally:
        router.close()


def _seconds(text: str) -> float:
    """'5', '5s', '500ms', '2m' -> seconds."""
    value = text.strip().lower()
    for suffix, scale in (("ms", 0.001), ("s", 1.0), ("m", 60.0)):
        if value.endswith(suffix):
            return float(value[: -len(suffix)]) * scale
    return float(value)


def _percent(text: str) -> float:
    return float(text.strip().rstrip("%"))


def _drill_options(args: argparse.Namespace) -> Any:
    from .drill import DrillOptions, Limit

    limits = []
    for name, parse in (("max_write_downtime", _seconds), ("min_read_availability", _percent),
                        ("min_write_availability", _percent), ("max_lost_writes", float), ("max_latency", _seconds)):
        text = getattr(args, name)
        if text is not None:
            try:
                limits.append(Limit(name.replace("_", "-"), parse(text)))
            except ValueError:
                raise ConfigurationError(f"--{name.replace('_', '-')}: cannot read {text!r} as a number") from None
    try:
        return DrillOptions(
            scenario=args.scenario, local=args.local, config=args.config, replicas=args.replicas, sync=args.sync,
            threads=args.threads, write_ratio=args.write_ratio, duration=_seconds(args.duration),
            rate=args.rate, fault_at=_seconds(args.fault_at),
            recover_after=None if args.no_recover else _seconds(args.recover_after),
            promote_after=_seconds(args.promote_after), latency=_seconds(args.latency), inject=args.inject,
            recover=args.recover, failover_wait=None if args.failover_wait is None else _seconds(args.failover_wait),
            out=Path(args.out),
            live=not args.quiet, limits=limits, asyncio=args.asyncio, asyncio_debug=args.asyncio_debug,
        )
    except ValueError as exc:
        raise ConfigurationError(f"cannot read a duration: {exc}") from None


def _drill(args: argparse.Namespace) -> int:
    from .drill import run_drill

    report = run_drill(_drill_options(args))
    for error in report.errors:
        print(f"dbrouter: {error.splitlines()[0]} (the report was written)", file=sys.stderr)
    for limit in report.violated:
        print(f"dbrouter: limit violated: {limit.describe()}", file=sys.stderr)
    return 1 if report.errors else 2 if report.violated else 0


def _compare(args: argparse.Namespace) -> int:
    """``dbrouter drill compare A.json B.json ...``: exit 2, with one line naming the file, for
    a file that is missing or no drill report."""
    from .drill.compare import load_report, render_comparison

    given = sorted(f"--{name.replace('_', '-')}" for name, default in args.drill_defaults.items()
                   if getattr(args, name) != default)
    if given:
        print(f"dbrouter: drill compare takes no drill options (got {', '.join(given)})", file=sys.stderr)
        return 2
    if len(args.reports) < 2:
        print("dbrouter: drill compare needs at least two reports", file=sys.stderr)
        return 2
    try:
        reports = [load_report(Path(path)) for path in args.reports]
    except ConfigurationError as exc:
        print(f"dbrouter: {exc}", file=sys.stderr)
        return 2
    try:
        print(render_comparison(reports), flush=True)
    except BrokenPipeError:  # `| head`: the reader has seen enough (the recipe of Python's signal docs)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0


def _chaos(args: argparse.Namespace) -> int:
    import logging

    from .chaos import run_chaos

    try:
        duration = _seconds(args.duration)
    except ValueError:
        raise ConfigurationError(f"--duration: cannot read {args.duration!r} as a duration") from None
    if not logging.getLogger().handlers:
        # The router logs every breaker and failover event: hundreds of lines under chaos.
        logging.basicConfig(level=logging.ERROR, format="%(name)s: %(message)s")
    report = run_chaos(args.engine, duration, args.seed, args.threads, stream=sys.stdout)
    for line in report.failures:
        print(f"dbrouter: {line}", file=sys.stderr)
    return 0 if report.passed else 1


def _add_drill_arguments(p: argparse.ArgumentParser, *, demo: bool) -> None:
    from .drill import scenario_names

    where = p.add_mutually_exclusive_group()
    where.add_argument("--local", choices=("postgres", "mariadb", "patroni"), default="postgres" if demo else None,
                       help="start a local replication cluster for the drill (patroni: PostgreSQL managed by "
                            "Patroni with etcd, for the patroni-* scenarios)")
    where.add_argument("--config", help="a dbrouter TOML config for a real cluster (use with --scenario shell)")
    p.add_argument("--scenario", default="kill-primary-promote", metavar="NAME",
                   help=f"one of: {', '.join(scenario_names())} (default kill-primary-promote)")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--sync", action="store_true", help="synchronous (PostgreSQL) / semi-synchronous (MariaDB) replication;"
                                                       " Patroni's synchronous_mode: true")
    p.add_argument("--threads", type=int, default=8,
                   help="workers: threads, or with --async asyncio tasks on one event loop (default 8)")
    p.add_argument("--async", dest="asyncio", action="store_true",
                   help="run the workload as asyncio tasks through dbrouter.AsyncRouter (psycopg 3's async "
                        "connection, mysql.connector.aio) on an event loop in a thread of its own, instead of threads "
                        "through Router")
    p.add_argument("--asyncio-debug", action="store_true",
                   help="with --async: asyncio's debug mode on the workload's loop; callbacks that run 5 ms or more "
                        "are counted in the report (slow_callbacks)")
    p.add_argument("--write-ratio", type=float, default=0.3, help="share of writes, 0 to 1")
    p.add_argument("--duration", default="15s" if demo else "20s")
    p.add_argument("--rate", type=float, help="target operations per second over all threads (default: flat out)")
    p.add_argument("--fault-at", default="5s")
    p.add_argument("--recover-after", default="5s", help="time from the fault to the recovery")
    p.add_argument("--no-recover", action="store_true", help="leave the fault in place")
    p.add_argument("--promote-after", default="2s", help="kill-primary-promote: time from the kill to the promotion")
    p.add_argument("--latency", default="50ms", help="latency scenario: delay added each way")
    p.add_argument("--inject", help="shell scenario: command that injects the fault")
    p.add_argument("--recover", help="shell scenario: command that recovers")
    p.add_argument("--failover-wait", default=None,
                   help="router failover_wait: writes wait this long for a new primary (default: the config's, else 0)")
    p.add_argument("--max-write-downtime", help="limit, e.g. 5s: exit non-zero when exceeded")
    p.add_argument("--min-read-availability", help="limit in percent, e.g. 99.9")
    p.add_argument("--min-write-availability", help="limit in percent")
    p.add_argument("--max-lost-writes", help="limit: acknowledged writes missing afterwards")
    p.add_argument("--max-latency", help="limit on the worst latency, e.g. 2s")
    p.add_argument("--out", default=".", help="directory for the report and the chart (default: here)")
    p.add_argument("--quiet", action="store_true", help="no live view")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dbrouter", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    cluster = sub.add_parser("cluster", help="start, inspect and stop a local replication cluster")
    cluster_sub = cluster.add_subparsers(dest="action", required=True)
    for action, helptext in (("up", "start a primary with replicas"), ("down", "stop and remove it"),
                             ("status", "show each node's role")):
        p = cluster_sub.add_parser(action, help=helptext)
        p.add_argument("--engine", choices=ENGINES, default="postgres")
        p.add_argument("--state", help="state file (default ~/.dbrouter/clusters/ENGINE.json)")
        if action == "up":
            p.add_argument("--replicas", type=int, default=2)
            p.add_argument("--sync", action="store_true", help="synchronous / semi-synchronous replication")
            p.add_argument("--dir", help="base directory for the data (default: a new temporary one)")
        if action == "status":
            p.add_argument("--json", action="store_true")
    status = sub.add_parser("status", help="probe each node of a cluster: role, reachability, lag, breaker, pool")
    status.add_argument("--config", required=True, help="a dbrouter TOML config file")
    status.add_argument("--json", action="store_true", help="one JSON document per refresh")
    status.add_argument("--watch", type=float, nargs="?", const=2.0, default=0.0, metavar="SECONDS",
                        help="refresh every SECONDS (default 2) until interrupted or --count refreshes")
    status.add_argument("--count", type=int, default=1_000_000, help="with --watch: stop after this many refreshes")
    drill = sub.add_parser("drill", help="run a workload, inject a fault, report what the application saw",
                           usage="%(prog)s [options]\n       %(prog)s compare A.json B.json [C.json ...]")
    _add_drill_arguments(drill, demo=False)
    # `drill compare` is a subcommand of a command that runs without one: `drill --local ...`
    # parses as before. The drill options' defaults tell `_compare` whether any was given.
    defaults = vars(drill.parse_args([]))
    drill_sub = drill.add_subparsers(dest="drill_action", title="subcommand", metavar="SUBCOMMAND")
    compare = drill_sub.add_parser("compare", help="drill reports side by side (B - A with two)",
                                   prog="dbrouter drill compare",
                                   description="Print the figures of drill reports (the JSON files a drill "
                                               "writes) side by side, one column per report.")
    compare.add_argument("reports", nargs="+", metavar="REPORT", help="a dbrouter-drill-*.json file (at least two)")
    compare.set_defaults(drill_defaults=defaults)
    chaos = sub.add_parser("chaos", help="seeded faults on a local cluster under load; checks the invariants")
    chaos.add_argument("--engine", choices=ENGINES, default="postgres")
    chaos.add_argument("--duration", default="60s", help="length of the run, e.g. 30s or 2m (at least 15s)")
    chaos.add_argument("--seed", type=int, required=True, help="the same seed replays the same faults and timings")
    chaos.add_argument("--threads", type=int, default=32)
    demo = sub.add_parser("demo", help="a drill with sensible defaults on a local PostgreSQL cluster")
    _add_drill_arguments(demo, demo=True)
    return parser


def _exit_on_sigterm() -> None:
    """Turn SIGTERM into a normal exit, so that clusters and proxies the command started
    are torn down (atexit hooks do not run when Python dies of a signal)."""
    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def run(args: argparse.Namespace) -> int:
    """Run a parsed command; raises `DbRouterError` (a `ConfigurationError` for bad input,
    before anything is started) where `main` prints it."""
    handlers = {"up": _cluster_up, "down": _cluster_down, "status": _cluster_status}
    if args.command == "cluster":
        if args.action == "up":
            check_range("", "--replicas", args.replicas, low=0, high=16, integer=True)
        return handlers[args.action](args)
    if args.command == "status":
        return _status(args)
    if args.command == "chaos":
        return _chaos(args)
    if getattr(args, "drill_action", None) == "compare":
        return _compare(args)
    return _drill(args)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _exit_on_sigterm()
    try:
        return run(args)
    except DbRouterError as exc:
        print(f"dbrouter: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
