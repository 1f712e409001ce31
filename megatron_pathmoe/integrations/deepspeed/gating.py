"""PathB{B} routing for ``deepspeed.moe.layer.MoE``: one gate weight per block of B layers.

DeepSpeed's ``TopKGate`` computes ``logits = input @ wg.weight.T`` and hands them to its
top-1 / top-2 / general top-k gating (capacity, token dropping, aux loss): all of that is kept
as is. Only the weight is shared: the first MoE layer of each block keeps its ``wg``
(``torch.nn.Linear``); the other gates of the block get a ``TiedGateWeight`` that points at it
without registering it. So ``parameters()``, the optimizer (ZeRO included) and
``state_dict()`` see one Parameter and one entry per block, and autograd sums the gradients of
all the block's layers into it. B=1 leaves DeepSpeed's gates untouched (its independent
baseline). The shared weight carries ``pathmoe_tie = "path.block{b}.weight"`` like the
Megatron path's block-shared routers (``megatron_pathmoe.routing.block_shared``).
"""

from __future__ import annotations

from typing import Iterable

import torch

from megatron_pathmoe.integrations.deepspeed._require import require_deepspeed


class TiedGateWeight(torch.nn.Module):
    """Stands in for a gate's ``wg`` Linear: ``.weight`` is the block owner's Parameter.

    The owner is kept out of ``_modules`` on purpose, so this module has no parameters and no
    state-dict entries: the block's weight is counted and saved once, in the owner's layer.
    """

    def __init__(self, owner: torch.nn.Linear, tie_key: str, owner_layer: int) -> None:
        super().__init__()
        self.__dict__["_owner"] = owner  # not a submodule (see the class docstring)
        self.tie_key = tie_key
        self.owner_layer = owner_layer

    @property
    def weight(self) -> torch.nn.Parameter:
        return self.__dict__["_owner"].weight

    def extra_repr(self) -> str:
        return f"{self.tie_key} (owned by MoE layer {self.owner_layer})"


def moe_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's ``deepspeed.moe.layer.MoE`` modules in registration (= depth) order."""
    moe_cls = require_deepspeed("deepspeed.moe.layer").MoE
    return [m for m in model.modules() if isinstance(m, moe_cls)]


def _checked_gates(layers: list[torch.nn.Module]) -> list[torch.nn.Module]:
    gate_cls = require_deepspeed("deepspeed.moe.sharded_moe").TopKGate
    gates = []
    for i, layer in enumerate(layers):
        gate = getattr(getattr(layer, "deepspeed_moe", None), "gate", None)
        if type(gate) is not gate_cls:
            raise TypeError(f"MoE layer {i}: gate is {type(gate).__name__}, not DeepSpeed's TopKGate; "
                            "block-shared gating needs deepspeed.moe.layer.MoE's own gate")
        experts = gate.wg.weight.shape[0]
        if not 1 <= gate.k <= experts:
            raise ValueError(f"MoE layer {i}: top-k {gate.k} (--moe-router-topk) must be between 1 "
                             f"and the number of experts {experts} (--num-experts)")
        gates.append(gate)
    return gates


def share_block_gates(layers: torch.nn.Module | Iterable[torch.nn.Module],
                      block_size: int) -> dict[int, torch.nn.Parameter]:
    """Tie the gate weights of each block of ``block_size`` consecutive MoE layers.

    Args:
        layers: a model (its ``MoE`` modules are taken in depth order) or the layers themselves.
        block_size: B; 1 keeps DeepSpeed's independent gates unchanged.

    Returns: block index -> the block's gate Parameter. Call before ``deepspeed.initialize`` and
    before building the optimizer, so both see one Parameter per block.
    """
    layers = moe_layers(layers) if isinstance(layers, torch.nn.Module) else list(layers)
    gates = _checked_gates(layers)
    if block_size < 1 or len(layers) % block_size:
        raise ValueError(f"--path-block-size {block_size} must be a positive divisor of the number "
                         f"of MoE layers ({len(layers)})")
    shared: dict[int, torch.nn.Parameter] = {}
    for start in range(0, len(gates), block_size):
        block = start // block_size
        owner = gates[start].wg
        key = f"path.block{block}.weight"
        for i, gate in enumerate(gates[start + 1:start + block_size], start + 1):
            if gate.wg.weight.shape != owner.weight.shape:
                raise ValueError(f"MoE layers {start} and {i} have gate shapes {tuple(owner.weight.shape)} "
                                 f"and {tuple(gate.wg.weight.shape)}: a block must share one shape")
            gate.wg = TiedGateWeight(owner, key, start)
        if block_size > 1:
            owner.weight.pathmoe_tie = key
        shared[block] = owner.weight
    return shared


def shared_gate_weights(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Tie key -> Parameter of the block-shared gates in ``model`` (empty when B=1)."""
    return {p.pathmoe_tie: p for p in model.parameters() if hasattr(p, "pathmoe_tie")}
