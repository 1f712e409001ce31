"""The portable (SSE2/NEON) variant of the CPU row kernels, which an AVX2 machine never picks on
its own: correct against the reference, and bitwise equal to the AVX2 variant."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from megatron_pathmoe.ops import load_extension, permutation
from tests.conftest import REPO
from tests.ops.test_permute_ops import DTYPES, forward_backward, rand, routing

DUMP = """
import sys, torch
from megatron_pathmoe.ops import load_extension, permutation
from tests.ops.test_permute_ops import DTYPES, forward_backward, rand, routing
assert load_extension().module.cpu.isa() == "baseline"
routing_map, probs = routing(1024, 16, 4, empty=2)
out = {str(d): forward_backward(permutation, rand(1024, 1030, dtype=d, seed=1), routing_map, probs,
                                weighted=True) for d in DTYPES}
torch.save(out, sys.argv[1])
"""


def _baseline_env() -> dict:
    return dict(os.environ, PATHMOE_OPS_ISA="baseline", PYTHONPATH=REPO, OMP_NUM_THREADS="1")


@pytest.mark.skipif(load_extension().module is None or load_extension().module.cpu.isa() == "baseline",
                    reason="this CPU runs the baseline variant already (covered by the other tests)")
def test_baseline_variant_is_bitwise_equal_to_avx2(tmp_path):
    dump = tmp_path / "baseline.pt"
    result = subprocess.run([sys.executable, "-c", DUMP, str(dump)], env=_baseline_env(),
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    baseline = torch.load(dump)
    routing_map, probs = routing(1024, 16, 4, empty=2)
    for dtype in DTYPES:
        got = forward_backward(permutation, rand(1024, 1030, dtype=dtype, seed=1), routing_map,
                               probs, weighted=True)
        for key, value in got.items():
            assert torch.equal(value, baseline[str(dtype)][key]), (dtype, key)


def test_baseline_variant_matches_reference():
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
         "tests/ops/test_permute_ops.py", "-k", "matches_reference and T300 or half or round_trip"],
        env=_baseline_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
    assert " passed" in result.stdout
