#!/usr/bin/env bash
# Prepare a fresh Debian/Ubuntu machine: Mosquitto (for tests and the demo's --mosquitto),
# docker-compose (to validate compose.yaml),
# a virtualenv in .venv with the project and its extras. Safe to re-run; quick when done.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need_apt+=(mosquitto)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need_apt+=(python3-venv)
# validates compose.yaml (no Docker engine needed); the compose tests skip without it
command -v docker-compose >/dev/null 2>&1 || need_apt+=(docker-compose)
if [ ${#need_apt[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing ${need_apt[*]} with apt-get" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

extras="${E2LLM_EXTRAS:-dev}"
stamp=".venv/.e2llm-installed-$extras"
fresh() { [ -f "$1" ] && ! [ pyproject.toml -nt "$1" ]; }
in_dev() {  # pyproject's dev extra holds fog, export, sim and demo
  local e
  for e in ${1//,/ }; do
    case "$e" in fog | export | sim | demo | dev) ;; *) return 1 ;; esac
  done
}
# so after scripts/test.sh, scripts/demo.sh installs nothing
if in_dev "$extras" && fresh .venv/.e2llm-installed-dev; then
  stamp=.venv/.e2llm-installed-dev
fi
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if ! fresh "$stamp"; then
  echo "installing e2llm-edge[$extras] into .venv (log: .venv/setup.log)" >&2
  if ! { .venv/bin/python -m pip install -q --upgrade pip &&
         .venv/bin/python -m pip install -q -e ".[$extras]"; } >.venv/setup.log 2>&1; then
    tail -n 30 .venv/setup.log >&2
    echo "setup failed: see .venv/setup.log" >&2
    exit 1
  fi
  touch "$stamp"
fi
