"""Training step time of PathMoE vs independent routing, same config, same process.

Builds each variant through the real training stack (megatron DDP, optimizer, schedule) on
random tokens, warms up, then times interleaved rounds so machine noise hits both alike.
Prints a table with the ratio against the named baseline (independent routing).

    python benchmarks/step_time.py --num-layers 8 --hidden-size 128 --rounds 5
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p.add_argument("--block-sizes", type=int, nargs="+", default=[4])
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per variant")
    p.add_argument("--steps-per-round", type=int, default=3)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    from megatron_pathmoe.platform import resolve_device

    device = resolve_device(args.device)
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_pathmoe.config import PathMoEConfig
    from megatron_pathmoe.training.arguments import TrainingConfig
    from megatron_pathmoe.training.loop import (
        build_model_and_optimizer,
        destroy_distributed,
        forward_step,
        initialize_distributed,
    )

    base = PathMoEConfig(num_layers=args.num_layers, hidden_size=args.hidden_size,
                         num_attention_heads=args.num_attention_heads,
                         num_query_groups=args.num_query_groups,
                         moe_ffn_hidden_size=args.moe_ffn_hidden_size,
                         seq_length=args.seq_length, vocab_size=args.vocab_size,
                         num_experts=args.num_experts, moe_router_topk=args.moe_router_topk)
    train = TrainingConfig(train_iters=10, lr_warmup_iters=0,
                           micro_batch_size=args.micro_batch_size,
                           global_batch_size=args.micro_batch_size)
    variants = {"independent": base.replace(routing="independent")}
    for b in args.block_sizes:
        variants[f"path B={b}"] = base.replace(routing="path", path_block_size=b)
    initialize_distributed(base.validate(1), train, device)
    tokens = torch.randint(0, args.vocab_size, (args.micro_batch_size, args.seq_length))
    batch = dict(tokens=tokens, labels=tokens, loss_mask=torch.ones(tokens.shape),
                 position_ids=torch.arange(args.seq_length).expand(args.micro_batch_size, -1))

    def make_step(cfg):
        chunks, optimizer, _ = build_model_and_optimizer(cfg.validate(1), train, device)

        def step():
            for chunk in chunks:
                chunk.zero_grad_buffer()
            optimizer.zero_grad()
            get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iter([batch]), model=chunks,
                num_microbatches=1, seq_length=args.seq_length,
                micro_batch_size=args.micro_batch_size, forward_only=False)
            optimizer.step()
            if device == "cuda":
                torch.cuda.synchronize()
        return step

    steps = {name: make_step(cfg) for name, cfg in variants.items()}
    for step in steps.values():
        step(); step()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            t0 = time.perf_counter()
            for _ in range(args.steps_per_round):
                step()
            times[name].append((time.perf_counter() - t0) / args.steps_per_round)
    destroy_distributed()

    tokens_per_step = args.micro_batch_size * args.seq_length
    baseline = statistics.median(times["independent"])
    print(f"# step time, {device}, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"# L={args.num_layers} d={args.hidden_size} E={args.num_experts} "
          f"top{args.moe_router_topk} seq={args.seq_length} mbs={args.micro_batch_size}, "
          f"{args.rounds} rounds x {args.steps_per_round} steps, median")
    print("| variant | step (ms) | tokens/s | ratio vs independent |")
    print("|---|---:|---:|---:|")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"| {name} | {1000 * med:.1f} | {tokens_per_step / med:,.0f} | "
              f"{med / baseline:.3f} |")


if __name__ == "__main__":
    main()
