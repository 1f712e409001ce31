"""``pathmoe-pretrain``: the pretraining entry point (launch with torchrun; also
``python -m megatron_pathmoe.training.pretrain``)."""

from __future__ import annotations

import sys

from megatron_pathmoe.runtime import quiet_warnings


def main(argv: list[str] | None = None) -> int:
    quiet_warnings()
    from megatron_pathmoe.platform import resolve_device
    from megatron_pathmoe.training.arguments import parse_args

    model_cfg, train_cfg = parse_args(argv)  # exits with a one-line error on bad input
    device = resolve_device(train_cfg.device)
    if train_cfg.dry_run:
        return _dry_run(model_cfg, train_cfg)
    from megatron_pathmoe.runtime import destroy_distributed
    from megatron_pathmoe.training.trainer import pretrain

    try:
        pretrain(model_cfg, train_cfg, device)
    except Exception as err:  # name the rank: torchrun interleaves every rank's stderr
        return _report_failure(err)
    finally:
        destroy_distributed()
    return 0


def _dry_run(model_cfg, train_cfg) -> int:
    """The validated layout, parameter counts and memory estimate; no process group."""
    from megatron_pathmoe.model.estimate import layout_report
    from megatron_pathmoe.parallel.layout import describe_layout

    world = train_cfg.dry_run_world_size
    nmb = train_cfg.num_microbatches(model_cfg, world)
    print(f"dry run: routing={model_cfg.routing} layers={model_cfg.num_layers} "
          f"hidden={model_cfg.hidden_size} experts={model_cfg.num_experts} "
          f"top{model_cfg.moe_router_topk} seq={model_cfg.seq_length}")
    print(f"layout OK for world size {world}: {describe_layout(model_cfg, world)}; "
          f"global batch {train_cfg.global_batch_size} = micro-batch "
          f"{train_cfg.micro_batch_size} x {nmb} micro-batches x DP "
          f"{train_cfg.data_parallel_size(model_cfg, world)}")
    schedule = train_cfg.batch_schedule()
    if schedule.rampup is not None:
        sizes = schedule.sizes()
        print(f"batch ramp-up: global batch {', '.join(map(str, sizes))} over the first "
              f"{schedule.rampup.samples:,} samples; {train_cfg.train_iters} iterations for "
              f"--train-samples {train_cfg.train_samples:,}")
    _, _, report = layout_report(
        model_cfg, world, micro_batch_size=train_cfg.micro_batch_size, num_microbatches=nmb,
        use_distributed_optimizer=train_cfg.use_distributed_optimizer,
        flash_attention=train_cfg.transformer_impl == "transformer_engine")
    print("\n".join(report), flush=True)
    return 0


def _report_failure(err: Exception) -> int:
    """One line naming the rank and the error (a traceback first when it is not one of ours);
    the non-zero exit makes torchrun stop the other ranks."""
    from megatron_pathmoe.checkpoint import CheckpointError
    from megatron_pathmoe.runtime import report_failure
    from megatron_pathmoe.training.faults import InjectedFault, NonFiniteError

    ours = isinstance(err, (CheckpointError, InjectedFault, NonFiniteError))
    return report_failure("pathmoe-pretrain", err, traceback=not ours)


if __name__ == "__main__":
    sys.exit(main())
