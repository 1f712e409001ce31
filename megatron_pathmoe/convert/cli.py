"""``pathmoe-convert``: Megatron checkpoints <-> Hugging Face model directories."""

from __future__ import annotations

import argparse
import os
import sys

from megatron_pathmoe.convert.checkpoint import (
    DTYPES,
    ParallelLayout,
    export_to_hf,
    import_from_hf,
)
from megatron_pathmoe.convert.qwen2_moe import IMPORTABLE_ROUTING
from megatron_pathmoe.ops import PERMUTE_IMPLS
from megatron_pathmoe.runtime import quiet_warnings

EPILOG = """examples:
  pathmoe-convert to-hf --load runs/ckpt --output runs/hf
  torchrun --nproc_per_node 4 -m megatron_pathmoe.convert.cli to-hf --load runs/ckpt \\
      --output runs/hf --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2
  pathmoe-convert to-megatron --hf runs/hf --save runs/ckpt_from_hf
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pathmoe-convert", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Convert PathMoE megatron checkpoints to Hugging Face Qwen2-MoE model "
                    "directories (exact logits) and back.")
    sub = parser.add_subparsers(dest="command", required=True)

    to_hf = sub.add_parser("to-hf", help="megatron checkpoint -> Hugging Face directory",
                           description="Megatron checkpoint (any saved TP/EP/PP layout) -> "
                                       "Hugging Face directory: config.json, safetensors, "
                                       "tokenizer, generation config.")
    to_hf.add_argument("--load", required=True,
                       help="a --save directory of pathmoe-pretrain or one iter_XXXXXXX in it")
    to_hf.add_argument("--output", required=True, help="Hugging Face model directory to write")
    to_hf.add_argument("--max-shard-size", default="5GB",
                       help="largest safetensors file, e.g. 5GB or 500MiB (default 5GB)")
    to_hf.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                       help="cast the weights (auto: keep the checkpoint's dtype)")
    to_hf.add_argument("--overwrite", action="store_true",
                       help="write into a non-empty --output (old weight files are removed)")
    for flag in ("tensor", "pipeline", "expert"):
        to_hf.add_argument(f"--{flag}-model-parallel-size", type=int, default=1,
                           help="layout to load in when launched with torchrun (default 1)")
    to_hf.add_argument("--permute-impl", choices=PERMUTE_IMPLS, default="auto",
                       help="token permutation of the loaded model's MoE dispatch (see "
                            "pathmoe-pretrain --help; default auto)")

    to_mg = sub.add_parser("to-megatron", help="Hugging Face directory -> megatron checkpoint",
                           description="Hugging Face Qwen2-MoE directory -> megatron model-only "
                                       "checkpoint that pathmoe-pretrain --load continues from.")
    to_mg.add_argument("--hf", required=True, help="Hugging Face model directory")
    to_mg.add_argument("--save", required=True, help="checkpoint root to write iter_XXXXXXX in")
    to_mg.add_argument("--iteration", type=int, default=None,
                       help="iteration to record (default: the exported one, else 0)")
    to_mg.add_argument("--routing", choices=IMPORTABLE_ROUTING, default=None,
                       help="router to rebuild (default: what config.json records); path ties "
                            "the gates of each block after checking they are equal")
    to_mg.add_argument("--path-block-size", type=int, default=None,
                       help="block size for --routing path (default: the recorded one)")
    return parser


def _layout(args: argparse.Namespace) -> ParallelLayout:
    return ParallelLayout(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                          args.expert_model_parallel_size)


def run(args: argparse.Namespace) -> str | None:
    if args.command == "to-hf":
        return export_to_hf(args.load, args.output, max_shard_size=args.max_shard_size,
                            dtype=args.dtype, overwrite=args.overwrite, layout=_layout(args),
                            permute_impl=args.permute_impl)
    return import_from_hf(args.hf, args.save, iteration=args.iteration, routing=args.routing,
                          path_block_size=args.path_block_size)


def main(argv: list[str] | None = None) -> int:
    quiet_warnings()
    args = build_parser().parse_args(argv)
    try:
        written = run(args)
    except ValueError as err:  # ConversionError, CheckpointError, ConfigError, DataError
        rank = os.environ.get("RANK")
        where = f" (rank {rank})" if rank not in (None, "0") else ""
        print(f"pathmoe-convert{where}: error: {err}", file=sys.stderr, flush=True)
        return 1
    if written:
        print(f"pathmoe-convert: wrote {written}", flush=True)
    if written and args.command == "to-hf" and not os.path.isfile(
            os.path.join(written, "tokenizer_config.json")):
        print("pathmoe-convert: note: the checkpoint's NullTokenizer has no text vocabulary, so "
              "no tokenizer was written; the model reads and writes token ids (its eos_token_id "
              "is the end of document)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
