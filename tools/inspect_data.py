#!/usr/bin/env python3
"""Validate a Megatron indexed dataset (.bin/.idx) and print its statistics and first documents.

Thin wrapper; the command line lives in ``megatron_pathmoe.data.cli`` (see ``--help``).
"""

import os
import sys

# Runnable from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_pathmoe.data.cli import inspect_main as main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
