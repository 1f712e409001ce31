"""Data pipeline: tokenizer, jsonl -> indexed dataset, megatron-core GPT datasets, demo corpus."""

from megatron_pathmoe.data.corpus import default_demo_paths, prepare_demo_data
from megatron_pathmoe.data.datasets import (
    build_gpt_datasets,
    make_data_iterator,
    parse_blend,
    token_stream,
    unigram_cross_entropy,
    validate_data_prefix,
)
from megatron_pathmoe.data.errors import DataError
from megatron_pathmoe.data.preprocess import preprocess, token_dtype
from megatron_pathmoe.data.tokenizer import EOD_TOKEN, PathMoETokenizer, load_tokenizer

__all__ = [
    "DataError",
    "EOD_TOKEN",
    "PathMoETokenizer",
    "build_gpt_datasets",
    "default_demo_paths",
    "load_tokenizer",
    "make_data_iterator",
    "parse_blend",
    "prepare_demo_data",
    "preprocess",
    "token_dtype",
    "token_stream",
    "unigram_cross_entropy",
    "validate_data_prefix",
]
