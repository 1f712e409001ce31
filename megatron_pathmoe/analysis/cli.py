"""Command line of ``tools/analyze_paths.py``: expert-path analysis of checkpoints."""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap

from megatron_pathmoe.analysis.plots import PLOT_DESCRIPTIONS, PLOT_FILES
from megatron_pathmoe.analysis.report import DEFAULT_TOP_PATHS
from megatron_pathmoe.ops import PERMUTE_IMPLS
from megatron_pathmoe.platform import DEVICE_CHOICES
from megatron_pathmoe.runtime import is_rank0, quiet_warnings, report_failure

REPORT_FILE = "report.json"
REPORT_FORMAT = "pathmoe-path-report"
PROG = "analyze_paths"


def _outputs_help() -> str:
    rows = [(REPORT_FILE, "every metric of every model (see below), plus plot file names"),
            *((PLOT_FILES[name], text) for name, text in PLOT_DESCRIPTIONS.items()),
            ("paths/LABEL/", "the raw recording of each model: experts.npy uint8 [L,k,N], "
                             "probs.npy float16 [L,k,N], tokens.npy, positions.npy int32 [N], "
                             "meta.json (format: megatron_pathmoe/analysis/path_arrays.py); "
                             "3*L*k + 8 bytes per token")]
    lines = ["outputs (in --output-dir):"]
    for name, text in rows:
        lines += textwrap.wrap(text, 100, initial_indent=f"  {name:28s}",
                               subsequent_indent=" " * 30)
    lines += ["", "report.json, per model: perplexity; path_entropy (bits, unique paths, "
              "effective path space 2^H); coverage; top_paths; correlation (aligned top-1 "
              "agreement of consecutive layers, Cramér's V); consistency (Jaccard by pair and "
              "by window); engagement (run lengths); usage_entropy_bits by layer; expert_load "
              "and balance statistics; categories (Table 9 mix of the top paths, "
              "concentration); robustness (perplexity vs permutation probability). The "
              "definitions are in the docstrings of megatron_pathmoe/analysis/."]
    return "\n".join(lines[:-1] + textwrap.wrap(lines[-1], 100))


def build_parser() -> argparse.ArgumentParser:
    # Imports megatron (router hooks): after main's warning filter.
    from megatron_pathmoe.analysis.robustness import DEFAULT_P

    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.fill(
            "Record the expert path of every token through one or more PathMoE checkpoints "
            "and measure the paper's path statistics side by side. Run with python (one "
            "process) or torchrun with any TP/PP/EP layout.", 100),
        epilog=_outputs_help() + "\n\nexample:\n  python tools/analyze_paths.py --checkpoint "
               "indep=runs/indep --checkpoint path4=runs/path4 \\\n    --data "
               "runs/data/shakespeare_valid_text_document --tokens 200000 --output-dir "
               "runs/analysis")
    parser.add_argument("--checkpoint", action="append", required=True, metavar="[LABEL=]PATH",
                        help="a --save directory of pathmoe-pretrain (or one of its "
                             "iter_XXXXXXX folders); repeat to compare models. LABEL names "
                             "the model in plots (default: the directory name)")
    parser.add_argument("--data", required=True,
                        help="indexed dataset prefix (PREFIX.bin/.idx from "
                             "tools/preprocess_data.py), a .jsonl(.gz) file with a 'text' "
                             "field, or a plain text file")
    parser.add_argument("--tokens", type=int, default=100_000,
                        help="tokens to analyse from the start of --data (rounded down to "
                             "whole sequences; default %(default)s)")
    parser.add_argument("--output-dir", required=True, help="where the outputs below go")
    parser.add_argument("--seq-length", type=int, default=None,
                        help="sequence length (default: the checkpoint's)")
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--top-paths", type=int, default=DEFAULT_TOP_PATHS,
                        help="most frequent paths listed and used for the category analysis")
    parser.add_argument("--robustness-p", type=float, nargs="+", default=list(DEFAULT_P),
                        help="expert-permutation probabilities (default %(default)s)")
    parser.add_argument("--robustness-seeds", type=int, default=3,
                        help="random permutations averaged per p > 0")
    parser.add_argument("--robustness-tokens", type=int, default=16384,
                        help="tokens per robustness evaluation (0: skip the sweep)")
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1)
    parser.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    parser.add_argument("--expert-model-parallel-size", type=int, default=1)
    parser.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    parser.add_argument("--permute-impl", choices=PERMUTE_IMPLS, default="auto",
                        help="token permutation of the MoE dispatch (see pathmoe-pretrain "
                             "--help)")
    parser.add_argument("--workers", type=int, default=2,
                        help="threads for the path statistics (default %(default)s)")
    return parser


def parse_checkpoint_args(values: list[str]) -> list[tuple[str, str]]:
    """``[LABEL=]PATH`` strings -> unique (label, path) pairs."""
    pairs = []
    for value in values:
        label, sep, path = value.partition("=")
        if not sep:
            label, path = os.path.basename(os.path.normpath(value)), value
        if not label or not path or "/" in label or label in (".", ".."):
            raise ValueError(f"--checkpoint {value!r}: expected LABEL=PATH with a label "
                             "usable as a folder name")
        pairs.append((label, path))
    labels = [label for label, _ in pairs]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ValueError(f"--checkpoint labels {duplicates} are used twice; name each model "
                         "with LABEL=PATH")
    return pairs


def _layout(args) -> dict:
    """The parallel layout flags as PathMoEConfig fields (MoE under TP needs SP)."""
    tp = args.tensor_model_parallel_size
    return {"tensor_model_parallel_size": tp,
            "pipeline_model_parallel_size": args.pipeline_model_parallel_size,
            "expert_model_parallel_size": args.expert_model_parallel_size,
            "sequence_parallel": tp > 1}


def validate(args: argparse.Namespace, world_size: int) -> list[tuple[str, str]]:
    """Everything checkable before any process group: raises ValueError naming the flag."""
    from megatron_pathmoe.analysis.forward import check_data_source
    from megatron_pathmoe.checkpoint import CheckpointError, read_run_config

    if args.tokens < 1 or args.micro_batch_size < 1 or args.top_paths < 1 \
            or args.robustness_seeds < 1 or args.robustness_tokens < 0 or args.workers < 1:
        raise ValueError("--tokens, --micro-batch-size, --top-paths, --robustness-seeds and "
                         "--workers must be >= 1, --robustness-tokens >= 0")
    if any(not 0.0 <= p <= 1.0 for p in args.robustness_p):
        raise ValueError(f"--robustness-p values must be in [0, 1], got {args.robustness_p}")
    indexed = check_data_source(args.data)
    checkpoints = parse_checkpoint_args(args.checkpoint)
    layout = _layout(args)
    tokenizers = set()
    for label, path in checkpoints:
        try:
            run = read_run_config(path)
        except CheckpointError as err:
            raise ValueError(f"--checkpoint {label}={path}: {err}") from None
        tokenizers.add(run.tokenizer_sha256)
        if args.seq_length is not None and not 1 <= args.seq_length <= run.model.seq_length:
            raise ValueError(f"--seq-length {args.seq_length}: checkpoint {label} was trained "
                             f"with sequences of {run.model.seq_length}; use 1..that")
        run.model.replace(**layout).validate(world_size)
    if indexed and len(tokenizers) > 1:
        raise ValueError(f"--data {args.data!r} holds token ids of one tokenizer, but the "
                         "checkpoints were trained with different tokenizers; analyse them "
                         "separately or pass a text file")
    return checkpoints


def _summary_line(label: str, report: dict) -> str:
    windows = report["consistency"]["by_window"]
    robust = report.get("robustness", {}).get("sweep", [])
    worst = f" | +{robust[-1]['degradation_percent']:.0f}% ppl at p={robust[-1]['p']}" \
        if robust else ""
    entropy = report["path_entropy"]
    return (f"{label}: ppl {report['perplexity']:.2f} | H {entropy['entropy_bits']:.2f} bits, "
            f"{entropy['unique_paths']:,} unique paths | correlation "
            f"{100 * (report['correlation']['mean_agreement'] or 0):.1f}% | consistency(w=2) "
            f"{100 * windows.get(2, float('nan')):.1f}%{worst}")


def write_outputs(reports: dict, args: argparse.Namespace) -> dict:
    from megatron_pathmoe.analysis.plots import write_plots

    plots = write_plots(reports, args.output_dir)
    payload = {"format": REPORT_FORMAT, "version": 1, "data": args.data,
               "tokens_requested": args.tokens,
               "plots": {name: os.path.basename(path) for name, path in plots.items()},
               "models": reports}
    with open(os.path.join(args.output_dir, REPORT_FILE), "w") as f:
        json.dump(payload, f, indent=1)
    return plots


def run(args: argparse.Namespace, checkpoints: list[tuple[str, str]]) -> None:
    """The analysis on every rank (process group and parallel state set up here)."""
    from megatron_pathmoe.analysis.pipeline import AnalysisOptions, analyze_checkpoint
    from megatron_pathmoe.config import PathMoEConfig
    from megatron_pathmoe.runtime import distributed

    with distributed(PathMoEConfig(**_layout(args)), args.device) as device:
        options = AnalysisOptions(
            data=args.data, num_tokens=args.tokens, output_dir=args.output_dir,
            seq_length=args.seq_length, micro_batch_size=args.micro_batch_size,
            top_paths=args.top_paths, robustness_p=tuple(args.robustness_p),
            robustness_seeds=args.robustness_seeds, robustness_tokens=args.robustness_tokens,
            workers=args.workers, device=device, permute_impl=args.permute_impl)
        reports = {}
        for label, path in checkpoints:
            report = analyze_checkpoint(label, path, options)
            if is_rank0():
                reports[label] = report
                print(_summary_line(label, report), flush=True)
        if is_rank0():
            plots = write_outputs(reports, args)
            print(f"wrote {os.path.join(args.output_dir, REPORT_FILE)} and "
                  f"{len(plots)} plots to {args.output_dir}", flush=True)


def main(argv: list[str] | None = None) -> int:
    quiet_warnings()
    args = build_parser().parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        checkpoints = validate(args, world)
        os.makedirs(args.output_dir, exist_ok=True)
    except (ValueError, OSError) as err:  # CheckpointError, ConfigError, DataError included
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    try:
        run(args, checkpoints)
    except Exception as err:  # name the rank: torchrun interleaves every rank's stderr
        return report_failure(PROG, err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
