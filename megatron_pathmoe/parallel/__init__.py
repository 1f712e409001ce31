"""Parallel layouts beyond what megatron-core does on its own: router parameters tied across
pipeline stages, expert gradients under TP without EP, layout checks and descriptions. In the
model core (above ``routing/``, below ``model/``); never imports the layers built on it."""

from megatron_pathmoe.parallel.experts import reduce_expert_grads_over_expert_dp
from megatron_pathmoe.parallel.ties import (
    RouterTies,
    is_canonical_copy,
    is_tie_writer,
    local_layer_numbers,
)

__all__ = [
    "RouterTies",
    "is_canonical_copy",
    "is_tie_writer",
    "local_layer_numbers",
    "reduce_expert_grads_over_expert_dp",
]
