#!/usr/bin/env python
"""Plot the metrics.jsonl of one or several runs (loss, validation perplexity, tokens/s,
per-layer expert load and routing entropy) into PNGs.

Thin wrapper; the logic lives in ``megatron_pathmoe.monitoring.plots`` (see ``--help``).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":
    from megatron_pathmoe.monitoring.plots import main

    sys.exit(main())
