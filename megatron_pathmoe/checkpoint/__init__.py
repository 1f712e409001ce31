"""Checkpoints that survive faults and reshard, one concern per module:

- ``layout``: the directory protocol of a ``--save`` root (tracker file, ``iter_XXXXXXX``,
  atomic publish of a temporary directory, pruning);
- ``record``: the run record ``pathmoe_run.json`` (model config, training settings, layout,
  tokenizer hash) and whether a checkpoint may be resumed by a given model;
- ``sharded``: the sharded state dict through megatron-core's ``dist_checkpointing`` (router
  ties stored once, RNG, optimizer) with megatron-core 0.16.1's workarounds; save and resume;
- ``load``: a model for inference, resharded to the caller's layout.

Below ``training/``, ``eval/``, ``analysis/`` and ``convert/``, which all read checkpoints
through it; above ``runtime/`` and the model layers.
"""

from megatron_pathmoe.checkpoint.layout import (
    RUN_FILE,
    TOKENIZER_FILE,
    TRACKER_FILE,
    CheckpointError,
    find_checkpoint,
    is_complete_checkpoint,
    iteration_dir,
    read_tracker,
    resolve_checkpoint_dir,
)
from megatron_pathmoe.checkpoint.load import load_model_for_inference
from megatron_pathmoe.checkpoint.record import (
    CHANGEABLE_FIELDS,
    CheckpointMeta,
    RunConfig,
    check_compatible,
    current_layout,
    file_sha256,
    read_run_config,
)
from megatron_pathmoe.checkpoint.sharded import (
    TIE_KEY_PREFIX,
    LoadOptions,
    ResumeState,
    load_checkpoint,
    save_checkpoint,
    save_model_checkpoint,
)

__all__ = [
    "CHANGEABLE_FIELDS",
    "RUN_FILE",
    "TIE_KEY_PREFIX",
    "TOKENIZER_FILE",
    "TRACKER_FILE",
    "CheckpointError",
    "CheckpointMeta",
    "LoadOptions",
    "ResumeState",
    "RunConfig",
    "check_compatible",
    "current_layout",
    "file_sha256",
    "find_checkpoint",
    "is_complete_checkpoint",
    "iteration_dir",
    "load_checkpoint",
    "load_model_for_inference",
    "read_run_config",
    "read_tracker",
    "resolve_checkpoint_dir",
    "save_checkpoint",
    "save_model_checkpoint",
]
