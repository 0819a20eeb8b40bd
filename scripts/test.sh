#!/usr/bin/env bash
# Set up, then run the test suite (long runs are behind the `slow` marker).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -m "not slow" "$@"
