"""How code outside the routers reaches them: the routers of some model chunks, and a base
for forward hooks on them (training metrics, fault detection and injection, path recording,
robustness permutations all subclass :class:`RouterHooks`)."""

from __future__ import annotations

from typing import Any, Callable

import torch
from megatron.core.transformer.moe.router import Router


def unwrap_model(chunk: torch.nn.Module) -> torch.nn.Module:
    """The model inside any wrappers (megatron DDP, Float16Module) that hold it as ``module``."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def routers_of(model_chunks: list[torch.nn.Module]) -> list[Router]:
    """Every megatron ``Router`` in the model chunks (wrappers looked through), in module
    order: one per MoE layer on this rank, for every routing variant."""
    return [m for chunk in model_chunks for m in chunk.modules() if isinstance(m, Router)]


class RouterHooks:
    """Hooks on routers, removed together; a context manager. A subclass calls
    :meth:`hook_forward` / :meth:`hook_pre_forward` for the routers it watches."""

    def __init__(self) -> None:
        self._handles: list[Any] = []

    def hook_forward(self, routers: list[Router], hook: Callable) -> None:
        """``hook(router, inputs, output)`` after each forward of ``routers`` (a non-None
        return replaces the output)."""
        self._handles += [router.register_forward_hook(hook) for router in routers]

    def hook_pre_forward(self, routers: list[Router], hook: Callable) -> None:
        """``hook(router, inputs)`` before each forward (a non-None return replaces inputs)."""
        self._handles += [router.register_forward_pre_hook(hook) for router in routers]

    @property
    def num_hooked(self) -> int:
        return len(self._handles)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
