"""The run record (``pathmoe_run.json``) a checkpoint carries beside its tensors: the model
config, the training settings, the parallel layout and the tokenizer (its type, copies of its
files and their hashes); and whether a checkpoint may be resumed by a given model and tokenizer.

Tokenizer files are copied into the checkpoint under fixed names (``TOKENIZER_COPY_NAMES``), so
evaluation, analysis and conversion rebuild the tokenizer from the checkpoint alone. Records
written before tokenizer types were recorded hold one tokenizer.json and still load."""

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
from megatron_pathmoe.data.encoders import (
    FILE_FLAGS,
    GPT2_TYPE,
    HF_TYPE,
    NULL_TYPE,
    TokenizerSpec,
)

FORMAT_NAME = "megatron-pathmoe-checkpoint"
FORMAT_VERSION = 1

# Fields a resumed run may change: the parallel layout and training-only regularisers. Any
# other difference in PathMoEConfig changes the model and is refused.
CHANGEABLE_FIELDS = frozenset({
    "tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size",
    "sequence_parallel", "virtual_pipeline_model_parallel_size", "moe_token_dispatcher_type",
    "attention_dropout", "hidden_dropout", "moe_aux_loss_coeff", "moe_z_loss_coeff",
    "calculate_per_token_loss",
    "moe_router_bias_update_rate", "moe_path_restriction", "moe_path_restriction_top_k",
    # Performance switches and token dropping change how a step runs, not the weights: a
    # requeued job may turn on recompute after an OOM, or fused kernels on another cluster.
    "recompute_granularity", "recompute_method", "recompute_num_layers", "recompute_modules",
    "moe_grouped_gemm", "moe_permute_fusion", "moe_router_dtype", "moe_shared_expert_overlap",
    "moe_router_load_balancing_type", "moe_expert_capacity_factor",
    "moe_pad_expert_input_to_capacity", "moe_token_drop_policy",
    "max_position_embeddings",  # RoPE: no position weights
})
assert CHANGEABLE_FIELDS <= {f.name for f in dataclasses.fields(PathMoEConfig)}, \
    "CHANGEABLE_FIELDS names a field PathMoEConfig does not have"


# Names of the tokenizer copies inside a checkpoint, by TokenizerSpec field; a tokenizer.json
# keeps TOKENIZER_FILE, a SentencePiece model is tokenizer.model.
TOKENIZER_COPY_NAMES = {"vocab_file": "vocab.json", "merge_file": "merges.txt"}
SPM_COPY_NAME = "tokenizer.model"


@dataclass
class RunConfig:
    """What ``pathmoe_run.json`` records about the run that wrote a checkpoint.

    ``tokenizer`` reads the checkpoint's own copies; ``tokenizer_path`` is the copy of its main
    file ("" for a NullTokenizer); ``tokenizer_sha256`` identifies the tokenizer (for a
    tokenizer.json the file's hash, else a hash of type, file hashes, EOD and vocabulary size);
    ``tokenizer_files`` holds the recorded hash of each copy, by spec field."""

    model: PathMoEConfig
    iteration: int
    tokenizer_path: str
    tokenizer_sha256: str
    consumed_samples: int = 0
    training: dict = field(default_factory=dict)
    parallel: dict = field(default_factory=dict)
    has_optimizer: bool = True
    tokenizer: TokenizerSpec = field(default_factory=TokenizerSpec)
    tokenizer_files: dict = field(default_factory=dict)


@dataclass
class CheckpointMeta:
    """What a save records beyond tensors: ``tokenizer`` (any type), or else the tokenizer.json
    at ``tokenizer_path``."""

    model: PathMoEConfig
    tokenizer_path: str = ""
    consumed_samples: int = 0
    training: dict = field(default_factory=dict)
    tokenizer: TokenizerSpec | None = None

    def tokenizer_spec(self) -> TokenizerSpec:
        return self.tokenizer or TokenizerSpec(HF_TYPE, self.tokenizer_path)


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
    spec, files = _recorded_tokenizer(ckpt, record["tokenizer"])
    main_copy = spec.vocab_file if spec.tokenizer_type == GPT2_TYPE else spec.tokenizer_model
    return RunConfig(
        model=PathMoEConfig(**record["model"]), iteration=int(record["iteration"]),
        tokenizer_path=main_copy or "", tokenizer_sha256=record["tokenizer"]["sha256"],
        consumed_samples=int(record.get("consumed_samples", 0)),
        training=record.get("training", {}), parallel=record.get("parallel", {}),
        has_optimizer=bool(record.get("has_optimizer", True)), tokenizer=spec,
        tokenizer_files=files)


def _recorded_tokenizer(ckpt: str, record: dict) -> tuple[TokenizerSpec, dict[str, str]]:
    """The tokenizer over the checkpoint's copies, and each copy's recorded sha256."""
    if "type" not in record:  # written before tokenizer types were recorded: a tokenizer.json
        return (TokenizerSpec(HF_TYPE, os.path.join(ckpt, TOKENIZER_FILE)),
                {"tokenizer_model": record["sha256"]})
    files = record.get("files", {})
    spec = TokenizerSpec(record["type"], eod=record.get("eod"),
                         vocab_size=record.get("vocab_size"), legacy=record.get("legacy", False))
    spec = spec.with_files({name: os.path.join(ckpt, entry["file"])
                            for name, entry in files.items()})
    return spec, {name: entry["sha256"] for name, entry in files.items()}


def _copy_name(spec: TokenizerSpec, name: str) -> str:
    if name != "tokenizer_model":
        return TOKENIZER_COPY_NAMES[name]
    return TOKENIZER_FILE if spec.tokenizer_type == HF_TYPE else SPM_COPY_NAME


def tokenizer_record(spec: TokenizerSpec) -> dict:
    """The ``tokenizer`` entry of a run record: type, EOD, vocabulary size and, per file, the
    copy's name, the source path and the sha256."""
    files = {name: {"file": _copy_name(spec, name), "source": os.path.abspath(path),
                    "sha256": file_sha256(path)} for name, path in spec.files().items()}
    record = {"type": spec.tokenizer_type, "eod": spec.eod, "vocab_size": spec.vocab_size,
              "files": files}
    if spec.legacy:  # --legacy-tokenizer (absent otherwise: older records keep their hash)
        record["legacy"] = True
    if spec.tokenizer_type == HF_TYPE:  # the keys older readers know: the tokenizer.json itself
        record.update(files["tokenizer_model"])
    else:
        identity = json.dumps({k: record[k] for k in ("type", "eod", "vocab_size", "legacy")
                               if k in record} |
                              {"files": {n: e["sha256"] for n, e in files.items()}},
                              sort_keys=True)
        record["sha256"] = hashlib.sha256(identity.encode()).hexdigest()
    return record


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
    balancing = (saved.moe_router_load_balancing_type, current.moe_router_load_balancing_type)
    if balancing[0] != balancing[1] and "sinkhorn" in balancing:
        # The aux-loss types only weigh a loss; sinkhorn changes the gate function itself.
        differing.append(f"moe_router_load_balancing_type: checkpoint {balancing[0]!r} vs now "
                         f"{balancing[1]!r} (sinkhorn routing scores tokens differently)")
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
            "tokenizer": tokenizer_record(meta.tokenizer_spec()),
            "megatron_core": megatron.core.__version__,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def write_run_files(directory: str, meta: CheckpointMeta, iteration: int,
                    has_optimizer: bool) -> None:
    """The tokenizer copies and the run record of a save (rank 0, before publishing)."""
    spec = meta.tokenizer_spec()
    for name, path in spec.files().items():
        shutil.copyfile(path, os.path.join(directory, _copy_name(spec, name)))
    write_atomic(os.path.join(directory, RUN_FILE),
                 json.dumps(run_record(meta, iteration, has_optimizer), indent=2))


def verify_tokenizer_copies(run: RunConfig, checkpoint: str) -> None:
    """Every tokenizer copy of the checkpoint is present and has its recorded sha256."""
    for name, sha in run.tokenizer_files.items():
        path = getattr(run.tokenizer, name)
        if not os.path.isfile(path):
            raise CheckpointError(f"{checkpoint}: its tokenizer copy {path} is missing; the "
                                  "checkpoint is incomplete")
        if file_sha256(path) != sha:
            raise CheckpointError(f"{path} does not match the sha256 recorded in the "
                                  f"checkpoint's {RUN_FILE} (corrupted copy); restore it from "
                                  f"the training run's {FILE_FLAGS[name]}")


def tokenizer_file_differences(run: RunConfig, given: dict[str, str]) -> list[str]:
    """For each ``{spec field: path}`` given, why it is not the file the checkpoint's tokenizer
    was made from (nothing when it is)."""
    out = []
    for name, path in given.items():
        flag = FILE_FLAGS[name]
        if name not in run.tokenizer_files:
            out.append(f"{flag} {path}: the checkpoint's {run.tokenizer.tokenizer_type} reads no "
                       f"{flag}")
        elif not os.path.isfile(path):
            out.append(f"{flag} {path!r} does not exist")
        else:
            given_sha, saved_sha = file_sha256(path), run.tokenizer_files[name]
            if given_sha != saved_sha:
                out.append(f"{flag} {path} (sha256 {given_sha[:12]}) is not the file it was "
                           f"trained with (sha256 {saved_sha[:12]}, copy at "
                           f"{getattr(run.tokenizer, name)})")
    return out


def tokenizer_differences(run: RunConfig, spec: TokenizerSpec) -> list[str]:
    """Why ``spec`` is not the tokenizer the checkpoint was trained with (nothing when it is):
    type, files, NullTokenizer vocabulary, end-of-document id."""
    saved = run.tokenizer
    if spec.tokenizer_type != saved.tokenizer_type:
        return [f"--tokenizer-type {spec.tokenizer_type} (the checkpoint's: "
                f"{saved.tokenizer_type})"]
    out = tokenizer_file_differences(run, spec.files())
    if spec.legacy != saved.legacy:
        out.append(f"--legacy-tokenizer {'given' if spec.legacy else 'not given'} (the "
                   f"checkpoint's {saved.tokenizer_type} was {'' if saved.legacy else 'not '}"
                   "legacy)")
    if spec.vocab_size != saved.vocab_size and spec.tokenizer_type == NULL_TYPE:
        out.append(f"--vocab-size {spec.vocab_size} (the checkpoint's: {saved.vocab_size})")
    if not out and spec.load().eod != saved.load().eod:
        out.append(f"--eod-token {spec.eod!r} (the checkpoint's: {saved.eod!r})")
    return out
