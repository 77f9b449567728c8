#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment and installs dynlm into it.
#
# - Keeps an existing PyTorch: if the Python used to create the environment already has torch,
#   the environment sees it (--system-site-packages) and nothing replaces it.
# - Otherwise installs torch==2.13.0: on a machine without an NVIDIA GPU that is the CPU build where a
#   local wheel is provided (set DYNLM_TORCH_SPEC / PIP_INDEX_URL to choose another build).
# - Re-runs are cheap: nothing is reinstalled unless pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${DYNLM_VENV:-.venv}
EXTRAS=${DYNLM_EXTRAS:-dev,hf}
STAMP="$VENV/.dynlm-installed"
WANT="$(cat pyproject.toml | sha256sum | cut -c1-16)-$EXTRAS"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && "$VENV/bin/python" -c "import dynlm, torch" 2>/dev/null; then
  exit 0
fi

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
  echo "setup: dynlm needs Python >= 3.10 ($PYTHON is $("$PYTHON" --version 2>&1)); set PYTHON=..." >&2
  exit 2
fi

if [ ! -x "$VENV/bin/python" ]; then
  if "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "setup: keeping the existing torch $("$PYTHON" -c 'import torch; print(torch.__version__)')"
    "$PYTHON" -m venv --system-site-packages "$VENV"
  else
    "$PYTHON" -m venv "$VENV"
  fi
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if [ -n "${DYNLM_TORCH_SPEC:-}" ]; then
    spec=$DYNLM_TORCH_SPEC
  else
    spec="torch==2.13.0"
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
      echo "setup: NVIDIA GPU found; installing $spec (CUDA build from the package index)"
    else
      echo "setup: no GPU found; installing $spec (CPU build where a local wheel is provided)"
    fi
  fi
  "${PIP[@]}" install "$spec"
fi

echo "setup: installing dynlm[$EXTRAS] (editable)"
"${PIP[@]}" install -e ".[$EXTRAS]"
echo "$WANT" > "$STAMP"
echo "setup: ready ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
