"""What the training log reports: the metrics window every scalar flows through, and what it
measures beyond the loss (per-layer expert load, routing entropy, aux losses, peak memory)."""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.transformer.moe.moe_utils import (
    clear_aux_losses_tracker,
    get_moe_layer_wise_logging_tracker,
    reduce_aux_losses_tracker_across_ranks,
)
from megatron.core.transformer.moe.router import Router

from megatron_pathmoe.config import PathMoEConfig
from megatron_pathmoe.routing import RouterHooks, routers_of
from megatron_pathmoe.runtime import all_reduce_to_cpu, log


class ExpertLoadTracker(RouterHooks):
    """Per MoE layer, over training forwards: tokens routed to each expert, and the mean
    per-token entropy of the router's distribution over all experts.

    Forward hooks on every megatron ``Router`` read the routing map it returns (any routing
    variant) and the ``last_routing_entropy`` statistics that this project's routers record.
    """

    def __init__(self, model_chunks: list[torch.nn.Module], num_layers: int,
                 num_experts: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.counts = torch.zeros(num_layers, num_experts, dtype=torch.float64)
        self.entropy = torch.zeros(num_layers, 2, dtype=torch.float64)  # [sum nats, tokens]
        self.hook_forward(routers_of(model_chunks), self._hook)

    def _hook(self, router: Router, inputs, output) -> None:
        if not router.training or router.layer_number is None:
            return
        _, routing_map = output
        row = router.layer_number - 1
        if self.counts.device != routing_map.device:  # accumulate where routing runs: no sync
            self.counts = self.counts.to(routing_map.device)
            self.entropy = self.entropy.to(routing_map.device)
        self.counts[row] += routing_map.detach().sum(0).to(torch.float64)
        stats = getattr(router, "last_routing_entropy", None)  # set by our routers only
        if stats is not None:
            self.entropy[row] += stats.detach().to(self.entropy.device, torch.float64)
            router.last_routing_entropy = None

    def pop_load(self) -> torch.Tensor:
        """Per-layer load relative to uniform (1.0 = balanced), summed over all ranks, then
        reset. Rows are ratios, so tokens duplicated across TP ranks cancel out."""
        counts = all_reduce_to_cpu(self.counts)
        self.counts.zero_()
        totals = counts.sum(dim=1, keepdim=True).clamp_min(1)
        return counts * counts.shape[1] / totals

    def pop_entropy(self) -> torch.Tensor:
        """Per-layer mean per-token routing entropy in nats (ln(num_experts) = uniform, 0 =
        one expert takes all the probability), over all ranks since the last call; then
        reset. NaN for a layer whose router records none."""
        entropy = all_reduce_to_cpu(self.entropy)
        self.entropy.zero_()
        return torch.where(entropy[:, 1] > 0, entropy[:, 0] / entropy[:, 1].clamp_min(1),
                           torch.full_like(entropy[:, 0], float("nan")))


def peak_memory_gib(device: str) -> float:
    """The largest peak memory of any rank, in GiB: the CUDA caching allocator's high-water
    mark of allocated tensors on GPU (what must fit), the process's peak resident set on
    CPU. Collective: call on every rank."""
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    reduced = all_reduce_to_cpu(torch.tensor([float(peak)], dtype=torch.float64),
                                op=dist.ReduceOp.MAX)
    return float(reduced[0]) / 2**30


def pop_aux_losses(num_moe_layers: int, num_microbatches: int) -> dict[str, float]:
    """Per-iteration mean of each aux loss megatron's routers recorded, over the layers that
    compute it (MonoB{B} computes its losses once per block) and micro-batches, reduced
    across ranks; then clears megatron's tracker. Call once per iteration on every rank (it
    runs collectives)."""
    tracker = get_moe_layer_wise_logging_tracker()
    if not tracker:
        return {}
    reduce_aux_losses_tracker_across_ranks()
    losses = {}
    for name, entry in tracker.items():
        values = entry["values"]
        layers = min(int((values != 0).sum()), num_moe_layers) or num_moe_layers
        losses[name] = float(values.sum()) / (layers * num_microbatches)
    clear_aux_losses_tracker()
    return losses


def format_load(load: torch.Tensor) -> str:
    """'L1 1.42/0.61 L2 ...': max/min load per layer relative to uniform."""
    return " ".join(f"L{i + 1} {row.max():.2f}/{row.min():.2f}" for i, row in enumerate(load))


def format_entropy(entropy: torch.Tensor, num_experts: int) -> str:
    """'L1 0.97 L2 ...': routing entropy per layer as a fraction of the maximum ln(E) (1 =
    uniform router, towards 0 = collapsed onto one expert per token)."""
    top = math.log(num_experts) if num_experts > 1 else 1.0
    return " ".join(f"L{i + 1} {value / top:.2f}" for i, value in enumerate(entropy.tolist()))


class MetricsWindow:
    """The one place training scalars flow through. :meth:`update` takes every step's
    numbers (loss, grad norm, lr, step time, aux losses); :meth:`flush` logs the window since
    the last flush (every ``--log-interval``: tokens/s, expert load, routing entropy), resets
    it and returns its scalars; the run's history stays for the summary."""

    def __init__(self, chunks: list, model_cfg: PathMoEConfig, train_iters: int,
                 tokens_per_iter: int, num_microbatches: int) -> None:
        self.tracker = ExpertLoadTracker(chunks, model_cfg.num_layers, model_cfg.num_experts)
        self.num_layers, self.num_experts = model_cfg.num_layers, model_cfg.num_experts
        self.train_iters, self.tokens_per_iter = train_iters, tokens_per_iter
        self.num_microbatches = num_microbatches
        self.losses: list[float] = []
        self.grad_norms: list[float] = []
        self.step_seconds: list[float] = []
        self.step_tokens: list[int] = []  # differ per step under --rampup-batch-size
        self.skipped: list[int] = []
        self.aux_means: dict[str, float] = {}  # of the last flushed window
        self.load: torch.Tensor | None = None  # of the last flushed window
        self.entropy: torch.Tensor | None = None  # of the last flushed window
        self._reset()

    def _reset(self) -> None:
        self._start, self._iters, self._tokens, self._aux_sums = time.perf_counter(), 0, 0, {}

    def update(self, iteration: int, result: Any, seconds: float, tokens: int | None = None,
               num_microbatches: int | None = None) -> None:
        """One step's result (a ``StepResult``), its duration, and (a ramp-up step's) tokens
        and micro-batches. Collective (aux losses)."""
        tokens = self.tokens_per_iter if tokens is None else tokens
        self.step_seconds.append(seconds)
        self.step_tokens.append(tokens)
        self._tokens += tokens
        self.losses.append(result.loss)
        self.grad_norms.append(result.grad_norm)
        if result.skipped:
            self.skipped.append(iteration)
        for name, value in pop_aux_losses(self.num_layers,
                                          num_microbatches or self.num_microbatches).items():
            self._aux_sums[name] = self._aux_sums.get(name, 0.0) + value
        self._iters += 1
        self._last = result

    def exclude(self, seconds: float) -> None:
        """Keep ``seconds`` spent outside training (a checkpoint save) out of tokens/s."""
        self._start += seconds

    def flush(self, iteration: int) -> dict[str, float]:
        """Log the window ending at ``iteration``, start a new one and return its scalars,
        named as ``megatron_pathmoe.monitoring.SCALARS`` (Megatron-LM's TensorBoard tags; aux
        losses by megatron's tracker names). ``load`` and ``entropy`` keep the window's
        per-layer expert load and routing entropy. Collective."""
        elapsed = time.perf_counter() - self._start
        self.load = self.tracker.pop_load()
        self.entropy = self.tracker.pop_entropy()
        self.aux_means = {k: v / self._iters for k, v in self._aux_sums.items()}
        result, iters = self._last, self._iters
        scalars = {"lm loss": result.loss, "grad-norm": result.grad_norm,
                   "learning-rate": result.lr, "skipped-iterations": float(len(self.skipped)),
                   "tokens-per-second": self._tokens / elapsed,
                   "iteration-time": elapsed / iters, **self.aux_means}
        aux = " ".join(f"{k} {v:.4f}" for k, v in self.aux_means.items()) or "aux loss off"
        log(f"iter {iteration:6d}/{self.train_iters} | loss {result.loss:.4f} | {aux} | "
            f"grad norm {result.grad_norm:.3f} | lr {result.lr:.2e} | "
            f"{scalars['tokens-per-second']:,.0f} tokens/s | "
            f"{1000 * elapsed / iters:.0f} ms/iter{' | skipped' if result.skipped else ''}")
        log(f"    expert load max/min vs uniform: {format_load(self.load)}")
        log(f"    routing entropy / ln(E): {format_entropy(self.entropy, self.num_experts)}")
        self._reset()
        return scalars

    def steady_step_seconds(self) -> float | None:
        """Mean step time without the first steps, which pay one-off costs (allocator,
        caches); None before any step."""
        steady = self.step_seconds[self._steady_start():]
        return sum(steady) / len(steady) if steady else None

    def steady_tokens_per_second(self) -> float | None:
        """Tokens over seconds of the same steps as :meth:`steady_step_seconds`."""
        first = self._steady_start()
        seconds = sum(self.step_seconds[first:])
        return sum(self.step_tokens[first:]) / seconds if seconds else None

    def _steady_start(self) -> int:
        return min(2, len(self.step_seconds) - 1)

    def close(self) -> None:
        self.tracker.remove()
