"""Pretrain the DeepSpeed-MoE GPT with PathB{B} gating through DeepSpeed's engine.

Launch with torchrun (or the ``deepspeed`` launcher); reads megatron ``.bin/.idx`` data through
megatron-core's GPTDataset (``megatron_pathmoe.data``), or the shipped Shakespeare corpus when
``--data-path`` is not given. Flags follow Megatron-LM's names where one exists.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from typing import Any, Iterator

import torch
import torch.distributed as dist

from megatron_pathmoe.integrations.deepspeed._require import require_deepspeed
from megatron_pathmoe.integrations.deepspeed.model import DeepSpeedMoEGPT, DSModelConfig

DEFAULT_DS_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))), "examples", "deepspeed", "ds_config.json")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", help="train prefix(es) of .bin/.idx (default: the shipped corpus)")
    g.add_argument("--valid-data-path", nargs="+", help="validation prefix(es)")
    g.add_argument("--tokenizer-model", help="tokenizer.json (default: the shipped corpus's)")
    g.add_argument("--demo-data-dir", default="runs/data", help="where the shipped corpus is preprocessed")
    g.add_argument("--seq-length", type=int, default=256)
    g = p.add_argument_group("model")
    g.add_argument("--num-layers", type=int, default=8)
    g.add_argument("--hidden-size", type=int, default=128)
    g.add_argument("--num-attention-heads", type=int, default=4)
    g.add_argument("--moe-ffn-hidden-size", type=int, default=256)
    g.add_argument("--num-experts", type=int, default=8)
    g.add_argument("--moe-router-topk", type=int, default=2)
    g.add_argument("--routing", choices=("path", "independent"), default="path",
                   help="path: one gate per block of --path-block-size MoE layers; independent: DeepSpeed's")
    g.add_argument("--path-block-size", type=int, default=4)
    g.add_argument("--moe-expert-capacity-factor", type=float, default=None,
                   help="token dropping at this capacity (DeepSpeed drop_tokens); default: drop-free")
    g.add_argument("--moe-top2-sampling", action="store_true",
                   help="DeepSpeed's Gumbel-sampled 2nd expert for top-2 (default: deterministic top-2)")
    g.add_argument("--moe-aux-loss-coeff", type=float, default=0.0, help="DeepSpeed's aux loss of every MoE layer, summed, times this (0 = off)")
    g.add_argument("--expert-model-parallel-size", type=int, default=1, help="DeepSpeed ep_size")
    g.add_argument("--seed", type=int, default=1234)
    g = p.add_argument_group("training")
    g.add_argument("--deepspeed-config", default=DEFAULT_DS_CONFIG, help="DeepSpeed JSON config")
    g.add_argument("--zero-stage", type=int, choices=(0, 1, 2), help="overrides the config's stage")
    g.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPU; not checked on CPU)")
    g.add_argument("--micro-batch-size", type=int, default=8)
    g.add_argument("--global-batch-size", type=int, default=16)
    g.add_argument("--train-iters", type=int, default=150)
    g.add_argument("--lr", type=float, default=2e-3)
    g.add_argument("--lr-warmup-iters", type=int, default=15)
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--eval-iters", type=int, default=8, help="validation batches after training (0: none)")
    g.add_argument("--save", help="DeepSpeed checkpoint directory to write")
    g.add_argument("--save-interval", type=int, default=0, help="0: save at the end only")
    g.add_argument("--load", help="DeepSpeed checkpoint directory to resume from (its latest tag)")
    g.add_argument("--exit-interval", type=int, default=0, help="stop after this iteration (after saving)")
    g.add_argument("--log-json", help="write per-iteration metrics here (rank 0)")
    g.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # deepspeed launcher
    return p


def model_config(args: argparse.Namespace, vocab_size: int) -> DSModelConfig:
    return DSModelConfig(
        vocab_size=vocab_size, num_layers=args.num_layers, hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads, ffn_hidden_size=args.moe_ffn_hidden_size,
        seq_length=args.seq_length, num_experts=args.num_experts, topk=args.moe_router_topk,
        ep_size=args.expert_model_parallel_size,
        path_block_size=args.path_block_size if args.routing == "path" else 1,
        capacity_factor=args.moe_expert_capacity_factor, top2_sampling=args.moe_top2_sampling,
        seed=args.seed)


def deepspeed_config(args: argparse.Namespace, world: int) -> dict[str, Any]:
    """The JSON config with the batch, lr schedule and the flags that override it filled in."""
    if not os.path.isfile(args.deepspeed_config):
        raise FileNotFoundError(f"--deepspeed-config {args.deepspeed_config}: no such file "
                                "(examples/deepspeed/ds_config.json is the shipped one)")
    with open(args.deepspeed_config, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["train_micro_batch_size_per_gpu"] = args.micro_batch_size
    cfg["gradient_accumulation_steps"] = args.global_batch_size // (args.micro_batch_size * world)
    cfg.pop("train_batch_size", None)
    cfg.setdefault("optimizer", {}).setdefault("params", {})["lr"] = args.lr
    sched = cfg.setdefault("scheduler", {"type": "WarmupDecayLR", "params": {}})["params"]
    sched.update(warmup_max_lr=args.lr, warmup_num_steps=args.lr_warmup_iters,
                 total_num_steps=max(args.train_iters, args.lr_warmup_iters + 1))
    if args.zero_stage is not None:
        cfg.setdefault("zero_optimization", {})["stage"] = args.zero_stage
    if args.bf16:
        cfg["bf16"] = {"enabled": True}
    return cfg


def build_data(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """(tokenizer, train dataset, validation dataset) through megatron_pathmoe.data's helpers."""
    from megatron_pathmoe import data

    if args.data_path is None:
        if dist.get_rank() == 0:
            data.prepare_demo_data(args.demo_data_dir)
        dist.barrier()
        demo = data.prepare_demo_data(args.demo_data_dir)
        args.data_path = [demo["train_prefix"]]
        args.valid_data_path = args.valid_data_path or [demo["valid_prefix"]]
        args.tokenizer_model = args.tokenizer_model or demo["tokenizer"]
    tokenizer = data.load_tokenizer(args.tokenizer_model)
    train, valid = data.build_gpt_datasets(
        args.data_path, args.valid_data_path, tokenizer, args.seq_length, args.seed,
        args.train_iters * args.global_batch_size, max(args.eval_iters, 1) * args.global_batch_size)
    return tokenizer, train, valid


def init_engine(args: argparse.Namespace, model: DeepSpeedMoEGPT, world: int) -> Any:
    deepspeed = require_deepspeed()
    split = require_deepspeed("deepspeed.moe.utils").split_params_into_different_moe_groups_for_optimizer
    groups = split({"params": [p for p in model.parameters() if p.requires_grad], "name": "params"})
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups,
                                           config=deepspeed_config(args, world))
    return engine


def _batches(dataset: Any, args: argparse.Namespace, consumed: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    from megatron_pathmoe.data import make_data_iterator

    return make_data_iterator(dataset, args.micro_batch_size, dist.get_rank(), dist.get_world_size(),
                              consumed_samples=consumed)


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, ...]:
    return tuple(batch[k].to(device) for k in ("tokens", "labels", "loss_mask"))


def train_step(engine: Any, batches: Iterator[dict[str, torch.Tensor]], coeff: float) -> dict[str, Any]:
    """One global batch (all its micro-batches); metrics averaged over micro-batches and ranks."""
    sums = torch.zeros(2, dtype=torch.float64, device=engine.device)
    counts = None
    for _ in range(engine.gradient_accumulation_steps()):
        lm_loss, aux_loss, layer_counts = engine(*model_inputs(next(batches), engine.device))
        engine.backward(lm_loss + coeff * aux_loss)
        engine.step()
        sums += torch.stack([lm_loss.detach(), aux_loss.detach()]).double()
        step_counts = torch.stack([c.double() for c in layer_counts])
        counts = step_counts if counts is None else counts + step_counts
    dist.all_reduce(sums)
    dist.all_reduce(counts)  # every rank's own tokens: the sum is the global load
    sums /= engine.gradient_accumulation_steps() * dist.get_world_size()
    load = counts / counts.mean(dim=1, keepdim=True)
    return {"lm_loss": sums[0].item(), "aux_loss": sums[1].item(),
            "expert_load_max": load.max(dim=1).values.tolist(),
            "expert_load_min": load.min(dim=1).values.tolist()}


@torch.no_grad()
def evaluate(engine: Any, valid: Any, args: argparse.Namespace) -> float:
    """Mean LM loss over ``--eval-iters`` global batches of the validation set (all ranks)."""
    engine.eval()
    batches = _batches(valid, args)
    total = torch.zeros(1, dtype=torch.float64, device=engine.device)
    steps = args.eval_iters * engine.gradient_accumulation_steps()
    for _ in range(steps):
        total += engine(*model_inputs(next(batches), engine.device))[0].double()
    dist.all_reduce(total)
    engine.train()
    return total.item() / (steps * dist.get_world_size())


def _log(it: int, m: dict[str, Any], tokens_per_s: float) -> None:
    loads = " ".join(f"{hi:.2f}/{lo:.2f}" for hi, lo in zip(m["expert_load_max"], m["expert_load_min"]))
    print(f"iteration {it:5d} | lm loss {m['lm_loss']:.6f} | aux loss {m['aux_loss']:.6f} | "
          f"tokens/s {tokens_per_s:.0f} | expert load max/min per layer {loads}", flush=True)


def resume(engine: Any, load: str | None) -> int:
    """Load ``load``'s latest DeepSpeed checkpoint (if given); the iteration it ended."""
    if not load:
        return 0
    _, client = engine.load_checkpoint(load)
    if client is None:
        raise FileNotFoundError(f"--load {load}: no DeepSpeed checkpoint found there")
    torch.set_rng_state(client["rng_state"])
    return client["iteration"]


def train_loop(engine: Any, dataset: Any, args: argparse.Namespace, start: int) -> list[dict[str, Any]]:
    history = []
    batches = _batches(dataset, args, start * args.global_batch_size)
    for it in range(start + 1, args.train_iters + 1):
        t0 = time.perf_counter()
        metrics = train_step(engine, batches, args.moe_aux_loss_coeff)
        metrics.update(iteration=it, step_seconds=time.perf_counter() - t0)
        tokens_per_s = args.global_batch_size * args.seq_length / metrics["step_seconds"]
        metrics["tokens_per_second"] = tokens_per_s
        history.append(metrics)
        if dist.get_rank() == 0 and (it % args.log_interval == 0 or it == start + 1):
            _log(it, metrics, tokens_per_s)
        last = it == args.train_iters or it == args.exit_interval
        if args.save and (last or (args.save_interval and it % args.save_interval == 0)):
            engine.save_checkpoint(args.save, tag=f"iter_{it:07d}",
                                   client_state={"iteration": it, "rng_state": torch.get_rng_state()})
        if it == args.exit_interval:
            break
    return history


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train (and evaluate); returns what ``--log-json`` writes."""
    require_deepspeed().init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    tokenizer, train, valid = build_data(args)
    model = DeepSpeedMoEGPT(model_config(args, tokenizer.vocab_size))
    engine = init_engine(args, model, dist.get_world_size())
    result: dict[str, Any] = {"history": train_loop(engine, train, args, resume(engine, args.load))}
    if args.eval_iters:
        result["valid_loss"] = evaluate(engine, valid, args)
        if dist.get_rank() == 0:
            print(f"validation loss {result['valid_loss']:.6f} | perplexity "
                  f"{math.exp(min(result['valid_loss'], 50)):.1f}", flush=True)
    result.update(gate_layout(model, engine))
    if args.log_json and dist.get_rank() == 0:
        with open(args.log_json, "w", encoding="utf-8") as f:
            json.dump(result, f)
    return result


def gate_layout(model: DeepSpeedMoEGPT, engine: Any) -> dict[str, Any]:
    """How the gates are held now: ``gate_owner`` maps each MoE layer to the first layer holding
    the same Parameter object; ``optimizer_numel`` is what the optimizer (ZeRO's flat groups
    included) holds, to compare with ``model_numel`` (each shared gate counted once)."""
    from megatron_pathmoe.integrations.deepspeed.gating import shared_gate_weights

    weights = [layer.moe.deepspeed_moe.gate.wg.weight for layer in model.layers]
    owner = [next(j for j, w in enumerate(weights) if w is weight) for weight in weights]
    opt = engine.optimizer  # ZeRO 1/2 and bf16 keep the model's own tensors in these groups
    groups = getattr(opt, "bit16_groups", None) or getattr(opt, "bf16_groups", None) \
        or [g["params"] for g in opt.param_groups]
    return {"shared_gates": list(shared_gate_weights(model)), "gate_owner": owner,
            "optimizer_numel": sum(p.numel() for g in groups for p in g),
            "model_numel": sum(p.numel() for p in model.parameters())}


def check_args(args: argparse.Namespace) -> None:
    """The flag errors that need no data or process group (raised as one-line ValueErrors)."""
    model_config(args, vocab_size=1).check()
    if args.data_path and not args.tokenizer_model:
        raise ValueError("--tokenizer-model is required with --data-path (the tokenizer.json it was built with)")
    layers, block = args.num_layers, args.path_block_size
    if args.routing == "path" and (block < 1 or layers % block):
        raise ValueError(f"--path-block-size {block} must be a positive divisor of --num-layers {layers}")
    per_step = args.micro_batch_size * int(os.environ.get("WORLD_SIZE", "1"))
    if args.global_batch_size % per_step:
        raise ValueError(f"--global-batch-size {args.global_batch_size} must be a multiple of "
                         f"--micro-batch-size x world size = {per_step}")


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_args(args)
    except ValueError as error:
        parser.error(str(error))
    run(args)


if __name__ == "__main__":
    main()
