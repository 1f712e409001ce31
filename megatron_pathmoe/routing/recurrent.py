"""Recurrent-MoE (Qiu et al., 2024, "Layerwise Recurrent Router for Mixture-of-Experts").

Layer l projects its input to the GRU's size r, advances one GRU cell shared by all layers with
the state left by layer l-1 (zeros at layer 1), and reads its logits off the new state:

    u_l = W1_l x          W1_l [r, hidden], per layer
    h_l = GRU(u_l, h_{l-1})    one GRU cell, shared (ties ``recurrent.gru.weight_ih`` ...)
    logits_l = W2_l h_l   W2_l [experts, r], per layer

The state runs over depth with gradients (backpropagation through the layers' routers). It is
handed from layer to layer in-process, so every layer must sit on one pipeline stage: config
validation refuses ``--pipeline-model-parallel-size > 1`` (the state would have to travel with
the activations between stages). With sequence parallelism each TP rank carries the state of
its own tokens. The GRU follows PyTorch's ``GRUCell`` equations and initialisation; its maths
runs in ``--moe-router-dtype`` (fp32 or fp64) whatever the params dtype.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from megatron_pathmoe.routing.base import PathMoERouter

_STATE_KEY = "recurrent.state"


class SharedGRUCell(torch.nn.Module):
    """A GRU cell (PyTorch ``GRUCell`` equations) computing in its input's dtype."""

    def __init__(self, size: int, new_parameter: Any) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(size)
        for name, shape in (("weight_ih", (3 * size, size)), ("weight_hh", (3 * size, size)),
                            ("bias_ih", (3 * size,)), ("bias_hh", (3 * size,))):
            setattr(self, name, new_parameter(torch.empty(shape).uniform_(-bound, bound)))

    def forward(self, inputs: torch.Tensor, state: torch.Tensor | None) -> torch.Tensor:
        w_ih, w_hh, b_ih, b_hh = (p.to(inputs.dtype) for p in
                                  (self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh))
        if state is None:
            state = inputs.new_zeros(inputs.shape[0], w_hh.shape[1])
        reset_i, update_i, new_i = F.linear(inputs, w_ih, b_ih).chunk(3, dim=-1)
        reset_h, update_h, new_h = F.linear(state, w_hh, b_hh).chunk(3, dim=-1)
        reset = torch.sigmoid(reset_i + reset_h)
        update = torch.sigmoid(update_i + update_h)
        candidate = torch.tanh(new_i + reset * new_h)
        return (1 - update) * candidate + update * state


class RecurrentRouter(PathMoERouter):
    variant = "recurrent"

    def __init__(self, config: Any, pg_collection: Any = None, *, build: Any) -> None:
        super().__init__(config, pg_collection, build=build)
        self.drop_gate_weight()
        size = self.pathmoe_config.recurrent_router_dim
        weight_in = torch.empty(size, self.config.hidden_size)
        weight_out = torch.empty(self.config.num_moe_experts, size)
        self.config.init_method(weight_in)
        self.config.init_method(weight_out)
        self.weight_in = self.new_parameter(weight_in)
        self.weight_out = self.new_parameter(weight_out)
        self.gru = SharedGRUCell(size, self.new_parameter)

    def tie_parameters(self) -> None:
        layers = tuple(range(1, self.pathmoe_config.num_layers + 1))
        if len(layers) > 1:
            self._build.ties.tie(self, "gru", "recurrent.gru", layers)

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        seq, batch = input.shape[:2]
        tokens = seq * batch
        projected = F.linear(self.to_router_dtype(input),
                             self.to_router_dtype(self.weight_in)).reshape(tokens, -1)
        previous = None
        if self.layer_number > 1:
            previous = self._build.carry.get(
                _STATE_KEY, tokens, f"recurrent router of layer {self.layer_number}",
                last_reader=self.layer_number == self.pathmoe_config.num_layers)
        state = self.gru(projected, previous)
        if self.layer_number < self.pathmoe_config.num_layers:
            self._build.carry.put(_STATE_KEY, state)
        return F.linear(state, self.to_router_dtype(self.weight_out)).reshape(seq, batch, -1)

    def export_gate_weight(self) -> torch.Tensor:
        raise self.export_error("logits depend on a GRU state carried from the previous "
                                "layers, not on x alone")
