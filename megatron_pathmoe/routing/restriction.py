"""Path restriction (paper section 5.2): record the most frequent expert paths, then train with
every token's routing confined to them.

**Paths.** A token's expert path is its top-1 expert at every MoE layer: the selected expert
with the largest gate probability (``probs.argmax``), which every router variant returns.
``megatron_pathmoe.analysis.record_paths`` counts them over a corpus and stores the K most
frequent as an expert-paths file (``megatron_pathmoe.expert_paths``: ``<stem>.npy``, int32
[K, num_layers], most frequent first, plus ``<stem>.json`` with counts, coverage, model shape,
source). ``--moe-path-restriction <stem>.npy``
restricts training to them (``--moe-path-restriction-top-k`` takes the first K rows).

**Mapping a token onto an allowed path.** A token follows the allowed path that maximises the
sum over layers of its router log-probabilities, decided layer by layer: layer l's decision
must be made before layer l+1's hidden state (hence its probabilities) exists. At layer l the
candidates are the allowed paths that agree with the token's experts at layers 1..l-1 (all K
at layer 1); they share that prefix, so the one maximising sum_{j<=l} log p_j is the one whose
layer-l expert has the highest router score now. The token's top-1 expert at layer l is
therefore the highest-scoring expert among its candidates' layer-l experts, and the candidates
shrink to the paths through it. The set never empties (the chosen expert comes from a
candidate), and the realised top-1 path is always one of the allowed paths. With top-k > 1 the
remaining k-1 experts are the best-scoring others, unrestricted; gate probabilities are the
router's own (the restriction changes which experts are selected, not their scores). Aux-loss
statistics are megatron's (computed from the unrestricted top-k).

The selection plugs into megatron's top-k replay seam (``TopKRouter.router_replay``), so the
score function, pre-softmax, expert bias and aux/z losses are megatron's own code.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from megatron_pathmoe.config import PathMoEConfig
from megatron_pathmoe.expert_paths import read_paths_file


class PathRestriction:
    """The allowed paths of one model build, and per layer the top-k selection that keeps each
    token on them (see the module docstring for the definition)."""

    def __init__(self, paths: np.ndarray, num_experts: int) -> None:
        self.paths = torch.as_tensor(paths, dtype=torch.long)  # [K, L]
        self.num_layers = self.paths.shape[1]
        self.num_experts = num_experts

    @classmethod
    def from_config(cls, config: PathMoEConfig) -> "PathRestriction | None":
        if not config.moe_path_restriction:
            return None
        paths = read_paths_file(config.moe_path_restriction, config.num_layers,
                                config.num_experts).paths
        if config.moe_path_restriction_top_k is not None:
            paths = paths[:config.moe_path_restriction_top_k]
        return cls(paths, config.num_experts)

    def for_layer(self, layer_number: int, carry: Any) -> "LayerPathRestriction":
        return LayerPathRestriction(self, layer_number, carry)


_OPEN_PATHS_KEY = "restriction.open_paths"


class LayerPathRestriction:
    """Megatron's top-k replay hook (``get_replay_topk``) for one layer."""

    def __init__(self, restriction: PathRestriction, layer_number: int, carry: Any) -> None:
        self.restriction = restriction
        self.layer_number = layer_number
        self.carry = carry
        # This layer's expert on each path [K], and as one-hot rows [K, experts].
        self._layer_experts = restriction.paths[:, layer_number - 1]
        self._on_path = torch.nn.functional.one_hot(self._layer_experts, restriction.num_experts)

    def _on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._layer_experts.device != device:
            self._layer_experts = self._layer_experts.to(device)
            self._on_path = self._on_path.to(device)
        return self._layer_experts, self._on_path

    def get_replay_topk(self, scores: torch.Tensor, topk: int, num_groups: int | None = None,
                        group_topk: int | None = None,
                        default_compute_topk: Callable | None = None):
        if group_topk:
            raise ValueError("path restriction does not support group-limited routing")
        tokens = scores.shape[0]
        r = self.restriction
        layer_experts, on_path = self._on(scores.device)
        if self.layer_number == 1:
            open_paths = torch.ones(tokens, len(layer_experts), dtype=torch.bool,
                                    device=scores.device)
        else:
            last = self.layer_number == r.num_layers
            open_paths = self.carry.get(_OPEN_PATHS_KEY, tokens,
                                        f"path restriction of layer {self.layer_number}",
                                        last_reader=last)
        # The best-scoring expert that some still-open path uses at this layer.
        allowed = (open_paths.to(scores.dtype) @ on_path.to(scores.dtype)) > 0
        first = scores.detach().masked_fill(~allowed, float("-inf")).argmax(-1, keepdim=True)
        if self.layer_number < r.num_layers:
            self.carry.put(_OPEN_PATHS_KEY, open_paths & (layer_experts[None, :] == first))
        indices = first
        if topk > 1:
            others = scores.detach().scatter(1, first, float("-inf"))
            indices = torch.cat([first, others.topk(topk - 1, dim=-1).indices], dim=-1)
        return scores.gather(1, indices), indices
