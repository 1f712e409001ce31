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


@pytest.fixture(scope="session")
def gpt2_files(tmp_path_factory, small_docs_text) -> tuple[str, str]:
    """A small GPT-2-format vocab.json + merges.txt (byte-level BPE, 600 ids, <|endoftext|>)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(small_docs_text, trainer=trainer)
    folder = tmp_path_factory.mktemp("gpt2")
    vocab, merges = tok.model.save(str(folder))
    return vocab, merges


@pytest.fixture(scope="session")
def spm_model(tmp_path_factory, small_docs_text) -> str:
    """A small SentencePiece BPE model (unk 0, bos 1, eos 2)."""
    import sentencepiece as spm

    path = tmp_path_factory.mktemp("spm") / "tiny.model"
    lines = [line for text in small_docs_text for line in text.splitlines() if line.strip()]
    with open(path, "wb") as out:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=out, vocab_size=300,
                                       model_type="bpe", minloglevel=2)
    return str(path)


@pytest.fixture(scope="session")
def small_docs_text(small_docs) -> list[str]:
    return [d["text"] for d in small_docs if d["text"]]
