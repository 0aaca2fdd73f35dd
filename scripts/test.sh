#!/usr/bin/env bash
# The test command: set up whatever is missing (scripts/setup.sh), then run the
# whole suite (the linter, ruff, then unit tests and real multi-rank mpirun
# tests). Extra arguments go to pytest, e.g. scripts/test.sh -k schedule.
set -euo pipefail
case "${1:-}" in --help|-h) sed -n '2,4p' "$0"; exit 0 ;; esac
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup.sh"
cd "$ROOT"
"$ROOT/.venv/bin/ruff" check .   # the style CI holds (pyproject.toml [tool.ruff])
exec "$ROOT/.venv/bin/python" -m pytest -q -rs --durations=15 "$@" tests
