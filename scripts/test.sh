#!/usr/bin/env bash
# The whole test suite: unit, runtime (real Mosquitto), model parity and end-to-end.
# Installs what it needs first (scripts/setup.sh). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
