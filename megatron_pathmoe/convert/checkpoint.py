"""Megatron checkpoints <-> Hugging Face model directories.

Megatron -> HF loads the checkpoint through ``load_model_for_inference`` (megatron's
dist_checkpointing reshards any saved TP/EP/PP layout to this process's layout; world 1 by
default), gathers the canonical state dict on rank 0 (``shards.py``) and writes the directory.
HF -> Megatron builds a world-1 model, loads the converted weights (restoring block-shared
routers) and saves a model-only checkpoint with ``save_model_checkpoint``, which
``pathmoe-pretrain --load`` continues from in any layout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import os
from dataclasses import dataclass
from typing import Iterator

import torch

from megatron_pathmoe.config import PathMoEConfig
from megatron_pathmoe.convert import hf_files, qwen2_moe
from megatron_pathmoe.convert.converter import (
    EXTRA_STATE_SUFFIX,
    hf_to_megatron,
    megatron_to_hf,
    tie_block_routers,
)
from megatron_pathmoe.convert.errors import ConversionError
from megatron_pathmoe.convert.shards import canonical_state
from megatron_pathmoe.convert.tokenizer import hf_tokenizer_spec, write_hf_tokenizer
from megatron_pathmoe.data.encoders import HF_TYPE, TokenizerSpec
from megatron_pathmoe.runtime import is_rank0

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_EMBEDDING_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")


@dataclass(frozen=True)
class ParallelLayout:
    """The layout the converting processes load the checkpoint in (world 1 by default; under
    torchrun each rank converts its own shard and rank 0 writes)."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1


@contextlib.contextmanager
def megatron_process_group(layout: ParallelLayout = ParallelLayout(),
                           device: str = "cpu") -> Iterator[None]:
    """Use the caller's megatron parallel state (it must have ``layout``), or set one up for
    this process (plain python: a world of one; torchrun: its world) and tear it down."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        current = ParallelLayout(ps.get_tensor_model_parallel_world_size(),
                                 ps.get_pipeline_model_parallel_world_size(),
                                 ps.get_expert_model_parallel_world_size())
        if current != layout:
            raise ConversionError(f"megatron is already initialised with {current}, not {layout}")
        yield
        return
    from megatron_pathmoe.runtime import distributed

    with distributed(PathMoEConfig(**dataclasses.asdict(layout)), device):
        yield


def _prepare_output_dir(output_dir: str, overwrite: bool) -> None:
    if os.path.isfile(output_dir):
        raise ConversionError(f"--output {output_dir!r} is a file; pass a directory")
    if os.path.isdir(output_dir) and os.listdir(output_dir):
        if not overwrite:
            raise ConversionError(f"--output {output_dir!r} exists and is not empty; choose a "
                                  "new directory or pass --overwrite")
        stale = glob.glob(os.path.join(output_dir, "model*.safetensors*"))
        for path in stale:  # shards of a previous export must not mix with this one
            os.remove(path)
    os.makedirs(output_dir, exist_ok=True)


def _cast(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    if dtype is None:
        return tensors
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}


def export_to_hf(checkpoint: str, output_dir: str, *, max_shard_size: str = "5GB",
                 dtype: str = "auto", overwrite: bool = False,
                 layout: ParallelLayout = ParallelLayout(),
                 permute_impl: str = "auto") -> str | None:
    """Write the Hugging Face directory of a megatron checkpoint (a ``--save`` root or an
    ``iter_XXXXXXX`` folder). Returns the directory on rank 0, None on other ranks."""
    from megatron_pathmoe.checkpoint import read_run_config, resolve_checkpoint_dir

    ckpt = resolve_checkpoint_dir(checkpoint)
    saved = read_run_config(ckpt)
    shard_bytes = hf_files.parse_size(max_shard_size)
    if dtype != "auto" and dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r}: choose auto or one of {', '.join(DTYPES)}")
    if is_rank0():
        _prepare_output_dir(output_dir, overwrite)
    with megatron_process_group(layout):
        from megatron_pathmoe.checkpoint import load_model_for_inference

        model, run = load_model_for_inference(ckpt, permute_impl=permute_impl)
        state = canonical_state(model, run.model)  # gathered on rank 0
        writer = is_rank0()
        del model
    if not writer:
        return None
    write_hf_directory(state, saved.model, output_dir, tokenizer=saved.tokenizer,
                       iteration=saved.iteration, max_shard_bytes=shard_bytes,
                       dtype=DTYPES.get(dtype))
    return output_dir


def write_hf_directory(state: dict[str, torch.Tensor], cfg: PathMoEConfig, output_dir: str, *,
                       tokenizer: TokenizerSpec | str, iteration: int | None = None,
                       max_shard_bytes: int = 5 * 10**9, dtype: torch.dtype | None = None) -> None:
    """Write the Hugging Face directory of a canonical megatron state dict (the directory must
    exist). ``tokenizer``: the checkpoint's (see ``convert/tokenizer.py``), or a tokenizer.json."""
    if not isinstance(tokenizer, TokenizerSpec):
        tokenizer = TokenizerSpec(HF_TYPE, tokenizer)
    tensors = _cast(megatron_to_hf(state, cfg), dtype)
    exported = write_hf_tokenizer(tokenizer, output_dir, cfg.seq_length)
    rows = tensors["model.embed_tokens.weight"].shape[0]
    hf_files.write_json(os.path.join(output_dir, hf_files.CONFIG_FILE), qwen2_moe.hf_config(
        cfg, vocab_rows=rows, eod_id=exported.eod,
        dtype=tensors["model.embed_tokens.weight"].dtype, iteration=iteration,
        bos_id=exported.bos, tokenizer=exported.record))
    hf_files.write_json(os.path.join(output_dir, hf_files.GENERATION_CONFIG_FILE),
                        hf_files.generation_config(exported.eod, exported.bos))
    hf_files.write_weights(tensors, output_dir, max_shard_bytes)


def _fit_vocabulary(state: dict[str, torch.Tensor], cfg: PathMoEConfig, source: str) -> None:
    """Megatron pads the vocabulary to a multiple of --make-vocab-size-divisible-by rows; pad
    with zero rows if the Hugging Face model has fewer (ids past the tokenizer's vocabulary
    never occur)."""
    padded = cfg.replace(tensor_model_parallel_size=1).padded_vocab_size
    for key in _EMBEDDING_KEYS:
        if key not in state:
            continue
        rows = state[key].shape[0]
        if rows > padded:
            raise ConversionError(f"{source}: {rows} vocabulary rows exceed megatron's padded "
                                  f"vocabulary ({padded}) for vocab_size {cfg.vocab_size}")
        if rows < padded:
            pad = state[key].new_zeros(padded - rows, state[key].shape[1])
            state[key] = torch.cat([state[key], pad])


def _load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    full = model.state_dict()
    expected = {k for k in full if not k.endswith(EXTRA_STATE_SUFFIX)}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ConversionError(f"{source} does not fit the megatron model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    full.update(state)
    try:
        model.load_state_dict(full, strict=True)
    except RuntimeError as err:
        raise ConversionError(f"{source} does not fit the megatron model: {err}") from None


def import_from_hf(hf_dir: str, save_root: str, *, iteration: int | None = None,
                   routing: str | None = None, path_block_size: int | None = None) -> str:
    """Write a megatron model-only checkpoint (``<save_root>/iter_XXXXXXX``) of a Hugging Face
    Qwen2-MoE directory; returns the iteration directory."""
    hf_cfg = hf_files.read_config(hf_dir)
    source = os.path.join(hf_dir, hf_files.CONFIG_FILE)
    cfg = qwen2_moe.pathmoe_config(hf_cfg, source, routing=routing,
                                   path_block_size=path_block_size)
    meta = hf_cfg.get(qwen2_moe.METADATA_KEY) or {}
    tokenizer = hf_tokenizer_spec(hf_dir, meta.get("tokenizer"))
    state = hf_to_megatron(hf_files.read_weights(hf_dir), cfg, source=hf_dir)
    if cfg.routing == "path":
        state = tie_block_routers(state, cfg, source=hf_dir)
    _fit_vocabulary(state, cfg, source)
    iteration = iteration if iteration is not None else int(meta.get("iteration") or 0)
    with megatron_process_group():
        from megatron_pathmoe.model import build_gpt_model
        from megatron_pathmoe.checkpoint import CheckpointMeta, save_checkpoint

        model = build_gpt_model(cfg)
        _load_into(model, state, hf_dir)
        # Model only (no optimizer), with the tokenizer of any type.
        return save_checkpoint(save_root, iteration, [model], None, None,
                               CheckpointMeta(model=cfg, tokenizer=tokenizer))
