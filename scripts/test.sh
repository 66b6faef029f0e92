#!/usr/bin/env bash
# Sets up ./.venv (if needed), lints (ruff check + ruff format --check, settings in pyproject.toml),
# runs the test suite and lists the 15 slowest tests; fails when either the lint or a test fails.
#   ./scripts/test.sh            every test (what CI runs), on TEST_WORKERS pytest-xdist workers (default 2; 0: one
#                                process), a test file per worker at a time (its module fixtures built once)
#   ./scripts/test.sh --quick    the quick tier, -m "not slow": no Ray, no subprocess, no moto (< 2 min), one process
# Any other argument goes to pytest as it is (a file, -k EXPR, -x, --durations=0, ...), run in one process.
# A test still running after 6 minutes has every thread's stack dumped (faulthandler_timeout): a hang says where.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
args=()
for a in "$@"; do
  if [ "$a" = --quick ]; then args+=(-m "not slow"); else args+=("$a"); fi
done
workers=${TEST_WORKERS:-2}
[ $# != 0 ] || [ "$workers" = 0 ] || args+=(-n "$workers" --dist loadfile --no-loadscope-reorder)  # the whole suite only
lint=0
.venv/bin/ruff check --quiet . && .venv/bin/ruff format --check --quiet . || lint=$?
[ "$lint" = 0 ] || echo "lint failed: run .venv/bin/ruff format . && .venv/bin/ruff check --fix . and fix what is left" >&2
tests=0
.venv/bin/python -m pytest -q --durations=15 -o faulthandler_timeout=360 ${args[@]+"${args[@]}"} || tests=$?
[ "$tests" != 0 ] && exit "$tests"
exit "$lint"
