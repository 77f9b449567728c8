#!/usr/bin/env bash
# The main job: the quick arena. Trains every registered architecture that has a `-quick` preset
# (standard, MoD, DTF, ...) on the default corpus (Shakespeare, fetched once into the cache) on
# CPU, three seeds each, at equal training FLOPs and at equal wall-clock time, scores them in bits
# per byte with the one evaluator and writes arena/quick/report.md, report.json and plots.
# Run again: the finished arms are kept (an interrupted arena continues where it stopped).
# Arguments go to `dynlm arena`, e.g. `make quickstart ARGS="--archs standard,mod --seeds 0"`.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${DYNLM_VENV:-.venv}/bin
OUT=${DYNLM_ARENA_OUT:-arena/quick}
"$BIN/dynlm" info
if [ -f "$OUT/settings.json" ]; then
    "$BIN/dynlm" arena --resume "$OUT" "$@"
else
    "$BIN/dynlm" arena quick --out "$OUT" "$@"
fi
