"""PathMoE's block-shared routing (PathB{B}) for DeepSpeed-MoE models.

    from megatron_pathmoe.integrations.deepspeed import share_block_gates
    model = MyModel(...)                       # with deepspeed.moe.layer.MoE layers
    share_block_gates(model, block_size=4)     # before deepspeed.initialize

deepspeed (the ``deepspeed`` extra) is imported when a function needs it, never at import time
and never by the rest of ``megatron_pathmoe``. ``train`` is the engine-based trainer behind
examples/deepspeed/pretrain_pathmoe_deepspeed.py.
"""

from megatron_pathmoe.integrations.deepspeed._require import require_deepspeed
from megatron_pathmoe.integrations.deepspeed.gating import (TiedGateWeight, moe_layers, share_block_gates,
                                                            shared_gate_weights)
from megatron_pathmoe.integrations.deepspeed.model import DeepSpeedMoEGPT, DSModelConfig

__all__ = ["DSModelConfig", "DeepSpeedMoEGPT", "TiedGateWeight", "moe_layers", "require_deepspeed",
           "share_block_gates", "shared_gate_weights"]
