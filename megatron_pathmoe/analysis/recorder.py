"""Records every token's top-k experts and probabilities at every MoE layer during forwards.

Forward hooks on megatron ``Router`` modules read what each router returns, ``(probs [T, E],
routing_map [T, E])``, so any routing variant with that signature is recorded without touching
it. Layouts:

- **TP with sequence parallelism**: each tensor-parallel rank routes its own contiguous slice
  of the sequence; the hook all-gathers the slices over the TP group to restore token order,
  and TP rank 0 writes.
- **PP**: each stage records the layers it holds; they land in the recording by their global
  layer number.
- **DP/EP**: each data-parallel rank writes the tokens of its own micro-batches.

The caller announces, per micro-batch in the order this rank runs them, where its tokens go in
the recording (:meth:`PathRecorder.expect`). The n-th forward of a layer's router is the n-th
micro-batch on every stage, which is how a pipeline stage that never sees the input tokens
still knows where to write.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatron_pathmoe.analysis.path_arrays import EXPERT_DTYPE, PROB_DTYPE, PathWriter
from megatron_pathmoe.routing import RouterHooks, routers_of


@dataclass(frozen=True)
class Slot:
    """Where a micro-batch goes in the recording: ``samples`` sequences from token ``start``."""

    start: int
    samples: int


def top_k_choices(probs: torch.Tensor, routing_map: torch.Tensor,
                  topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``topk`` selected experts of each token by decreasing probability, and their
    probabilities: ([T, k] int64, [T, k] float32)."""
    masked = probs.detach().float().masked_fill(~routing_map.bool(), float("-inf"))
    values, experts = masked.topk(topk, dim=1)
    if torch.isinf(values).any():
        raise RuntimeError(f"a router selected fewer than {topk} experts for some tokens "
                           "(token dropping?); the recorder needs exactly top-k per token")
    return experts, values


def _gather_sequence(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate the sequence slices [s/tp, ...] of the TP group in rank order."""
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts, dim=0)


class PathRecorder(RouterHooks):
    """Forward hooks that stream routing decisions into a :class:`PathWriter`.

    Args:
        model_chunks: the model (chunks) of this rank.
        writer: the recording to fill, or None on ranks that only take part in the gathers.
        topk: experts per token to record (the router top-k).
    """

    def __init__(self, model_chunks: list[torch.nn.Module], writer: PathWriter | None,
                 topk: int) -> None:
        super().__init__()
        self.writer = writer
        self.topk = topk
        self.routers = routers_of(model_chunks)
        if not self.routers:
            raise ValueError("the model has no megatron Router modules: nothing to record")
        self._plan: list[Slot | None] = []
        self._calls: dict[int, int] = {}
        self.hook_forward(self.routers, self._hook)

    def expect(self, plan: list[Slot | None]) -> None:
        """The micro-batches the next forwards run, in order (None: padding, not written)."""
        self._plan = list(plan)
        self._calls = {r.layer_number: 0 for r in self.routers}

    def _hook(self, router: Any, inputs: tuple, output: tuple) -> None:
        from megatron.core import parallel_state

        layer = router.layer_number
        call = self._calls[layer]
        if call >= len(self._plan):
            raise RuntimeError(f"layer {layer}'s router ran {call + 1} forwards but only "
                               f"{len(self._plan)} micro-batches were announced")
        self._calls[layer] = call + 1
        seq_local, batch = inputs[0].shape[:2]
        experts, probs = top_k_choices(*output, self.topk)
        experts = experts.view(seq_local, batch, self.topk)
        probs = probs.view(seq_local, batch, self.topk)
        if router.config.sequence_parallel and \
                parallel_state.get_tensor_model_parallel_world_size() > 1:
            experts, probs = _gather_sequence(experts), _gather_sequence(probs)
        slot = self._plan[call]
        if self.writer is None or slot is None:
            return
        # [s, b, k] -> [k, b * s]: sample-major token order, as in the recording.
        experts = experts[:, :slot.samples].permute(2, 1, 0).reshape(self.topk, -1)
        probs = probs[:, :slot.samples].permute(2, 1, 0).reshape(self.topk, -1)
        self.writer.write_layer(layer, slot.start,
                                experts.cpu().numpy().astype(EXPERT_DTYPE),
                                probs.cpu().numpy().astype(PROB_DTYPE))

    def check_complete(self) -> None:
        """Every local router ran exactly once per announced micro-batch."""
        wrong = {layer: n for layer, n in self._calls.items() if n != len(self._plan)}
        if wrong:
            raise RuntimeError(f"routers ran {wrong} forwards (layer: count), expected "
                               f"{len(self._plan)} each")


class Top1PathRecorder(RouterHooks):
    """Each forward's top-1 expert per layer (the first of :func:`top_k_choices`, as
    :class:`PathRecorder` records it), stacked into [tokens, layers] and counted. Needs all
    layers on this rank (PP=1); each rank counts the tokens it routes."""

    def __init__(self, model_chunks: list[torch.nn.Module], num_layers: int) -> None:
        super().__init__()
        routers = routers_of(model_chunks)
        if len(routers) != num_layers:
            raise ValueError(f"path recording needs every MoE layer on this rank: found "
                             f"{len(routers)} routers for {num_layers} layers (use "
                             "--pipeline-model-parallel-size 1)")
        self.num_layers = num_layers
        self.counts: dict[bytes, int] = {}
        self.num_tokens = 0
        self._current: dict[int, torch.Tensor] = {}
        self.hook_forward(routers, self._hook)

    def _hook(self, router: Any, inputs: tuple, output: tuple) -> None:
        experts, _ = top_k_choices(*output, 1)
        self._current[router.layer_number] = experts[:, 0].cpu()

    def end_forward(self) -> None:
        """Count the paths of the forward that just ran."""
        if len(self._current) != self.num_layers:
            raise RuntimeError(f"a forward reached {len(self._current)} of {self.num_layers} "
                               "routers")
        rows = torch.stack([self._current[layer] for layer in sorted(self._current)], dim=1)
        self._current.clear()
        unique, counts = np.unique(rows.numpy().astype(np.int32), axis=0, return_counts=True)
        for row, count in zip(unique, counts):
            key = row.tobytes()
            self.counts[key] = self.counts.get(key, 0) + int(count)
        self.num_tokens += rows.shape[0]


def local_layer_numbers(model_chunks: list[torch.nn.Module]) -> list[int]:
    return sorted(r.layer_number for r in routers_of(model_chunks))


def positions_of(num_samples: int, seq_length: int) -> np.ndarray:
    """Position of every recorded token in its sequence."""
    return np.tile(np.arange(seq_length, dtype=np.int32), num_samples)
