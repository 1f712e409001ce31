"""The paper's length-dependent claims at the largest scale a CPU affords: trajectories.

Trains PathB4-MoE without LBL, Indep-MoE with LBL 0.01 and without, and PathB4-MoE with LBL 0.01
(8 layers, d=128, 16 experts top-4 of half the small study's expert width, block size 4) for
1,500 steps of 16 x 256 tokens on a mixed-domain corpus (Python 3.11 docs + Linux kernel docs +
Shakespeare, split by file; megatron_pathmoe.study.corpus), 3 seeds, and evaluates the
checkpoints at steps 250, 500, 1,000 and 1,500: held-out perplexity, LAMBADA bits per byte, the
paper's path statistics, robustness at p=1 and load balance. The report (results.md,
results.json, trajectory plots in --results-dir) gives every metric at every checkpoint, the
PathB4 − baseline differences paired by seed and a verdict per paper direction.

    python benchmarks/paper_medium.py                 # run what is missing, then the report
    python benchmarks/paper_medium.py --report-only   # rebuild the report from --results-dir
    python benchmarks/paper_medium.py --expert-drift  # + are idle experts untrained? (needs
                                                      #   the checkpoints in --output-dir)
    python benchmarks/paper_medium.py --robustness-recheck  # + robustness at the last checkpoint
                                                      #   with 8 draws on 32k tokens (idem)

Resumable at two levels: a run whose JSON results are in --results-dir is never run again (so a
fresh machine resumes from the committed results), and an unfinished run resumes its training
from its newest checkpoint under --output-dir when that still exists. Runs go seed-major (seed 1
of every variant first). --commit commits each finished run's results and the regenerated report
in the git repository holding --results-dir, touching no other path. The whole study is many
hours on 2 cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megatron_pathmoe.data import DataError  # noqa: E402
from megatron_pathmoe.study.robustness_recheck import run_recheck  # noqa: E402
from megatron_pathmoe.study.runner import (  # noqa: E402
    ModelShape, StageError, StudyConfig, run_study)
from megatron_pathmoe.study.variants import (  # noqa: E402
    ABLATIONS, VARIANTS, Variant, select_variants)

MEDIUM_VARIANTS = ("indep_aux", "path4", "indep", "path4_aux")
MEDIUM_SHAPE = ModelShape(moe_ffn_hidden_size=128, num_experts=16, moe_router_topk=4)
COMMAND = "python benchmarks/paper_medium.py"  # what the report names (the same on every rebuild)


def medium_config(output_dir: str, results_dir: str, corpus: dict) -> StudyConfig:
    """The study as specified in issue 21 (before --set overrides)."""
    return StudyConfig(output_dir=output_dir, train_data=corpus["train_prefix"],
                       valid_data=corpus["valid_prefix"], tokenizer=corpus["tokenizer"],
                       shape=MEDIUM_SHAPE, train_iters=1500,
                       checkpoint_iterations=(250, 500, 1000, 1500), robustness_p=(1.0,),
                       results_dir=results_dir)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="runs/paper_medium",
                   help="scratch: checkpoints, logs, path recordings (large; not committed)")
    p.add_argument("--results-dir", default=os.path.join(ROOT, "benchmarks", "results",
                                                         "paper_medium"),
                   help="each finished run's JSON and the report (default: %(default)s)")
    p.add_argument("--corpus-dir", default=None,
                   help="built corpus (default: OUTPUT_DIR/corpus, built there when missing)")
    p.add_argument("--variants", nargs="+", default=list(MEDIUM_VARIANTS),
                   help="default: %(default)s (indep_aux is always run)")
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (default: %(default)s)")
    p.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE",
                   help="override a StudyConfig or ModelShape field, e.g. train_iters=40 "
                        "checkpoint_iterations=20,40 num_layers=2 (for toy runs)")
    p.add_argument("--commit", action="store_true",
                   help="git-commit each finished run's results and the report")
    p.add_argument("--report-only", action="store_true",
                   help="only rebuild the report from --results-dir (no training, no corpus)")
    p.add_argument("--expert-drift", action="store_true",
                   help="before the report, compare every published run's experts at each "
                        "evaluated checkpoint (in --output-dir) with their initial weights "
                        "(megatron_pathmoe.study.expert_drift) into RESULTS_DIR/expert_drift.json")
    p.add_argument("--robustness-recheck", action="store_true",
                   help="also re-measure robustness at p=1 of every published run's last "
                        "checkpoint in --output-dir with more draws on more tokens "
                        "(megatron_pathmoe.study.robustness_recheck), --jobs at a time; "
                        "skips runs already re-measured")
    return p.parse_args(argv)


def _convert(template, text: str):
    if isinstance(template, tuple):
        kind = type(template[0]) if template else str
        return tuple(kind(x) for x in text.split(",") if x)
    if template is None or isinstance(template, str):
        return None if text == "None" else (int(text) if template is None else text)
    return type(template)(text)


def apply_overrides(cfg: StudyConfig, items: list[str]) -> StudyConfig:
    """--set FIELD=VALUE on the config or its model shape; ValueError names a bad item."""
    config_fields = {f.name for f in dataclasses.fields(StudyConfig)} - {"shape"}
    shape_fields = {f.name for f in dataclasses.fields(ModelShape)}
    changes, shape = {}, {}
    for item in items:
        name, sep, text = item.partition("=")
        target = changes if name in config_fields else shape if name in shape_fields else None
        if not sep or target is None:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE with FIELD one of "
                             f"{sorted(config_fields | shape_fields)}")
        owner = cfg if target is changes else cfg.shape
        try:
            target[name] = _convert(getattr(owner, name), text)
        except ValueError:
            raise ValueError(f"--set {item!r}: {text!r} is not a valid {name}") from None
    return dataclasses.replace(cfg, shape=dataclasses.replace(cfg.shape, **shape), **changes)


def corpus_for(args: argparse.Namespace, build: bool) -> dict:
    """The corpus's paths, built when missing (and ``build``), its manifest copied next to the
    results as corpus.json."""
    from megatron_pathmoe.study.corpus import build_corpus, corpus_paths

    corpus_dir = args.corpus_dir or os.path.join(args.output_dir, "corpus")
    paths = corpus_paths(corpus_dir)
    if build and not os.path.exists(paths["manifest"]):
        print(f"building the corpus in {corpus_dir}", flush=True)
        build_corpus(corpus_dir, workers=2)
    if build:
        os.makedirs(args.results_dir, exist_ok=True)
        shutil.copyfile(paths["manifest"], os.path.join(args.results_dir, "corpus.json"))
    return paths


def git_commit(repo: str, paths: list[str], message: str, tries: int = 60) -> None:
    """``git add`` + ``git commit -- paths`` (only these paths), retried while another
    process holds the index lock."""
    for attempt in range(tries):
        add = subprocess.run(["git", "-C", repo, "add", *paths], capture_output=True, text=True)
        commit = add if add.returncode else subprocess.run(
            ["git", "-C", repo, "commit", "-q", "-m", message, "--", *paths],
            capture_output=True, text=True)
        if commit.returncode == 0 or "nothing to commit" in commit.stdout + commit.stderr:
            return
        if "index.lock" not in commit.stderr or attempt == tries - 1:
            raise StageError(f"git commit of {paths} failed: {commit.stderr.strip()}")
        time.sleep(5)


def report(cfg: StudyConfig, variants: list[Variant], seeds: list[int]) -> list[str]:
    """Rebuild the report in the results directory; returns its files."""
    from megatron_pathmoe.study.balance import PLOT
    from megatron_pathmoe.study.trajectory import write_report

    os.makedirs(cfg.results_dir, exist_ok=True)
    write_report(cfg, variants, seeds, COMMAND, cfg.results_dir)
    return [os.path.join(cfg.results_dir, f) for f in (
        "results.md", "results.json", "trajectory_differences.png", "trajectory_values.png",
        PLOT)]


def expert_drift(cfg: StudyConfig, variants: list[Variant], seeds: list[int]) -> str:
    """expert_drift.json over every published run whose checkpoints are in --output-dir."""
    from megatron_pathmoe.study.balance import DRIFT_FILE

    runs = [cfg.run_dir(v, s) for s in seeds for v in variants
            if os.path.exists(os.path.join(cfg.result_dir(v, s), "summary.json"))
            and os.path.isdir(os.path.join(cfg.run_dir(v, s), "checkpoints"))]
    if not runs:
        raise FileNotFoundError(f"--expert-drift: no published run has its checkpoints under "
                                f"{cfg.output_dir}/runs")
    out = os.path.join(cfg.results_dir, DRIFT_FILE)
    command = [sys.executable, "-m", "megatron_pathmoe.study.expert_drift", *runs,
               "--iterations", *map(str, cfg.checkpoint_iterations), "--output", out]
    print(f"expert drift of {len(runs)} run(s) -> {out}", flush=True)
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    if subprocess.run(command, env=env).returncode:
        raise StageError(f"expert drift failed: {' '.join(command)}")
    return out


def finished_hook(cfg: StudyConfig, variants: list[Variant], seeds: list[int], commit: bool):
    """After each run: record where and when it ran, rebuild the report, commit both."""
    def on_finished(variant: Variant, seed: int) -> None:
        run_dir = cfg.result_dir(variant, seed)
        with open(os.path.join(run_dir, "machine.txt"), "w") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
                    f"{platform.machine()}, {os.cpu_count()} cores, {cfg.threads_per_job} "
                    f"thread(s) per run, shared machine, nice {os.nice(0)}\n")
        repo = subprocess.run(["git", "-C", cfg.results_dir, "rev-parse", "--show-toplevel"],
                              capture_output=True, text=True).stdout.strip()
        name = f"{variant.key}_seed{seed}"
        if commit:
            git_commit(repo, [run_dir], f"paper_medium: {name} finished")
        files = report(cfg, variants, seeds)
        if commit:
            corpus = os.path.join(cfg.results_dir, "corpus.json")
            git_commit(repo, files + [corpus], f"paper_medium: report with {name}")
        print(f"{name} published in {run_dir}", flush=True)
    return on_finished


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        variants = select_variants(args.variants, {**VARIANTS, **ABLATIONS})
        if args.jobs < 1 or not args.seeds:
            raise ValueError("--jobs must be >= 1 and --seeds non-empty")
        corpus = corpus_for(args, build=not args.report_only)
        cfg = apply_overrides(medium_config(args.output_dir, os.path.abspath(args.results_dir),
                                            corpus), args.set)
        if not args.report_only:
            run_study(cfg, variants, args.seeds, args.jobs,
                      finished_hook(cfg, variants, args.seeds, args.commit))
        if args.expert_drift:
            expert_drift(cfg, variants, args.seeds)
        if args.robustness_recheck:
            run_recheck(cfg, variants, args.seeds, args.jobs)
        report(cfg, variants, args.seeds)
        with open(os.path.join(cfg.results_dir, "results.md")) as f:
            print(f.read(), end="")
    except (ValueError, StageError, DataError, FileNotFoundError) as err:
        print(f"paper_medium: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
