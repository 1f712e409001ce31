#!/usr/bin/env python
"""Expert-path analysis of PathMoE checkpoints: path statistics, robustness, plots.

Thin wrapper; the logic lives in ``megatron_pathmoe.analysis`` (see ``--help``). Run it with
python (one process) or ``torchrun --nproc_per_node N`` for a TP/PP/EP layout.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":
    from megatron_pathmoe.analysis.cli import main

    sys.exit(main())
