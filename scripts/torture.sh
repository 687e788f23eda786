#!/usr/bin/env bash
# The full fault suites (issue 6): >= 100 seeded kill -9 points across ingest, seal, send and clear of the
# agent and the receiver; 20 broker outages during a large transfer; the link stalled without a FIN, then
# reset; the receiver SIGKILLed at each step of its commit (tests/test_receiver_crash.py). Each suite prints its seed; replay a failure with FAULTS_SEED=<seed> and the same counts.
# Usage: scripts/torture.sh [extra pytest args]   (env: FAULTS_KILLS, FAULTS_OUTAGES, FAULTS_LARGE_MB)
set -euo pipefail
cd "$(dirname "$0")/.."
export FAULTS_KILLS="${FAULTS_KILLS:-100}"
export FAULTS_OUTAGES="${FAULTS_OUTAGES:-20}"
export FAULTS_LARGE_MB="${FAULTS_LARGE_MB:-400}"
started=$(date +%s)
.venv/bin/python -m pytest -p no:cacheprovider -s -q --timeout 3600 tests/faults tests/test_receiver_crash.py "$@"
echo "torture: kills=${FAULTS_KILLS} outages=${FAULTS_OUTAGES} large=${FAULTS_LARGE_MB}MiB passed in $(( $(date +%s) - started )) s"
