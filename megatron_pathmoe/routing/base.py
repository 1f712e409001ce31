"""What every PathMoE router shares.

Every variant is a megatron-core ``TopKRouter`` subclass built by one :class:`RouterBuilder`
per model build (model chunk). The builder owns what crosses layers:

* :class:`TieRegistry`: Parameters shared by several layers' routers. The first router (in
  layer order) to claim a tie key owns the Parameter, registered in its own module; the other
  routers hold a plain attribute pointing at it. ``parameters()``/``state_dict()``, megatron
  DDP and the optimizer therefore see one tensor per tie and autograd sums the per-layer
  gradients. Each tied Parameter carries ``pathmoe_tie`` (a stable key such as
  ``"path.block0.weight"``) and ``pathmoe_tie_layers`` (the global 1-based layer numbers that
  use it), which checkpointing and cross-stage pipeline ties rely on.
* :class:`DepthCarry`: tensors one layer's router hands to a later layer's router within the
  same forward pass (a GRU state, a block's routing decision, the paths a token can still
  follow). Only layers of one pipeline stage can share it (config validation enforces this).

Routers keep megatron's forward contract (``probs`` [tokens, experts] dense, ``routing_map``
[tokens, experts] bool), so forward hooks work for every variant, and add:

* ``export_gate_weight()``: the [experts, hidden] fp32 matrix ``W`` with ``logits = x @ W.T``,
  or :class:`RoutingExportError` when the variant's logits are not a linear gate;
* ``last_routing_entropy``: (sum over tokens of the router distribution's entropy in nats,
  token count) of the last training forward, read by the training log;
* path restriction (``--moe-path-restriction``) through megatron's top-k replay seam.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.router import TopKRouter

from megatron_pathmoe.config import PathMoEConfig
from megatron_pathmoe.platform.profiling import RANGE_ROUTING, profile_range
from megatron_pathmoe.routing.hooks import unwrap_model
from megatron_pathmoe.routing.restriction import PathRestriction


class RoutingExportError(ValueError):
    """This router's logits cannot be written as one linear gate ``x @ W.T``."""


class TieRegistry:
    """Tie key -> the router module that owns the shared Parameter or submodule."""

    def __init__(self) -> None:
        self._owners: dict[str, torch.nn.Module] = {}

    def owner(self, key: str) -> torch.nn.Module:
        return self._owners[key]

    def tie(self, router: torch.nn.Module, name: str, key: str, layers: tuple[int, ...]) -> bool:
        """Share ``router.<name>`` (a Parameter or a submodule) under ``key``; returns whether
        ``router`` owns it. Must run before DDP or the optimizer see the parameters."""
        owner = self._owners.setdefault(key, router)
        if owner is router:
            _tag_tie(getattr(router, name), key, layers)
            return True
        mine, theirs = getattr(router, name), getattr(owner, name)
        if _shapes(mine) != _shapes(theirs):
            raise ValueError(f"routers of layers {layers} cannot share {name!r} under tie "
                             f"{key!r}: shapes {_shapes(mine)} vs {_shapes(theirs)}")
        registry = router._parameters if name in router._parameters else router._modules
        del registry[name]
        # A plain attribute, not a registered Parameter/submodule: one owner per shared tensor.
        object.__setattr__(router, name, theirs)
        return False


def _shapes(item: torch.nn.Module | torch.Tensor) -> list[tuple[int, ...]]:
    tensors = item.parameters() if isinstance(item, torch.nn.Module) else [item]
    return [tuple(t.shape) for t in tensors]


def _tag_tie(item: torch.nn.Module | torch.nn.Parameter, key: str,
             layers: tuple[int, ...]) -> None:
    named = ([(f"{key}.{n}", p) for n, p in item.named_parameters()]
             if isinstance(item, torch.nn.Module) else [(key, item)])
    for tie_key, param in named:
        param.pathmoe_tie = tie_key
        param.pathmoe_tie_layers = tuple(layers)


class DepthCarry:
    """Tensors handed from one layer's router to a later layer's in the same forward pass.

    Keyed by name; a reader checks that the value covers its own tokens, so a value left over
    from another micro-batch or a skipped layer fails loudly instead of routing silently wrong.
    """

    def __init__(self) -> None:
        self._values: dict[str, Any] = {}

    def put(self, key: str, value: Any) -> None:
        self._values[key] = value

    def get(self, key: str, num_tokens: int, reader: str, *, last_reader: bool = False) -> Any:
        value = self._values.pop(key, None) if last_reader else self._values.get(key)
        first = value[0] if isinstance(value, tuple) else value
        if first is None or first.shape[0] != num_tokens:
            raise RuntimeError(
                f"{reader}: no routing state {key!r} from an earlier layer for these "
                f"{num_tokens} tokens; the layers sharing it must run in order within one "
                "forward pass on one pipeline stage (activation recomputation of single layers "
                "is not supported with this routing)")
        return value

    def clear(self) -> None:
        self._values.clear()


def routing_entropy_sum(logits: torch.Tensor, score_function: str) -> torch.Tensor:
    """[sum over tokens of the entropy (nats) of the router's distribution over all experts,
    token count], detached. Sigmoid scores are normalised to a distribution first."""
    with torch.no_grad():
        logits = logits.reshape(-1, logits.shape[-1]).float()
        if score_function == "softmax":
            log_p = F.log_softmax(logits, dim=-1)
        else:
            scores = torch.sigmoid(logits)
            log_p = torch.log(scores.clamp_min(1e-30)) - torch.log(scores.sum(-1, keepdim=True))
        entropy = -(log_p.exp() * log_p).sum(-1)
        return torch.stack([entropy.sum(), torch.tensor(float(entropy.numel()),
                                                        device=entropy.device)]).double()


class PathMoERouter(TopKRouter):
    """Megatron's ``TopKRouter`` plus the PathMoE router interface (see module docstring).

    Subclasses change how logits are computed (``gating``) or what is shared, never megatron's
    top-k, aux-loss, z-loss or expert-bias code (whose token count only runs eagerly here).
    """

    variant = "independent"

    def __init__(self, config: Any, pg_collection: Any = None, *,
                 build: "RouterBuilder") -> None:
        super().__init__(config=config, pg_collection=pg_collection)
        # Shared per model build; a plain attribute so it is not a submodule.
        object.__setattr__(self, "_build", build)
        self.last_routing_entropy: torch.Tensor | None = None

    @property
    def pathmoe_config(self) -> PathMoEConfig:
        return self._build.config

    def new_parameter(self, tensor: torch.Tensor) -> torch.nn.Parameter:
        """A router Parameter tagged like megatron's router weight: with sequence parallelism
        every TP rank routes its own tokens, so ``finalize_model_grads`` sums its grads."""
        param = torch.nn.Parameter(tensor.to(dtype=self.config.params_dtype))
        param.sequence_parallel = self.config.sequence_parallel
        return param

    def drop_gate_weight(self) -> None:
        """For variants whose logits do not come from megatron's [experts, hidden] gate."""
        self.register_parameter("weight", None)

    def set_layer_number(self, layer_number: int) -> None:
        """Megatron passes the global layer number after construction, before DDP or the
        optimizer exist: ties and per-layer state are set up here."""
        super().set_layer_number(layer_number)
        self.tie_parameters()
        restriction = self._build.restriction
        if restriction is not None:
            self.router_replay = restriction.for_layer(layer_number, self._build.carry)

    def tie_parameters(self) -> None:
        """Share parameters with other layers' routers (none for independent routers)."""

    def __call__(self, *args: Any, **kwargs: Any):
        # Around the whole call, so variants that override forward() are covered too.
        with profile_range(RANGE_ROUTING):
            return super().__call__(*args, **kwargs)

    def routing(self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None):
        if self.training:
            self.last_routing_entropy = routing_entropy_sum(logits, self.score_function)
        return super().routing(logits, padding_mask=padding_mask)

    def _apply_expert_bias(self, routing_map: torch.Tensor,
                           padding_mask: torch.Tensor | None = None) -> None:
        """megatron-core's expert-bias token count, run eagerly. megatron wraps it in
        ``torch.compile`` (``jit_fuser``), which guards on ``self`` and so compiles once per
        router, and on the CPU platform runs inductor (seconds per layer) whose cache key
        probes CUDA device properties; the body is one masked sum either way."""
        if self.enable_expert_bias and torch.is_grad_enabled():
            with torch.no_grad():
                if padding_mask is not None:
                    routing_map = routing_map & (~padding_mask)
                self.local_tokens_per_expert += routing_map.sum(dim=0)

    def export_gate_weight(self) -> torch.Tensor:
        """[experts, hidden] fp32 ``W`` such that ``logits = x @ W.T`` equals this router's."""
        if self.bias is not None:
            raise RoutingExportError(f"{self.variant}: the router has a bias")
        return self.weight.detach().float().clone()

    def export_error(self, why: str) -> RoutingExportError:
        return RoutingExportError(
            f"--routing {self.variant} (layer {self.layer_number}) cannot be exported as a "
            f"linear gate (logits = x @ W.T): {why}")

    @property
    def router_dtype(self) -> torch.dtype:
        """``--moe-router-dtype``: the routing math's dtype whatever the params dtype, as
        megatron's own gating uses it."""
        return torch.float64 if self.config.moe_router_dtype == "fp64" else torch.float32

    def to_router_dtype(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.router_dtype)


class RouterBuilder:
    """The ``MoESubmodules.router`` builder for one model build: one instance per chunk, so
    the ties and depth state of two models in one process never mix."""

    def __init__(self, config: PathMoEConfig, router_class: type[PathMoERouter]) -> None:
        self.config = config
        self.router_class = router_class
        self.ties = TieRegistry()
        self.carry = DepthCarry()
        self.restriction = PathRestriction.from_config(config)

    def __call__(self, *, config: Any, pg_collection: Any = None, **kwargs: Any) -> PathMoERouter:
        return self.router_class(config, pg_collection, build=self)


def tied_router_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """This model chunk's Parameters shared by several layers' routers, by ``pathmoe_tie``
    key (a DDP wrapper is looked through). One chunk registers one Parameter per tie."""
    ties: dict[str, torch.nn.Parameter] = {}
    for param in unwrap_model(model).parameters():
        key = getattr(param, "pathmoe_tie", None)
        if key is None:
            continue
        if ties.setdefault(key, param) is not param:
            raise ValueError(f"two Parameters of one model chunk carry tie key {key!r}; a "
                             "router variant must register one Parameter per tie and stage")
    return ties
