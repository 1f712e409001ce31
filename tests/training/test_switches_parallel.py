"""Expert capacity under expert parallelism (the alltoall dispatcher's drop and drop-and-pad
modes across ranks), group-limited routing with gate scaling under expert parallelism, a
gated shared expert under tensor and expert parallelism, query/key norms and q/k/v biases under
tensor parallelism, and activation recomputation under pipeline parallelism train exactly like
one process. Reuses ``parallel_driver`` (see ``test_routing_parallel``):
one world-1 launch, one world-2 launch, the same global batches."""

from __future__ import annotations

import pytest

from tests.distributed.test_parallel_layouts import GRAD_NORM_RTOL, LOSS_RTOL
from tests.distributed.test_routing_parallel import _launch

AUX = {"moe_aux_loss_coeff": 0.01, "moe_z_loss_coeff": 1e-3}
PATH = {"routing": "path", "path_block_size": 2, **AUX}
CAPACITY = {"moe_expert_capacity_factor": 0.5}
FULL = {"recompute_granularity": "full", "recompute_method": "uniform",
        "recompute_num_layers": 1}
VARIANTS = {
    "path": PATH,
    "path-capacity": {**PATH, **CAPACITY},
    "path-capacity-pad": {**PATH, **CAPACITY, "moe_pad_expert_input_to_capacity": True},
    "mono-capacity": {"routing": "mono", "path_block_size": 2, **AUX, **CAPACITY},
    "lowrank-capacity-position": {"routing": "lowrank", "lowrank_rank": 2, **AUX, **CAPACITY,
                                  "moe_token_drop_policy": "position"},
    # Device-limited routing: 2 groups = the EP2 ranks' experts, each token on one rank.
    "path-groups-scaled": {**PATH, "moe_router_num_groups": 2, "moe_router_group_topk": 1,
                           "moe_router_topk_scaling_factor": 1.5},
    # A gated shared expert (tensor-parallel like attention) next to the routed experts.
    "path-shared-expert": {**PATH, "moe_shared_expert_intermediate_size": 48,
                           "moe_shared_expert_gate": True},
    # Query/key norms: replicated weights used on each TP rank's heads (grads summed over TP).
    "path-qk-layernorm": {**PATH, "qk_layernorm": True, "add_qkv_bias": True},
    "path-shared-expert-overlap": {**PATH, "moe_shared_expert_intermediate_size": 48,
                                   "moe_shared_expert_gate": True,
                                   "moe_shared_expert_overlap": True},
    "path-recompute-full": {**PATH, **FULL},
    "path-recompute-moe": {**PATH, "recompute_granularity": "selective",
                           "recompute_modules": ["core_attn", "moe"]},
}
EP2 = {"expert_model_parallel_size": 2, "moe_token_dispatcher_type": "alltoall"}
PP2 = {"pipeline_model_parallel_size": 2}
TP2 = {"tensor_model_parallel_size": 2, "sequence_parallel": True,
       "moe_token_dispatcher_type": "allgather"}
# (case, variant, layout, the world-1 variant it must equal): recompute against no recompute.
CASES = [("ep2/" + v, v, EP2, v) for v in VARIANTS if "capacity" in v] + [
    ("ep2/path-groups-scaled", "path-groups-scaled", EP2, "path-groups-scaled"),
    ("ep2/path-shared-expert", "path-shared-expert", EP2, "path-shared-expert"),
    ("tp2/path-shared-expert", "path-shared-expert", TP2, "path-shared-expert"),
    ("ep2/path-shared-expert-overlap", "path-shared-expert-overlap", EP2, "path-shared-expert"),
    ("tp2/path-qk-layernorm", "path-qk-layernorm", TP2, "path-qk-layernorm"),
    ("pp2/path-recompute-full", "path-recompute-full", PP2, "path"),
    ("pp2/path-recompute-moe", "path-recompute-moe", PP2, "path"),
    ("dp2-distopt/path-recompute-full", "path-recompute-full", {"distopt": True}, "path"),
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("switches_parallel")
    cases = [{"name": name, "variant": variant, "layout": layout}
             for name, variant, layout, _ in CASES]
    return {"reference": _launch(tmp, {"variants": VARIANTS, "cases": []}, 1),
            "parallel": _launch(tmp, {"variants": VARIANTS, "cases": cases}, 2)}


@pytest.mark.parametrize("name, variant, layout, reference", CASES,
                         ids=[c[0] for c in CASES])
def test_matches_single_process(runs, name, variant, layout, reference):
    got, ref = runs["parallel"][name], runs["reference"][reference]
    assert got["losses"] == pytest.approx(ref["losses"], rel=LOSS_RTOL)
    assert got["grad_norms"] == pytest.approx(ref["grad_norms"], rel=GRAD_NORM_RTOL)
    assert ref["losses"][-1] < ref["losses"][0]


def test_world1_recompute_and_capacity(runs):
    """One process: recomputation changes nothing (same initial weights, same batches);
    dropping tokens does change the losses (the capacity cases are not vacuous)."""
    ref = runs["reference"]
    for variant in ("path-recompute-full", "path-recompute-moe"):
        assert ref[variant]["losses"] == pytest.approx(ref["path"]["losses"], rel=LOSS_RTOL)
        assert ref[variant]["grad_norms"] == pytest.approx(ref["path"]["grad_norms"],
                                                           rel=GRAD_NORM_RTOL)
    assert ref["path-capacity"]["losses"] != ref["path"]["losses"]
    assert ref["path-groups-scaled"]["losses"] != ref["path"]["losses"]
    assert ref["path-shared-expert"]["losses"] != ref["path"]["losses"]
    assert ref["path-qk-layernorm"]["losses"] != ref["path"]["losses"]
