"""Hugging Face model directory files: safetensors shards + index, config, tokenizer, generation
config. Reading them back fails with a :class:`ConversionError` naming the file."""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any

import torch
from tqdm import tqdm

from megatron_pathmoe.convert.errors import ConversionError

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
SINGLE_WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """``"5GB"``, ``"500MiB"`` or a byte count -> bytes."""
    found = _SIZE.match(str(text))
    if not found or (found.group(2) or "").upper() not in _UNITS:
        raise ConversionError(f"--max-shard-size {text!r} is not a size; write e.g. 5GB, "
                              "500MiB or a number of bytes")
    size = int(float(found.group(1)) * _UNITS[(found.group(2) or "").upper()])
    if size <= 0:
        raise ConversionError(f"--max-shard-size {text!r} must be positive")
    return size


def write_json(path: str, content: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(content, f, indent=2, sort_keys=False)
        f.write("\n")


def _plan_shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    used = 0
    for key, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and used + size > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += size
    return shards


def write_weights(tensors: dict[str, torch.Tensor], out_dir: str, max_shard_bytes: int
                  ) -> list[str]:
    """Safetensors files as ``save_pretrained`` writes them: one ``model.safetensors``, or
    ``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json`` when the tensors
    exceed one shard. Returns the file names."""
    from safetensors.torch import save_file

    plan = _plan_shards(tensors, max_shard_bytes)
    names = ([SINGLE_WEIGHTS_FILE] if len(plan) == 1 else
             [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))])
    for name, keys in tqdm(list(zip(names, plan)), desc="writing safetensors", unit="shard",
                           disable=len(plan) == 1):
        save_file({k: tensors[k].contiguous() for k in keys}, os.path.join(out_dir, name),
                  metadata={"format": "pt"})
    if len(plan) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        write_json(os.path.join(out_dir, INDEX_FILE), {
            "metadata": {"total_size": total},
            "weight_map": {k: name for name, keys in zip(names, plan) for k in keys}})
    return names


def read_config(hf_dir: str) -> dict[str, Any]:
    if not os.path.isdir(hf_dir):
        raise ConversionError(f"{hf_dir!r} is not a directory; pass a Hugging Face model "
                              f"directory (with {CONFIG_FILE} and safetensors weights)")
    path = os.path.join(hf_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise ConversionError(f"{hf_dir!r} is not a Hugging Face model directory: no "
                              f"{CONFIG_FILE}; pass the directory `pathmoe-convert to-hf` wrote")
    try:
        return json.load(open(path, encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConversionError(f"{path}: not valid JSON ({err})") from None


def _weight_files(hf_dir: str) -> list[str]:
    index = os.path.join(hf_dir, INDEX_FILE)
    if os.path.isfile(index):
        weight_map = json.load(open(index, encoding="utf-8")).get("weight_map", {})
        return sorted(set(weight_map.values()))
    if os.path.isfile(os.path.join(hf_dir, SINGLE_WEIGHTS_FILE)):
        return [SINGLE_WEIGHTS_FILE]
    raise ConversionError(f"{hf_dir!r} has no {SINGLE_WEIGHTS_FILE} or {INDEX_FILE}; only "
                          "safetensors weights are read (re-save with "
                          "save_pretrained(..., safe_serialization=True))")


def read_weights(hf_dir: str) -> dict[str, torch.Tensor]:
    """Every tensor of the model directory's safetensors files."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    files = _weight_files(hf_dir)
    for name in tqdm(files, desc="reading safetensors", unit="file", disable=len(files) == 1):
        path = os.path.join(hf_dir, name)
        if not os.path.isfile(path):
            raise ConversionError(f"{os.path.join(hf_dir, INDEX_FILE)} names {name}, which is "
                                  "missing; the download or copy is incomplete")
        tensors.update(load_file(path))
    return tensors


def write_tokenizer(tokenizer_json: str, out_dir: str, eod_token: str,
                    model_max_length: int) -> None:
    """``tokenizer.json`` + ``tokenizer_config.json`` so ``AutoTokenizer`` builds a fast
    tokenizer whose bos/eos/pad token is the end-of-document token."""
    shutil.copyfile(tokenizer_json, os.path.join(out_dir, TOKENIZER_FILE))
    write_tokenizer_config(out_dir, {"tokenizer_class": "PreTrainedTokenizerFast",
                                     "bos_token": eod_token, "eos_token": eod_token,
                                     "pad_token": eod_token}, model_max_length)


def write_tokenizer_config(out_dir: str, config: dict[str, Any], model_max_length: int) -> None:
    """``tokenizer_config.json`` (class and special tokens) + ``special_tokens_map.json``."""
    special = {k: v for k, v in config.items() if k in SPECIAL_TOKEN_KEYS}
    write_json(os.path.join(out_dir, "tokenizer_config.json"), {
        **config, "model_max_length": model_max_length, "clean_up_tokenization_spaces": False})
    write_json(os.path.join(out_dir, "special_tokens_map.json"), special)


def generation_config(eod_id: int, bos_id: int | None = None) -> dict[str, Any]:
    return {"bos_token_id": eod_id if bos_id is None else bos_id, "eos_token_id": eod_id,
            "pad_token_id": eod_id,
            "do_sample": False}
