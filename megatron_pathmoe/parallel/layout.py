"""The parallel layout of a run, in words (startup log and ``--dry-run``)."""

from __future__ import annotations

from megatron_pathmoe.config import PathMoEConfig


def data_parallel_size(cfg: PathMoEConfig, world_size: int) -> int:
    return world_size // (cfg.tensor_model_parallel_size * cfg.pipeline_model_parallel_size)


def expert_data_parallel_size(cfg: PathMoEConfig, world_size: int) -> int:
    """Replicas of each expert (experts are never tensor-parallel here)."""
    return world_size // (cfg.pipeline_model_parallel_size * cfg.expert_model_parallel_size)


def describe_layout(cfg: PathMoEConfig, world_size: int) -> str:
    """E.g. ``TP1 PP2 (VPP2) EP8 DP32 (expert-DP 8) SP off``."""
    vpp = cfg.virtual_pipeline_model_parallel_size
    return (f"TP{cfg.tensor_model_parallel_size} PP{cfg.pipeline_model_parallel_size}"
            f"{f' (VPP{vpp})' if vpp else ''} EP{cfg.expert_model_parallel_size} "
            f"DP{data_parallel_size(cfg, world_size)} "
            f"(expert-DP {expert_data_parallel_size(cfg, world_size)}) "
            f"SP {'on' if cfg.sequence_parallel else 'off'}")


def check_pipeline_schedule(cfg: PathMoEConfig, num_microbatches: int) -> None:
    """The interleaved schedule runs micro-batches in groups of PP (megatron-core raises
    mid-step otherwise); say so before launch."""
    from megatron_pathmoe.config import ConfigError

    vpp, pp = cfg.virtual_pipeline_model_parallel_size, cfg.pipeline_model_parallel_size
    if vpp is not None and num_microbatches % pp:
        raise ConfigError(
            f"--virtual-pipeline-model-parallel-size {vpp} needs the micro-batches per step "
            f"({num_microbatches} = global batch / (micro-batch x data-parallel size)) to be a "
            f"multiple of --pipeline-model-parallel-size {pp}; change --global-batch-size or "
            "--micro-batch-size")
