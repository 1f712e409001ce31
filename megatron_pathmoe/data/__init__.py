"""Data pipeline: tokenizers, corpus -> indexed dataset, megatron-core GPT datasets, demo corpus.

The modules that need torch or megatron-core (``datasets``, ``tokenizer``) are imported on first
use of their names, so the preprocessing and inspection tools start in a fraction of a second.
``cli`` holds ``tools/preprocess_data.py`` and ``tools/inspect_data.py``. A leaf of the model
core: it imports nothing else of the package.
"""

from __future__ import annotations

import importlib
from typing import Any

from megatron_pathmoe.data.corpus import default_demo_paths, prepare_demo_data
from megatron_pathmoe.data.encoders import EOD_TOKEN, TOKENIZER_TYPES, TokenizerSpec
from megatron_pathmoe.data.errors import DataError
from megatron_pathmoe.data.indexed import (
    IndexInfo,
    IndexWriter,
    check_indexed_dataset,
    token_dtype,
)
from megatron_pathmoe.data.inspection import inspect_dataset
from megatron_pathmoe.data.preprocess import (
    PreprocessConfig,
    merge_datasets,
    preprocess,
    run_preprocess,
)

_LAZY = {
    "build_gpt_datasets": "datasets",
    "make_data_iterator": "datasets",
    "parse_blend": "datasets",
    "token_stream": "datasets",
    "unigram_cross_entropy": "datasets",
    "validate_data_prefix": "datasets",
    "PathMoETokenizer": "tokenizer",
    "load_tokenizer": "tokenizer",
}

__all__ = [
    "DataError", "EOD_TOKEN", "IndexInfo", "IndexWriter", "PreprocessConfig", "TOKENIZER_TYPES",
    "TokenizerSpec", "check_indexed_dataset", "default_demo_paths", "inspect_dataset",
    "merge_datasets", "prepare_demo_data", "preprocess", "run_preprocess", "token_dtype",
    *sorted(_LAZY),
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
