#!/usr/bin/env bash
# Rewrite scripts/constraints.txt from the working .venv (exact versions of
# every package, direct and transitive, and pip, setuptools and wheel, which
# build Horovod). Run after changing setup.cfg's dependencies, then commit the result.
# The build-only section at the end (what builds source-only dependencies, never in .venv)
# is carried over as it is.
set -euo pipefail
case "${1:-}" in --help|-h) sed -n '2,6p' "$0"; exit 0 ;; esac
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HVD=$(grep -i '^horovod==' "$ROOT/scripts/constraints.txt" | cut -d= -f3)   # the locally built, cached wheel
BUILD_ONLY=$(sed -n '/^# build-only/,$p' "$ROOT/scripts/constraints.txt")
{
  echo "# Exact pins for scripts/setup.sh (pip -c). Regenerate with scripts/freeze.sh."
  "$ROOT/.venv/bin/python" -m pip freeze --all --exclude-editable --disable-pip-version-check | grep -v '^-e ' \
    | sed -E "s/^horovod @ .*/horovod==$HVD/"
  [[ -z "$BUILD_ONLY" ]] || echo "$BUILD_ONLY"
} > "$ROOT/scripts/constraints.txt.tmp"
mv "$ROOT/scripts/constraints.txt.tmp" "$ROOT/scripts/constraints.txt"
echo "wrote $(grep -vc '^#' "$ROOT/scripts/constraints.txt") pins to scripts/constraints.txt"
