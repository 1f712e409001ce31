"""RMSNorm that megatron's layer specs can build and that works with sequence parallelism.

megatron-core's local torch norm refuses ``sequence_parallel``; this one tags its weight with
``sequence_parallel`` so ``finalize_model_grads`` all-reduces its gradient over TP, which is all
sequence parallelism needs from a norm.
"""

from __future__ import annotations

from typing import Any

import torch


class RMSNorm(torch.nn.RMSNorm):
    def __init__(self, config: Any, hidden_size: int, eps: float = 1e-5, **unused: Any) -> None:
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)
