#!/usr/bin/env python3
"""Build the shipped Shakespeare demo corpus and its tokenizer (byte for byte).

Thin wrapper; the command line lives in ``megatron_pathmoe.data.cli`` (see ``--help``).
"""

import os
import sys

# Runnable from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_pathmoe.data.cli import make_demo_corpus_main as main  # noqa: E402
from megatron_pathmoe.data.demo_corpus import HELD_OUT_PLAYS  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(main())
