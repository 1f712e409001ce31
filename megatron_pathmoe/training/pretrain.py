"""``pathmoe-pretrain``: the pretraining entry point (launch with torchrun)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from megatron_pathmoe.platform import resolve_device
    from megatron_pathmoe.training.arguments import parse_args

    model_cfg, train_cfg = parse_args(argv)  # exits with a one-line error on bad input
    device = resolve_device(train_cfg.device)
    from megatron_pathmoe.training.loop import destroy_distributed, pretrain

    try:
        pretrain(model_cfg, train_cfg, device)
    finally:
        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
