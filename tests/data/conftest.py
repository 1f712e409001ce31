"""Shared fixtures: the shipped tokenizer, a small jsonl corpus, the preprocessed demo corpus."""

from __future__ import annotations

import gzip
import json

import pytest

from megatron_pathmoe.data import default_demo_paths, load_tokenizer, prepare_demo_data


@pytest.fixture(scope="session")
def demo_paths() -> dict:
    return default_demo_paths()


@pytest.fixture(scope="session")
def tokenizer_path(demo_paths) -> str:
    return demo_paths["tokenizer"]


@pytest.fixture(scope="session")
def tokenizer(tokenizer_path):
    return load_tokenizer(tokenizer_path)


@pytest.fixture(scope="session")
def small_docs(demo_paths) -> list[dict]:
    """40 real scenes plus an empty document (which preprocessing must skip)."""
    with gzip.open(demo_paths["valid_jsonl"], "rt", encoding="utf-8") as f:
        docs = [json.loads(line) for _, line in zip(range(40), f)]
    docs.insert(7, {"text": "", "title": "empty"})
    return docs


@pytest.fixture
def small_jsonl(tmp_path, small_docs) -> str:
    with open(tmp_path / "small.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(d) + "\n" for d in small_docs)
    return str(tmp_path / "small.jsonl")


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> dict:
    """The full shipped corpus, preprocessed once per session (~3 s)."""
    return prepare_demo_data(str(tmp_path_factory.mktemp("demo_idx")), workers=1)
