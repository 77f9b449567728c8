#!/usr/bin/env bash
# The main job: shows the environment, then runs the quick demo.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${DYNLM_VENV:-.venv}/bin
"$BIN/dynlm" info
