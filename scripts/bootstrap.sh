#!/usr/bin/env bash
# Create ./.venv and install geokd (editable) with its dev, demo and gguf extras. Safe to re-run.
#
# torch: the pinned CPU wheel by default (it is what CI and laptops without a GPU want). On a CUDA
# machine, install your CUDA build of torch into .venv first, or set GEOKD_TORCH (for example
# GEOKD_TORCH="torch==2.13.0 --index-url <your CUDA wheel index>"); an importable torch in .venv
# is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    # shellcheck disable=SC2086
    .venv/bin/python -m pip install --quiet ${GEOKD_TORCH:-torch==2.13.0}
fi
.venv/bin/python -m pip install --quiet -e ".[dev,demo,gguf]"
