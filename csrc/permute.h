// Token-permutation ops for MoE token dispatch: raw-pointer kernels for CPU and CUDA.
//
// Layout conventions (all arrays contiguous, row-major, indices int64):
//   routing_map    [T, E] bytes, nonzero = token t is routed to expert e
//   sorted_indices [N]    permuted row j holds token sorted_indices[j]; expert-major and, within
//                         an expert, ascending token index (megatron-core's unfused order)
//   token CSR      offsets [T + 1], slots [N]: the permuted rows of token t are
//                         slots[offsets[t] .. offsets[t + 1]), in ascending row order
//   rows           [N, H] or [T, H] of the element type named by DType
//   weights        [N] in the accumulation type (float, or double for kFloat64)
//
// Sums of rows run in a fixed order (ascending permuted row) in the accumulation type and
// are rounded to the element type once, so every result is deterministic; no float atomics.
// Nothing here depends on torch: the Python layer allocates, validates and passes pointers,
// so the built module survives torch upgrades.
#pragma once

#include <cstdint>

namespace pathmoe {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

namespace cpu {

// sorted_indices of a routing map. capacity < 0: dropless, N = nnz(routing_map).
// capacity >= 0 (drop-and-pad, N = E * capacity): per expert its first `capacity` routed tokens,
// then, while the expert has fewer, its first non-routed tokens, all in ascending token order.
void routing_map_to_indices(const uint8_t* routing_map, int64_t num_tokens, int64_t num_experts,
                            int64_t capacity, int64_t* sorted_indices, int num_threads);

// Stable inverse of sorted_indices (counting sort by token). Throws on an index outside [0, T).
void token_csr(const int64_t* sorted_indices, int64_t num_rows, int64_t num_tokens,
               int64_t* offsets, int64_t* slots, int num_threads);

// Token-major scatter: dst[slots[r]] = src[t] (* weights[slots[r]]) for r in
// [offsets[t], offsets[t+1]); each source row is read once. dst has dst_rows rows.
void scatter_rows(DType dtype, const void* src, int64_t num_tokens, const int64_t* offsets,
                  const int64_t* slots, const void* weights, int64_t hidden, void* dst,
                  int64_t dst_rows, int num_threads);

// dst[t] = sum over r in [offsets[t], offsets[t+1]) of src[slots[r]] (* weights[slots[r]]),
// src has src_rows rows.
void segment_sum_rows(DType dtype, const void* src, int64_t src_rows, const int64_t* offsets,
                      const int64_t* slots, const void* weights, int64_t num_tokens,
                      int64_t hidden, void* dst, int num_threads);

// Backward of the weighted unpermute in one pass over grad_out: for every row j = slots[r] of
// token t, grad_rows[j] = grad_out[t] * weights[j] (skipped when grad_rows is null) and
// grad_weights[j] = <grad_out[t], rows[j]>.
void scatter_rows_and_dot(DType dtype, const void* grad_out, int64_t num_tokens,
                          const int64_t* offsets, const int64_t* slots, const void* weights,
                          const void* rows, int64_t num_rows, int64_t hidden, void* grad_rows,
                          void* grad_weights, int num_threads);

// The row functions throw on a slot outside the rows it indexes.

// Instruction-set variant the row functions use on this CPU: "avx2" or "baseline".
const char* row_kernels_isa();

}  // namespace cpu

#ifdef PATHMOE_WITH_CUDA
namespace cuda {

// Same semantics as the CPU functions, enqueued on `stream` (a cudaStream_t). Functions that
// need scratch memory take a device workspace of at least *_workspace_bytes(...) bytes.
int64_t routing_map_workspace_bytes(int64_t num_tokens, int64_t num_experts);
void routing_map_to_indices(const uint8_t* routing_map, int64_t num_tokens, int64_t num_experts,
                            int64_t capacity, int64_t* sorted_indices, void* workspace,
                            int64_t workspace_bytes, void* stream);

int64_t token_csr_workspace_bytes(int64_t num_rows, int64_t num_tokens);
void token_csr(const int64_t* sorted_indices, int64_t num_rows, int64_t num_tokens,
               int64_t* offsets, int64_t* slots, void* workspace, int64_t workspace_bytes,
               void* stream);

// Out-of-range slots cannot raise inside a kernel without a host sync: the kernels skip them,
// so memory stays safe. The Python layer only passes slots that it built (token_csr).
void scatter_rows(DType dtype, const void* src, int64_t num_tokens, const int64_t* offsets,
                  const int64_t* slots, const void* weights, int64_t hidden, void* dst,
                  int64_t dst_rows, void* stream);
void segment_sum_rows(DType dtype, const void* src, int64_t src_rows, const int64_t* offsets,
                      const int64_t* slots, const void* weights, int64_t num_tokens,
                      int64_t hidden, void* dst, void* stream);
void scatter_rows_and_dot(DType dtype, const void* grad_out, int64_t num_tokens,
                          const int64_t* offsets, const int64_t* slots, const void* weights,
                          const void* rows, int64_t num_rows, int64_t hidden, void* grad_rows,
                          void* grad_weights, void* stream);

}  // namespace cuda
#endif  // PATHMOE_WITH_CUDA

}  // namespace pathmoe
