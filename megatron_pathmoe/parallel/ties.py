"""Router parameters tied across pipeline stages (and virtual pipeline chunks).

A router Parameter shared by several layers carries ``pathmoe_tie`` (a stable key such as
``"path.block2.weight"``) and ``pathmoe_tie_layers`` (the global 1-based layer numbers using it).
Within one model chunk there is one registered Parameter per key, so autograd already sums the
per-layer gradients there. When the layers of a tie live on several pipeline stages (or
several virtual-pipeline chunks of one rank), every holder keeps its own copy, and this module
keeps the copies identical with megatron-core's tied word-embedding recipe
(``LanguageModule.setup_embeddings_and_output_layer`` and ``finalize_model_grads``):

* one process group per (tie, pipeline group) over the pipeline ranks that hold the tie,
  created in the same order on every rank;
* at build time the copy in the chunk holding the tie's first layer (the *canonical* copy) is
  kept and every other copy is zeroed, then the copies are summed over the group, so all start
  from the canonical values bit for bit;
* after megatron's data-parallel gradient reduction, the gradients of all copies are summed
  over the group, so every copy takes the same optimizer step;
* every copy gets ``shared_embedding = True``: under the distributed optimizer it then sits in
  a bucket of its own, so each data-parallel rank owns the same slice of it on every stage;
  the non-canonical copies get ``shared = True``, so the gradient norm counts the tie once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist

from megatron_pathmoe.platform.profiling import RANGE_TIE_ALLREDUCE, profile_range
from megatron_pathmoe.routing import tied_router_parameters, unwrap_model

TIE_ATTR = "pathmoe_tie"
TIE_LAYERS_ATTR = "pathmoe_tie_layers"


def local_layer_numbers(model: torch.nn.Module) -> set[int]:
    """Global 1-based numbers of the decoder layers in one (unwrapped) model chunk."""
    decoder = getattr(unwrap_model(model), "decoder", None)
    return {layer.layer_number for layer in getattr(decoder, "layers", [])}


def is_canonical_copy(model: torch.nn.Module, param: torch.nn.Parameter) -> bool:
    """True for the copy held by the chunk that builds the tie's first layer (the copy that
    initialises the others, counts in the gradient norm and is written to checkpoints)."""
    return min(getattr(param, TIE_LAYERS_ATTR)) in local_layer_numbers(model)


def is_tie_writer(model: torch.nn.Module, param: torch.nn.Parameter) -> bool:
    """Whether this rank writes tie ``param`` of ``model`` to a checkpoint: the canonical copy
    on tensor-parallel rank 0 and data-parallel rank 0 (router weights are replicated there)."""
    from megatron.core import parallel_state as ps

    return (is_canonical_copy(model, param) and ps.get_tensor_model_parallel_rank() == 0
            and ps.get_data_parallel_rank(with_context_parallel=True) == 0)


@dataclass
class _LocalTie:
    key: str
    copies: list[torch.nn.Parameter]
    canonical: torch.nn.Parameter | None  # None: the first layer lives on another stage
    group: Any = None  # process group over the pipeline ranks holding the tie; None: this rank only

    @property
    def spans_ranks(self) -> bool:
        return self.group is not None


@dataclass
class RouterTies:
    """This rank's tied router parameters and the process groups that keep them in sync."""

    ties: list[_LocalTie] = field(default_factory=list)

    @classmethod
    def build(cls, chunks: list[torch.nn.Module]) -> "RouterTies":
        """Collective over the world: find the ties of this rank's chunks, learn which
        pipeline ranks hold each one and create their process groups (same order on every
        rank). ``chunks`` are this rank's model chunks, in virtual-pipeline order."""
        local = _collect_local(chunks)
        holders = _pipeline_holders(set(local))
        my_groups = _create_groups(holders)
        return cls([_LocalTie(key, copies, canonical, my_groups.get(key))
                    for key, (copies, canonical) in sorted(local.items())])

    # ----------------------------------------------------------------------- megatron tags

    def tag_for_megatron(self) -> None:
        """Before DDP wrapping: a bucket of its own for every copy of a tie that has several
        copies (distributed optimizer), and only the canonical copy in the gradient norm."""
        for tie in self._multi_copy():
            for param in tie.copies:
                param.shared_embedding = True
                if param is not tie.canonical:
                    param.shared = True

    # ----------------------------------------------------------------------- collectives

    @torch.no_grad()
    def sync_weights(self) -> None:
        """Make every copy equal to the canonical one (zero the others, sum over holders)."""
        for tie in self._multi_copy():
            for param in tie.copies:
                if param is not tie.canonical:
                    param.data.zero_()
            self._sum_into_copies(tie, [p.data for p in tie.copies])

    @torch.no_grad()
    def allreduce_grads(self) -> None:
        """Sum the gradients of all copies of each tie (call after the data-parallel sync)."""
        with profile_range(RANGE_TIE_ALLREDUCE):
            for tie in self._multi_copy():
                grads = [_main_grad(p) for p in tie.copies]
                if any(g is None for g in grads):
                    raise RuntimeError(f"router tie {tie.key!r} has a copy without a gradient")
                self._sum_into_copies(tie, grads)

    def finalize_model_grads_func(self, finalize: Callable | None = None) -> Callable:
        """megatron's ``finalize_model_grads`` (DP reduce, SP/TP norms, embeddings) followed by
        the tie all-reduce, for ``config.finalize_model_grads_func``."""
        if finalize is None:
            from megatron.core.distributed.finalize_model_grads import finalize_model_grads

            finalize = finalize_model_grads

        def finalize_with_ties(model, *args, **kwargs):
            result = finalize(model, *args, **kwargs)
            self.allreduce_grads()
            return result

        return finalize_with_ties

    # ----------------------------------------------------------------------- helpers

    def _multi_copy(self) -> Iterable[_LocalTie]:
        return (t for t in self.ties if t.spans_ranks or len(t.copies) > 1)

    @staticmethod
    def _sum_into_copies(tie: _LocalTie, tensors: list[torch.Tensor]) -> None:
        total = tensors[0].clone() if len(tensors) > 1 else tensors[0]
        for extra in tensors[1:]:
            total.add_(extra)
        if tie.group is not None:
            dist.all_reduce(total, group=tie.group)
        for tensor in tensors:
            if tensor is not total:
                tensor.copy_(total)


def _main_grad(param: torch.nn.Parameter) -> torch.Tensor | None:
    return param.main_grad if hasattr(param, "main_grad") else param.grad


def _collect_local(chunks: list[torch.nn.Module]) -> dict[str, tuple[list, Any]]:
    """key -> (copies in chunk order, canonical copy or None) for this rank."""
    local: dict[str, tuple[list, Any]] = {}
    for chunk in chunks:
        for key, param in tied_router_parameters(unwrap_model(chunk)).items():
            copies, canonical = local.get(key, ([], None))
            copies.append(param)
            if is_canonical_copy(chunk, param):
                canonical = param
            local[key] = (copies, canonical)
    return local


Holders = dict[str, dict[tuple[int, ...], list[int]]]


def _pipeline_holders(my_keys: set[str]) -> Holders:
    """key -> {pipeline group (its global ranks): global ranks in it holding the key}, the
    same on every rank."""
    from megatron.core import parallel_state as ps

    pipeline = tuple(dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group()))
    records: list = [None] * dist.get_world_size()
    dist.all_gather_object(records, (pipeline, dist.get_rank(), sorted(my_keys)))
    holders: Holders = {}
    for pipeline, rank, keys in records:
        for key in keys:
            holders.setdefault(key, {}).setdefault(pipeline, []).append(rank)
    return holders


def _create_groups(holders: Holders) -> dict[str, Any]:
    """One group per (tie, pipeline group) holding it on several stages; every rank creates
    all of them in sorted order (torch requires it), each keeps the ones it belongs to."""
    from megatron.core import parallel_state as ps

    mine: dict[str, Any] = {}
    for key in sorted(holders):
        for pipeline in sorted(holders[key]):
            ranks = sorted(holders[key][pipeline])
            if len(ranks) > 1:
                group = ps.create_group(ranks, group_desc="PATHMOE_ROUTER_TIE")
                if dist.get_rank() in ranks:
                    mine[key] = group
    return mine
