"""Training state through megatron-core's ``dist_checkpointing``: the sharded state dict
(model chunks, optimizer, scheduler, RNG), its save and its resume, with the workarounds
megatron-core 0.16.1 needs.

Parameters shared by several layers' routers (``pathmoe_tie`` attribute, see
``megatron_pathmoe.routing``) are stored once, under ``pathmoe_ties.<tie key>``, written by the
pipeline stage that holds the tie's first layer. Every other tensor keeps megatron-core's own
sharded key, so a checkpoint loads into any TP/EP/PP/DP layout (resharding).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from megatron_pathmoe.checkpoint.layout import (
    iteration_dir,
    prepare_tmp_dir,
    publish,
    resolve_checkpoint_dir,
    tmp_dir,
)
from megatron_pathmoe.checkpoint.record import (
    CheckpointMeta,
    check_compatible,
    current_layout,
    read_run_config,
    write_run_files,
)
from megatron_pathmoe.config import PathMoEConfig
from megatron_pathmoe.routing import unwrap_model
from megatron_pathmoe.runtime import barrier, is_rank0, warn

TIE_KEY_PREFIX = "pathmoe_ties."


def _store_ties_once(sharded: dict, model: torch.nn.Module) -> dict:
    """Re-key router parameters shared across layers to one ``pathmoe_ties.<key>`` entry.

    megatron stores a router weight under its layer's slot of a layer-stacked tensor; a tied
    weight would then appear under whichever layer owns it on each stage, which differs between
    pipeline layouts. One key per tie makes it layout-independent. The stage holding the tie's
    first layer writes it; other holders are replicas (and all of them load it).
    """
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron_pathmoe.parallel import is_canonical_copy
    from megatron_pathmoe.routing import tied_router_parameters

    tied = {id(p): p for p in tied_router_parameters(model).values()}
    for name, value in sharded.items():
        if isinstance(value, ShardedTensor) and id(value.data) in tied:
            param = tied[id(value.data)]
            writer = is_canonical_copy(model, param)
            replica = (value.replica_id if isinstance(value.replica_id, tuple)
                       else (value.replica_id,))
            sharded[name] = ShardedTensor.from_rank_offsets(
                TIE_KEY_PREFIX + param.pathmoe_tie, param,
                replica_id=(0 if writer else 1, *replica))
    return sharded


def _model_keys(chunks: list) -> list[str]:
    return ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]


def model_sharded_state(chunks: list) -> dict:
    return {key: _store_ties_once(unwrap_model(chunk).sharded_state_dict(), unwrap_model(chunk))
            for key, chunk in zip(_model_keys(chunks), chunks)}


def _rng_state() -> dict:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": get_cuda_rng_tracker().get_states()}


def _set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded_object(state: dict | None):
    """One RNG record per (PP, TP, DP) rank: restored only into the same layout."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    shape = (ps.get_pipeline_model_parallel_world_size(),
             ps.get_tensor_model_parallel_world_size(), ps.get_data_parallel_world_size())
    offset = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
              ps.get_data_parallel_rank())
    return ShardedObject("rng_state", state, shape, offset, replica_id=0)


# Distributed optimizer state format: each rank's buckets (fast; loads into another DP size,
# not another TP/PP/EP layout). megatron-core 0.16.1's "fully_reshardable" fails to load with
# torch's Adam (no apex/TE: a KeyError on "step"), so it is not offered.
_OPTIMIZER_SHARDING = "dp_reshardable"


def _full_state(chunks: list, optimizer: Any, scheduler: Any, *, is_loading: bool,
                with_rng: bool) -> dict:
    state = model_sharded_state(chunks)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(
            state, is_loading=is_loading,
            metadata={"distrib_optim_sharding_type": _OPTIMIZER_SHARDING})
    if scheduler is not None:
        state["opt_param_scheduler"] = scheduler.state_dict()
    if with_rng:
        state["rng_state"] = _rng_sharded_object(None if is_loading else _rng_state())
    return state


# --------------------------------------------------------------------------- save

def save_checkpoint(root: str, iteration: int, chunks: list, optimizer: Any, scheduler: Any,
                    meta: CheckpointMeta, keep_last: int | None = None,
                    before_publish: Any = None) -> str:
    """Save on every rank (collective); returns the final directory. ``before_publish`` is a
    fault-injection hook run after all shards are written and before the checkpoint becomes
    visible."""
    from megatron.core import dist_checkpointing

    tmp = tmp_dir(root, iteration)
    if is_rank0():
        prepare_tmp_dir(root, iteration)
    barrier()
    state = _full_state(chunks, optimizer, scheduler, is_loading=False, with_rng=True)
    dist_checkpointing.save(state, tmp)  # ends with a barrier: every rank's shards are written
    if before_publish is not None:
        before_publish()
    if is_rank0():
        write_run_files(tmp, meta, iteration, optimizer is not None)
        publish(root, iteration, keep_last)
    barrier()
    return iteration_dir(root, iteration)


def save_model_checkpoint(model: torch.nn.Module, model_cfg: PathMoEConfig, save_root: str,
                          iteration: int, tokenizer_path: str) -> str:
    """A model-only checkpoint (no optimizer state), e.g. from a Hugging Face conversion."""
    return save_checkpoint(save_root, iteration, [model], None, None,
                           CheckpointMeta(model=model_cfg, tokenizer_path=tokenizer_path))


# --------------------------------------------------------------------------- resume

@dataclass(frozen=True)
class LoadOptions:
    """What a resume restores beyond the weights, with Megatron-LM's meanings:
    ``--no-load-optim`` (optimizer=False: fresh Adam state and LR schedule; iteration and data
    position kept), ``--no-load-rng`` (rng=False), ``--finetune`` (weights only: iteration 0,
    no data position, fresh optimizer, schedule and RNG)."""

    optimizer: bool = True
    rng: bool = True
    finetune: bool = False

    @property
    def wants_optimizer(self) -> bool:
        return self.optimizer and not self.finetune

    @property
    def wants_rng(self) -> bool:
        return self.rng and not self.finetune


@dataclass
class ResumeState:
    iteration: int
    consumed_samples: int
    checkpoint_dir: str
    rng_restored: bool
    optimizer_restored: bool = False  # Adam moments and LR schedule


def load_checkpoint(path: str, chunks: list, optimizer: Any, scheduler: Any,
                    model_cfg: PathMoEConfig, options: LoadOptions = LoadOptions()
                    ) -> ResumeState:
    """Resume training (collective): model, and as ``options`` allow the optimizer with the
    scheduler, and the RNG (same layout only)."""
    from megatron.core import dist_checkpointing

    ckpt = resolve_checkpoint_dir(path)
    run = read_run_config(ckpt)
    check_compatible(run.model, model_cfg, f"--load {ckpt}")
    same_layout = run.parallel == current_layout()
    load_optim = run.has_optimizer and options.wants_optimizer and optimizer is not None
    placeholders = _give_fresh_distributed_optimizer_a_step(optimizer) if load_optim else []
    state = _full_state(chunks, optimizer if load_optim else None,
                        scheduler if load_optim else None, is_loading=True,
                        with_rng=same_layout and run.has_optimizer and options.wants_rng)
    for param_state in placeholders:  # the loaded state brings its own step
        param_state.pop("step", None)
    optimizer_loaded = "optimizer" in state and _optimizer_layout_matches(state["optimizer"], ckpt)
    if "optimizer" in state and not optimizer_loaded:
        del state["optimizer"]
        warn(f"{ckpt}: optimizer state not restored: it was saved with a different optimizer "
              f"structure ({_layout_text(run.parallel)}; e.g. expert parallelism splits the "
              "optimizer into dense and expert parts); Adam moments restart from zero")
    loaded = dist_checkpointing.load(state, ckpt)
    for key, chunk in zip(_model_keys(chunks), chunks):
        unwrap_model(chunk).load_state_dict(loaded[key], strict=True)
    if optimizer is not None:
        with torch.no_grad():  # the distributed optimizer's main params may view model params
            if optimizer_loaded:
                optimizer.load_state_dict(loaded["optimizer"])
            else:  # main (fp32 / sharded) params must follow the loaded model weights
                optimizer.reload_model_params()
    # Asked-for keys only: dist_checkpointing.load returns every common (non-sharded) entry.
    if "opt_param_scheduler" in state:
        scheduler.load_state_dict(loaded["opt_param_scheduler"])
    if "rng_state" in state:
        _set_rng_state(loaded["rng_state"])
    return ResumeState(iteration=0 if options.finetune else run.iteration,
                       consumed_samples=0 if options.finetune else run.consumed_samples,
                       checkpoint_dir=ckpt, rng_restored="rng_state" in state,
                       optimizer_restored=optimizer_loaded)


def _give_fresh_distributed_optimizer_a_step(optimizer: Any) -> list[dict]:
    """megatron-core 0.16.1's distributed optimizer reads the common Adam ``step`` from its
    state while building the state dict to load into (without apex/TE), which a fresh
    optimizer does not have yet: allocate its state as megatron does and add placeholder
    steps. Returns the per-parameter states that got one (to drop before loading)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    placeholders = []
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(sub, DistributedOptimizer) and sub.init_state_fn is not None:
            sub.init_state_fn(sub.optimizer, sub.config)
            for param_state in sub.optimizer.state.values():
                if "step" not in param_state:
                    param_state["step"] = torch.tensor(0.0)
                    placeholders.append(param_state)
    return placeholders


def _optimizer_layout_matches(optimizer_state: dict, ckpt: str) -> bool:
    """Whether every optimizer entry this run asks for exists in the checkpoint. TP/PP/DP
    changes keep the keys of a plain or fully reshardable optimizer state (megatron reshards
    them); a different optimizer structure, or dp_reshardable buckets of another TP/PP/EP
    layout, do not."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedBase
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    saved = {v.key for v in nested_values(load_sharded_metadata(ckpt))}
    wanted = {v.key for v in nested_values(optimizer_state) if isinstance(v, ShardedBase)}
    return wanted <= saved


_LAYOUT_NAMES = {"tensor_model_parallel_size": "TP", "pipeline_model_parallel_size": "PP",
                 "virtual_pipeline_model_parallel_size": "VPP",
                 "expert_model_parallel_size": "EP", "data_parallel_size": "DP"}


def _layout_text(layout: dict) -> str:
    saved = " ".join(f"{short}{layout[key]}" for key, short in _LAYOUT_NAMES.items()
                     if layout.get(key))
    now = " ".join(f"{short}{value}" for key, short in _LAYOUT_NAMES.items()
                   if (value := current_layout().get(key)))
    return f"saved with {saved or 'an unknown layout'}, loading with {now}"
