#!/usr/bin/env bash
# The main job: trains the quick preset (standard-quick, BPE 2048) on the default corpus
# (Shakespeare, fetched once into the cache) on CPU, evaluates it on the validation and test
# splits (bits per byte) and generates a sample. The run folder is runs/quick.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${DYNLM_VENV:-.venv}/bin
"$BIN/dynlm" info
"$BIN/dynlm" train quick "$@"
