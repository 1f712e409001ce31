"""Train several parallel layouts and routing variants in one launch (torchrun, gloo, CPU).

One launch pays the imports once and runs every case in turn, re-initialising megatron's
parallel state in between. Two modes:

* ``reference`` (world 1): for each variant, build the model, save its initial weights as a
  model-only checkpoint and train a few steps; records the losses and grad norms.
* ``cases`` (world 2 or 4): for each case, build the layout, load the variant's initial weights
  (megatron dist-checkpointing reshards them), train the same global batches and record the
  losses, grad norms and the consistency checks of the router copies.

Everything the training step does is the production code (``build_model_and_optimizer`` and
``train_step`` of ``megatron_pathmoe.training.step``); only the data is synthetic.

    python -m tests.distributed.parallel_driver --mode reference --spec spec.json --out ref.json
    torchrun --nproc_per_node 2 -m tests.distributed.parallel_driver --mode cases ...
"""

from __future__ import annotations

import argparse
import json
import os
from datetime import timedelta
from typing import Any, Iterator

import torch
import torch.distributed as dist

TOKENIZER = os.path.join(os.path.dirname(__file__), "..", "..", "data", "shakespeare",
                         "tokenizer.json")
# Tiny, but every dimension divisible by TP 2 and every count by EP 2; the vocabulary needs no
# padding at TP 1 or 2, so the embedding has the same shape in every layout.
MODEL_SHAPE = dict(num_layers=4, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                   moe_ffn_hidden_size=32, seq_length=16, vocab_size=256, num_experts=4,
                   moe_router_topk=2)
TRAINING = dict(micro_batch_size=2, global_batch_size=8, train_iters=3, lr=1e-2, min_lr=1e-3,
                lr_warmup_iters=1, clip_grad=1.0, seed=1234)
LAYOUT_KEYS = ("tensor_model_parallel_size", "pipeline_model_parallel_size",
               "virtual_pipeline_model_parallel_size", "expert_model_parallel_size",
               "sequence_parallel", "moe_token_dispatcher_type")


def model_config(variant: dict, layout: dict):
    from megatron_pathmoe.config import PathMoEConfig

    return PathMoEConfig(**MODEL_SHAPE, **variant, **{k: layout[k] for k in LAYOUT_KEYS
                                                      if k in layout})


def training_config(layout: dict):
    from megatron_pathmoe.training.arguments import TrainingConfig

    return TrainingConfig(**TRAINING,
                          use_distributed_optimizer=layout.get("distopt", False))


def synthetic_batches(step_seed: int, dp_rank: int, dp_size: int) -> Iterator[dict]:
    """The micro-batches of one global batch for one data-parallel rank, in the sample order
    of ``make_data_iterator`` (micro-step j covers samples j*mbs*dp ..., rank r the r-th slice)."""
    mbs, gbs = TRAINING["micro_batch_size"], TRAINING["global_batch_size"]
    seq, vocab = MODEL_SHAPE["seq_length"], MODEL_SHAPE["vocab_size"]
    # Arithmetic progressions mod vocab: learnable in a few steps, so training moves the loss.
    generator = torch.Generator().manual_seed(step_seed)
    start = torch.randint(0, vocab, (gbs, 1), generator=generator)
    stride = torch.randint(1, 4, (gbs, 1), generator=generator)
    samples = (start + stride * torch.arange(seq + 1)) % vocab
    for start in range(dp_rank * mbs, gbs, mbs * dp_size):
        chunk = samples[start:start + mbs]
        yield {"tokens": chunk[:, :-1].contiguous(), "labels": chunk[:, 1:].contiguous(),
               "loss_mask": torch.ones(mbs, seq),
               "position_ids": torch.arange(seq).expand(mbs, seq).contiguous()}


def _data_iterators(model_cfg, step: int):
    from megatron.core import parallel_state as ps

    def make():
        return synthetic_batches(1000 + step, ps.get_data_parallel_rank(),
                                 ps.get_data_parallel_world_size())
    vpp = model_cfg.virtual_pipeline_model_parallel_size
    return make() if vpp is None else [make() for _ in range(vpp)]


def _reset_megatron_globals() -> None:
    from megatron.core.transformer.moe.moe_utils import (
        MoEAuxLossAutoScaler,
        get_moe_layer_wise_logging_tracker,
    )

    MoEAuxLossAutoScaler.main_loss_backward_scale = None
    get_moe_layer_wise_logging_tracker().clear()


def _train(chunks, optimizer, scheduler, model_cfg, train) -> tuple[list, list]:
    from megatron_pathmoe.training.step import train_step

    world = dist.get_world_size()
    nmb = train.num_microbatches(model_cfg, world)
    losses, norms = [], []
    for step in range(train.train_iters):
        result = train_step(chunks, optimizer, scheduler, _data_iterators(model_cfg, step),
                            model_cfg, train, nmb)
        losses.append(result.loss)
        norms.append(result.grad_norm)
    return losses, norms


# --------------------------------------------------------------------------- checks

def _max_diff_over(group, tensor: torch.Tensor) -> float:
    """Largest |difference| between this rank's tensor and any other member's."""
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, tensor.contiguous(), group=group)
    return max(float((g - tensor).abs().max()) for g in gathered)


def tie_copy_difference(chunks) -> tuple[float, int]:
    """(largest difference between copies of any tie, number of ties with several copies),
    over the pipeline ranks and chunks holding each tie; collective over the world."""
    from megatron_pathmoe.parallel import RouterTies

    ties = RouterTies.build([chunk.module for chunk in chunks])
    worst, spanning = 0.0, 0
    for tie in ties.ties:
        if tie.group is None and len(tie.copies) < 2:
            continue
        spanning += 1
        first = tie.copies[0].detach()
        worst = max([worst] + [float((c.detach() - first).abs().max()) for c in tie.copies])
        if tie.group is not None:
            worst = max(worst, _max_diff_over(tie.group, first))
    return _world_max(worst), int(_world_max(spanning))


def replica_difference(chunks, kind: str, group) -> float:
    """Largest difference over ``group`` of any parameter whose name contains ``kind``."""
    worst = 0.0
    if dist.get_world_size(group) > 1:
        for chunk in chunks:
            for name, param in chunk.module.named_parameters():
                if kind in name:
                    worst = max(worst, _max_diff_over(group, param.detach()))
    return _world_max(worst)


def estimate_mismatch(chunks, model_cfg) -> tuple[float, float]:
    """(largest |held - estimated| parameter count of any rank, 1.0 if any chunk's layer numbers
    differ from the estimate's layout): the dry run's per-rank figures are the built ones."""
    from megatron.core import parallel_state as ps

    from megatron_pathmoe.model.estimate import chunk_layers, rank_parameters, router_parameters
    from megatron_pathmoe.parallel import local_layer_numbers

    pp_rank = ps.get_pipeline_model_parallel_rank()
    held = sum(p.numel() for chunk in chunks for p in chunk.module.parameters())
    estimate = rank_parameters(model_cfg, pp_rank, router_parameters(model_cfg)).total
    layers = [sorted(local_layer_numbers(chunk.module)) for chunk in chunks]
    expected = [list(r) for r in chunk_layers(model_cfg, pp_rank)]
    return _world_max(abs(held - estimate)), _world_max(float(layers != expected))


def _world_max(value: float) -> float:
    tensor = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor)


# --------------------------------------------------------------------------- modes

def _setup(model_cfg, train):
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_pathmoe.runtime import initialize_model_parallel
    from megatron_pathmoe.training.build import build_model_and_optimizer

    model_cfg = model_cfg.validate(dist.get_world_size())
    initialize_model_parallel(model_cfg)
    torch.manual_seed(train.seed)
    model_parallel_cuda_manual_seed(train.seed)
    return build_model_and_optimizer(model_cfg, train, "cpu")


def _teardown() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    _reset_megatron_globals()


def run_reference(spec: dict, workdir: str) -> dict:
    """World 1: save each variant's initial weights and train it."""
    from megatron_pathmoe.checkpoint import save_model_checkpoint

    results = {}
    for name, variant in spec["variants"].items():
        model_cfg, train = model_config(variant, {}), training_config({})
        chunks, optimizer, scheduler = _setup(model_cfg, train)
        try:
            save_model_checkpoint(chunks[0].module, model_cfg, os.path.join(workdir, name), 0,
                                  TOKENIZER)
            losses, norms = _train(chunks, optimizer, scheduler, model_cfg, train)
            results[name] = {"losses": losses, "grad_norms": norms}
        finally:
            _teardown()
    return results


def run_case(case: dict, spec: dict, workdir: str) -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    from megatron_pathmoe.checkpoint import load_checkpoint

    from megatron_pathmoe.parallel import RouterTies

    model_cfg = model_config(spec["variants"][case["variant"]], case["layout"])
    train = training_config(case["layout"])
    sync_weights = RouterTies.sync_weights
    if case.get("without_tie_sync"):  # proves the initial-copy check can fail
        RouterTies.sync_weights = lambda self: None
    try:
        chunks, optimizer, scheduler = _setup(model_cfg, train)
    finally:
        RouterTies.sync_weights = sync_weights
    try:
        # Before loading (which writes the same values into every copy): the build's own sync.
        initial_tie_diff, _ = tie_copy_difference(chunks)
        load_checkpoint(os.path.join(workdir, case["variant"]), chunks, optimizer, None, model_cfg)
        if case.get("without_tie_allreduce"):  # proves the trained-copy check can fail
            chunks[0].module.config.finalize_model_grads_func = finalize_model_grads
        losses, norms = _train(chunks, optimizer, scheduler, model_cfg, train)
        tie_diff, spanning = tie_copy_difference(chunks)
        count_diff, layout_diff = estimate_mismatch(chunks, model_cfg)
        return {"estimate_count_diff": count_diff, "estimate_layout_diff": layout_diff,
                "losses": losses, "grad_norms": norms, "initial_tie_diff": initial_tie_diff,
                "tie_diff": tie_diff, "multi_copy_ties": spanning,
                # Routers are replicated over TP. Experts are never TP-split, so the TP ranks
                # hold replicas of the same experts: the expert-DP group holds all of them.
                "tp_router_diff": replica_difference(chunks, ".router.",
                                                     ps.get_tensor_model_parallel_group()),
                "tp_expert_diff": replica_difference(
                    chunks, ".experts.", ps.get_expert_data_parallel_group())}
    finally:
        _teardown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("reference", "cases"), required=True)
    parser.add_argument("--spec", required=True, help="JSON: {variants: {...}, cases: [...]}")
    parser.add_argument("--workdir", required=True, help="initial-weight checkpoints")
    parser.add_argument("--out", required=True, help="results JSON (written by rank 0)")
    args = parser.parse_args(argv)

    from megatron_pathmoe.platform import enable_cpu_platform

    enable_cpu_platform()
    if "RANK" not in os.environ:
        from tests.conftest import free_port

        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", timeout=timedelta(minutes=5))
    with open(args.spec) as f:
        spec = json.load(f)
    results: dict[str, Any] = {}
    try:
        if args.mode == "reference":
            results = run_reference(spec, args.workdir)
        else:
            for case in spec["cases"]:
                # A failing case fails the launch (a rank left in a collective would hang).
                print(f"rank {dist.get_rank()}: case {case['name']}", flush=True)
                results[case["name"]] = run_case(case, spec, args.workdir)
        if dist.get_rank() == 0:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
