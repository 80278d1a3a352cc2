#!/usr/bin/env bash
# Lint, format and type checks, as CI runs them (scripts/setup.sh installs the tools).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
