"""PathMoE's block-shared routing (PathB{B}) for DeepSpeed-MoE models.

    from megatron_pathmoe.integrations.deepspeed import share_block_gates
    model = MyModel(...)                       # with deepspeed.moe.layer.MoE layers
    share_block_gates(model, block_size=4)     # before deepspeed.initialize

deepspeed is imported on first use of a name (the ``deepspeed`` extra), never by the rest of
``megatron_pathmoe``. ``train`` is the engine-based trainer behind
examples/deepspeed/pretrain_pathmoe_deepspeed.py.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "TiedGateWeight": "gating",
    "moe_layers": "gating",
    "share_block_gates": "gating",
    "shared_gate_weights": "gating",
    "DSModelConfig": "model",
    "DeepSpeedMoEGPT": "model",
    "require_deepspeed": "_require",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
