"""What a training run is built from: this rank's model chunks in megatron DDP, the megatron
optimizer and LR scheduler (the data iterators: ``training/data.py``)."""

from __future__ import annotations

from typing import Any

import torch

from megatron_pathmoe.config import PathMoEConfig
from megatron_pathmoe.training.arguments import TrainingConfig


def build_model_and_optimizer(model_cfg: PathMoEConfig, train: TrainingConfig,
                              device: str) -> tuple[list[Any], Any, Any]:
    """This rank's model chunks (one per virtual pipeline stage) wrapped in megatron DDP, the
    megatron optimizer and LR scheduler, with ``--permute-impl`` installed. Router parameters
    tied across pipeline stages start identical and have their gradients summed after the
    data-parallel reduction."""
    from megatron_pathmoe.model import build_model_chunks
    from megatron_pathmoe.parallel import RouterTies, reduce_expert_grads_over_expert_dp

    models = build_model_chunks(
        model_cfg, use_transformer_engine=train.transformer_impl == "transformer_engine",
        use_cpu_initialization=device == "cpu",  # CPU: TP layouts start from TP=1's weights
        permute_impl=train.permute_impl, device=device)
    if device == "cuda":
        for model in models:
            model.cuda(torch.cuda.current_device())
    reduce_expert_grads_over_expert_dp(models, model_cfg)
    ties = RouterTies.build(models)
    ties.tag_for_megatron()  # before DDP: buckets and grad-norm accounting read the tags
    ties.sync_weights()      # before the optimizer copies main weights
    chunks = _wrap_ddp(models, train)
    optimizer, scheduler = _optimizer_and_scheduler(chunks, model_cfg, train)
    # The hooks megatron's schedules call: grad sync (+ router ties), loss scaling, no_sync.
    config = models[0].config
    config.finalize_model_grads_func = ties.finalize_model_grads_func()
    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = ([chunk.no_sync for chunk in chunks] if len(chunks) > 1
                           else chunks[0].no_sync)
    _wire_overlap(config, chunks, train.performance.align_grad_reduce)
    return chunks, optimizer, scheduler


def _wrap_ddp(models: list[torch.nn.Module], train: TrainingConfig) -> list[Any]:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    perf = train.performance
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=perf.overlap_grad_reduce,
        overlap_param_gather=perf.overlap_param_gather,
        # As Megatron-LM: only the interleaved schedule dispatches the gathers itself
        # (config.param_sync_func); otherwise each bucket's forward pre-hook does.
        align_param_gather=(perf.overlap_param_gather and perf.align_param_gather
                            and len(models) > 1),
        bucket_size=perf.ddp_bucket_size,
        use_distributed_optimizer=train.use_distributed_optimizer,
        check_for_nan_in_grad=False)  # NonFiniteGuard checks (and can skip) instead
    return [DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model,
                                    disable_bucketing=i > 0)
            for i, model in enumerate(models)]


def _wire_overlap(config: Any, chunks: list, align_grad_reduce: bool) -> None:
    """The schedule hooks Megatron-LM's ``train()`` sets for the overlap flags: the schedules
    start each chunk's grad reduce (and, interleaved, param gather) as soon as it is ready.
    Without them (``--no-align-*``) the buckets' own backward / forward pre-hooks do."""
    ddp_config = chunks[0].ddp_config

    def per_chunk(name: str) -> Any:
        funcs = [getattr(chunk, name) for chunk in chunks]
        return funcs if len(funcs) > 1 else funcs[0]

    if ddp_config.overlap_grad_reduce and align_grad_reduce:
        config.grad_sync_func = per_chunk("start_grad_sync")
    if ddp_config.overlap_param_gather and ddp_config.align_param_gather:
        config.param_sync_func = per_chunk("start_param_sync")


def sync_params(chunks: list) -> None:
    """Finish the parameter all-gather that ``--overlap-param-gather`` leaves to the next
    forward pass, so the weights are complete on every rank: before a checkpoint is written
    (Megatron-LM does the same around its saves). A no-op without the flag."""
    for chunk in chunks:
        if getattr(chunk, "use_forward_hook", False):
            chunk.disable_forward_pre_hook(param_sync=True)
            chunk.enable_forward_pre_hook()


def _optimizer_and_scheduler(chunks: list, model_cfg: PathMoEConfig, train: TrainingConfig):
    """megatron's Adam and OptimizerParamScheduler with Megatron-LM's schedule flags (warmup,
    decay style incl. WSD, iteration or sample budgets, weight-decay increment)."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=train.lr, min_lr=train.min_lr,
                        weight_decay=train.weight_decay, adam_beta1=train.adam_beta1,
                        adam_beta2=train.adam_beta2, adam_eps=train.adam_eps,
                        clip_grad=train.clip_grad, bf16=model_cfg.bf16,
                        params_dtype=model_cfg.params_dtype,
                        use_distributed_optimizer=train.use_distributed_optimizer,
                        decoupled_lr=train.decoupled_lr,
                        decoupled_min_lr=train.decoupled_min_lr),
        chunks)
    steps = train.lr_schedule()
    start_wd, end_wd = train.weight_decay_range()
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=train.lr_warmup_init, max_lr=train.lr, min_lr=train.min_lr,
        lr_warmup_steps=steps.warmup_steps, lr_decay_steps=steps.decay_steps,
        lr_decay_style=train.lr_decay_style, start_wd=start_wd, end_wd=end_wd,
        wd_incr_steps=steps.wd_incr_steps, wd_incr_style=train.weight_decay_incr_style,
        wsd_decay_steps=steps.wsd_decay_steps, lr_wsd_decay_style=train.lr_wsd_decay_style,
        override_opt_param_scheduler=train.override_opt_param_scheduler,
        use_checkpoint_opt_param_scheduler=not train.override_opt_param_scheduler)
    return optimizer, scheduler
