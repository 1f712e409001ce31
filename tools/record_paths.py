#!/usr/bin/env python
"""Record the most frequent top-1 expert paths of a checkpoint (for --moe-path-restriction).

    python tools/record_paths.py --load runs/pathb8 --data-path PREFIX --output runs/paths/top

Thin wrapper of ``python -m megatron_pathmoe.analysis.record_paths`` (see ``--help``).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":
    from megatron_pathmoe.analysis.record_paths import main

    main()
