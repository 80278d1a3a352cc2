#!/usr/bin/env bash
# The main job: a whole cluster on this machine answering a prompt (e2llm demo).
# Installs what it needs first (scripts/setup.sh). Extra arguments go to `e2llm demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
E2LLM_EXTRAS=fog,demo bash scripts/setup.sh
exec .venv/bin/e2llm demo "$@"
