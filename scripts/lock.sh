#!/usr/bin/env bash
# Refreshes requirements/cpu.lock: resolves pyproject.toml's dependencies (with the test extras)
# anew with pip-tools, torch pinned to its CPU build, in a throwaway venv. Run it after changing
# dependencies in pyproject.toml, then run ./scripts/test.sh and commit the lock with the change.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH=${TORCH:-2.13.0+cpu}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"${PYTHON:-python3}" -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install -q pip-tools
echo "torch==$TORCH" > "$tmp/torch.txt"
"$tmp/venv/bin/pip-compile" -q --extra test --strip-extras --no-header --no-emit-index-url --no-emit-find-links \
  -c "$tmp/torch.txt" -o "$tmp/cpu.lock" pyproject.toml
{ echo "# The exact versions CI passed with (torch: the CPU build). Refresh: scripts/lock.sh (see README)."
  cat "$tmp/cpu.lock"; } > requirements/cpu.lock
echo "wrote requirements/cpu.lock ($(grep -c '==' requirements/cpu.lock) pins)"
