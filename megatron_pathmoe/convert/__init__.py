"""Megatron checkpoints <-> Hugging Face transformers (Qwen2-MoE), exactly.

- ``mapping.py``: the declarative key table (wildcards, fused QKV and gate/up, TP split dims).
- ``converter.py``: pure state-dict functions; ``shards.py``: model (any TP/EP/PP rank) ->
  canonical state dict; ``qwen2_moe.py``: the Hugging Face config and why Qwen2-MoE;
  ``hf_files.py``: the model directory; ``checkpoint.py``: the end-to-end conversions;
  ``cli.py``: ``pathmoe-convert``.

Beside ``training/`` (never importing it): checkpoints are read and written through
``checkpoint/``, the process group comes from ``runtime/``.
"""

from megatron_pathmoe.convert.checkpoint import ParallelLayout, export_to_hf, import_from_hf
from megatron_pathmoe.convert.converter import hf_to_megatron, megatron_to_hf, tie_block_routers
from megatron_pathmoe.convert.errors import ConversionError
from megatron_pathmoe.convert.mapping import QWEN2_MOE_TABLE, KeyMapping
from megatron_pathmoe.convert.shards import canonical_state

__all__ = [
    "ConversionError",
    "KeyMapping",
    "ParallelLayout",
    "QWEN2_MOE_TABLE",
    "canonical_state",
    "export_to_hf",
    "hf_to_megatron",
    "import_from_hf",
    "megatron_to_hf",
    "tie_block_routers",
]
