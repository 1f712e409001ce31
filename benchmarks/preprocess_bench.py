"""tools/preprocess_data.py vs a Megatron-LM-style preprocessing loop: tokens/s, same run.

Baseline: what Megatron-LM's tools/preprocess_data.py does, with the same tokenizer: a
``multiprocessing.Pool`` ``imap`` over the text lines of the input with chunk size 32, one
``json.loads`` and one ``Tokenizer.encode(text).ids`` per document in the workers, Python lists
of ids sent back, megatron-core's ``IndexedDatasetBuilder.add_document`` per document. (Megatron's
HuggingFaceTokenizer goes through ``transformers``, which is slower still; the raw
``tokenizers`` call is the most favourable baseline.)

Candidate: ``run_preprocess`` (blocks of ~256 KiB per task, batched ``encode_batch_fast`` in the
workers, numpy arrays back, a streaming index writer).

Both use the same corpus, tokenizer and number of workers; rounds are interleaved so machine
noise hits both alike; both outputs are checked to be byte-identical. Besides wall-clock
tokens/s, the table gives tokens per CPU-second (main process and workers together), which a
machine shared with other jobs distorts much less.

    python benchmarks/preprocess_bench.py --workers 2 --corpus-mb 8 --rounds 3
"""

from __future__ import annotations

import argparse
import gzip
import json
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_pathmoe.data.encoders import HF_TYPE, TokenizerSpec  # noqa: E402
from megatron_pathmoe.data.preprocess import PreprocessConfig, output_prefix_for, run_preprocess  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--corpus-mb", type=float, default=8.0,
                   help="size of the jsonl corpus (the shipped Shakespeare train split, repeated)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per variant (interleaved)")
    p.add_argument("--tokenizer-model", default=str(REPO / "data" / "shakespeare" / "tokenizer.json"))
    p.add_argument("--source", default=str(REPO / "data" / "shakespeare" / "train.jsonl.gz"))
    return p.parse_args()


def make_corpus(source: str, megabytes: float, out: Path) -> tuple[int, int]:
    with gzip.open(source, "rt", encoding="utf-8") as f:
        lines = [json.dumps({"text": json.loads(line)["text"]}) + "\n" for line in f]
    target, size, docs = int(megabytes * 2**20), 0, 0
    with open(out, "w", encoding="utf-8") as f:
        while size < target:
            for line in lines:
                f.write(line)
                size += len(line.encode("utf-8"))
                docs += 1
                if size >= target:
                    break
    return docs, size


# --- Megatron-LM-style baseline ------------------------------------------------------------------

class MegatronStyleEncoder:
    """Megatron-LM's ``Encoder``: one document per call, ids returned as Python lists."""

    def __init__(self, tokenizer_path: str, keys: list[str], append_eod: bool) -> None:
        self.tokenizer_path, self.keys, self.append_eod = tokenizer_path, keys, append_eod

    def initializer(self) -> None:
        from tokenizers import Tokenizer

        MegatronStyleEncoder.tokenizer = Tokenizer.from_file(self.tokenizer_path)
        MegatronStyleEncoder.eod = MegatronStyleEncoder.tokenizer.token_to_id("<|endoftext|>")

    def encode(self, json_line: str):
        data = json.loads(json_line)
        ids, lens = {}, {}
        for key in self.keys:
            doc_ids, sentence_lens = [], []
            for sentence in [data[key]]:
                sentence_ids = MegatronStyleEncoder.tokenizer.encode(sentence).ids
                if len(sentence_ids) > 0:
                    doc_ids.extend(sentence_ids)
                    sentence_lens.append(len(sentence_ids))
            if len(doc_ids) > 0 and self.append_eod:
                doc_ids.append(MegatronStyleEncoder.eod)
                sentence_lens[-1] += 1
            ids[key], lens[key] = doc_ids, sentence_lens
        return ids, lens, len(json_line)


def run_baseline(corpus: str, prefix: str, tokenizer_path: str, workers: int) -> int:
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(tokenizer_path).get_vocab_size(with_added_tokens=True)
    encoder = MegatronStyleEncoder(tokenizer_path, ["text"], append_eod=True)
    out = output_prefix_for(prefix, "text")
    builder = IndexedDatasetBuilder(out + ".bin", dtype=DType.optimal_dtype(vocab))
    tokens = 0
    with open(corpus, "r", encoding="utf-8") as fin, multiprocessing.get_context("fork").Pool(
            workers, initializer=encoder.initializer) as pool:
        for doc, sentence_lens, _ in pool.imap(encoder.encode, fin, 32):
            for key in doc:
                builder.add_document(doc[key], sentence_lens[key])
                tokens += len(doc[key])
    builder.finalize(out + ".idx")
    return tokens


def run_candidate(corpus: str, prefix: str, tokenizer_path: str, workers: int) -> int:
    cfg = PreprocessConfig([corpus], prefix, TokenizerSpec(HF_TYPE, tokenizer_path), workers=workers, quiet=True)
    return run_preprocess(cfg)["tokens"]


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (pool workers are joined)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    args = parse_args()
    import megatron.core.datasets.indexed_dataset  # noqa: F401  (import cost outside the timings)

    with tempfile.TemporaryDirectory() as tmp:
        corpus = str(Path(tmp) / "corpus.jsonl")
        docs, size = make_corpus(args.source, args.corpus_mb, Path(corpus))
        variants = {"megatron-lm style (baseline)": run_baseline, "tools/preprocess_data.py": run_candidate}
        times: dict[str, list[float]] = {name: [] for name in variants}
        cpu: dict[str, list[float]] = {name: [] for name in variants}
        tokens: dict[str, int] = {}
        for r in range(args.rounds):
            for name, fn in variants.items():
                prefix = str(Path(tmp) / f"{'base' if fn is run_baseline else 'cand'}{r}")
                start, start_cpu = time.perf_counter(), _cpu_seconds()
                tokens[name] = fn(corpus, prefix, args.tokenizer_model, args.workers)
                times[name].append(time.perf_counter() - start)
                cpu[name].append(_cpu_seconds() - start_cpu)
        identical = all(
            Path(output_prefix_for(str(Path(tmp) / f"base{r}"), "text") + ext).read_bytes()
            == Path(output_prefix_for(str(Path(tmp) / f"cand{r}"), "text") + ext).read_bytes()
            for r in range(args.rounds) for ext in (".bin", ".idx")
        )
    base_name = next(iter(variants))
    print(f"machine: {platform.node()} ({os.cpu_count()} CPUs, {platform.processor() or platform.machine()}), "
          f"python {platform.python_version()}; corpus {size / 2**20:.1f} MiB jsonl, {docs:,} documents, "
          f"{tokens[base_name]:,} tokens; workers={args.workers}; {args.rounds} interleaved rounds (median)")
    print("| variant | wall s | tokens/s | ratio | CPU s | tokens/CPU-s | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    base, base_cpu = statistics.median(times[base_name]), statistics.median(cpu[base_name])
    for name in variants:
        t, c = statistics.median(times[name]), statistics.median(cpu[name])
        print(f"| {name} | {t:.2f} | {tokens[name] / t:,.0f} | {base / t:.2f} | {c:.2f} | {tokens[name] / c:,.0f} "
              f"| {base_cpu / c:.2f} |")
    print(f"outputs byte-identical: {identical}")


if __name__ == "__main__":
    main()
