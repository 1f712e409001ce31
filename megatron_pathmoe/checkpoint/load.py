"""A model from a checkpoint for inference (evaluation, analysis, conversion, path
recording), resharded to the caller's parallel layout."""

from __future__ import annotations

import torch

from megatron_pathmoe.checkpoint.layout import resolve_checkpoint_dir
from megatron_pathmoe.checkpoint.record import RunConfig, read_run_config
from megatron_pathmoe.checkpoint.sharded import model_sharded_state


def load_model_for_inference(path: str, device: str = "cpu", permute_impl: str = "auto"
                             ) -> tuple[torch.nn.Module, RunConfig]:
    """This rank's model for the megatron parallel state already initialised by the caller,
    with the checkpoint's weights (resharded as needed), in eval mode, its token permutation
    ``permute_impl`` (``--permute-impl``)."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    from megatron_pathmoe.model import build_gpt_model

    ckpt = resolve_checkpoint_dir(path)
    run = read_run_config(ckpt)
    layout = run.model.replace(
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        expert_model_parallel_size=ps.get_expert_model_parallel_world_size(),
        sequence_parallel=ps.get_tensor_model_parallel_world_size() > 1,
        virtual_pipeline_model_parallel_size=None)
    model = build_gpt_model(layout, permute_impl=permute_impl, device=device)
    if device == "cuda":
        model.cuda(torch.cuda.current_device())
    loaded = dist_checkpointing.load(model_sharded_state([model]), ckpt)
    model.load_state_dict(loaded["model"], strict=True)
    model.eval()
    run.model = layout
    return model, run
