"""Cluster operations with Megatron-LM's flags and meanings: one command for the first launch
and every requeue, graceful exits (time budget, SIGTERM, interval), what a ``--load`` restores
(``--no-load-optim``, ``--no-load-rng``, ``--finetune``), the checkpoint format, the data
sources beyond ``--data-path`` (``--test-data-path``, ``--mock-data``, ``--num-workers``) and
manual garbage collection (``--manual-gc``)."""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import signal
import time
from dataclasses import dataclass
from typing import Any, Iterator

from megatron_pathmoe.config import ConfigError, PathMoEConfig, dataclass_from_namespace
from megatron_pathmoe.data.encoders import TokenizerSpec

CKPT_FORMATS = ("torch_dist",)  # --ckpt-format: the one megatron-core dist checkpointing writes
# Param-group LR bounds that the optimizer state of a checkpoint carries: a resume keeps them.
DECOUPLED_LR_FIELDS = ("decoupled_lr", "decoupled_min_lr")


@dataclass
class ClusterConfig:
    exit_duration_in_mins: float | None = None
    exit_signal_handler: bool = False
    exit_interval: int | None = None
    no_load_optim: bool = False
    no_load_rng: bool = False
    finetune: bool = False
    ckpt_format: str = "torch_dist"
    auto_detect_ckpt_format: bool = False
    test_data_path: list[str] | None = None
    mock_data: bool = False
    num_workers: int = 0
    manual_gc: bool = False
    manual_gc_interval: int = 0
    manual_gc_eval: bool = True

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> "ClusterConfig":
        return dataclass_from_namespace(cls, ns)

    def load_options(self) -> Any:
        """What ``--load`` restores (``checkpoint.LoadOptions``)."""
        from megatron_pathmoe.checkpoint import LoadOptions

        return LoadOptions(optimizer=not self.no_load_optim, rng=not self.no_load_rng,
                           finetune=self.finetune)


def add_cluster_args(parser: argparse.ArgumentParser) -> None:
    """Megatron-LM's flags for long cluster jobs (``megatron/training/arguments.py``)."""
    d = ClusterConfig()
    g = parser.add_argument_group("cluster operations")
    g.add_argument("--exit-duration-in-mins", type=float, default=d.exit_duration_in_mins,
                   help="save and exit 0 once the job has run this long (set below the "
                        "allocation's time limit)")
    g.add_argument("--exit-signal-handler", action="store_true",
                   help="on SIGTERM (SLURM's preemption signal) finish the step, save, exit 0")
    g.add_argument("--exit-interval", type=int, default=d.exit_interval,
                   help="save and exit when the iteration is a multiple of this")
    g.add_argument("--no-load-optim", action="store_true",
                   help="--load restores weights and iteration, not the optimizer state")
    g.add_argument("--no-load-rng", action="store_true",
                   help="--load does not restore the RNG states")
    g.add_argument("--finetune", action="store_true",
                   help="--load the weights only: iteration 0, fresh optimizer and RNG")
    g.add_argument("--ckpt-format", choices=CKPT_FORMATS, default=d.ckpt_format,
                   help="checkpoint format (megatron-core dist checkpointing)")
    g.add_argument("--auto-detect-ckpt-format", action="store_true",
                   help="accepted for Megatron-LM scripts (only torch_dist is read)")
    g.add_argument("--test-data-path", nargs="+", default=d.test_data_path,
                   help="test prefixes, evaluated once after training")
    g.add_argument("--mock-data", action="store_true",
                   help="synthetic tokens instead of --data-path (no files)")
    g.add_argument("--num-workers", type=int, default=d.num_workers,
                   help="DataLoader worker processes (data order unchanged)")
    g.add_argument("--manual-gc", action="store_true",
                   help="turn Python's threshold garbage collector off for the training loop "
                        "and collect at the same points on every rank (before and after each "
                        "evaluation, every --manual-gc-interval steps), so no rank stalls the "
                        "others' collectives with a collection of its own")
    g.add_argument("--manual-gc-interval", type=int, default=d.manual_gc_interval,
                   help="with --manual-gc: collect every this many steps (0: never between "
                        "steps)")
    g.add_argument("--no-manual-gc-eval", dest="manual_gc_eval", action="store_false",
                   help="with --manual-gc: no collection around evaluations")


def validate_cluster(cluster: ClusterConfig) -> None:
    """Checks that need no process group; raises ``ConfigError`` naming the flag."""
    if cluster.exit_duration_in_mins is not None and cluster.exit_duration_in_mins <= 0:
        raise ConfigError("--exit-duration-in-mins must be positive (minutes of training "
                          "before saving and exiting)")
    if cluster.exit_interval is not None and cluster.exit_interval < 1:
        raise ConfigError("--exit-interval must be at least 1 (iterations)")
    if cluster.num_workers < 0:
        raise ConfigError("--num-workers must be >= 0 (0 reads the data in the training "
                          "process)")
    if cluster.manual_gc_interval < 0:
        raise ConfigError("--manual-gc-interval must be >= 0 (0: no collection between steps)")
    if cluster.manual_gc_interval and not cluster.manual_gc:
        raise ConfigError("--manual-gc-interval needs --manual-gc (without it Python collects "
                          "on its own thresholds)")


def check_data_sources(cluster: ClusterConfig, data_path: list[str],
                       valid_data_path: list[str]) -> None:
    """``--mock-data`` replaces the data files; ``--test-data-path`` files must exist."""
    from megatron_pathmoe.data import parse_blend

    if cluster.mock_data and (data_path or valid_data_path):
        raise ConfigError("--mock-data trains on synthetic tokens: drop --data-path and "
                          "--valid-data-path, or drop --mock-data")
    if not cluster.mock_data:
        parse_blend(data_path, "--data-path")  # checks every .bin/.idx exists
    if cluster.test_data_path:
        parse_blend(cluster.test_data_path, "--test-data-path")


class ManualGC:
    """Megatron-LM's ``--manual-gc``: Python's automatic collector is off from ``start()`` to
    ``close()``; collections run at ``start()``, after every ``--manual-gc-interval``-th step
    and around evaluations (unless ``--no-manual-gc-eval``). ``collections`` counts them."""

    def __init__(self, cluster: ClusterConfig) -> None:
        self.cluster = cluster
        self.collections = 0
        self._was_enabled: bool | None = None

    def _collect(self) -> None:
        gc.collect()
        self.collections += 1

    def start(self) -> None:
        if self.cluster.manual_gc and self._was_enabled is None:
            self._was_enabled = gc.isenabled()
            gc.disable()
            self._collect()

    def after_step(self, iteration: int) -> None:
        interval = self.cluster.manual_gc_interval
        if self.cluster.manual_gc and interval and iteration % interval == 0:
            self._collect()

    @contextlib.contextmanager
    def around_evaluation(self) -> Iterator[None]:
        collect = self.cluster.manual_gc and self.cluster.manual_gc_eval
        if collect:
            self._collect()
        yield
        if collect:
            self._collect()

    def close(self) -> None:
        """Give Python its collector back (as it was before ``start()``)."""
        if self._was_enabled:
            gc.enable()
        self._was_enabled = None


class ExitPolicy:
    """When a job saves and exits 0 before ``--train-iters`` (Megatron-LM's
    ``checkpoint_and_decide_exit``): SIGTERM received by any rank (``--exit-signal-handler``),
    the slowest rank's wall time past ``--exit-duration-in-mins``, or an iteration that is a
    multiple of ``--exit-interval``. The first two are decided by one all-reduce (max) over all
    ranks after each step, so every rank stops after the same step."""

    def __init__(self, cluster: ClusterConfig, start_time: float | None = None) -> None:
        self.cluster = cluster
        self.start_time = time.time() if start_time is None else start_time
        self.signalled = False
        self._previous = None
        if cluster.exit_signal_handler:
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signalled = True  # acted on after the current step, on every rank

    def check(self, iteration: int) -> str | None:
        """The reason to stop after ``iteration``, else None (collective when a signal handler
        or a duration is set)."""
        cluster = self.cluster
        if cluster.exit_signal_handler or cluster.exit_duration_in_mins is not None:
            signalled, minutes = self._agree()
            if signalled:
                return "received SIGTERM (--exit-signal-handler)"
            if cluster.exit_duration_in_mins is not None and \
                    minutes > cluster.exit_duration_in_mins:
                return (f"ran {minutes:.2f} min, past --exit-duration-in-mins "
                        f"{cluster.exit_duration_in_mins:g}")
        if cluster.exit_interval and iteration % cluster.exit_interval == 0:
            return f"iteration {iteration} is a multiple of --exit-interval {cluster.exit_interval}"
        return None

    def _agree(self) -> tuple[bool, float]:
        import torch

        from megatron_pathmoe.runtime import all_reduce_to_cpu

        mine = torch.tensor([float(self.signalled), (time.time() - self.start_time) / 60.0],
                            dtype=torch.float64)
        signalled, minutes = all_reduce_to_cpu(mine, op=torch.distributed.ReduceOp.MAX).tolist()
        return signalled > 0, minutes

    def close(self) -> None:
        """Give SIGTERM its previous handler back."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


def check_resumable(path: str, model: PathMoEConfig, tokenizer: TokenizerSpec,
                    decoupled_lr: dict[str, float | None] | None = None) -> None:
    """Fail before launch when --load names a damaged checkpoint, a different model, a
    different tokenizer or other ``--decoupled-*lr`` values. A path without any checkpoint yet
    passes: the run starts from scratch (the first launch of a ``--save X --load X`` job)."""
    from megatron_pathmoe.checkpoint import check_compatible, find_checkpoint, read_run_config
    from megatron_pathmoe.checkpoint.record import tokenizer_differences

    if find_checkpoint(path) is None:
        return
    saved = read_run_config(path)
    differences = tokenizer_differences(saved, tokenizer)
    if differences:
        raise ConfigError(f"--load {path} was trained with another tokenizer: "
                          f"{'; '.join(differences)}; use the checkpoint's tokenizer")
    probe = model.replace(vocab_size=saved.model.vocab_size)  # vocab comes from the tokenizer
    check_compatible(saved.model, probe, f"--load {path}")
    changed = [f"--{name.replace('_', '-')} {value} (the checkpoint's: "
               f"{saved.training.get(name)})" for name, value in (decoupled_lr or {}).items()
               if value != saved.training.get(name)]
    if changed:
        raise ConfigError(f"--load {path}: {'; '.join(changed)}; the embedding and output "
                          "layer's param group keeps its LR bounds in the optimizer state, so "
                          "resume with the checkpoint's values")
