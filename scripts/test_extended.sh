#!/usr/bin/env bash
# The tests left out of the default run (pytest marker `extended`, pyproject.toml): more variants of properties
# the default run proves (every audio codec, H.265 signed video over RTSP, the demo on S3, a second store
# outage shape). Run before a release, or when touching the camera recorder or the S3 store.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m pytest -p no:cacheprovider -m extended "$@"
