#!/usr/bin/env python
"""Pretrain a small GPT with DeepSpeed-MoE layers and PathMoE block-shared gates (PathB{B}).

    torchrun --nproc_per_node 2 examples/deepspeed/pretrain_pathmoe_deepspeed.py \
        --expert-model-parallel-size 2 --path-block-size 4 --train-iters 40

Without --data-path it trains on the shipped Shakespeare corpus. All flags: --help. The trainer
is megatron_pathmoe.integrations.deepspeed.train; DeepSpeed settings: examples/deepspeed/ds_config.json.
"""

from megatron_pathmoe.integrations.deepspeed.train import main

if __name__ == "__main__":
    main()
