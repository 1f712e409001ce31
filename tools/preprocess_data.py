#!/usr/bin/env python3
"""Tokenize a jsonl(.gz) corpus into Megatron indexed datasets ({prefix}_{key}_document.bin/.idx).

Flags follow Megatron-LM's tools/preprocess_data.py. Example (the shipped demo corpus):

    python tools/preprocess_data.py --input data/shakespeare/train.jsonl.gz \\
        --output-prefix /tmp/shakespeare_train --tokenizer-model data/shakespeare/tokenizer.json \\
        --append-eod --workers 2
"""

from __future__ import annotations

import argparse
import os
import sys

# Runnable from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--input", required=True, help="jsonl file, one JSON object per line (.gz ok)")
    parser.add_argument("--json-keys", nargs="+", default=["text"],
                        help="JSON fields to tokenize (default: text)")
    parser.add_argument("--output-prefix", required=True, help="writes {prefix}_{key}_document.bin/.idx")
    parser.add_argument(
        "--tokenizer-type", default="HuggingFaceTokenizer", choices=["HuggingFaceTokenizer"],
        help="only Hugging Face tokenizer.json files are supported",
    )
    parser.add_argument("--tokenizer-model", required=True, help="path to a Hugging Face tokenizer.json")
    parser.add_argument("--append-eod", action="store_true", help="append <|endoftext|> to every document")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes (1 = in-process)")
    parser.add_argument("--log-interval", type=int, default=1000, help="documents between progress lines")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from megatron_pathmoe.data.errors import DataError
    from megatron_pathmoe.data.preprocess import preprocess

    try:
        preprocess(
            args.input, args.output_prefix, args.tokenizer_model, json_keys=args.json_keys,
            append_eod=args.append_eod, workers=args.workers, log_interval=args.log_interval,
        )
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
