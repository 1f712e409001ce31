"""X-MoE (Chi et al., 2022): routing on a low-dimensional hypersphere.

``logits = cos(P x, e_i) / tau``: tokens are projected by ``P`` [d, hidden] (d = ``--xmoe-dim``,
16 by default), tokens and expert embeddings ``e`` [experts, d] are L2-normalised, and the
cosine similarities are divided by a learnable temperature. The temperature is bounded by
construction, ``tau = tau_min + (tau_max - tau_min) * sigmoid(theta)``, so it always stays in
[``--xmoe-temperature-min``, ``--xmoe-temperature-max``] and its gradient never dies at a
clamp; ``theta`` starts where ``tau = --xmoe-temperature-init``.

Block sharing composes with it (PathB{B}X-MoE, paper Appendix C.3): ``--routing xmoe
--path-block-size B`` shares ``P``, ``e`` and ``theta`` by blocks of B layers exactly as PathMoE
shares its weight (ties ``xmoe.block{b}.projection`` ...); B defaults to 1, plain X-MoE.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from megatron_pathmoe.routing.block_shared import BlockSharedRouter

_NORM_EPS = 1e-6


class XMoERouter(BlockSharedRouter):
    variant = "xmoe"
    tied_parameter_names = ("projection", "expert_embeddings", "temperature_logit")

    def __init__(self, config: Any, pg_collection: Any = None, *, build: Any) -> None:
        super().__init__(config, pg_collection, build=build)
        self.drop_gate_weight()
        cfg = self.pathmoe_config
        projection = torch.empty(cfg.xmoe_dim, self.config.hidden_size)
        self.config.init_method(projection)
        self.projection = self.new_parameter(projection)
        embeddings = torch.empty(self.config.num_moe_experts, cfg.xmoe_dim)
        torch.nn.init.orthogonal_(embeddings)
        self.expert_embeddings = self.new_parameter(embeddings)
        self.temperature_bounds = (cfg.xmoe_temperature_min, cfg.xmoe_temperature_max)
        low, high = self.temperature_bounds
        fraction = (cfg.xmoe_temperature_init - low) / (high - low)
        self.temperature_logit = self.new_parameter(
            torch.tensor([math.log(fraction / (1 - fraction))]))

    def temperature(self) -> torch.Tensor:
        low, high = self.temperature_bounds
        return low + (high - low) * torch.sigmoid(self.to_router_dtype(self.temperature_logit))

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        tokens = F.normalize(F.linear(self.to_router_dtype(input),
                                      self.to_router_dtype(self.projection)),
                             dim=-1, eps=_NORM_EPS)
        experts = F.normalize(self.to_router_dtype(self.expert_embeddings), dim=-1, eps=_NORM_EPS)
        return F.linear(tokens, experts) / self.temperature()

    def export_gate_weight(self) -> torch.Tensor:
        raise self.export_error("logits are cosine similarities of L2-normalised projections "
                                "divided by a learned temperature, not linear in x")
