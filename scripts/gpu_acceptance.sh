#!/usr/bin/env bash
# The GPU path's acceptance run (scripts/gpu_acceptance.py has the stages): kernels built and
# self-checked on the GPU, tests/ops on CUDA, permute_bench at the paper's shapes, a world-1
# NCCL checkpoint round trip, and the 0.9B width PathB4 vs Indep-MoE; under 8 minutes on one
# H100; the table for benchmarks/RESULTS.md goes to $OUT/gpu_acceptance.md (else runs/).
#
# On the lent GPU machine (no network, no megatron-core): first, on the dev machine,
#   bash scripts/gpu_wheelhouse.sh
# then run `bash scripts/gpu_acceptance.sh` there with carry=["wheelhouse"]; the wheels of
# whatever does not import are unpacked into build/gpu_site (nothing else is installed).
# On CPU (CI): `bash scripts/gpu_acceptance.sh --dry-run` checks the wheelhouse and runs every
# stage at tiny sizes, then checks the table. Other options: --help.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi
# The launchers call `python` and `torchrun`: make both the interpreter that holds torch.
SHIMS=build/gpu_bin
EXE=$("$PY" -c 'import sys; print(sys.executable)')
mkdir -p "$SHIMS"
ln -sf "$EXE" "$SHIMS/python"
printf '#!/usr/bin/env bash\nexec %q -m torch.distributed.run "$@"\n' "$EXE" >"$SHIMS/torchrun"
chmod +x "$SHIMS/torchrun"
export PATH="$PWD/$SHIMS:$PATH"
exec "$PY" scripts/gpu_acceptance.py "$@"
