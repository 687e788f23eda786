#!/usr/bin/env bash
# The test command: install what is missing, lint, check the import contracts (pyproject.toml,
# docs/ARCHITECTURE.md), then run the whole suite against real peers.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/lint-imports --no-cache
exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
