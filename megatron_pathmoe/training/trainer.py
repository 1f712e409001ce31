"""The pretraining run, built from megatron-core's own pieces (parallel state, the
forward-backward schedules, megatron DDP, ``get_megatron_optimizer``, ``finalize_model_grads``,
``OptimizerParamScheduler``) and split like torchtitan's ``Trainer``: :meth:`Trainer.setup`,
:meth:`Trainer.train_step`, :meth:`Trainer.evaluate`, :meth:`Trainer.train`. Every scalar
goes through the :class:`~megatron_pathmoe.training.metrics.MetricsWindow`, and the run
summary is built from it; :class:`~megatron_pathmoe.training.watch.RunWatch` writes its
flushes and the validations to metrics.jsonl / TensorBoard / W&B and runs the profiler."""

from __future__ import annotations

import dataclasses
import math
import time
from functools import partial

import torch.distributed as dist

from megatron_pathmoe.config import PathMoEConfig
from megatron_pathmoe.runtime import check_platform, initialize_distributed, log, warn
from megatron_pathmoe.training.arguments import TrainingConfig
from megatron_pathmoe.training.build import build_model_and_optimizer
from megatron_pathmoe.training.cluster import ExitPolicy, ManualGC
from megatron_pathmoe.training.data import build_data_iterators
from megatron_pathmoe.training.faults import FaultInjector, NonFiniteGuard
from megatron_pathmoe.training.metrics import MetricsWindow, peak_memory_gib
from megatron_pathmoe.training.step import StepResult, evaluate, train_step
from megatron_pathmoe.training.summary import (
    RunSummary,
    build_summary,
    log_summary,
    write_summary,
)
from megatron_pathmoe.training.watch import RunWatch


class Trainer:
    """One pretraining run on this rank. Assumes validated configs."""

    def __init__(self, model_cfg: PathMoEConfig, train: TrainingConfig, device: str) -> None:
        self.model_cfg, self.train_cfg, self.device = model_cfg, train, device
        self.start_iteration = self.consumed_samples = 0
        # From here on SIGTERM is caught (--exit-signal-handler) and the job's time counts.
        self.exits = ExitPolicy(train.cluster)
        self.gc = ManualGC(train.cluster)
        self._last_batch: int | None = None  # the previous step's global batch

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        """Process group, model, optimizer, resume, data, metrics, fault hooks, and last the
        monitoring sinks (metrics.jsonl, TensorBoard, W&B) and the profiler."""
        cfg, train = self.model_cfg, self.train_cfg
        self.device = initialize_distributed(cfg, self.device, seed=train.seed,
                                             timeout_minutes=train.distributed_timeout_minutes)
        self.world = dist.get_world_size()
        self.num_microbatches = train.num_microbatches(cfg, self.world)
        self.batches = train.batch_schedule()  # per-step global batch (--rampup-batch-size)
        self.chunks, self.optimizer, self.scheduler = build_model_and_optimizer(
            cfg, train, self.device)
        self.parameters = self._log_setup()
        self._resume()
        self.data = build_data_iterators(cfg, train, consumed_samples=self.consumed_samples)
        self.window = MetricsWindow(self.chunks, cfg, train.train_iters,
                                    train.global_batch_size * cfg.seq_length,
                                    self.num_microbatches)
        self.guard = NonFiniteGuard(self.chunks, cfg.num_layers, train.nonfinite_action,
                                    train.max_skipped_steps)
        self.faults = FaultInjector.from_env()
        # Last: nothing in setup can fail after the sinks open; train() closes them.
        self.watch = RunWatch(cfg, train, self.device, self.start_iteration, chunks=self.chunks,
                              optimizer=self.optimizer)

    def _log_setup(self) -> dict[str, int]:
        """Log the permutation, layout, memory estimate and parameters; returns the counts."""
        from megatron_pathmoe.model import count_parameters
        from megatron_pathmoe.model.estimate import layout_report
        from megatron_pathmoe.ops import installed_permute_impl
        from megatron_pathmoe.parallel.layout import describe_layout

        cfg, train, world, nmb = self.model_cfg, self.train_cfg, self.world, self.num_microbatches
        log(f"token permutation: {installed_permute_impl()} (--permute-impl {train.permute_impl})")
        params, stages, report = layout_report(
            cfg, world, micro_batch_size=train.micro_batch_size, num_microbatches=nmb,
            use_distributed_optimizer=train.use_distributed_optimizer,
            flash_attention=train.transformer_impl == "transformer_engine")
        log(f"PathMoE pretraining: routing={cfg.routing_label} layers={cfg.num_layers} "
            f"hidden={cfg.hidden_size} experts={cfg.num_experts} top{cfg.moe_router_topk} "
            f"world={world} ({describe_layout(cfg, world)}) micro-batches={nmb} "
            f"device={self.device}")
        for line in report:
            log(line)
        held = sum(count_parameters(chunk.module, cfg).total for chunk in self.chunks)
        log(f"parameters held by rank 0: {held:,} (estimate {stages[0].params.total:,})")
        return {"total": params.total, "active": params.active, "router": params.router}

    def _resume(self) -> None:
        """``--load``: nothing there yet trains from scratch (one command for the first launch
        and every requeue); else what ``--no-load-optim/--no-load-rng/--finetune`` allow."""
        from megatron_pathmoe.checkpoint import find_checkpoint, load_checkpoint

        train, cluster = self.train_cfg, self.train_cfg.cluster
        if not train.load:
            return
        if find_checkpoint(train.load) is None:
            warn(f"no checkpoint in {train.load}, training from scratch")
            return
        if cluster.auto_detect_ckpt_format:
            log("--auto-detect-ckpt-format: reading torch_dist (the only format written here)")
        resume = load_checkpoint(train.load, self.chunks, self.optimizer, self.scheduler,
                                 self.model_cfg, cluster.load_options())
        log(_resume_text(resume, cluster))
        if resume.iteration > train.train_iters:
            raise ValueError(f"--load {resume.checkpoint_dir} is at iteration {resume.iteration}, "
                             f"past --train-iters {train.train_iters}; raise --train-iters")
        self.start_iteration, self.consumed_samples = resume.iteration, resume.consumed_samples

    # ------------------------------------------------------------------ steps

    def train_step(self, iteration: int) -> StepResult:
        """One global batch (faults injected first, the non-finite guard before the update)."""
        self.watch.before_step(iteration)
        injected = self.faults.before_step(iteration, self.chunks)
        batch = self._global_batch(iteration)
        num_microbatches = self.train_cfg.num_microbatches(self.model_cfg, self.world, batch)
        t0 = time.perf_counter()
        result = train_step(self.chunks, self.optimizer, self.scheduler, self.data.train,
                            self.model_cfg, self.train_cfg, num_microbatches,
                            should_step=partial(self.guard.should_step, iteration),
                            global_batch_size=batch)
        seconds = time.perf_counter() - t0
        injected.remove()
        self.consumed_samples += batch
        self.window.update(iteration, result, seconds, tokens=batch * self.model_cfg.seq_length,
                           num_microbatches=num_microbatches)
        return result

    def _global_batch(self, iteration: int) -> int:
        """This step's global batch; the log says when a ramp-up changes it."""
        batch = self.batches.size(self.consumed_samples)
        if self.batches.rampup is not None and batch != self._last_batch:
            log(f"global batch size {batch} from iteration {iteration} (--rampup-batch-size; "
                f"{self.consumed_samples:,} samples consumed)")
        self._last_batch = batch
        return batch

    def evaluate(self, data_iterator=None) -> float:
        """Mean loss over ``--eval-iters`` global batches of the validation data (or
        ``data_iterator``'s)."""
        data = self.data.valid if data_iterator is None else data_iterator
        return evaluate(self.chunks, data, self.model_cfg,
                        self.train_cfg, self.num_microbatches)

    def train(self) -> RunSummary:
        """``--train-iters`` iterations with periodic logs, validation and saves; then the
        final validation, the test evaluation and the run summary (written to
        ``--summary-json``). A graceful exit (:class:`ExitPolicy`) saves and ends the loop
        early, without them, like Megatron-LM."""
        last, stop = self.train_cfg.train_iters, None
        valid_loss = test_loss = None
        self.gc.start()
        try:
            for iteration in range(self.start_iteration + 1, last + 1):
                self.train_step(iteration)
                self.gc.after_step(iteration)
                saved = self._after_step(iteration, last)
                stop = self.exits.check(iteration) if iteration < last else None
                if stop:
                    self._exit(iteration, stop, saved)
                    break
            if not stop:
                valid_loss = self._validate(last)
                test_loss = self._test()
        finally:  # also on an error: the stream and events so far stay readable
            self.gc.close()
            self.watch.close()
            self.exits.close()
            self.data.close()
        self.window.close()
        self.guard.remove()
        summary = self.summary(valid_loss, test_loss, stop)
        log_summary(summary)
        check_platform(self.device)
        write_summary(summary, self.train_cfg.summary_json)
        return summary

    def _after_step(self, iteration: int, last: int) -> bool:
        """Log, validate and save as the intervals say; returns whether it saved."""
        train = self.train_cfg
        if iteration % train.log_interval == 0 or iteration == last:
            self._log_interval(iteration)
        if train.eval_interval and iteration % train.eval_interval == 0 and iteration != last:
            val = self._validate(iteration)
            log(f"validation at iter {iteration}: loss {val:.4f} ppl {math.exp(val):.2f}")
        if train.save and (iteration == last or (
                train.save_interval and iteration % train.save_interval == 0)):
            self.window.exclude(self.save(iteration))  # out of the next window's tokens/s
            return True
        return False

    def _exit(self, iteration: int, reason: str, saved: bool) -> None:
        """Save at ``iteration`` (unless just saved) before a graceful exit."""
        log(f"exiting at iteration {iteration}: {reason}")
        if iteration % self.train_cfg.log_interval:
            self._log_interval(iteration)  # the last steps' losses reach the stream
        if not self.train_cfg.save:
            warn("no --save directory: the exit saves no checkpoint")
        elif not saved:
            self.save(iteration)

    def _test(self) -> float | None:
        """``--test-data-path``: one evaluation after training."""
        if self.data.test is None:
            return None
        with self.gc.around_evaluation():
            loss = self.evaluate(self.data.test)
        log(f"test: loss {loss:.4f} | perplexity {math.exp(loss):.2f}")
        return loss

    def _log_interval(self, iteration: int) -> None:
        scalars = self.window.flush(iteration)
        scalars["loss-scale"] = float(self.optimizer.get_loss_scale())
        self.watch.interval(iteration, scalars, consumed_samples=self.consumed_samples,
                            load=self.window.load, entropy=self.window.entropy)

    def _validate(self, iteration: int) -> float:
        with self.gc.around_evaluation():
            val = self.evaluate()
        self.watch.validation(iteration, val, self.consumed_samples)
        return val

    def save(self, iteration: int) -> float:
        """Save a checkpoint (collective); returns the seconds it took."""
        from megatron_pathmoe.checkpoint import CheckpointMeta, save_checkpoint
        from megatron_pathmoe.training.build import sync_params

        train = self.train_cfg
        sync_params(self.chunks)  # --overlap-param-gather: complete the weights first
        log(f"saving checkpoint at iteration {iteration} to {train.save}")
        t0 = time.perf_counter()
        meta = CheckpointMeta(model=self.model_cfg, tokenizer=train.tokenizer_spec(),
                              consumed_samples=self.consumed_samples,
                              training=dataclasses.asdict(train))
        path = save_checkpoint(train.save, iteration, self.chunks, self.optimizer,
                               self.scheduler, meta, keep_last=train.keep_last,
                               before_publish=self.faults.during_save)
        seconds = time.perf_counter() - t0
        log(f"saved {path} in {seconds:.1f} s")
        return seconds

    def summary(self, valid_loss: float | None, test_loss: float | None = None,
                exit_reason: str | None = None) -> RunSummary:
        """The run summary from the metrics window (collective: peak memory)."""
        from megatron_pathmoe.ops import permute_impl_report

        run = {"routing": self.model_cfg.routing,
               "path_block_size": self.model_cfg.router_block_size,
               "iterations": self.train_cfg.train_iters, "parameters": self.parameters,
               "start_iteration": self.start_iteration,
               "consumed_samples": self.consumed_samples, "world_size": self.world,
               "peak_memory_gib": peak_memory_gib(self.device),
               "permute_impl": permute_impl_report(), "exit_reason": exit_reason,
               "manual_gc_collections": (self.gc.collections if self.train_cfg.cluster.manual_gc
                                         else None)}
        return build_summary(self.window, run, valid_loss, test_loss)


def pretrain(model_cfg: PathMoEConfig, train: TrainingConfig, device: str) -> RunSummary:
    """Set up and run :class:`Trainer`; returns (and optionally writes) the run summary."""
    trainer = Trainer(model_cfg, train, device)
    trainer.setup()
    return trainer.train()


def _resume_text(resume, cluster) -> str:
    """The log line of a resume, naming what was not restored and why (a changed optimizer
    structure has its own warning from the checkpoint layer)."""
    if cluster.finetune:
        return (f"fine-tuning from the weights of {resume.checkpoint_dir} (--finetune): "
                "iteration 0, fresh optimizer state, LR schedule and RNG")
    notes = []
    if cluster.no_load_optim:
        notes.append("optimizer state and LR schedule start fresh (--no-load-optim)")
    if not resume.rng_restored:
        why = ("--no-load-rng" if cluster.no_load_rng
               else "different parallel layout or no optimizer in the checkpoint")
        notes.append(f"RNG states not restored ({why})")
    extra = "".join(f"; {note}" for note in notes)
    return (f"resumed from {resume.checkpoint_dir}: iteration {resume.iteration}, "
            f"{resume.consumed_samples:,} samples consumed{extra}")
