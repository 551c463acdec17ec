"""A failover drill from Python: kill the primary under load, promote a replica, measure.

    python examples/failover_drill.py [--engine postgres|mariadb] [--duration 15] [--out drill-report]

The drill starts its own local cluster (primary + 2 replicas, behind fault proxies),
runs a read/write workload through a Router, SIGKILLs the primary at --fault-at,
promotes the most advanced replica a few seconds later, and reports what the
application saw: read and write availability, write downtime, lost writes. It
writes a JSON report and an HTML chart to --out. DBROUTER_PRIMARY is ignored.

The same from the shell: dbrouter drill --local postgres --scenario kill-primary-promote
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import dbrouter  # noqa: F401 - import it early: it loads the MySQL driver's C extension before anything loads ssl
from dbrouter.drill import DrillOptions, run_drill


def main() -> int:
    parser = argparse.ArgumentParser(description="kill the primary under load and measure the failover")
    parser.add_argument("--engine", choices=("postgres", "mariadb"), default="postgres")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds of workload")
    parser.add_argument("--fault-at", type=float, default=None, help="seconds in (default: a third of --duration)")
    parser.add_argument("--out", type=Path, default=Path("drill-report"), help="directory for the JSON and HTML report")
    args = parser.parse_args()

    options = DrillOptions(
        scenario="kill-primary-promote",
        local=args.engine,                    # a throwaway local cluster, started and destroyed by the drill
        duration=args.duration,
        fault_at=args.duration / 3 if args.fault_at is None else args.fault_at,
        promote_after=min(3.0, args.duration / 4),  # how long the cluster has no primary
        threads=4,                            # workload threads, 30% writes by default
        out=args.out,
        live=sys.stdout.isatty(),             # a live status line, only on a terminal
    )
    # Raises ConfigurationError for bad options, before anything starts. Prints its own
    # summary; the numbers are also in report.results.
    report = run_drill(options)

    results = report.results
    json_path = args.out / f"dbrouter-drill-{report.scenario}.json"
    html_path = args.out / f"dbrouter-drill-{report.scenario}.html"
    print()
    print(f"read availability: {results['read_availability']:.1f}%  (replicas kept serving reads)")
    print(f"write availability: {results['write_availability']:.1f}%")
    print(f"write downtime: {results['write_unavailability']:.2f}s  (from the first failed write to the first "
          "write on the new primary)")
    print(f"lost writes: {results['lost_writes']}  (acknowledged, then missing from the new primary)")
    print(f"JSON report: {json_path}")
    print(f"HTML chart: {html_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
