"""Record the most frequent top-1 expert paths of a checkpoint over a corpus (paper 5.2).

    python -m megatron_pathmoe.routing.record_paths --load runs/pathb8/iter_0005000 \\
        --data-path runs/data/corpus_text_document --num-tokens 2000000 --top-k 500 \\
        --output runs/paths/pathb8_5k

writes ``runs/paths/pathb8_5k.npy`` (int32 [500, num_layers], most frequent first) and
``runs/paths/pathb8_5k.json`` (counts, token coverage, model shape, source). Continue training
restricted to the 10 most frequent of them with ``pathmoe-pretrain --load runs/pathb8
--moe-path-restriction runs/paths/pathb8_5k.npy --moe-path-restriction-top-k 10 ...``.

Runs with ``python -m`` (one process) or under torchrun with ``--tensor-model-parallel-size``
/ ``--expert-model-parallel-size`` (every MoE layer must be on each rank: no pipeline
parallelism); tokens of all ranks are counted once each.
"""

from __future__ import annotations

import argparse
import sys

import torch


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megatron_pathmoe.routing.record_paths",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="checkpoint (--save root or iter_XXXXXXX)")
    p.add_argument("--data-path", nargs="+", required=True,
                   help="indexed-dataset prefixes (path without .bin/.idx)")
    p.add_argument("--output", required=True, help="output stem: writes STEM.npy and STEM.json")
    p.add_argument("--top-k", type=int, default=500, help="paths to keep, most frequent first")
    p.add_argument("--num-tokens", type=int, default=1_000_000,
                   help="tokens to route (rounded up to whole global micro-batches)")
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=1234, help="dataset shuffling seed")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--expert-model-parallel-size", type=int, default=1)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    return p


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="tok", unit_scale=True, disable=not enabled,
                desc="routing tokens")


def record(args: argparse.Namespace) -> str | None:
    """Count paths over ``--num-tokens`` tokens; returns the .npy written (rank 0) or None."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_pathmoe.data import build_gpt_datasets, make_data_iterator
    from megatron_pathmoe.platform import resolve_device
    from megatron_pathmoe.routing.restriction import count_top1_paths, write_paths_file
    from megatron_pathmoe.training.arguments import TrainingConfig
    from megatron_pathmoe.training.checkpointing import (
        load_model_for_inference,
        read_run_config,
        resolve_checkpoint_dir,
    )
    from megatron_pathmoe.training.loop import destroy_distributed, initialize_distributed

    device = resolve_device(args.device)
    checkpoint = resolve_checkpoint_dir(args.load)
    run = read_run_config(checkpoint)
    tp, ep = args.tensor_model_parallel_size, args.expert_model_parallel_size
    layout = run.model.replace(tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
                               pipeline_model_parallel_size=1, sequence_parallel=tp > 1)
    initialize_distributed(layout, TrainingConfig(seed=args.seed), device)
    try:
        model, run = load_model_for_inference(checkpoint, device)
        cfg = run.model
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        per_step = args.micro_batch_size * dp * cfg.seq_length
        steps = -(-args.num_tokens // per_step)
        dataset, _ = build_gpt_datasets(args.data_path, None, run.tokenizer_path,
                                        cfg.seq_length, args.seed,
                                        train_samples=steps * args.micro_batch_size * dp,
                                        valid_samples=0, split="100,0,0")
        batches = make_data_iterator(dataset, args.micro_batch_size, dp_rank, dp)
        model_device = next(model.parameters()).device

        def forward(m: torch.nn.Module, batch: dict) -> None:
            m(batch["tokens"].to(model_device), batch["position_ids"].to(model_device), None)

        with _progress(steps * per_step, dist.get_rank() == 0) as bar:
            counts = count_top1_paths(model, (next(batches) for _ in range(steps)),
                                      cfg.num_layers, forward,
                                      progress=lambda n: bar.update(n * dp * tp))
        if dist.get_rank() != 0:
            return None
        paths, path_counts = counts.top(args.top_k)
        meta = {"num_layers": cfg.num_layers, "num_experts": cfg.num_experts,
                "routing": cfg.routing, "block_size": cfg.block_size,
                "checkpoint": checkpoint, "iteration": run.iteration,
                "data_path": list(args.data_path), "num_tokens": counts.num_tokens,
                "unique_paths": int(len(counts.counts)),
                "coverage": float(path_counts.sum() / max(counts.num_tokens, 1))}
        written = write_paths_file(args.output, paths, path_counts, meta)
        print(f"{len(paths)} most frequent of {meta['unique_paths']:,} paths over "
              f"{counts.num_tokens:,} tokens cover {100 * meta['coverage']:.1f}% -> {written}")
        return written
    finally:
        destroy_distributed()


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.top_k < 1 or args.num_tokens < 1 or args.micro_batch_size < 1:
        sys.exit("record_paths: --top-k, --num-tokens and --micro-batch-size must be >= 1")
    record(args)


if __name__ == "__main__":
    main()
