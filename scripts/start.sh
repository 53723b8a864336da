#!/usr/bin/env bash
# Set up (once) and run the service: creates .venv, installs the pinned requirements, starts
# hypercorn exactly as the Procfile does. Needs OPENAI_API_KEY; PORT defaults to 8000.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
: "${OPENAI_API_KEY:?set OPENAI_API_KEY (or run against a fake: see README)}"
export PORT="${PORT:-8000}"
echo "Starting on port ${PORT}, every interface: open http://127.0.0.1:${PORT}/  (Ctrl+C to stop)"
exec .venv/bin/hypercorn --config file:hypercorn_config.py app:app --bind "0.0.0.0:${PORT}"
