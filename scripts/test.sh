#!/usr/bin/env bash
# Sets up ./.venv (if needed) and runs the test suite, then lists the 15 slowest tests.
#   ./scripts/test.sh            every test (what CI runs)
#   ./scripts/test.sh --quick    the quick tier, -m "not slow": no Ray, no subprocess, no moto (< 2 min)
# Any other argument goes to pytest as it is (a file, -k EXPR, -x, --durations=0, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
args=()
for a in "$@"; do
  if [ "$a" = --quick ]; then args+=(-m "not slow"); else args+=("$a"); fi
done
exec .venv/bin/python -m pytest -q --durations=15 ${args[@]+"${args[@]}"}
