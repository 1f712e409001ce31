"""Memory of this process, as named scalars (Megatron-LM's tag names on GPU)."""

from __future__ import annotations

import resource

import torch


def memory_scalars(device: str) -> dict[str, float]:
    """GPU (``device == "cuda"``): the caching allocator's current and peak allocated and
    reserved bytes of the current device. CPU: the resident set size now and its peak.
    Local to this rank: no collective."""
    if device == "cuda":
        stats = torch.cuda.memory_stats()
        return {"mem-allocated-bytes": float(stats.get("allocated_bytes.all.current", 0)),
                "mem-reserved-bytes": float(stats.get("reserved_bytes.all.current", 0)),
                "mem-max-allocated-bytes": float(stats.get("allocated_bytes.all.peak", 0)),
                "mem-max-reserved-bytes": float(stats.get("reserved_bytes.all.peak", 0))}
    import psutil

    rss = psutil.Process().memory_info().rss  # before the peak: the peak includes it
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {"mem-rss-bytes": float(rss), "mem-max-rss-bytes": float(max(peak, rss))}
