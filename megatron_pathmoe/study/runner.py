"""Runs the study: for every (variant, seed) train, evaluate and analyse, each a subprocess of
the project's own command-line tools, several at a time.

A run's stages leave one output file each (``summary.json``, ``eval.json``,
``analysis/report.json``; with ``checkpoint_iterations`` one evaluation and one analysis per
checkpoint, under ``iter_XXXXXXX/``), written only when the stage succeeded; a stage whose output
exists is skipped, so an interrupted study resumes where it stopped, and training resumes from
the run's newest checkpoint. A failing stage stops the study with the log file to read;
completed runs are kept. With ``results_dir`` a finished run's outputs (JSON, no checkpoints)
are copied there, and a run whose results are all there is not run again.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Callable

from megatron_pathmoe.study.variants import Variant


class StageError(RuntimeError):
    """A stage's command failed; the message names the run, the stage and the log."""


@dataclass(frozen=True)
class ModelShape:
    """The model every variant shares (only the router differs)."""

    num_layers: int = 8
    hidden_size: int = 128
    num_attention_heads: int = 4
    num_query_groups: int = 2
    moe_ffn_hidden_size: int = 256
    num_experts: int = 8
    moe_router_topk: int = 2
    seq_length: int = 256

    def flags(self) -> list[str]:
        return [f"--{name.replace('_', '-')}={value}" for name, value in vars(self).items()]


@dataclass(frozen=True)
class StudyConfig:
    """Everything a run depends on besides its variant and seed."""

    output_dir: str
    train_data: str
    valid_data: str
    tokenizer: str
    shape: ModelShape = field(default_factory=ModelShape)
    train_iters: int = 200
    micro_batch_size: int = 16
    global_batch_size: int = 16
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_fraction: float = 0.1
    log_interval: int = 50
    lambada_limit: int = 500
    analysis_tokens: int = 32768
    robustness_tokens: int = 8192
    robustness_seeds: int = 2  # permutation draws per probability
    threads_per_job: int = 1
    extra_train_flags: tuple[str, ...] = ()
    checkpoint_iterations: tuple[int, ...] = ()  # () : evaluate the final model only
    robustness_p: tuple[float, ...] = ()  # (): the analysis CLI's default sweep
    valid_max_tokens: int | None = None  # None: perplexity on the whole held-out set
    results_dir: str = ""  # "": a run's results stay in its run directory

    def run_dir(self, variant: Variant, seed: int) -> str:
        return os.path.join(self.output_dir, "runs", run_name(variant, seed))

    def result_dir(self, variant: Variant, seed: int) -> str:
        """Where a finished run's JSON outputs are read from (and copied to)."""
        if not self.results_dir:
            return self.run_dir(variant, seed)
        return os.path.join(self.results_dir, "runs", run_name(variant, seed))


TRACKER_FILE = "latest_checkpointed_iteration.txt"  # the trainer's --save layout


def run_name(variant: Variant, seed: int) -> str:
    return f"{variant.key}_seed{seed}"


def split_run_name(name: str) -> tuple[str, int] | None:
    """(variant key, seed) of a ``run_name`` (a run folder's name); None for another name."""
    key, sep, seed = name.rpartition("_seed")
    return (key, int(seed)) if sep and key and seed.isdigit() else None


def iteration_folder(iteration: int) -> str:
    """The checkpoint folder name of the trainer (and of a run's per-checkpoint outputs)."""
    return f"iter_{iteration:07d}"


def _save_flags(cfg: StudyConfig, run: str) -> list[str]:
    """A checkpoint at every evaluated iteration (their gcd as interval), and resumption from
    the newest one a cut-short run left (same data order: the sample count is restored)."""
    flags = ["--save", os.path.join(run, "checkpoints")]
    if cfg.checkpoint_iterations:
        flags += ["--save-interval", str(math.gcd(*cfg.checkpoint_iterations))]
    if _resumable_iteration(cfg, run) is not None:
        flags += ["--load", os.path.join(run, "checkpoints")]
    return flags


def _resumable_iteration(cfg: StudyConfig, run: str) -> int | None:
    """The iteration of the run's newest complete checkpoint when training is unfinished (the
    trainer's tracker file is replaced only once a save is complete)."""
    tracker = os.path.join(run, "checkpoints", TRACKER_FILE)
    if not cfg.checkpoint_iterations or not os.path.isfile(tracker):
        return None
    with open(tracker) as f:
        text = f.read().strip()
    return int(text) if text.isdigit() and int(text) < cfg.train_iters else None


def train_command(cfg: StudyConfig, variant: Variant, seed: int) -> list[str]:
    """pathmoe-pretrain for one run: same data order, steps and schedule for every variant."""
    run = cfg.run_dir(variant, seed)
    warmup = max(1, round(cfg.warmup_fraction * cfg.train_iters))
    return [sys.executable, "-m", "megatron_pathmoe.training.pretrain", "--device", "cpu",
            *cfg.shape.flags(), *variant.trainer_flags(),
            "--micro-batch-size", str(cfg.micro_batch_size),
            "--global-batch-size", str(cfg.global_batch_size),
            "--train-iters", str(cfg.train_iters), "--lr", repr(cfg.lr),
            "--min-lr", repr(cfg.min_lr), "--lr-warmup-iters", str(warmup),
            "--seed", str(seed), "--log-interval", str(cfg.log_interval),
            "--eval-interval", "0", "--eval-iters", "1",
            "--data-path", cfg.train_data, "--valid-data-path", cfg.valid_data,
            "--tokenizer-model", cfg.tokenizer, *_save_flags(cfg, run),
            "--summary-json", os.path.join(run, "summary.json"), *cfg.extra_train_flags]


def checkpoint_path(run: str, iteration: int | None) -> str:
    """The evaluated model: the final one (the --save root) or one iter_XXXXXXX folder."""
    root = os.path.join(run, "checkpoints")
    return root if iteration is None else os.path.join(root, iteration_folder(iteration))


def _output_folder(iteration: int | None) -> str:
    return "" if iteration is None else iteration_folder(iteration)


def eval_command(cfg: StudyConfig, variant: Variant, seed: int,
                 iteration: int | None = None) -> list[str]:
    """Perplexity over the held-out set and LAMBADA (accuracy, bits per byte)."""
    run = cfg.run_dir(variant, seed)
    cap = [] if cfg.valid_max_tokens is None else ["--valid-max-tokens", str(cfg.valid_max_tokens)]
    return [sys.executable, "-m", "megatron_pathmoe.eval.cli", "--device", "cpu",
            "--load", checkpoint_path(run, iteration), "--tasks", "lambada",
            "--limit", str(cfg.lambada_limit), "--valid-data-path", cfg.valid_data, *cap,
            "--label", f"{variant.key} seed {seed}", "--no-progress",
            "--output-json", os.path.join(run, _output_folder(iteration), "eval.json")]


def analysis_command(cfg: StudyConfig, variant: Variant, seed: int,
                     iteration: int | None = None, output_name: str = "analysis") -> list[str]:
    """The paper's path statistics on held-out text (tools/analyze_paths.py), into the
    run's (checkpoint's) ``output_name`` folder."""
    run = cfg.run_dir(variant, seed)
    sweep = ["--robustness-p", *map(repr, cfg.robustness_p)] if cfg.robustness_p else []
    return [sys.executable, "-m", "megatron_pathmoe.analysis.cli", "--device", "cpu",
            "--checkpoint", f"{variant.key}={checkpoint_path(run, iteration)}",
            "--data", cfg.valid_data, "--tokens", str(cfg.analysis_tokens),
            "--robustness-tokens", str(cfg.robustness_tokens),
            "--robustness-seeds", str(cfg.robustness_seeds), *sweep, "--workers", "1",
            "--output-dir", os.path.join(run, _output_folder(iteration), output_name)]


@dataclass(frozen=True)
class Stage:
    """One subprocess of a run: its kind (train / eval / analysis), command and output file
    (relative to the run directory)."""

    kind: str
    command: Callable[[StudyConfig, Variant, int], list[str]]
    output: str
    iteration: int | None = None

    def argv(self, cfg: StudyConfig, variant: Variant, seed: int) -> list[str]:
        if self.iteration is None:
            return self.command(cfg, variant, seed)
        return self.command(cfg, variant, seed, self.iteration)

    def label(self) -> str:
        return self.kind if self.iteration is None else f"{self.kind}@{self.iteration}"


def run_stages(cfg: StudyConfig) -> list[Stage]:
    """Training, then evaluation and analysis of the final model or of every checkpoint."""
    iterations = cfg.checkpoint_iterations or (None,)
    stages = [Stage("train", train_command, "summary.json")]
    for it in iterations:
        folder = _output_folder(it)
        stages += [Stage("eval", eval_command, os.path.join(folder, "eval.json"), it),
                   Stage("analysis", analysis_command,
                         os.path.join(folder, "analysis", "report.json"), it)]
    return stages


@dataclass
class _Progress:
    """Counts finished stages; the time left is each remaining stage at the mean duration of
    its kind so far (training dominates), divided among the parallel jobs."""

    remaining: dict[str, int]
    jobs: int
    done: int = 0
    seconds: dict[str, list[float]] = field(default_factory=dict)
    start: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def finished(self, stage: str, what: str, seconds: float) -> None:
        with self.lock:
            self.done += 1
            self.remaining[stage] -= 1
            self.seconds.setdefault(stage, []).append(seconds)
            left = sum(n * self._typical(kind) for kind, n in self.remaining.items())
            total = self.done + sum(self.remaining.values())
            elapsed = time.monotonic() - self.start
            print(f"[{self.done}/{total}] {what} ({seconds:.0f} s) | elapsed "
                  f"{elapsed / 60:.1f} min, about {left / self.jobs / 60:.0f} min left",
                  flush=True)

    def _typical(self, stage: str) -> float:
        seen = self.seconds.get(stage) or [s for v in self.seconds.values() for s in v]
        return sum(seen) / len(seen)


def run_logged(command: list[str], log_path: str, env: dict, output: str, what: str) -> None:
    """Run ``command`` with stdout and stderr into ``log_path``; StageError (naming ``what``,
    the log and its last lines) unless it exits 0 and leaves ``output``."""
    with open(log_path, "w") as log:
        proc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                              cwd=os.getcwd())
    if proc.returncode != 0 or not os.path.exists(output):
        with open(log_path, errors="replace") as f:
            tail = "".join(f.readlines()[-5:])
        raise StageError(f"{what} failed (exit {proc.returncode}); full log: {log_path}\n{tail}")


def _run_stage(cfg: StudyConfig, variant: Variant, seed: int, stage: Stage, env: dict) -> float:
    run = cfg.run_dir(variant, seed)
    os.makedirs(os.path.join(run, os.path.dirname(stage.output)), exist_ok=True)
    if stage.kind == "train" and _resumable_iteration(cfg, run) is None:
        shutil.rmtree(os.path.join(run, "checkpoints"), ignore_errors=True)  # restart from 0
    start = time.monotonic()
    log = os.path.join(run, f"{stage.label().replace('@', '_')}.log")
    run_logged(stage.argv(cfg, variant, seed), log, env, os.path.join(run, stage.output),
               f"{stage.label()} of {variant.key} seed {seed}")
    return time.monotonic() - start


def is_published(cfg: StudyConfig, variant: Variant, seed: int) -> bool:
    """Every stage output of the run is in its result directory."""
    return all(os.path.exists(os.path.join(cfg.result_dir(variant, seed), stage.output))
               for stage in run_stages(cfg))


def _publish(cfg: StudyConfig, variant: Variant, seed: int) -> None:
    """Copy the run's JSON outputs (not its checkpoints, logs or path recordings) to its
    result directory; the copy is complete before the last file lands (summary.json)."""
    run, dest = cfg.run_dir(variant, seed), cfg.result_dir(variant, seed)
    if run == dest:
        return
    for stage in reversed(run_stages(cfg)):
        os.makedirs(os.path.join(dest, os.path.dirname(stage.output)), exist_ok=True)
        shutil.copyfile(os.path.join(run, stage.output), os.path.join(dest, stage.output))


def _run_one(cfg: StudyConfig, variant: Variant, seed: int, env: dict,
             progress: _Progress, stop: threading.Event,
             on_finished: Callable[[Variant, int], None] | None) -> None:
    if is_published(cfg, variant, seed):
        return
    for stage in run_stages(cfg):
        if os.path.exists(os.path.join(cfg.run_dir(variant, seed), stage.output)):
            continue
        if stop.is_set():  # another run failed: finish no more stages
            return
        seconds = _run_stage(cfg, variant, seed, stage, env)
        progress.finished(stage.kind, f"{stage.label():14s} {variant.key} seed {seed}", seconds)
    _publish(cfg, variant, seed)
    if on_finished is not None:
        on_finished(variant, seed)


def _pending(cfg: StudyConfig, todo: list[tuple[Variant, int]]) -> dict[str, int]:
    """Stages left per kind; a published run has none."""
    remaining: dict[str, int] = {}
    for v, s in todo:
        for stage in run_stages(cfg):
            left = not is_published(cfg, v, s) and not os.path.exists(
                os.path.join(cfg.run_dir(v, s), stage.output))
            remaining[stage.kind] = remaining.get(stage.kind, 0) + left
    return remaining


def run_study(cfg: StudyConfig, variants: list[Variant], seeds: list[int], jobs: int,
              on_finished: Callable[[Variant, int], None] | None = None) -> None:
    """Every (variant, seed) run, ``jobs`` at a time, seed-major so that runs sharing the
    machine at the same moment are different variants of one seed (contention hits each
    variant alike). ``on_finished(variant, seed)`` is called after each run's results are
    published (one call at a time). Stops at the first failure, after the runs in flight end."""
    env = {**os.environ, "OMP_NUM_THREADS": str(cfg.threads_per_job),
           "PYTHONWARNINGS": "ignore"}
    todo = [(v, s) for s in seeds for v in variants]
    remaining = _pending(cfg, todo)
    pending = sum(remaining.values())
    if not pending:
        print("every run is complete; collecting results", flush=True)
        return
    progress = _Progress(remaining, jobs)
    print(f"{pending} stages to run over {len(todo)} runs, {jobs} at a time, "
          f"{cfg.threads_per_job} thread(s) each", flush=True)
    stop = threading.Event()
    lock = threading.Lock()

    def finished(variant: Variant, seed: int) -> None:
        with lock:
            on_finished(variant, seed)

    callback = finished if on_finished is not None else None
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(_run_one, cfg, v, s, env, progress, stop, callback)
                   for v, s in todo]
        try:
            for future in as_completed(futures):
                future.result()
        except BaseException:
            stop.set()
            for future in futures:
                future.cancel()
            raise
