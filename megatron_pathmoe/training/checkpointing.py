"""Checkpoints through megatron-core's ``dist_checkpointing`` that survive faults.

Layout of a ``--save`` directory::

    <root>/latest_checkpointed_iteration.txt   iteration of the newest complete checkpoint
    <root>/iter_0000100/                       megatron dist checkpoint (torch_dist) +
                                               pathmoe_run.json + tokenizer.json
    <root>/.tmp_iter_0000200/                  a save in progress (never loaded)

Atomicity: every rank writes into the temporary directory; once all ranks are done (the
barrier inside ``dist_checkpointing.save``) rank 0 writes ``pathmoe_run.json``, renames the
directory to its final name and only then replaces the tracker file. A save interrupted at any
point leaves the previous checkpoint as "latest", and a directory without ``metadata.json`` and
``pathmoe_run.json`` is never taken for a checkpoint.

Parameters shared by several layers' routers (``pathmoe_tie`` attribute, see
``megatron_pathmoe.routing``) are stored once, under ``pathmoe_ties.<tie key>``, written by the
pipeline stage that holds the tie's first layer. Every other tensor keeps megatron-core's own
sharded key, so a checkpoint loads into any TP/EP/PP/DP layout (resharding).
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatron_pathmoe.config import PathMoEConfig

TRACKER_FILE = "latest_checkpointed_iteration.txt"
RUN_FILE = "pathmoe_run.json"
TOKENIZER_FILE = "tokenizer.json"
FORMAT_NAME = "megatron-pathmoe-checkpoint"
FORMAT_VERSION = 1
TIE_KEY_PREFIX = "pathmoe_ties."

# Fields a resumed run may change: the parallel layout and training-only regularisers. Any
# other difference in PathMoEConfig changes the model and is refused.
CHANGEABLE_FIELDS = frozenset({
    "tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size",
    "sequence_parallel", "virtual_pipeline_model_parallel_size",
    "num_layers_per_virtual_pipeline_stage", "moe_token_dispatcher_type",
    "attention_dropout", "hidden_dropout", "moe_aux_loss_coeff", "moe_z_loss_coeff",
    "moe_router_bias_update_rate", "moe_path_restriction", "moe_path_restriction_top_k",
})


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the path and what to do."""


@dataclass
class RunConfig:
    """What ``pathmoe_run.json`` records about the run that wrote a checkpoint."""

    model: PathMoEConfig
    iteration: int
    tokenizer_path: str
    tokenizer_sha256: str
    consumed_samples: int = 0
    training: dict = field(default_factory=dict)
    parallel: dict = field(default_factory=dict)
    has_optimizer: bool = True


# --------------------------------------------------------------------------- paths

def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def _tmp_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f".tmp_iter_{iteration:07d}")


def is_complete_checkpoint(path: str) -> bool:
    """A finished save: megatron's ``metadata.json`` (written after all shards) and ours."""
    return (os.path.isfile(os.path.join(path, "metadata.json"))
            and os.path.isfile(os.path.join(path, RUN_FILE)))


def read_tracker(root: str) -> int | None:
    tracker = os.path.join(root, TRACKER_FILE)
    if not os.path.isfile(tracker):
        return None
    text = open(tracker).read().strip()
    try:
        return int(text)
    except ValueError:
        raise CheckpointError(f"{tracker}: expected an iteration number, found {text!r}; "
                              "delete the file to fall back to the newest complete "
                              "iter_XXXXXXX directory") from None


def resolve_checkpoint_dir(path: str) -> str:
    """The checkpoint directory meant by ``path``: an ``iter_XXXXXXX`` directory itself, or a
    ``--save`` root (its tracker file; without one, the newest complete ``iter_*``)."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist; pass a --save directory of "
                              "a training run or one of its iter_XXXXXXX folders")
    if is_complete_checkpoint(path):
        return path
    if os.path.basename(os.path.normpath(path)).startswith(("iter_", ".tmp_iter_")):
        raise CheckpointError(f"{path!r} is an incomplete checkpoint (interrupted save: no "
                              f"metadata.json or {RUN_FILE}); load its parent directory to get "
                              "the newest complete one")
    iteration = read_tracker(path)
    if iteration is not None:
        chosen = iteration_dir(path, iteration)
        if not is_complete_checkpoint(chosen):
            raise CheckpointError(f"{os.path.join(path, TRACKER_FILE)} names iteration "
                                  f"{iteration}, but {chosen} is missing or incomplete")
        return chosen
    complete = sorted(d for d in glob.glob(os.path.join(path, "iter_*"))
                      if is_complete_checkpoint(d))
    if complete:
        return complete[-1]
    raise CheckpointError(f"{path!r} holds no complete checkpoint (no {TRACKER_FILE} and no "
                          f"iter_XXXXXXX folder with metadata.json and {RUN_FILE}); check the "
                          "--load path or train with --save first")


def read_run_config(path: str) -> RunConfig:
    """The run record of the checkpoint at ``path`` (see :func:`resolve_checkpoint_dir`)."""
    ckpt = resolve_checkpoint_dir(path)
    record_path = os.path.join(ckpt, RUN_FILE)
    try:
        record = json.load(open(record_path))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{record_path}: not valid JSON ({err})") from None
    if record.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{record_path}: not a {FORMAT_NAME} record")
    known = {f.name for f in dataclasses.fields(PathMoEConfig)}
    unknown = sorted(set(record["model"]) - known)
    if unknown:
        raise CheckpointError(f"{record_path}: model fields {unknown} are unknown to this "
                              "version of megatron-pathmoe; upgrade it to load this checkpoint")
    return RunConfig(
        model=PathMoEConfig(**record["model"]), iteration=int(record["iteration"]),
        tokenizer_path=os.path.join(ckpt, TOKENIZER_FILE),
        tokenizer_sha256=record["tokenizer"]["sha256"],
        consumed_samples=int(record.get("consumed_samples", 0)),
        training=record.get("training", {}), parallel=record.get("parallel", {}),
        has_optimizer=bool(record.get("has_optimizer", True)))


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_compatible(saved: PathMoEConfig, current: PathMoEConfig, where: str) -> None:
    """Refuse to resume into a different model; a different parallel layout is fine."""
    old, new = saved.to_dict(), current.to_dict()
    differing = [f"{name}: checkpoint {old.get(name)!r} vs now {new.get(name)!r}"
                 for name in sorted(set(old) | set(new))
                 if name not in CHANGEABLE_FIELDS and old.get(name) != new.get(name)]
    if differing:
        raise CheckpointError(
            f"{where} was trained with a different model; resuming would not continue that "
            "run:\n  " + "\n  ".join(differing) + "\nuse the checkpoint's settings (only the "
            "parallel layout and regularisers may change) or start a new run without --load")


# --------------------------------------------------------------------------- sharded state

def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    return getattr(chunk, "module", chunk)


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
            replica = value.replica_id if isinstance(value.replica_id, tuple) else (value.replica_id,)
            sharded[name] = ShardedTensor.from_rank_offsets(
                TIE_KEY_PREFIX + param.pathmoe_tie, param, replica_id=(0 if writer else 1, *replica))
    return sharded


def _model_keys(chunks: list) -> list[str]:
    return ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]


def _model_sharded_state(chunks: list) -> dict:
    return {key: _store_ties_once(_unwrap(chunk).sharded_state_dict(), _unwrap(chunk))
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


def current_layout() -> dict:
    from megatron.core import parallel_state as ps

    return {"world_size": dist.get_world_size(),
            "tensor_model_parallel_size": ps.get_tensor_model_parallel_world_size(),
            "pipeline_model_parallel_size": ps.get_pipeline_model_parallel_world_size(),
            "virtual_pipeline_model_parallel_size":
                ps.get_virtual_pipeline_model_parallel_world_size(),
            "expert_model_parallel_size": ps.get_expert_model_parallel_world_size(),
            "data_parallel_size": ps.get_data_parallel_world_size()}


# Distributed optimizer state format: each rank's buckets (fast; loads into another DP size,
# not another TP/PP/EP layout). megatron-core 0.16.1's "fully_reshardable" fails to load with
# torch's Adam (no apex/TE: a KeyError on "step"), so it is not offered.
_OPTIMIZER_SHARDING = "dp_reshardable"


def _full_state(chunks: list, optimizer: Any, scheduler: Any, *, is_loading: bool,
                with_rng: bool) -> dict:
    state = _model_sharded_state(chunks)
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

@dataclass
class CheckpointMeta:
    """What a save records beyond tensors."""

    model: PathMoEConfig
    tokenizer_path: str
    consumed_samples: int = 0
    training: dict = field(default_factory=dict)


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _run_record(meta: CheckpointMeta, iteration: int, has_optimizer: bool) -> dict:
    import megatron.core

    return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "iteration": iteration,
            "has_optimizer": has_optimizer,
            "consumed_samples": meta.consumed_samples, "model": meta.model.to_dict(),
            "training": meta.training, "parallel": current_layout(),
            "tokenizer": {"file": TOKENIZER_FILE, "source": os.path.abspath(meta.tokenizer_path),
                          "sha256": file_sha256(meta.tokenizer_path)},
            "megatron_core": megatron.core.__version__,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def save_checkpoint(root: str, iteration: int, chunks: list, optimizer: Any, scheduler: Any,
                    meta: CheckpointMeta, keep_last: int | None = None,
                    before_publish: Any = None) -> str:
    """Save on every rank (collective); returns the final directory. ``before_publish`` is a
    fault-injection hook run after all shards are written and before the checkpoint becomes
    visible."""
    from megatron.core import dist_checkpointing

    final, tmp = iteration_dir(root, iteration), _tmp_dir(root, iteration)
    if _rank0():
        os.makedirs(root, exist_ok=True)
        if not os.access(root, os.W_OK):
            raise CheckpointError(f"--save {root!r} is not writable")
        shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted save
        os.makedirs(tmp)
    _barrier()
    state = _full_state(chunks, optimizer, scheduler, is_loading=False, with_rng=True)
    dist_checkpointing.save(state, tmp)  # ends with a barrier: every rank's shards are written
    if before_publish is not None:
        before_publish()
    if _rank0():
        shutil.copyfile(meta.tokenizer_path, os.path.join(tmp, TOKENIZER_FILE))
        _write_atomic(os.path.join(tmp, RUN_FILE), json.dumps(
            _run_record(meta, iteration, optimizer is not None), indent=2))
        shutil.rmtree(final, ignore_errors=True)  # re-saving an iteration replaces it
        os.replace(tmp, final)
        _write_atomic(os.path.join(root, TRACKER_FILE), f"{iteration}\n")
        if keep_last:
            _prune(root, keep_last)
    _barrier()
    return final


def _prune(root: str, keep_last: int) -> None:
    complete = sorted(d for d in glob.glob(os.path.join(root, "iter_*"))
                      if is_complete_checkpoint(d))
    for old in complete[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def save_model_checkpoint(model: torch.nn.Module, model_cfg: PathMoEConfig, save_root: str,
                          iteration: int, tokenizer_path: str) -> str:
    """A model-only checkpoint (no optimizer state), e.g. from a Hugging Face conversion."""
    return save_checkpoint(save_root, iteration, [model], None, None,
                           CheckpointMeta(model=model_cfg, tokenizer_path=tokenizer_path))


# --------------------------------------------------------------------------- load

@dataclass
class ResumeState:
    iteration: int
    consumed_samples: int
    checkpoint_dir: str
    rng_restored: bool


def load_checkpoint(path: str, chunks: list, optimizer: Any, scheduler: Any,
                    model_cfg: PathMoEConfig) -> ResumeState:
    """Resume training (collective): model, optimizer, scheduler, RNG (same layout only)."""
    from megatron.core import dist_checkpointing

    ckpt = resolve_checkpoint_dir(path)
    run = read_run_config(ckpt)
    check_compatible(run.model, model_cfg, f"--load {ckpt}")
    same_layout = run.parallel == current_layout()
    has_optimizer = run.has_optimizer
    placeholders = _give_fresh_distributed_optimizer_a_step(optimizer) \
        if optimizer is not None and has_optimizer else []
    state = _full_state(chunks, optimizer if has_optimizer else None,
                        scheduler if has_optimizer else None, is_loading=True,
                        with_rng=same_layout and has_optimizer)
    for param_state in placeholders:  # the loaded state brings its own step
        param_state.pop("step", None)
    optimizer_loaded = "optimizer" in state and _optimizer_layout_matches(state["optimizer"], ckpt)
    if "optimizer" in state and not optimizer_loaded:
        del state["optimizer"]
        _warn(f"{ckpt}: optimizer state not restored: it was saved with a different optimizer "
              f"structure ({_layout_text(run.parallel)}; e.g. expert parallelism splits the "
              "optimizer into dense and expert parts); Adam moments restart from zero")
    loaded = dist_checkpointing.load(state, ckpt)
    for key, chunk in zip(_model_keys(chunks), chunks):
        _unwrap(chunk).load_state_dict(loaded[key], strict=True)
    if optimizer is not None:
        with torch.no_grad():  # the distributed optimizer's main params may view model params
            if optimizer_loaded:
                optimizer.load_state_dict(loaded["optimizer"])
            else:  # main (fp32 / sharded) params must follow the loaded model weights
                optimizer.reload_model_params()
    if scheduler is not None and has_optimizer:
        scheduler.load_state_dict(loaded["opt_param_scheduler"])
    if "rng_state" in loaded:
        _set_rng_state(loaded["rng_state"])
    return ResumeState(iteration=run.iteration, consumed_samples=run.consumed_samples,
                       checkpoint_dir=ckpt, rng_restored="rng_state" in loaded)


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


def _warn(message: str) -> None:
    if _rank0():
        print(f"WARNING: {message}", flush=True)


def load_model_for_inference(path: str, device: str = "cpu") -> tuple[torch.nn.Module, RunConfig]:
    """This rank's model for the megatron parallel state already initialised by the caller,
    with the checkpoint's weights (resharded as needed), in eval mode."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    from megatron_pathmoe.model import build_gpt_model

    ckpt = resolve_checkpoint_dir(path)
    run = read_run_config(ckpt)
    layout = run.model.replace(
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        expert_model_parallel_size=ps.get_expert_model_parallel_world_size(),
        sequence_parallel=ps.get_tensor_model_parallel_world_size() > 1)
    if hasattr(layout, "virtual_pipeline_model_parallel_size"):
        layout = layout.replace(virtual_pipeline_model_parallel_size=None)
    model = build_gpt_model(layout)
    if device == "cuda":
        model.cuda(torch.cuda.current_device())
    loaded = dist_checkpointing.load(_model_sharded_state([model]), ckpt)
    model.load_state_dict(loaded["model"], strict=True)
    model.eval()
    run.model = layout
    return model, run
