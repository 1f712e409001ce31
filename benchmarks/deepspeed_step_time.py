"""DeepSpeed training step time: PathB{B} block-shared gates vs DeepSpeed's independent gates.

Builds one DeepSpeed engine per variant (same model, ds_config, random tokens) in the same
processes, warms each up, then times interleaved rounds (independent, path:4, ..., independent,
...) so machine noise hits all alike. Prints a markdown table with wall and process CPU step
times and their ratios to ``independent`` measured in the same run. The default capacity
factor 1.0 fixes each expert's work per step; drop-free (``none``) pads every expert to the
most loaded one, so there the step time follows the routing (the table shows the load). Launch
with torchrun:

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 1 benchmarks/deepspeed_step_time.py
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 benchmarks/deepspeed_step_time.py \
        --expert-model-parallel-size 2
"""

from __future__ import annotations

import argparse
import itertools
import platform
import statistics
import time

import torch
import torch.distributed as dist


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=["path:4", "path:8"],
                   help="path:B block sizes; 'independent' (DeepSpeed's gates) is always the baseline")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps-per-round", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--zero-stage", type=int, default=1, choices=(0, 1, 2))
    p.add_argument("--expert-model-parallel-size", type=int, default=1)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--moe-expert-capacity-factor", default="1.0",
                   help="DeepSpeed capacity factor (fixed expert work per step), or 'none': drop-free, "
                        "where every expert computes max-load tokens, so the cost follows the routing")
    return p.parse_args(argv)


def train_args(args: argparse.Namespace, block_size: int):
    """The trainer's own flags (tiny CPU config defaults) for one variant."""
    from megatron_pathmoe.integrations.deepspeed.train import build_parser

    world = dist.get_world_size()
    return build_parser().parse_args([
        "--routing", "path" if block_size > 1 else "independent", "--path-block-size", str(block_size),
        "--expert-model-parallel-size", str(args.expert_model_parallel_size),
        "--zero-stage", str(args.zero_stage), "--micro-batch-size", str(args.micro_batch_size),
        "--global-batch-size", str(args.micro_batch_size * world),
        *([] if args.moe_expert_capacity_factor == "none"
          else ["--moe-expert-capacity-factor", args.moe_expert_capacity_factor])])


def build_engine(args: argparse.Namespace, block_size: int):
    from megatron_pathmoe.integrations.deepspeed.model import DeepSpeedMoEGPT
    from megatron_pathmoe.integrations.deepspeed.train import init_engine, model_config

    targs = train_args(args, block_size)
    model = DeepSpeedMoEGPT(model_config(targs, args.vocab_size))
    return init_engine(targs, model, dist.get_world_size()), targs


def main(argv: list[str] | None = None) -> None:
    from megatron_pathmoe.integrations.deepspeed import require_deepspeed
    from megatron_pathmoe.integrations.deepspeed.train import train_step

    args = parse_args(argv)
    require_deepspeed().init_distributed(dist_backend="gloo")
    blocks = {"independent": 1, **{v: int(v.split(":")[1]) for v in args.variants}}
    engines = {name: build_engine(args, b) for name, b in blocks.items()}
    seq = engines["independent"][1].seq_length
    gen = torch.Generator().manual_seed(dist.get_rank())
    tokens = torch.randint(0, args.vocab_size, (args.micro_batch_size, seq), generator=gen)
    batch = {"tokens": tokens, "labels": tokens.roll(-1, 1), "loss_mask": torch.ones(tokens.shape)}
    wall: dict[str, list[float]] = {n: [] for n in engines}
    cpu: dict[str, list[float]] = {n: [] for n in engines}
    load: dict[str, float] = {}
    for r in range(args.rounds + 1):  # round 0 warms up
        for name, (engine, _) in engines.items():
            dist.barrier()
            w0, c0 = time.perf_counter(), time.process_time()
            for _ in range(args.steps_per_round):
                metrics = train_step(engine, itertools.repeat(batch), 0.0)
            load[name] = statistics.mean(metrics["expert_load_max"])
            if r:
                wall[name].append((time.perf_counter() - w0) / args.steps_per_round)
                cpu[name].append((time.process_time() - c0) / args.steps_per_round)
    if dist.get_rank() == 0:
        tokens_per_step = args.micro_batch_size * seq * dist.get_world_size()
        print_table(args, blocks, wall, cpu, load, tokens_per_step)


def print_table(args: argparse.Namespace, blocks: dict[str, int], wall: dict[str, list[float]],
                cpu: dict[str, list[float]], load: dict[str, float], tokens_per_step: int) -> None:
    """Wall: fastest round (least disturbed by neighbours). CPU (rank 0's process time): median
    of the per-round ratios, which pairs each round with the baseline's same round."""
    base_wall = min(wall["independent"])
    print(f"machine: {platform.machine()} {platform.processor() or ''}, torch {torch.__version__}, "
          f"world {dist.get_world_size()}, EP {args.expert_model_parallel_size}, ZeRO {args.zero_stage}, "
          f"capacity factor {args.moe_expert_capacity_factor}, "
          f"{args.rounds} rounds x {args.steps_per_round} steps")
    print("| gating | wall ms/step (fastest round) | tokens/s | wall ratio vs independent "
          "| CPU ms/step (median round) | CPU ratio vs independent (median per round) "
          "| expert load max / uniform (mean over layers, last step) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, b in blocks.items():
        label = "Indep-MoE (DeepSpeed's gates)" if b == 1 else f"PathB{b}-MoE"
        cpu_ratio = statistics.median(c / i for c, i in zip(cpu[name], cpu["independent"]))
        print(f"| {label} | {1000 * min(wall[name]):.0f} | {tokens_per_step / min(wall[name]):,.0f} | "
              f"{min(wall[name]) / base_wall:.3f} | {1000 * statistics.median(cpu[name]):.0f} | "
              f"{cpu_ratio:.3f} | {load[name]:.2f} |")


if __name__ == "__main__":
    main()
