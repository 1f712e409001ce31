#!/usr/bin/env python3
"""Validate a Megatron indexed dataset (.bin/.idx) and print its statistics and first documents.

Checks the magic, version and dtype code, the .idx size against its counts, sequence lengths,
pointer monotonicity and coverage of the .bin, and the document indices; with a tokenizer, that
every token id is inside its vocabulary. Exit status 0 when valid, 2 with a one-line reason when not.

example:
  python tools/inspect_data.py runs/data/shakespeare_train_text_document \\
      --tokenizer-model data/shakespeare/tokenizer.json --documents 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_pathmoe.data.encoders import add_tokenizer_arguments, spec_from_arguments  # noqa: E402
from megatron_pathmoe.data.errors import DataError  # noqa: E402
from megatron_pathmoe.data.inspection import format_report, inspect_dataset  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    head, example = __doc__.split("\n\nexample:\n", 1)
    parser = argparse.ArgumentParser(description=head, epilog="example:\n" + example,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prefix", nargs="+", help="dataset prefixes (a trailing .bin/.idx is ignored)")
    add_tokenizer_arguments(parser.add_argument_group("tokenizer (to detokenize and check ids)"))
    parser.add_argument("--documents", type=int, default=1, help="documents to print (default: 1)")
    parser.add_argument("--max-chars", type=int, default=1000, help="characters shown per document")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
