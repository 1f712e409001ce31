"""Record the most frequent top-1 expert paths of a checkpoint over a corpus (paper 5.2).

    python -m megatron_pathmoe.analysis.record_paths --load runs/pathb8/iter_0005000 \\
        --data-path runs/data/corpus_text_document --num-tokens 2000000 --top-k 500 \\
        --output runs/paths/pathb8_5k

writes ``runs/paths/pathb8_5k.npy`` (int32 [500, num_layers], most frequent first) and
``runs/paths/pathb8_5k.json`` (counts, token coverage, model shape, source). Continue training
restricted to the 10 most frequent of them with ``pathmoe-pretrain --load runs/pathb8
--moe-path-restriction runs/paths/pathb8_5k.npy --moe-path-restriction-top-k 10 ...``.

Runs with ``python -m`` (one process) or under torchrun with ``--tensor-model-parallel-size``
/ ``--expert-model-parallel-size`` (every MoE layer must be on each rank: no pipeline
parallelism); tokens of all ranks are counted once each. (``tools/record_paths.py`` is the
same command.)
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
import torch

from megatron_pathmoe.ops import PERMUTE_IMPLS
from megatron_pathmoe.platform import DEVICE_CHOICES

PROG = "python -m megatron_pathmoe.analysis.record_paths"


@dataclass
class PathCounts:
    paths: np.ndarray  # int32 [num_unique, num_layers], most frequent first
    counts: np.ndarray  # int64 [num_unique]
    num_tokens: int

    def top(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.paths[:k], self.counts[:k]


def _merge_across_ranks(counts: dict[bytes, int], num_tokens: int) -> tuple[dict, int]:
    """Every rank holds disjoint tokens with PP=1 (DP splits samples, sequence parallelism
    splits each sample over TP ranks): the global counts are the sum."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return counts, num_tokens
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (counts, num_tokens))
    merged: dict[bytes, int] = {}
    for rank_counts, _ in gathered:
        for key, count in rank_counts.items():
            merged[key] = merged.get(key, 0) + count
    return merged, sum(n for _, n in gathered)


def sorted_path_counts(counts: dict[bytes, int], num_tokens: int, num_layers: int) -> PathCounts:
    """Most frequent first; equal counts by path (lexicographic), so the order is stable."""
    if not counts:
        return PathCounts(np.zeros((0, num_layers), np.int32), np.zeros(0, np.int64), num_tokens)
    paths = np.stack([np.frombuffer(key, dtype=np.int32) for key in counts])
    values = np.array(list(counts.values()), dtype=np.int64)
    order = np.lexsort([*paths.T[::-1], -values])
    return PathCounts(paths[order], values[order], num_tokens)


@torch.no_grad()
def count_top1_paths(model: torch.nn.Module, batches: Iterable[Any], num_layers: int,
                     forward: Callable[[torch.nn.Module, Any], Any],
                     progress: Callable[[int], None] | None = None) -> PathCounts:
    """Run ``forward(model, batch)`` for every batch (eval mode) and count the top-1 paths of
    all tokens, summed over ranks. ``progress(tokens)`` is called after each batch."""
    from megatron_pathmoe.analysis.recorder import Top1PathRecorder

    model.eval()
    with Top1PathRecorder([model], num_layers) as recorder:
        for batch in batches:
            forward(model, batch)
            before = recorder.num_tokens
            recorder.end_forward()
            if progress is not None:
                progress(recorder.num_tokens - before)
    counts, num_tokens = _merge_across_ranks(recorder.counts, recorder.num_tokens)
    return sorted_path_counts(counts, num_tokens, num_layers)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__,
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
    p.add_argument("--device", choices=DEVICE_CHOICES, default="auto")
    p.add_argument("--permute-impl", choices=PERMUTE_IMPLS, default="auto",
                   help="token permutation of the MoE dispatch (see pathmoe-pretrain --help)")
    return p


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="tok", unit_scale=True, disable=not enabled,
                desc="routing tokens")


def _count(args: argparse.Namespace, model: torch.nn.Module, cfg, tokenizer) -> PathCounts:
    """Top-1 paths over ``--num-tokens`` tokens of ``--data-path``, over all ranks."""
    from megatron.core import parallel_state as ps

    from megatron_pathmoe.data import build_gpt_datasets, load_tokenizer, make_data_iterator
    from megatron_pathmoe.runtime import is_rank0

    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    per_step = args.micro_batch_size * dp * cfg.seq_length
    steps = -(-args.num_tokens // per_step)
    tokenizer = load_tokenizer(tokenizer)
    dataset, _ = build_gpt_datasets(args.data_path, None, tokenizer, cfg.seq_length, args.seed,
                                    train_samples=steps * args.micro_batch_size * dp,
                                    valid_samples=0, split="100,0,0")
    batches = make_data_iterator(dataset, args.micro_batch_size, dp_rank, dp)
    model_device = next(model.parameters()).device

    def forward(m: torch.nn.Module, batch: dict) -> None:
        m(batch["tokens"].to(model_device), batch["position_ids"].to(model_device), None)

    tp = args.tensor_model_parallel_size
    with _progress(steps * per_step, is_rank0()) as bar:
        return count_top1_paths(model, (next(batches) for _ in range(steps)), cfg.num_layers,
                                forward, progress=lambda n: bar.update(n * dp * tp))


def record(args: argparse.Namespace) -> str | None:
    """Count paths over ``--num-tokens`` tokens; returns the .npy written (rank 0) or None."""
    from megatron_pathmoe.checkpoint import (
        load_model_for_inference,
        read_run_config,
        resolve_checkpoint_dir,
    )
    from megatron_pathmoe.expert_paths import write_paths_file
    from megatron_pathmoe.runtime import distributed, is_rank0

    checkpoint = resolve_checkpoint_dir(args.load)
    run = read_run_config(checkpoint)
    tp, ep = args.tensor_model_parallel_size, args.expert_model_parallel_size
    layout = run.model.replace(tensor_model_parallel_size=tp, expert_model_parallel_size=ep,
                               pipeline_model_parallel_size=1, sequence_parallel=tp > 1)
    with distributed(layout, args.device, seed=args.seed) as device:
        model, run = load_model_for_inference(checkpoint, device, args.permute_impl)
        cfg = run.model
        counts = _count(args, model, cfg, run.tokenizer)
        if not is_rank0():
            return None
        paths, path_counts = counts.top(args.top_k)
        meta = {"num_layers": cfg.num_layers, "num_experts": cfg.num_experts,
                "routing": cfg.routing, "block_size": cfg.router_block_size,
                "checkpoint": checkpoint, "iteration": run.iteration,
                "data_path": list(args.data_path), "num_tokens": counts.num_tokens,
                "unique_paths": int(len(counts.counts)),
                "coverage": float(path_counts.sum() / max(counts.num_tokens, 1))}
        written = write_paths_file(args.output, paths, path_counts, meta)
        print(f"{len(paths)} most frequent of {meta['unique_paths']:,} paths over "
              f"{counts.num_tokens:,} tokens cover {100 * meta['coverage']:.1f}% -> {written}")
        return written


def main(argv: list[str] | None = None) -> None:
    from megatron_pathmoe.runtime import quiet_warnings

    quiet_warnings()
    args = build_parser().parse_args(argv)
    if args.top_k < 1 or args.num_tokens < 1 or args.micro_batch_size < 1:
        sys.exit("record_paths: --top-k, --num-tokens and --micro-batch-size must be >= 1")
    record(args)


if __name__ == "__main__":
    main()
