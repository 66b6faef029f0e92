#!/usr/bin/env bash
# Creates ./.venv and installs the project with its test extras (idempotent: skips pip when
# pyproject.toml has not changed since the last successful install).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # One resolution for everything: moto[server] and s3fs must be resolved together
  # (see ../shared/spec/platform-notes.md).
  .venv/bin/python -m pip install -q -e ".[test]"
  rm -f .venv/.installed-*
  touch "$stamp"
fi
