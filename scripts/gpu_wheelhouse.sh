#!/usr/bin/env bash
# Dev machine, before a GPU lease: download the wheels the lent GPU machine lacks (Python 3.12,
# x86_64 manylinux; it has torch, numpy, pytest... but no megatron-core and no network) into
# wheelhouse/ (git-ignored), which the device tool carries with the working tree
# (carry=["wheelhouse"]); scripts/gpu_acceptance.sh installs from it offline. Besides
# megatron-core 0.16.1 it holds the small pure or abi3 wheels of the run's other imports, in
# case an image lacks one: the acceptance script installs only what does not import.
#
#   bash scripts/gpu_wheelhouse.sh            # ~7 MB, a few seconds; WHEELHOUSE=DIR elsewhere
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${WHEELHOUSE:-wheelhouse}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
# dist==version: pinned so that the carried set is the one the dry run checked.
WHEELS=(megatron-core==0.16.1 packaging==25.0 psutil==7.1.3 pybind11==3.0.1 tqdm==4.67.1
        tokenizers==0.22.1)
mkdir -p "$DEST"
# --no-deps: megatron-core's own dependency on torch must never be resolved here.
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --abi cp312 --abi abi3 --abi none \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d "$DEST" "${WHEELS[@]}"
printf '%s\n' "${WHEELS[@]}" >"$DEST/REQUIREMENTS.txt"
du -sh "$DEST" | awk -v d="$DEST" '{print "gpu_wheelhouse: " $1 " in " d "/ (carry it: the device tool takes 64 MiB in all)"}'
