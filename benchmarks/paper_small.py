"""The paper's comparison at small scale: every routing variant, several seeds, real text.

Trains each variant (same model, data order, steps and schedule; only the router differs)
with the project's own trainer on the shipped Shakespeare corpus (4 plays held out), then
for every run measures held-out perplexity and LAMBADA accuracy / bits per byte
(pathmoe-evaluate) and the paper's path statistics (tools/analyze_paths.py), and writes a
Table-1 / Appendix-A style markdown table (mean ± std over seeds, differences against
Indep-MoE with the seed spread), its JSON, and plots, to ``--output-dir``.

    python benchmarks/paper_small.py                      # the full study (about 90 min, 2 cores)
    python benchmarks/paper_small.py --seeds 1 --variants indep_aux path4 --train-iters 50

Runs are resumable: rerunning the same command skips every finished stage. Aux-loss policy
as in the paper: PathMoE variants train without the load-balancing loss (LBL), the other
baselines with 0.01, and Indep-MoE both ways. ``--gpu`` instead measures tokens/s/GPU and
memory of the paper's 0.9B shape (benchmarks/paper_gpu.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megatron_pathmoe.data import default_demo_paths  # noqa: E402
from megatron_pathmoe.study.runner import ModelShape, StageError, StudyConfig, run_study  # noqa: E402
from megatron_pathmoe.study.variants import DEFAULT_VARIANTS, VARIANTS, select_variants  # noqa: E402

SHIPPED_TOKENIZER = default_demo_paths()["tokenizer"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = StudyConfig("", "", "", "")
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="runs/paper_small")
    p.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS),
                   help=f"from {', '.join(VARIANTS)}; the baseline indep_aux is always run "
                        "(default: %(default)s)")
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (default: %(default)s)")
    p.add_argument("--threads-per-job", type=int, default=d.threads_per_job)
    p.add_argument("--train-iters", type=int, default=d.train_iters)
    p.add_argument("--micro-batch-size", type=int, default=d.micro_batch_size)
    p.add_argument("--global-batch-size", type=int, default=d.global_batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--min-lr", type=float, default=d.min_lr)
    p.add_argument("--lambada-limit", type=int, default=d.lambada_limit,
                   help="LAMBADA items scored per run (default: %(default)s of 5,153)")
    p.add_argument("--analysis-tokens", type=int, default=d.analysis_tokens,
                   help="held-out tokens whose paths are analysed (default: %(default)s)")
    p.add_argument("--robustness-tokens", type=int, default=d.robustness_tokens)
    shape = p.add_argument_group("model (shared by every variant)")
    for f in dataclasses.fields(ModelShape):
        shape.add_argument(f"--{f.name.replace('_', '-')}", type=int, default=f.default)
    data = p.add_argument_group("data (default: the shipped Shakespeare corpus)")
    data.add_argument("--data-path", default=None, help="train .bin/.idx prefix")
    data.add_argument("--valid-data-path", default=None, help="held-out .bin/.idx prefix")
    data.add_argument("--tokenizer-model", default=SHIPPED_TOKENIZER)
    p.add_argument("--report-only", action="store_true",
                   help="only collect finished runs into the table (no training)")
    p.add_argument("--gpu", action="store_true",
                   help="run benchmarks/paper_gpu.py (0.9B shape, tokens/s/GPU and memory) "
                        "with every other argument instead (see its --help)")
    return p.parse_args(argv)


def shipped_corpus(out_dir: str) -> tuple[str, str]:
    """Megatron indexed binaries of data/shakespeare (preprocessed once, like the main job)."""
    from megatron_pathmoe.data import prepare_demo_data

    demo = prepare_demo_data(os.path.join(out_dir, "data"), workers=2)
    return demo["train_prefix"], demo["valid_prefix"]


def study_config(args: argparse.Namespace) -> StudyConfig:
    if (args.data_path is None) != (args.valid_data_path is None):
        raise ValueError("--data-path and --valid-data-path go together")
    if args.data_path is None:
        train, valid = shipped_corpus(args.output_dir)
    else:
        train, valid = args.data_path, args.valid_data_path
    shape = ModelShape(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ModelShape)})
    return StudyConfig(
        output_dir=args.output_dir, train_data=train, valid_data=valid,
        tokenizer=args.tokenizer_model, shape=shape, train_iters=args.train_iters,
        micro_batch_size=args.micro_batch_size, global_batch_size=args.global_batch_size,
        lr=args.lr, min_lr=args.min_lr, lambada_limit=args.lambada_limit,
        analysis_tokens=args.analysis_tokens, robustness_tokens=args.robustness_tokens,
        threads_per_job=args.threads_per_job)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--gpu" in argv:  # before parsing: flags like --train-iters belong to paper_gpu.py
        return subprocess.call([sys.executable, os.path.join(ROOT, "benchmarks", "paper_gpu.py"),
                                *(a for a in argv if a != "--gpu")])
    args = parse_args(argv)
    try:
        variants = select_variants(args.variants)
        if args.jobs < 1 or args.threads_per_job < 1 or not args.seeds:
            raise ValueError("--jobs and --threads-per-job must be >= 1, --seeds non-empty")
        os.makedirs(args.output_dir, exist_ok=True)
        cfg = study_config(args)
        if not args.report_only:
            run_study(cfg, variants, args.seeds, args.jobs)
        from megatron_pathmoe.study.report import write_report

        command = " ".join(["python", "benchmarks/paper_small.py", *argv])
        print(write_report(cfg, variants, args.seeds, command), end="")
    except (ValueError, StageError, FileNotFoundError) as err:
        print(f"paper_small: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
