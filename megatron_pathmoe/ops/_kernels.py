"""Tensor-level wrappers of the compiled kernels: check, allocate, call (CPU threads or CUDA
stream), return tensors. No autograd here; see :mod:`megatron_pathmoe.ops.functions`.

Rows are ``[n, hidden]`` tensors of float32/float64/bfloat16/float16; indices are int64. Weights
are converted to the accumulation type (float32, or float64 for float64 rows).
"""

from __future__ import annotations

import contextlib
import functools

import torch

from megatron_pathmoe.ops.extension import load_extension

_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
SUPPORTED_DTYPES = tuple(_DTYPE_CODES)


class _Backend:
    """The kernels of one device type, with the trailing threads/stream argument bound."""

    def __init__(self, device: torch.device):
        extension = load_extension()
        if not extension.supports(device.type):
            why = extension.reason or "it was built without CUDA kernels"
            raise RuntimeError(f"pathmoe permutation kernels are not available on "
                               f"{device.type}: {why}; use --permute-impl megatron or reference")
        if device.type == "cuda":
            _check_arch(device.index if device.index is not None else torch.cuda.current_device())
        self.device = device
        self.ops = getattr(extension.module, device.type)

    def __call__(self, name: str, *args):
        if self.device.type == "cpu":
            return getattr(self.ops, name)(*args, torch.get_num_threads())
        stream = torch.cuda.current_stream(self.device).cuda_stream
        return getattr(self.ops, name)(*args, stream)

    def guard(self):
        if self.device.type == "cuda":
            return torch.cuda.device(self.device)
        return contextlib.nullcontext()

    def workspace(self, query: str, *sizes: int) -> tuple[torch.Tensor, int]:
        """A scratch buffer and its size. Freeing it right after the launch is safe: the
        caching allocator reuses it only for work ordered after the kernels on this stream."""
        nbytes = getattr(self.ops, query)(*sizes)
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device), nbytes


@functools.lru_cache(maxsize=None)
def _check_arch(index: int) -> None:
    """Name the GPU's compute capability when the CUDA kernels have no image for it (instead
    of the launch's "no kernel image is available"); once per GPU."""
    problem = load_extension().cuda_arch_problem(torch.cuda.get_device_capability(index))
    if problem:
        raise RuntimeError(f"pathmoe permutation kernels on cuda:{index}: {problem}; use "
                           "--permute-impl megatron or reference")


def _ptr(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.data_ptr()


def _rows(name: str, tensor: torch.Tensor) -> torch.Tensor:
    if tensor.dim() != 2:
        raise ValueError(f"{name} must be 2-D [rows, hidden], got shape {tuple(tensor.shape)}")
    if tensor.dtype not in _DTYPE_CODES:
        raise TypeError(f"{name} has dtype {tensor.dtype}; the permutation kernels support "
                        f"{', '.join(str(d) for d in SUPPORTED_DTYPES)}")
    return tensor.contiguous()


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _weights(weights: torch.Tensor | None, rows: torch.Tensor, count: int) -> torch.Tensor | None:
    if weights is None:
        return None
    if weights.shape != (count,):
        raise ValueError(f"weights must have shape ({count},), got {tuple(weights.shape)}")
    return weights.to(accumulation_dtype(rows.dtype)).contiguous()


def _index(index: torch.Tensor, device: torch.device) -> torch.Tensor:
    if index.dim() != 1 or index.dtype != torch.int64 or index.device != device:
        raise ValueError(f"indices must be a 1-D int64 tensor on {device}, got "
                         f"{index.dim()}-D {index.dtype} on {index.device}")
    return index.contiguous()


def routing_map_to_indices(routing_map: torch.Tensor, num_rows: int,
                           capacity: int | None = None) -> torch.Tensor:
    """sorted_indices [num_rows] of a [tokens, experts] routing map (see csrc/permute.h);
    num_rows is nnz(routing_map) when dropless, experts * capacity with drop-and-pad."""
    backend = _Backend(routing_map.device)
    tokens, experts = routing_map.shape
    routing = routing_map.to(torch.bool).contiguous().view(torch.uint8)
    out = torch.empty(num_rows, dtype=torch.int64, device=routing_map.device)
    cap = -1 if capacity is None else capacity
    with backend.guard():
        if routing_map.device.type == "cpu":
            backend("routing_map_to_indices", _ptr(routing), tokens, experts, cap, _ptr(out))
        else:
            ws, nbytes = backend.workspace("routing_map_workspace_bytes", tokens, experts)
            backend("routing_map_to_indices", _ptr(routing), tokens, experts, cap, _ptr(out),
                    _ptr(ws), nbytes)
    return out


def token_csr(sorted_indices: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(offsets [num_tokens + 1], slots [rows]): the permuted rows of each token, ascending."""
    backend = _Backend(sorted_indices.device)
    index = _index(sorted_indices, sorted_indices.device)
    rows = index.numel()
    offsets = torch.empty(num_tokens + 1, dtype=torch.int64, device=index.device)
    slots = torch.empty(rows, dtype=torch.int64, device=index.device)
    with backend.guard():
        if index.device.type == "cpu":
            backend("token_csr", _ptr(index), rows, num_tokens, _ptr(offsets), _ptr(slots))
        else:
            ws, nbytes = backend.workspace("token_csr_workspace_bytes", rows, num_tokens)
            backend("token_csr", _ptr(index), rows, num_tokens, _ptr(offsets), _ptr(slots),
                    _ptr(ws), nbytes)
    return offsets, slots


def _csr(offsets: torch.Tensor, slots: torch.Tensor, device: torch.device):
    return _index(offsets, device), _index(slots, device)


def scatter_rows(src: torch.Tensor, offsets: torch.Tensor, slots: torch.Tensor, num_rows: int,
                 weights: torch.Tensor | None = None) -> torch.Tensor:
    """out[slots[r]] = src[t] (* weights[slots[r]]) for r in offsets[t]:offsets[t+1]; every
    source row is read once. out has num_rows rows."""
    src = _rows("rows", src)
    backend = _Backend(src.device)
    offsets, slots = _csr(offsets, slots, src.device)
    weights = _weights(weights, src, num_rows)
    out = torch.empty(num_rows, src.shape[1], dtype=src.dtype, device=src.device)
    with backend.guard():
        backend("scatter_rows", _DTYPE_CODES[src.dtype], _ptr(src), offsets.numel() - 1,
                _ptr(offsets), _ptr(slots), _ptr(weights), src.shape[1], _ptr(out), num_rows)
    return out


def segment_sum_rows(src: torch.Tensor, offsets: torch.Tensor, slots: torch.Tensor,
                     weights: torch.Tensor | None = None) -> torch.Tensor:
    """out[t] = sum of src[slots[r]] (* weights[slots[r]]) over r in offsets[t]:offsets[t+1],
    accumulated in fp32 (fp64 for fp64) in ascending r."""
    src = _rows("rows", src)
    backend = _Backend(src.device)
    offsets, slots = _csr(offsets, slots, src.device)
    weights = _weights(weights, src, src.shape[0])
    tokens = offsets.numel() - 1
    out = torch.empty(tokens, src.shape[1], dtype=src.dtype, device=src.device)
    with backend.guard():
        backend("segment_sum_rows", _DTYPE_CODES[src.dtype], _ptr(src), src.shape[0],
                _ptr(offsets), _ptr(slots), _ptr(weights), tokens, src.shape[1], _ptr(out))
    return out


def scatter_rows_and_dot(grad_out: torch.Tensor, offsets: torch.Tensor, slots: torch.Tensor,
                         weights: torch.Tensor, rows: torch.Tensor, need_rows: bool
                         ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Backward of the weighted unpermute, one pass over grad_out: (grad_out of each row's token
    * weights, or None; <grad_out of the row's token, rows[j]> for every row j)."""
    grad_out, rows = _rows("grad_output", grad_out), _rows("rows", rows)
    if grad_out.dtype != rows.dtype:
        grad_out = grad_out.to(rows.dtype)
    backend = _Backend(rows.device)
    offsets, slots = _csr(offsets, slots, rows.device)
    weights = _weights(weights, rows, rows.shape[0])
    grad_rows = torch.empty_like(rows) if need_rows else None
    grad_weights = torch.empty(rows.shape[0], dtype=weights.dtype, device=rows.device)
    with backend.guard():
        backend("scatter_rows_and_dot", _DTYPE_CODES[rows.dtype], _ptr(grad_out),
                offsets.numel() - 1, _ptr(offsets), _ptr(slots), _ptr(weights), _ptr(rows),
                rows.shape[0], rows.shape[1], _ptr(grad_rows), _ptr(grad_weights))
    return grad_rows, grad_weights
