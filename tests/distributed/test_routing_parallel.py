"""Every routing variant trains under TP=2 and EP=2 over gloo exactly like one process.

Reuses ``parallel_driver`` (see ``test_parallel_layouts.py``, which covers independent, path
and lowrank routing in every layout): one world-1 launch saves each variant's initial weights
and trains the reference, one world-2 launch loads them into TP2 and EP2 (megatron
dist-checkpointing reshards them) and trains the same global batches. Tolerances as there.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import run_cli
from tests.distributed.parallel_driver import MODEL_SHAPE
from tests.distributed.test_parallel_layouts import GRAD_NORM_RTOL, LOSS_RTOL

AUX = {"moe_aux_loss_coeff": 0.01, "moe_z_loss_coeff": 1e-3}
VARIANTS = {
    "random": {"routing": "random", **AUX},
    "xmoe": {"routing": "xmoe", **AUX},
    "pathb2x": {"routing": "xmoe", "path_block_size": 2},
    "recurrent": {"routing": "recurrent", "recurrent_router_dim": 8, **AUX},
    "mono": {"routing": "mono", "path_block_size": 2, **AUX},
    # Aux-loss-free balancing: token counts summed over TP x DP ranks and over the block.
    "path-expert-bias": {"routing": "path", "path_block_size": 2,
                         "moe_router_score_function": "sigmoid",
                         "moe_router_enable_expert_bias": True,
                         "moe_router_bias_update_rate": 0.05},
    # The restriction file is filled in by the fixture.
    "path-restricted": {"routing": "path", "path_block_size": 2},
}
LAYOUTS = {"tp2": {"tensor_model_parallel_size": 2, "sequence_parallel": True},
           "ep2": {"expert_model_parallel_size": 2}}
DISPATCHER = {"tp2": "allgather", "ep2": "alltoall"}
CASES = [{"name": f"{layout}/{variant}", "variant": variant,
          "layout": {**spec, "moe_token_dispatcher_type": DISPATCHER[layout]}}
         for layout, spec in LAYOUTS.items() for variant in VARIANTS]


def _launch(tmp_path, spec: dict, world: int) -> dict:
    spec_file, out = tmp_path / f"spec_{world}.json", tmp_path / f"results_{world}.json"
    spec_file.write_text(json.dumps(spec))
    result = run_cli(["-m", "tests.distributed.parallel_driver",
                      "--mode", "reference" if world == 1 else "cases", "--spec", str(spec_file),
                      "--workdir", str(tmp_path / "initial_weights"), "--out", str(out)],
                     nproc=world if world > 1 else 0)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from megatron_pathmoe.expert_paths import write_paths_file

    tmp = tmp_path_factory.mktemp("routing_parallel")
    layers, experts = MODEL_SHAPE["num_layers"], MODEL_SHAPE["num_experts"]
    paths = np.array([[e, (e + 1) % experts] * (layers // 2) for e in range(experts)])[:3]
    variants = json.loads(json.dumps(VARIANTS))
    variants["path-restricted"]["moe_path_restriction"] = write_paths_file(
        str(tmp / "allowed"), paths, [1] * len(paths), {})
    spec = {"variants": variants, "cases": CASES}
    return {"reference": _launch(tmp, {**spec, "cases": []}, 1), "parallel": _launch(tmp, spec, 2)}


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_variant_matches_single_process(runs, case):
    got, ref = runs["parallel"][case["name"]], runs["reference"][case["variant"]]
    assert got["losses"] == pytest.approx(ref["losses"], rel=LOSS_RTOL)
    assert got["grad_norms"] == pytest.approx(ref["grad_norms"], rel=GRAD_NORM_RTOL)
    assert ref["losses"][-1] < ref["losses"][0]
    assert got["tp_router_diff"] == 0.0 and got["tp_expert_diff"] == 0.0
