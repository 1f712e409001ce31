"""TensorBoard and Weights & Biases sinks: the same named scalars the metrics stream holds,
with Megatron-LM's tag names where it has them. Both packages are optional (the
``monitoring`` extra) and imported only when their flag is given."""

from __future__ import annotations

import importlib
import math
import os
from typing import Any, Mapping

import torch

from megatron_pathmoe.monitoring.arguments import MonitoringConfig

INSTALL_HINT = "pip install megatron-pathmoe[monitoring]"
# Megatron-LM also writes these against consumed samples ("<tag> vs samples").
VS_SAMPLES = ("lm loss", "learning-rate", "lm loss validation")


class MonitoringUnavailable(ImportError):
    """An optional monitoring package is missing; the message names the flag and the fix."""


def _import_optional(module: str, flag: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MonitoringUnavailable(f"{flag} needs {module.split('.')[-1]} ({error}); "
                                    f"{INSTALL_HINT}") from None


def _is_validation(tag: str) -> bool:
    return " validation" in tag


class TensorBoardSink:
    """Scalars every --tensorboard-log-interval iterations (validation whenever written),
    filtered by the --log-*-to-tensorboard switches, and expert-load histograms; flushed at
    every write so a killed run keeps its events."""

    def __init__(self, cfg: MonitoringConfig, resume_iteration: int = 0) -> None:
        tensorboard = _import_optional("torch.utils.tensorboard", "--tensorboard-dir")
        self.cfg = cfg
        # On resume, events of iterations the resumed run repeats are dropped (purge_step).
        self.writer = tensorboard.SummaryWriter(
            log_dir=cfg.tensorboard_dir, max_queue=cfg.tensorboard_queue_size,
            purge_step=resume_iteration + 1 if resume_iteration else None)

    def wants(self, tag: str) -> bool:
        cfg = self.cfg
        switches = {"learning-rate": cfg.log_learning_rate_to_tensorboard,
                    "loss-scale": cfg.log_loss_scale_to_tensorboard,
                    "world-size": cfg.log_world_size_to_tensorboard}
        if tag.endswith("-time"):  # iteration-time and the megatron timers' <name>-time
            return cfg.log_timers_to_tensorboard
        if tag.startswith("mem-"):
            return cfg.log_memory_to_tensorboard
        if tag.endswith(" validation ppl"):
            return cfg.log_validation_ppl_to_tensorboard
        return switches.get(tag, True)

    def write(self, iteration: int, scalars: Mapping[str, float], consumed_samples: int
              ) -> None:
        on_interval = iteration % self.cfg.tensorboard_log_interval == 0
        for tag, value in scalars.items():
            if not self.wants(tag) or not (on_interval or _is_validation(tag)):
                continue
            self.writer.add_scalar(tag, value, iteration)
            if tag in VS_SAMPLES:
                self.writer.add_scalar(f"{tag} vs samples", value, consumed_samples)
        self.writer.flush()

    def write_histograms(self, iteration: int, values: Mapping[str, torch.Tensor]) -> None:
        for tag, tensor in values.items():
            self.writer.add_histogram(tag, tensor.double(), iteration)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """One W&B run: the run's config recorded at start, every written scalar logged at its
    iteration (non-finite values left out). ``WANDB_MODE=offline`` keeps it local."""

    def __init__(self, cfg: MonitoringConfig, run_config: Mapping[str, Any] | None = None
                 ) -> None:
        wandb = _import_optional("wandb", "--wandb-project")
        self._teardown = wandb.teardown
        if cfg.wandb_save_dir:
            os.makedirs(cfg.wandb_save_dir, exist_ok=True)
        self.run = wandb.init(project=cfg.wandb_project, name=cfg.wandb_exp_name or None,
                              entity=cfg.wandb_entity or None, dir=cfg.wandb_save_dir or None,
                              config=dict(run_config or {}),
                              # The trainer logs its own stdout; W&B's capture of it would
                              # also swallow what is printed after finish().
                              settings=wandb.Settings(console="off"))

    def write(self, iteration: int, scalars: Mapping[str, float], consumed_samples: int
              ) -> None:
        row = {tag: float(v) for tag, v in scalars.items() if math.isfinite(float(v))}
        row["consumed-samples"] = consumed_samples
        self.run.log(row, step=iteration)

    def close(self) -> None:
        self.run.finish()
        self._teardown()  # finish() can return before W&B's service has written the run
