"""Tokens/s/GPU and peak memory of the paper's 0.9B shape, Indep-MoE vs PathB4-MoE, on GPUs.

Runs ``examples/pretrain_pathmoe_0.9b.sh`` (24 layers, d=1280, 16 experts top-4, seq 4096,
BF16, distributed optimizer, alltoall dispatcher) for a few hundred steps per variant, one
variant after the other (``--repeats`` alternates them), and prints a table with the steady
state tokens/s per GPU, its ratio to independent routing measured in the same run, and the
largest per-GPU peak of allocated memory. Paper (Appendix B, 8 GPUs): 55.21k (Indep-MoE) vs
55.67k (PathB4-MoE) tokens/s/GPU, 66.9 GiB.

    python benchmarks/paper_gpu.py --gpus 1 --train-iters 200           # one H100/H200: Indep vs PathB4
    python benchmarks/paper_gpu.py --gpus 8 --data-path D --tokenizer-model T

Without ``--data-path`` it writes a synthetic corpus: uniformly random tokens of a 32,000-word
vocabulary (the paper's Llama-2 size) with a matching word-level tokenizer. Throughput and
memory do not depend on what the tokens say; the losses of such a run mean nothing.
Arguments after ``--`` go to the trainer (later flags win, e.g. ``-- --device cpu
--num-layers 2`` for a CPU check of the mechanics).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megatron_pathmoe.study.runner import StageError, run_logged  # noqa: E402
from megatron_pathmoe.study.variants import VARIANTS, Variant, select_variants  # noqa: E402

LAUNCHER = os.path.join(ROOT, "examples", "pretrain_pathmoe_0.9b.sh")
PAPER_TOKENS_PER_GPU = {"indep_aux": 55_210, "path4": 55_670}
PAPER_MEMORY_GIB = 66.9
SYNTHETIC_VOCAB = 32_000
EOD = "<|endoftext|>"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=["path4"],
                   help=f"from {', '.join(VARIANTS)} (benchmarks/paper_small.py's variants, "
                        "with their aux-loss coefficients); the baseline indep_aux is always "
                        "run (default: %(default)s)")
    p.add_argument("--gpus", type=int, default=1, help="GPUs on this node (data parallel)")
    p.add_argument("--train-iters", type=int, default=200)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--global-batch-size", type=int, default=None,
                   help="default: 8 micro-batches per GPU")
    p.add_argument("--repeats", type=int, default=1, help="alternating rounds per variant")
    p.add_argument("--transformer-impl", choices=("local", "transformer_engine"),
                   default="local")
    p.add_argument("--data-path", default=None, help=".bin/.idx prefix (default: synthetic)")
    p.add_argument("--tokenizer-model", default=None, help="tokenizer.json of --data-path")
    p.add_argument("--output-dir", default="runs/paper_gpu")
    p.add_argument("trainer_args", nargs="*", help="after --: extra trainer flags")
    args = p.parse_args(argv)
    if (args.data_path is None) != (args.tokenizer_model is None):
        p.error("--data-path and --tokenizer-model go together")
    if args.gpus < 1 or args.train_iters < 10 or args.repeats < 1:
        p.error("--gpus and --repeats must be >= 1, --train-iters >= 10")
    return args


def synthetic_corpus(out_dir: str, num_tokens: int, seed: int = 0) -> tuple[str, str]:
    """A word-level tokenizer.json of SYNTHETIC_VOCAB entries and an indexed dataset of
    ``num_tokens`` uniformly random ids in documents of 1k-8k tokens; (prefix, tokenizer)."""
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")  # TE/apex notes
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    from tokenizers import Tokenizer, models, pre_tokenizers

    os.makedirs(out_dir, exist_ok=True)
    tokenizer_path = os.path.join(out_dir, "tokenizer.json")
    prefix = os.path.join(out_dir, f"random_{num_tokens}_text_document")
    if not os.path.exists(tokenizer_path):
        vocab = {EOD: 0, "<unk>": 1, **{f"w{i}": i for i in range(2, SYNTHETIC_VOCAB)}}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok.save(tokenizer_path)
    if not os.path.exists(prefix + ".idx"):
        rng = np.random.default_rng(seed)
        builder = IndexedDatasetBuilder(prefix + ".bin.tmp", dtype=np.uint16)
        written = 0
        while written < num_tokens:
            doc = rng.integers(2, SYNTHETIC_VOCAB, int(rng.integers(1024, 8192)), np.uint16)
            doc[-1] = 0  # EOD
            builder.add_document(doc, [len(doc)])
            written += len(doc)
        builder.finalize(prefix + ".idx.tmp")
        os.replace(prefix + ".bin.tmp", prefix + ".bin")
        os.replace(prefix + ".idx.tmp", prefix + ".idx")  # last: its presence means complete
    return prefix, tokenizer_path


def run_variant(args: argparse.Namespace, variant: Variant, data: str, tokenizer: str,
                gbs: int, tag: str) -> dict:
    summary = os.path.join(args.output_dir, f"{tag}.json")
    env = {**os.environ, "DATA": data, "TOKENIZER": tokenizer, "NPROC": str(args.gpus),
           "ROUTING": variant.routing, "AUX": repr(variant.aux_loss),
           "TRAIN_ITERS": str(args.train_iters), "GBS": str(gbs),
           "MBS": str(args.micro_batch_size), "TRANSFORMER_IMPL": args.transformer_impl}
    if variant.block_size is not None:
        env["BLOCK"] = str(variant.block_size)
    warmup = max(1, args.train_iters // 10)
    command = ["bash", LAUNCHER, "--lr-warmup-iters", str(warmup), "--eval-interval", "0",
               "--eval-iters", "1", "--summary-json", summary, *args.trainer_args]
    log_path = os.path.join(args.output_dir, f"{tag}.log")
    print(f"{tag}: {' '.join(command)}  (log: {log_path})", flush=True)
    run_logged(command, log_path, env, summary, tag)
    with open(summary) as f:
        return json.load(f)


def render(results: dict[str, list[dict]], baseline: str, args: argparse.Namespace) -> str:
    def per_gpu(s: dict) -> float:
        return s["tokens_per_second"] / s["world_size"]

    base = np.mean([per_gpu(s) for s in results[baseline]])
    lines = [f"{args.gpus} GPU(s), {args.train_iters} iterations, global batch "
             f"{args.global_batch_size or 8 * args.gpus} sequences, micro-batch "
             f"{args.micro_batch_size}, {args.transformer_impl} attention, "
             f"{'synthetic tokens' if args.data_path is None else args.data_path}; "
             f"{time.strftime('%Y-%m-%d')}", "",
             "| variant | tokens/s/GPU | ratio vs baseline | ms/iter | peak GiB/GPU | "
             "paper tokens/s/GPU |", "|---|---:|---:|---:|---:|---:|"]
    for variant, runs in results.items():
        speed = np.mean([per_gpu(s) for s in runs])
        step = 1000 * np.mean([s["mean_step_seconds"] for s in runs])
        memory = max(s["peak_memory_gib"] for s in runs)
        paper = PAPER_TOKENS_PER_GPU.get(variant)
        lines.append(f"| {variant} | {speed:,.0f} | {speed / base:.3f} | {step:.0f} | "
                     f"{memory:.1f} | {'–' if paper is None else f'{paper:,}'} |")
    lines.append(f"\nPaper: {PAPER_MEMORY_GIB} GiB per GPU (8 GPUs, its own layout).")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        variants = select_variants(args.variants)
    except ValueError as err:
        print(f"paper_gpu: error: {err}", file=sys.stderr)
        return 2
    os.makedirs(args.output_dir, exist_ok=True)
    gbs = args.global_batch_size or 8 * args.gpus
    if args.data_path is None:
        data, tokenizer = synthetic_corpus(os.path.join(args.output_dir, "data"),
                                           int(1.1 * (args.train_iters + 5) * gbs * 4096))
    else:
        data, tokenizer = args.data_path, args.tokenizer_model
    results: dict[str, list[dict]] = {v.key: [] for v in variants}
    try:
        for r in range(args.repeats):
            for v in variants:
                results[v.key].append(run_variant(args, v, data, tokenizer, gbs,
                                                  f"{v.key}_round{r}"))
    except StageError as err:
        print(f"paper_gpu: error: {err}", file=sys.stderr)
        return 1
    table = render(results, variants[0].key, args)
    with open(os.path.join(args.output_dir, "results.md"), "w") as f:
        f.write(table)
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
