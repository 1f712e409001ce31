"""Every parallel layout trains exactly like the single-process run of the same global batch.

Three launches (world 1, 2 and 4) of ``parallel_driver`` cover every case: the world-1 launch
saves each routing variant's initial weights and trains the reference; the others load those
weights into TP/EP/PP/VPP/DP layouts (megatron dist-checkpointing reshards them) and train the
same batches with the production training step.

Tolerances: losses and grad norms are fp32 sums over a few thousand terms taken in a different
order per layout (TP splits matmuls, EP/DP/PP split the batch and the reductions). Measured
over every case here: losses within 5e-8 relative, grad norms within 3e-7 (fp32 eps is 1.2e-7).
We allow about ten times that: rel 5e-7 for losses, 3e-6 for grad norms. A wrong reduction
shows up well above it: without the tie all-reduce the step-3 loss moves by 8e-6, without the
expert-DP reduction under TP the step-1 grad norm moves by 2e-5.
The router copies, by contrast, must be bit-identical: every holder applies the same update.
"""

from __future__ import annotations

import json
import sys

import pytest

from tests.conftest import run_cli

LOSS_RTOL = 5e-7
GRAD_NORM_RTOL = 3e-6

VARIANTS = {
    # Indep-MoE keeps megatron's aux loss, so its scaling under every layout is covered too.
    "independent": {"routing": "independent", "moe_aux_loss_coeff": 0.01},
    # One block of all 4 layers: it spans every pipeline boundary.
    "path": {"routing": "path", "path_block_size": 4},
    # A base router shared by all layers plus per-layer low-rank corrections.
    "lowrank": {"routing": "lowrank", "lowrank_rank": 2},
}
# Each variant uses the other dispatcher than the one before, so every layout runs both.
DISPATCHER = {"independent": "alltoall", "path": "allgather", "lowrank": "alltoall"}
# Run in one layout each: megatron's own embedding tie across stages next to ours, and BF16
# training (fp32 main weights and grads; a bf16 weight rounding one ulp differently moves the
# grad norm by up to ~1e-4 and the loss by ~4e-6 measured, so ten times that is allowed).
EXTRA_VARIANTS = {
    "path-tied": {"routing": "path", "path_block_size": 4,
                  "untie_embeddings_and_output_weights": False},
    "path-bf16": {"routing": "path", "path_block_size": 4, "bf16": True},
}
TOLERANCES = {"path-bf16": (5e-5, 1e-3)}

TP2 = {"tensor_model_parallel_size": 2, "sequence_parallel": True}
PP2 = {"pipeline_model_parallel_size": 2}
EP2 = {"expert_model_parallel_size": 2}
LAYOUTS = {
    2: {"tp2": TP2, "ep2": EP2, "pp2": PP2, "dp2-distopt": {"distopt": True},
        "pp2-vpp2": {**PP2, "virtual_pipeline_model_parallel_size": 2}},
    4: {"tp2-ep2": {**TP2, **EP2}, "pp2-ep2-distopt": {**PP2, **EP2, "distopt": True},
        "tp2-pp2": {**TP2, **PP2}, "pp4": {"pipeline_model_parallel_size": 4},
        "pp2-vpp2-dp2-distopt": {**PP2, "virtual_pipeline_model_parallel_size": 2,
                                 "distopt": True}},
}
# Copies of the spanning block on the two PP stages, with one half of the tie recipe removed.
BROKEN = {"without_tie_allreduce": "pp2/path/without-tie-allreduce",
          "without_tie_sync": "pp2/path/without-initial-sync"}
BROKEN_CASES = [{"name": name, "variant": "path", flag: True,
                 "layout": {**PP2, "moe_token_dispatcher_type": "allgather"}}
                for flag, name in BROKEN.items()]
EXTRA_CASES = {
    2: [{"name": "pp2/path-tied", "variant": "path-tied",
         "layout": {**PP2, "moe_token_dispatcher_type": "alltoall"}},
        {"name": "pp2-distopt/path-bf16", "variant": "path-bf16",
         "layout": {**PP2, "distopt": True, "moe_token_dispatcher_type": "alltoall"}}],
    4: [],
}


def _cases(world: int) -> list[dict]:
    cases = [{"name": f"{layout}/{variant}", "variant": variant,
              "layout": {**spec, "moe_token_dispatcher_type": DISPATCHER[variant]}}
             for layout, spec in LAYOUTS[world].items() for variant in VARIANTS]
    return cases + EXTRA_CASES[world] + (BROKEN_CASES if world == 2 else [])


def _launch(tmp_path, world: int, mode: str) -> dict:
    spec = tmp_path / f"spec_{world}.json"
    spec.write_text(json.dumps({"variants": {**VARIANTS, **EXTRA_VARIANTS},
                                "cases": _cases(world) if world > 1 else []}))
    out = tmp_path / f"results_{world}.json"
    args = ["-m", "tests.distributed.parallel_driver", "--mode", mode, "--spec", str(spec),
            "--workdir", str(tmp_path / "initial_weights"), "--out", str(out)]
    result = run_cli(args, nproc=world if world > 1 else 0)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parallel_layouts")
    reference = _launch(tmp, 1, "reference")
    return {"reference": reference, 2: _launch(tmp, 2, "cases"), 4: _launch(tmp, 4, "cases")}


ALL_CASES = [(world, case["name"], case["variant"]) for world in (2, 4)
             for case in _cases(world) if case["name"] not in BROKEN.values()]


@pytest.mark.parametrize("world,name,variant", ALL_CASES, ids=[c[1] for c in ALL_CASES])
def test_layout_matches_single_process(runs, world, name, variant):
    got, ref = runs[world][name], runs["reference"][variant]
    loss_rtol, grad_norm_rtol = TOLERANCES.get(variant, (LOSS_RTOL, GRAD_NORM_RTOL))
    assert got["losses"] == pytest.approx(ref["losses"], rel=loss_rtol)
    assert got["grad_norms"] == pytest.approx(ref["grad_norms"], rel=grad_norm_rtol)
    assert ref["losses"][-1] < ref["losses"][0]  # the steps do train
    # Router copies on different stages/chunks start and stay bit-identical.
    assert got["initial_tie_diff"] == 0.0 and got["tie_diff"] == 0.0
    # Routers are replicated over TP, each expert over its expert-DP group (the TP ranks
    # included: experts are never TP-split); the replicas stay bit-identical.
    assert got["tp_router_diff"] == 0.0 and got["tp_expert_diff"] == 0.0
    # The dry run's per-rank parameter counts and layer layout are those of the built model.
    assert got["estimate_count_diff"] == 0 and got["estimate_layout_diff"] == 0
    layout = name.split("/")[0]
    if layout.startswith("pp") and variant != "independent":
        assert got["multi_copy_ties"] >= 1, "the case should have a tie spanning stages"


def test_tie_checks_fail_without_the_tie_recipe(runs):
    """Without the gradient all-reduce the copies of the spanning block drift apart, and
    without the initial sync they start apart: both bit-identity checks above can fail."""
    no_allreduce = runs[2][BROKEN["without_tie_allreduce"]]
    assert no_allreduce["initial_tie_diff"] == 0.0 and no_allreduce["multi_copy_ties"] == 1
    assert no_allreduce["tie_diff"] > 1e-4
    no_sync = runs[2][BROKEN["without_tie_sync"]]
    assert no_sync["initial_tie_diff"] > 1e-4


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
