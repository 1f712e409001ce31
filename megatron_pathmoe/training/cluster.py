"""Cluster operations with Megatron-LM's flags and meanings: one command for the first launch
and every requeue, graceful exits (time budget, SIGTERM, interval), what a ``--load`` restores
(``--no-load-optim``, ``--no-load-rng``, ``--finetune``), the checkpoint format, and the data
sources beyond ``--data-path`` (``--test-data-path``, ``--mock-data``, ``--num-workers``)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields

from megatron_pathmoe.config import ConfigError, PathMoEConfig
from megatron_pathmoe.data.encoders import TokenizerSpec

CKPT_FORMATS = ("torch_dist",)  # --ckpt-format: the one megatron-core dist checkpointing writes


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

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> "ClusterConfig":
        return cls(**{f.name: getattr(ns, f.name) for f in fields(cls)})


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


def validate_cluster(cluster: ClusterConfig) -> None:
    """Checks that need no process group; raises ``ConfigError`` naming the flag."""


def check_resumable(path: str, model: PathMoEConfig, tokenizer: TokenizerSpec) -> None:
    """Fail before launch when --load names no usable checkpoint, a different model or a
    different tokenizer."""
    from megatron_pathmoe.checkpoint import check_compatible, read_run_config
    from megatron_pathmoe.checkpoint.record import tokenizer_differences


    saved = read_run_config(path)
    differences = tokenizer_differences(saved, tokenizer)
    if differences:
        raise ConfigError(f"--load {path} was trained with another tokenizer: "
                          f"{'; '.join(differences)}; use the checkpoint's tokenizer")
    probe = model.replace(vocab_size=saved.model.vocab_size)  # vocab comes from the tokenizer
    check_compatible(saved.model, probe, f"--load {path}")
