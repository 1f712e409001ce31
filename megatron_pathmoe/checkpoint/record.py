"""The run record (``pathmoe_run.json``) a checkpoint carries beside its tensors: the model
config, the training settings, the parallel layout and the tokenizer's hash; and whether a
checkpoint may be resumed by a given model."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field

import torch.distributed as dist

from megatron_pathmoe.checkpoint.layout import (
    RUN_FILE,
    TOKENIZER_FILE,
    CheckpointError,
    resolve_checkpoint_dir,
    write_atomic,
)
from megatron_pathmoe.config import PathMoEConfig

FORMAT_NAME = "megatron-pathmoe-checkpoint"
FORMAT_VERSION = 1

# Fields a resumed run may change: the parallel layout and training-only regularisers. Any
# other difference in PathMoEConfig changes the model and is refused.
CHANGEABLE_FIELDS = frozenset({
    "tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size",
    "sequence_parallel", "virtual_pipeline_model_parallel_size", "moe_token_dispatcher_type",
    "attention_dropout", "hidden_dropout", "moe_aux_loss_coeff", "moe_z_loss_coeff",
    "moe_router_bias_update_rate", "moe_path_restriction", "moe_path_restriction_top_k",
})
assert CHANGEABLE_FIELDS <= {f.name for f in dataclasses.fields(PathMoEConfig)}, \
    "CHANGEABLE_FIELDS names a field PathMoEConfig does not have"


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


@dataclass
class CheckpointMeta:
    """What a save records beyond tensors."""

    model: PathMoEConfig
    tokenizer_path: str
    consumed_samples: int = 0
    training: dict = field(default_factory=dict)


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


def current_layout() -> dict:
    from megatron.core import parallel_state as ps

    return {"world_size": dist.get_world_size(),
            "tensor_model_parallel_size": ps.get_tensor_model_parallel_world_size(),
            "pipeline_model_parallel_size": ps.get_pipeline_model_parallel_world_size(),
            "virtual_pipeline_model_parallel_size":
                ps.get_virtual_pipeline_model_parallel_world_size(),
            "expert_model_parallel_size": ps.get_expert_model_parallel_world_size(),
            "data_parallel_size": ps.get_data_parallel_world_size()}


def run_record(meta: CheckpointMeta, iteration: int, has_optimizer: bool) -> dict:
    import megatron.core

    return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "iteration": iteration,
            "has_optimizer": has_optimizer,
            "consumed_samples": meta.consumed_samples, "model": meta.model.to_dict(),
            "training": meta.training, "parallel": current_layout(),
            "tokenizer": {"file": TOKENIZER_FILE, "source": os.path.abspath(meta.tokenizer_path),
                          "sha256": file_sha256(meta.tokenizer_path)},
            "megatron_core": megatron.core.__version__,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def write_run_files(directory: str, meta: CheckpointMeta, iteration: int,
                    has_optimizer: bool) -> None:
    """The tokenizer copy and the run record of a save (rank 0, before publishing)."""
    shutil.copyfile(meta.tokenizer_path, os.path.join(directory, TOKENIZER_FILE))
    write_atomic(os.path.join(directory, RUN_FILE),
                 json.dumps(run_record(meta, iteration, has_optimizer), indent=2))
