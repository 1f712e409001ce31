#!/usr/bin/env python3
"""Evaluate a megatron-pathmoe checkpoint on the paper's downstream tasks (offline).

    python tools/evaluate.py --load runs/tiny/checkpoints --limit 200
    torchrun --nproc_per_node 2 tools/evaluate.py --load CKPT --tensor-model-parallel-size 2

See ``--help`` for every flag; the logic lives in ``megatron_pathmoe.eval``.
"""

from __future__ import annotations

import os
import sys

# Runnable from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_pathmoe.eval.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
