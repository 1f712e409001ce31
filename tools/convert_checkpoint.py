#!/usr/bin/env python
"""Convert PathMoE megatron checkpoints to Hugging Face and back (``pathmoe-convert``).

    python tools/convert_checkpoint.py to-hf --load runs/ckpt --output runs/hf
    python tools/convert_checkpoint.py to-megatron --hf runs/hf --save runs/ckpt_from_hf

Run with --help for every option; the logic lives in ``megatron_pathmoe.convert``.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_pathmoe.convert.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
