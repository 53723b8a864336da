#!/usr/bin/env bash
# Set up (once) and run the service: creates .venv, installs the pinned requirements, starts
# hypercorn exactly as the Procfile does. Needs OPENAI_API_KEY; PORT defaults to 8000.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${OPENAI_API_KEY:-}" ]; then  # said as the service says a bad setting: one line, exit code 2
  echo "configuration error: OPENAI_API_KEY is required (or run against the fake: see README)" >&2
  exit 2
fi
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
export PORT="${PORT:-8000}"
echo "Starting on port ${PORT}, every interface: open http://127.0.0.1:${PORT}/  (Ctrl+C to stop)"
exec .venv/bin/hypercorn --config file:hypercorn_config.py app:app --bind "0.0.0.0:${PORT}"
