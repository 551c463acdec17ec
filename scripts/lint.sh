#!/usr/bin/env bash
# Lint and type gates: ruff (rules in pyproject.toml [tool.ruff.lint]) and mypy --strict
# ([tool.mypy]) on the dbrouter package. Runs both, then exits non-zero if either found anything.
set -uo pipefail
cd "$(dirname "$0")/.."

status=0
.venv/bin/ruff check dbrouter || status=1
.venv/bin/mypy dbrouter || status=1
exit "$status"
