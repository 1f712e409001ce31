"""``python -m megatron_pathmoe.training.pretrain``: the ``pathmoe-pretrain`` console script
(its code lives in ``megatron_pathmoe.training.cli``)."""

import sys

from megatron_pathmoe.training.cli import main

if __name__ == "__main__":
    sys.exit(main())
