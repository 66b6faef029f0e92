#!/usr/bin/env bash
# Creates ./.venv and installs the project from the lock file (requirements/cpu.lock: the exact
# versions CI passed with, torch's CPU build), then the project itself without resolving again.
# Idempotent: skips pip when neither the lock nor pyproject.toml changed since the last install.
#   TORCH_BUILD=default  installs the registry's default torch 2.13.0 build for the platform instead
#                        (on Linux x86_64 a CUDA build, ~6 GB) — for GPU machines.
#   PIP_EXTRA_INDEX_URL  where pip finds torch 2.13.0+cpu when no local wheel store has it
#                        (PyTorch's CPU wheel index).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOCK=requirements/cpu.lock
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.installed-$(cat pyproject.toml "$LOCK" | sha1sum | cut -c1-12)-${TORCH_BUILD:-cpu}
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  lock=$LOCK
  if [ "${TORCH_BUILD:-cpu}" = default ]; then
    lock=$(mktemp); sed 's/^torch==\(.*\)+cpu$/torch==\1/' "$LOCK" > "$lock"
  fi
  .venv/bin/python -m pip install -q -r "$lock"
  .venv/bin/python -m pip install -q --no-deps -e .
  rm -f .venv/.installed-*
  touch "$stamp"
fi
