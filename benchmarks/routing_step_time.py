"""Training step time of every routing variant relative to independent routing.

Builds each variant through the real training stack (megatron DDP, Adam, the forward-backward
schedule) in one process, on the same random tokens, warms each up, then times interleaved
rounds (variant A, B, C, ..., A, B, C, ...) so machine noise hits all of them alike. Prints a
markdown table with wall and CPU step times and their ratios to ``independent`` measured in
the same run (see ``print_table`` for which to read when). Variants are ``NAME`` or ``NAME:B`` (block size), with NAME a ``--routing`` choice.

    python benchmarks/routing_step_time.py --rounds 4
    python benchmarks/routing_step_time.py --variants independent path:2 path:4 path:8
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

PAPER_NAMES = {"independent": "Indep-MoE", "path": "PathB{B}-MoE", "random": "Rand-MoE",
               "xmoe": "X-MoE", "recurrent": "Recurrent-MoE", "mono": "MonoB{B}-MoE",
               "lowrank": "LowRank-MoE"}
DEFAULT_VARIANTS = ["independent", "path:4", "path:8", "random", "xmoe", "xmoe:4",
                    "recurrent", "mono:4", "lowrank"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS,
                   help="NAME or NAME:BLOCK_SIZE; 'independent' is always measured (baseline)")
    p.add_argument("--num-layers", type=int, default=8)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-attention-heads", type=int, default=4)
    p.add_argument("--num-query-groups", type=int, default=2)
    p.add_argument("--moe-ffn-hidden-size", type=int, default=256)
    p.add_argument("--num-experts", type=int, default=8)
    p.add_argument("--moe-router-topk", type=int, default=2)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=4, help="timed rounds per variant")
    p.add_argument("--steps-per-round", type=int, default=3)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    return p.parse_args(argv)


def variant_configs(args: argparse.Namespace) -> dict[str, object]:
    """Label -> validated PathMoEConfig, independent first."""
    from megatron_pathmoe.config import PathMoEConfig

    base = PathMoEConfig(num_layers=args.num_layers, hidden_size=args.hidden_size,
                         num_attention_heads=args.num_attention_heads,
                         num_query_groups=args.num_query_groups,
                         moe_ffn_hidden_size=args.moe_ffn_hidden_size,
                         seq_length=args.seq_length, vocab_size=args.vocab_size,
                         num_experts=args.num_experts, moe_router_topk=args.moe_router_topk)
    configs = {}
    for spec in ["independent"] + [v for v in args.variants if v != "independent"]:
        routing, _, block = spec.partition(":")
        cfg = base.replace(routing=routing,
                           path_block_size=int(block) if block else None).validate(1)
        configs[label(cfg)] = cfg
    return configs


def label(cfg) -> str:
    name = PAPER_NAMES[cfg.routing].replace("{B}", str(cfg.block_size))
    if cfg.routing == "path" and cfg.block_size == cfg.num_layers:
        name = "PathMoE"
    if cfg.routing == "xmoe" and cfg.block_size > 1:
        name = f"PathB{cfg.block_size}X-MoE"
    block = f" B={cfg.block_size}" if cfg.block_size > 1 else ""
    return f"{name} (`{cfg.routing}`{block})"


def make_step(cfg, train, device: str, batch: dict):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_pathmoe.model import forward_step
    from megatron_pathmoe.training.build import build_model_and_optimizer

    chunks, optimizer, _ = build_model_and_optimizer(cfg, train, device)

    def step() -> None:
        for chunk in chunks:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([batch]), model=chunks,
            num_microbatches=1, seq_length=cfg.seq_length,
            micro_batch_size=train.micro_batch_size, forward_only=False)
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
    return step


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from megatron_pathmoe.runtime import destroy_distributed, initialize_distributed
    from megatron_pathmoe.training.arguments import TrainingConfig

    configs = variant_configs(args)
    train = TrainingConfig(train_iters=10, lr_warmup_iters=0,
                           micro_batch_size=args.micro_batch_size,
                           global_batch_size=args.micro_batch_size)
    device = initialize_distributed(next(iter(configs.values())), args.device, seed=train.seed)
    tokens = torch.randint(0, args.vocab_size, (args.micro_batch_size, args.seq_length))
    batch = dict(tokens=tokens, labels=tokens, loss_mask=torch.ones(tokens.shape),
                 position_ids=torch.arange(args.seq_length).expand(args.micro_batch_size, -1))
    steps = {name: make_step(cfg, train, device, batch) for name, cfg in configs.items()}
    for step in steps.values():
        step()
        step()  # warm-up: allocator, caches
    wall: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            w0, c0 = time.perf_counter(), time.process_time()
            for _ in range(args.steps_per_round):
                step()
            wall[name].append((time.perf_counter() - w0) / args.steps_per_round)
            cpu[name].append((time.process_time() - c0) / args.steps_per_round)
    destroy_distributed()
    print_table(args, device, wall, cpu)


def print_table(args: argparse.Namespace, device: str, wall: dict[str, list[float]],
                cpu: dict[str, list[float]]) -> None:
    """Per variant: wall time of the fastest round and its ratio to independent's fastest,
    and CPU time of this process (median round) with the median over rounds of the ratio
    within a round. On a busy shared machine wall time measures the neighbours; the CPU time
    of a single-threaded step (OMP_NUM_THREADS=1) measures the work, so its ratio is the
    figure to read there. On a GPU only the wall-time columns mean anything."""
    tokens_per_step = args.micro_batch_size * args.seq_length
    base_wall, base_cpu = next(iter(wall.values())), next(iter(cpu.values()))
    print(f"# step time, {device}, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"# L={args.num_layers} d={args.hidden_size} E={args.num_experts} "
          f"top{args.moe_router_topk} seq={args.seq_length} mbs={args.micro_batch_size}, "
          f"{args.rounds} rounds x {args.steps_per_round} steps")
    print("| variant | wall ms/step (fastest round) | tokens/s | wall ratio vs independent "
          "| CPU ms/step (median round) | CPU ratio vs independent (median per round) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in wall:
        fastest = min(wall[name])
        cpu_ratio = statistics.median(c / b for c, b in zip(cpu[name], base_cpu))
        print(f"| {name} | {1000 * fastest:.0f} | {tokens_per_step / fastest:,.0f} "
              f"| {fastest / min(base_wall):.3f} | {1000 * statistics.median(cpu[name]):.0f} "
              f"| {cpu_ratio:.3f} |")


if __name__ == "__main__":
    main()
