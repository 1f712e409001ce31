"""Runs the study: for every (variant, seed) train, evaluate and analyse, each a subprocess of
the project's own command-line tools, several at a time.

A run's stages leave one output file each (``summary.json``, ``eval.json``,
``analysis/report.json``), written only when the stage succeeded; a stage whose output exists
is skipped, so an interrupted study resumes where it stopped. A failing stage stops the study
with the log file to read; completed runs are kept.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field

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
    threads_per_job: int = 1
    extra_train_flags: tuple[str, ...] = ()

    def run_dir(self, variant: Variant, seed: int) -> str:
        return os.path.join(self.output_dir, "runs", f"{variant.key}_seed{seed}")


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
            "--tokenizer-model", cfg.tokenizer,
            "--save", os.path.join(run, "checkpoints"),
            "--summary-json", os.path.join(run, "summary.json"), *cfg.extra_train_flags]


def eval_command(cfg: StudyConfig, variant: Variant, seed: int) -> list[str]:
    """Perplexity over the whole held-out set and LAMBADA (accuracy, bits per byte)."""
    run = cfg.run_dir(variant, seed)
    return [sys.executable, "-m", "megatron_pathmoe.eval.cli", "--device", "cpu",
            "--load", os.path.join(run, "checkpoints"), "--tasks", "lambada",
            "--limit", str(cfg.lambada_limit), "--valid-data-path", cfg.valid_data,
            "--label", f"{variant.key} seed {seed}", "--no-progress",
            "--output-json", os.path.join(run, "eval.json")]


def analysis_command(cfg: StudyConfig, variant: Variant, seed: int) -> list[str]:
    """The paper's path statistics on held-out text (tools/analyze_paths.py)."""
    run = cfg.run_dir(variant, seed)
    return [sys.executable, "-m", "megatron_pathmoe.analysis.cli", "--device", "cpu",
            "--checkpoint", f"{variant.key}={os.path.join(run, 'checkpoints')}",
            "--data", cfg.valid_data, "--tokens", str(cfg.analysis_tokens),
            "--robustness-tokens", str(cfg.robustness_tokens), "--robustness-seeds", "2",
            "--workers", "1", "--output-dir", os.path.join(run, "analysis")]


STAGES = (("train", train_command, "summary.json"),
          ("eval", eval_command, "eval.json"),
          ("analysis", analysis_command, os.path.join("analysis", "report.json")))


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


def _run_stage(cfg: StudyConfig, variant: Variant, seed: int, stage: tuple, env: dict) -> float:
    name, command, output = stage
    run = cfg.run_dir(variant, seed)
    os.makedirs(run, exist_ok=True)
    if name == "train":  # a run cut short restarts from scratch (same seed: same result)
        shutil.rmtree(os.path.join(run, "checkpoints"), ignore_errors=True)
    start = time.monotonic()
    run_logged(command(cfg, variant, seed), os.path.join(run, f"{name}.log"), env,
               os.path.join(run, output), f"{name} of {variant.key} seed {seed}")
    return time.monotonic() - start


def _run_one(cfg: StudyConfig, variant: Variant, seed: int, env: dict,
             progress: _Progress, stop: threading.Event) -> None:
    for stage in STAGES:
        if os.path.exists(os.path.join(cfg.run_dir(variant, seed), stage[2])):
            continue
        if stop.is_set():  # another run failed: finish no more stages
            return
        seconds = _run_stage(cfg, variant, seed, stage, env)
        progress.finished(stage[0], f"{stage[0]:8s} {variant.key} seed {seed}", seconds)


def run_study(cfg: StudyConfig, variants: list[Variant], seeds: list[int], jobs: int) -> None:
    """Every (variant, seed) run, ``jobs`` at a time, seed-major so that runs sharing the
    machine at the same moment are different variants of one seed (contention hits each
    variant alike). Stops at the first failure, after the runs in flight end."""
    env = {**os.environ, "OMP_NUM_THREADS": str(cfg.threads_per_job),
           "PYTHONWARNINGS": "ignore"}
    todo = [(v, s) for s in seeds for v in variants]
    remaining = {name: sum(not os.path.exists(os.path.join(cfg.run_dir(v, s), output))
                           for v, s in todo) for name, _, output in STAGES}
    pending = sum(remaining.values())
    if not pending:
        print("every run is complete; collecting results", flush=True)
        return
    progress = _Progress(remaining, jobs)
    print(f"{pending} stages to run over {len(todo)} runs, {jobs} at a time, "
          f"{cfg.threads_per_job} thread(s) each", flush=True)
    stop = threading.Event()
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(_run_one, cfg, v, s, env, progress, stop) for v, s in todo]
        try:
            for future in as_completed(futures):
                future.result()
        except BaseException:
            stop.set()
            for future in futures:
                future.cancel()
            raise
