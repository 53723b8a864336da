#!/usr/bin/env bash
# Set up (once) and run every test: creates .venv, installs the pinned dev requirements, runs
# pytest. Extra arguments go to pytest (e.g. scripts/test.sh -k websocket).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
exec .venv/bin/python -m pytest "$@"
