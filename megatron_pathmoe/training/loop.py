"""The pretraining loop, built from megatron-core's own pieces: parallel state, the
forward-backward schedules, megatron DDP, ``get_megatron_optimizer``,
``finalize_model_grads`` and ``OptimizerParamScheduler``."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import time
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from megatron_pathmoe.config import PathMoEConfig
from megatron_pathmoe.training.arguments import TrainingConfig


def log(message: str) -> None:
    """Print once per job (global rank 0)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(message, flush=True)


# --------------------------------------------------------------------------- setup

def initialize_distributed(model: PathMoEConfig, train: TrainingConfig, device: str) -> None:
    """Process group (nccl on GPU, gloo on CPU), megatron parallel state, RNG streams."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if "RANK" not in os.environ:  # plain `python -m ...`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo",
                                timeout=timedelta(minutes=train.distributed_timeout_minutes))
    initialize_model_parallel(model)
    torch.manual_seed(train.seed)
    model_parallel_cuda_manual_seed(train.seed)


def initialize_model_parallel(model: PathMoEConfig) -> None:
    """megatron's parallel state for ``model``'s layout (experts never tensor-parallel, as in
    ``PathMoEConfig.to_transformer_config``)."""
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=model.tensor_model_parallel_size,
        pipeline_model_parallel_size=model.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=model.virtual_pipeline_model_parallel_size,
        expert_model_parallel_size=model.expert_model_parallel_size,
        expert_tensor_parallel_size=1,
    )


def destroy_distributed() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_model_and_optimizer(model_cfg: PathMoEConfig, train: TrainingConfig, device: str):
    """This rank's model chunks (one per virtual pipeline stage) wrapped in megatron DDP, the
    megatron optimizer and LR scheduler. Router parameters tied across pipeline stages start
    identical and have their gradients summed after the data-parallel reduction."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megatron_pathmoe.model import build_model_chunks
    from megatron_pathmoe.parallel import RouterTies, reduce_expert_grads_over_expert_dp

    models = build_model_chunks(
        model_cfg, use_transformer_engine=train.transformer_impl == "transformer_engine",
        use_cpu_initialization=device == "cpu")  # CPU: TP layouts start from TP=1's weights
    if device == "cuda":
        for model in models:
            model.cuda(torch.cuda.current_device())
    reduce_expert_grads_over_expert_dp(models, model_cfg)
    ties = RouterTies.build(models)
    ties.tag_for_megatron()  # before DDP: buckets and grad-norm accounting read the tags
    ties.sync_weights()      # before the optimizer copies main weights
    config = models[0].config
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False,
        use_distributed_optimizer=train.use_distributed_optimizer,
        check_for_nan_in_grad=False)  # NonFiniteGuard checks (and can skip) instead
    chunks = [DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model,
                                      disable_bucketing=i > 0)
              for i, model in enumerate(models)]
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=train.lr, min_lr=train.min_lr,
                        weight_decay=train.weight_decay, adam_beta1=train.adam_beta1,
                        adam_beta2=train.adam_beta2, clip_grad=train.clip_grad,
                        bf16=model_cfg.bf16, params_dtype=model_cfg.params_dtype,
                        use_distributed_optimizer=train.use_distributed_optimizer),
        chunks)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=train.lr, min_lr=train.min_lr,
        lr_warmup_steps=train.lr_warmup_iters, lr_decay_steps=train.train_iters,
        lr_decay_style=train.lr_decay_style, start_wd=train.weight_decay,
        end_wd=train.weight_decay, wd_incr_steps=train.train_iters, wd_incr_style="constant")
    # The hooks megatron's schedules call: grad sync (+ router ties), loss scaling, no_sync.
    config.finalize_model_grads_func = ties.finalize_model_grads_func()
    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = ([chunk.no_sync for chunk in chunks] if len(chunks) > 1
                           else chunks[0].no_sync)
    return chunks, optimizer, scheduler


# --------------------------------------------------------------------------- steps

def forward_step(data_iterator: Iterator[dict], model: torch.nn.Module):
    """Megatron's forward_step_func: returns the per-token losses and how to reduce them."""
    batch = next(data_iterator)
    device = next(model.parameters()).device
    tokens = batch["tokens"].to(device)
    output = model(tokens, batch["position_ids"].to(device), None,
                   labels=batch["labels"].to(device))
    return output, partial(_loss_func, batch["loss_mask"].to(device))


def _loss_func(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    mask = loss_mask.view(-1).float()
    total = torch.sum(per_token_loss.view(-1).float() * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([total.detach(), mask.sum()])
    # The 3-tuple form: megatron divides by num_tokens and the number of micro-batches.
    return total, num_tokens, {"lm loss": report}


def _global_loss(reports: list[dict]) -> float:
    from megatron_pathmoe.training.metrics import all_reduce_to_cpu

    """Token-weighted mean loss over the global batch. Only last-stage ranks hold reports;
    the all-reduce over the world gives every rank the same number (TP duplicates cancel)."""
    sums = torch.zeros(2, dtype=torch.float64)
    for report in reports:
        sums += report["lm loss"].detach().to(device="cpu", dtype=torch.float64)
    sums = all_reduce_to_cpu(sums)
    return float(sums[0] / sums[1].clamp_min(1))


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    lr: float
    skipped: bool


def train_step(chunks, optimizer, scheduler, data_iterator, model_cfg: PathMoEConfig,
               train: TrainingConfig, num_microbatches: int,
               should_step: Callable[[float], bool] | None = None) -> StepResult:
    """One global batch. ``should_step(loss)`` (the non-finite guard) runs between backward
    and the optimizer step and may veto the step."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    reports = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=data_iterator, model=chunks,
        num_microbatches=num_microbatches, seq_length=model_cfg.seq_length,
        micro_batch_size=train.micro_batch_size, decoder_seq_length=model_cfg.seq_length,
        forward_only=False)
    loss = _global_loss(reports)
    if should_step is not None and not should_step(loss):
        return StepResult(loss=loss, grad_norm=float("nan"), lr=optimizer.param_groups[0]["lr"],
                          skipped=True)
    updated, grad_norm, _ = optimizer.step()
    if updated:
        scheduler.step(increment=1)
    return StepResult(loss=loss, grad_norm=float(grad_norm or 0.0),
                      lr=optimizer.param_groups[0]["lr"], skipped=not updated)


@torch.no_grad()
def evaluate(chunks, data_iterator, model_cfg: PathMoEConfig, train: TrainingConfig,
             num_microbatches: int) -> float:
    """Mean validation loss (nats/token) over ``--eval-iters`` global batches."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    for chunk in chunks:
        chunk.eval()
    reports: list[dict] = []
    for _ in range(train.eval_iters):
        reports += get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=data_iterator, model=chunks,
            num_microbatches=num_microbatches, seq_length=model_cfg.seq_length,
            micro_batch_size=train.micro_batch_size, decoder_seq_length=model_cfg.seq_length,
            forward_only=True)
    for chunk in chunks:
        chunk.train()
    return _global_loss(reports)


# --------------------------------------------------------------------------- loop

@dataclass
class RunSummary:
    routing: str
    path_block_size: int | None
    iterations: int
    final_train_loss: float | None
    valid_loss: float
    valid_perplexity: float
    tokens_per_second: float | None
    mean_step_seconds: float | None
    parameters: dict[str, int]
    final_expert_load_max: list[float] = field(default_factory=list)
    final_expert_load_min: list[float] = field(default_factory=list)
    train_losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    aux_losses: dict[str, float] = field(default_factory=dict)
    start_iteration: int = 0
    consumed_samples: int = 0
    skipped_iterations: list[int] = field(default_factory=list)
    world_size: int = 1
    peak_memory_gib: float | None = None  # max over ranks; see metrics.peak_memory_gib


def _check_platform(device: str) -> None:
    """A CUDA call that megatron swallowed would make the CPU run differ from a GPU run."""
    from megatron_pathmoe.platform import unhandled_cuda_calls

    calls = unhandled_cuda_calls() if device == "cpu" else []
    if calls:
        raise RuntimeError("megatron-core reached CUDA calls the CPU platform does not map:\n  "
                           + "\n  ".join(calls))


def build_data_iterators(model_cfg: PathMoEConfig, train: TrainingConfig,
                         consumed_samples: int = 0):
    from megatron.core import parallel_state

    from megatron_pathmoe.data import build_gpt_datasets, load_tokenizer, make_data_iterator

    tokenizer = load_tokenizer(train.tokenizer_model)
    evals = train.train_iters // train.eval_interval + 1 if train.eval_interval else 1
    train_ds, valid_ds = build_gpt_datasets(
        train.data_path, train.valid_data_path or None, tokenizer, model_cfg.seq_length,
        train.seed, train_samples=train.train_iters * train.global_batch_size,
        valid_samples=evals * train.eval_iters * train.global_batch_size, split=train.split,
        cache_dir=train.data_cache_path)
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    # The interleaved schedule reads one iterator per model chunk; each pipeline stage reads
    # the whole batch (the first stage uses the tokens, the last the labels and loss mask).
    vpp = model_cfg.virtual_pipeline_model_parallel_size

    def iterators(dataset, consumed: int = 0):
        def make():
            return make_data_iterator(dataset, train.micro_batch_size, dp_rank, dp_size,
                                      consumed_samples=consumed)
        return make() if vpp is None else [make() for _ in range(vpp)]

    return iterators(train_ds, consumed_samples), iterators(valid_ds)


def pretrain(model_cfg: PathMoEConfig, train: TrainingConfig, device: str) -> RunSummary:
    """Initialise, train ``--train-iters`` iterations with periodic logs and validation,
    return (and optionally write) the run summary. Assumes validated configs."""
    from megatron_pathmoe.model import count_parameters
    from megatron_pathmoe.model.estimate import layout_report
    from megatron_pathmoe.ops import install_permute_impl
    from megatron_pathmoe.parallel.layout import describe_layout
    from megatron_pathmoe.training.faults import FaultInjector, NonFiniteGuard
    from megatron_pathmoe.training.metrics import (
        ExpertLoadTracker,
        format_entropy,
        format_load,
        peak_memory_gib,
        pop_aux_losses,
    )

    initialize_distributed(model_cfg, train, device)
    world = dist.get_world_size()
    nmb = train.num_microbatches(model_cfg, world)
    permute_impl = install_permute_impl(train.permute_impl, device)
    log(f"token permutation: {permute_impl} (--permute-impl {train.permute_impl})")
    chunks, optimizer, scheduler = build_model_and_optimizer(model_cfg, train, device)
    params, stages, report = layout_report(
        model_cfg, world, micro_batch_size=train.micro_batch_size, num_microbatches=nmb,
        use_distributed_optimizer=train.use_distributed_optimizer,
        flash_attention=train.transformer_impl == "transformer_engine")
    log(f"PathMoE pretraining: routing={model_cfg.routing}"
        f"{f' B={model_cfg.path_block_size}' if model_cfg.routing == 'path' else ''} "
        f"layers={model_cfg.num_layers} hidden={model_cfg.hidden_size} "
        f"experts={model_cfg.num_experts} top{model_cfg.moe_router_topk} world={world} "
        f"({describe_layout(model_cfg, world)}) micro-batches={nmb} device={device}")
    for line in report:
        log(line)
    held = sum(count_parameters(chunk.module, model_cfg).total for chunk in chunks)
    log(f"parameters held by rank 0: {held:,} (estimate {stages[0].params.total:,})")
    resume = _maybe_resume(chunks, optimizer, scheduler, model_cfg, train)
    start = resume.iteration if resume else 0
    consumed = resume.consumed_samples if resume else 0
    train_iter, valid_iter = build_data_iterators(model_cfg, train, consumed_samples=consumed)
    tracker = ExpertLoadTracker(chunks, model_cfg.num_layers, model_cfg.num_experts)
    guard = NonFiniteGuard(chunks, model_cfg.num_layers, train.nonfinite_action,
                           train.max_skipped_steps)
    faults = FaultInjector.from_env()
    tokens_per_iter = train.global_batch_size * model_cfg.seq_length

    losses: list[float] = []
    grad_norms: list[float] = []
    aux_sums: dict[str, float] = {}
    aux_means: dict[str, float] = {}
    step_times: list[float] = []
    skipped: list[int] = []
    window_start, window_iters, load = time.perf_counter(), 0, None
    for iteration in range(start + 1, train.train_iters + 1):
        injected = faults.before_step(iteration, chunks)
        t0 = time.perf_counter()
        result = train_step(chunks, optimizer, scheduler, train_iter, model_cfg, train, nmb,
                            should_step=partial(guard.should_step, iteration))
        step_times.append(time.perf_counter() - t0)
        for handle in injected:
            handle.remove()
        consumed += train.global_batch_size
        losses.append(result.loss)
        grad_norms.append(result.grad_norm)
        if result.skipped:
            skipped.append(iteration)
        for name, value in pop_aux_losses(model_cfg.num_layers, nmb).items():
            aux_sums[name] = aux_sums.get(name, 0.0) + value
        window_iters += 1
        if iteration % train.log_interval == 0 or iteration == train.train_iters:
            elapsed = time.perf_counter() - window_start
            load = tracker.pop_load()
            aux_means = {k: v / window_iters for k, v in aux_sums.items()}
            aux = " ".join(f"{k} {v:.4f}" for k, v in aux_means.items()) or "aux loss off"
            log(f"iter {iteration:6d}/{train.train_iters} | loss {result.loss:.4f} | {aux} | "
                f"grad norm {result.grad_norm:.3f} | lr {result.lr:.2e} | "
                f"{tokens_per_iter * window_iters / elapsed:,.0f} tokens/s | "
                f"{1000 * elapsed / window_iters:.0f} ms/iter"
                f"{' | skipped' if result.skipped else ''}")
            log(f"    expert load max/min vs uniform: {format_load(load)}")
            log(f"    routing entropy / ln(E): "
                f"{format_entropy(tracker.pop_entropy(), model_cfg.num_experts)}")
            window_start, window_iters, aux_sums = time.perf_counter(), 0, {}
        if train.eval_interval and iteration % train.eval_interval == 0 \
                and iteration != train.train_iters:
            val = evaluate(chunks, valid_iter, model_cfg, train, nmb)
            log(f"validation at iter {iteration}: loss {val:.4f} ppl {math.exp(val):.2f}")
        if train.save and (iteration == train.train_iters or (
                train.save_interval and iteration % train.save_interval == 0)):
            # Keep the save out of the next log window's tokens/s.
            window_start += _save(chunks, optimizer, scheduler, model_cfg, train, iteration,
                                  consumed, faults)
    val = evaluate(chunks, valid_iter, model_cfg, train, nmb)
    tracker.remove()
    guard.remove()
    # The first steps pay one-off costs (allocator, caches): time the rest.
    steady = step_times[min(2, len(step_times) - 1):]
    mean_step = sum(steady) / len(steady) if steady else float("nan")
    summary = RunSummary(
        routing=model_cfg.routing,
        path_block_size=model_cfg.path_block_size if model_cfg.routing == "path" else None,
        iterations=train.train_iters, final_train_loss=losses[-1] if losses else None,
        valid_loss=val, valid_perplexity=math.exp(val),
        tokens_per_second=tokens_per_iter / mean_step if steady else None,
        mean_step_seconds=mean_step if steady else None,
        parameters={"total": params.total, "active": params.active, "router": params.router},
        final_expert_load_max=[round(float(r.max()), 4) for r in load] if load is not None else [],
        final_expert_load_min=[round(float(r.min()), 4) for r in load] if load is not None else [],
        train_losses=losses,
        grad_norms=grad_norms,
        aux_losses=aux_means,
        start_iteration=start,
        consumed_samples=consumed,
        skipped_iterations=skipped,
        world_size=world,
        peak_memory_gib=peak_memory_gib(device))
    speed = (f" | steady-state {summary.tokens_per_second:,.0f} tokens/s "
             f"({1000 * mean_step:.0f} ms/iter)" if steady else "")
    log(f"validation: loss {val:.4f} | perplexity {summary.valid_perplexity:.2f}{speed} | "
        f"peak memory {summary.peak_memory_gib:.2f} GiB per rank")
    _check_platform(device)
    if train.summary_json and dist.get_rank() == 0:
        with open(train.summary_json, "w") as f:
            json.dump(summary.__dict__, f, indent=2)
    return summary


def _maybe_resume(chunks, optimizer, scheduler, model_cfg: PathMoEConfig, train: TrainingConfig):
    from megatron_pathmoe.training.checkpointing import load_checkpoint

    if not train.load:
        return None
    resume = load_checkpoint(train.load, chunks, optimizer, scheduler, model_cfg)
    rng = "" if resume.rng_restored else " (RNG states not restored: different parallel layout)"
    log(f"resumed from {resume.checkpoint_dir}: iteration {resume.iteration}, "
        f"{resume.consumed_samples:,} samples consumed{rng}")
    if resume.iteration > train.train_iters:
        raise ValueError(f"--load {resume.checkpoint_dir} is at iteration {resume.iteration}, "
                         f"past --train-iters {train.train_iters}; raise --train-iters")
    return resume


def _save(chunks, optimizer, scheduler, model_cfg: PathMoEConfig, train: TrainingConfig,
          iteration: int, consumed: int, faults) -> float:
    """Save a checkpoint (collective); returns the seconds it took."""
    from megatron_pathmoe.training.checkpointing import CheckpointMeta, save_checkpoint

    log(f"saving checkpoint at iteration {iteration} to {train.save}")
    t0 = time.perf_counter()
    meta = CheckpointMeta(model=model_cfg, tokenizer_path=train.tokenizer_model,
                          consumed_samples=consumed, training=dataclasses.asdict(train))
    path = save_checkpoint(train.save, iteration, chunks, optimizer, scheduler, meta,
                           keep_last=train.keep_last, before_publish=faults.during_save)
    seconds = time.perf_counter() - t0
    log(f"saved {path} in {seconds:.1f} s")
    return seconds
