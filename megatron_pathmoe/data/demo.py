"""CLI: turn the shipped Shakespeare corpus into Megatron indexed datasets.

    python -m megatron_pathmoe.data.demo --out-dir /tmp/shakespeare_idx
"""

from __future__ import annotations

import argparse
import json
import sys

from megatron_pathmoe.data.corpus import prepare_demo_data
from megatron_pathmoe.data.errors import DataError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_pathmoe.data.demo",
        description="Preprocess data/shakespeare/{train,valid}.jsonl.gz into "
        "OUT_DIR/shakespeare_{train,valid}_text_document.bin/.idx (skipped when up to date) "
        "and print the prefixes and tokenizer path as JSON.",
    )
    parser.add_argument("--out-dir", required=True, help="folder for the .bin/.idx files")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    args = parser.parse_args(argv)
    try:
        result = prepare_demo_data(args.out_dir, workers=args.workers)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
