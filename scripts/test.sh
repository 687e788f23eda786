#!/usr/bin/env bash
# The test command: install what is missing, lint, check the import contracts (pyproject.toml,
# docs/ARCHITECTURE.md), then run the whole suite against real peers.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/lint-imports --no-cache
# Two workers by default (EDGE_TEST_WORKERS=0 runs in one process): most tests wait on real time (camera
# streams, brokers, timeouts) rather than on a core, so two halve the run on a 2-core machine (17 -> 9 min).
exec .venv/bin/python -m pytest -p no:cacheprovider -n "${EDGE_TEST_WORKERS:-2}" "$@"
