#!/usr/bin/env bash
# The whole job end to end on an embedded default: see scripts/demo.py.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
