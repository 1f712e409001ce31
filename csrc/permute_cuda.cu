// CUDA token-permutation ops (sm_80, sm_90). Same semantics as permute_cpu.cpp.
//
// Determinism: index construction uses integer counts, cub scans and cub's stable radix sort;
// every row sum runs over a token's rows in ascending row order inside one thread, and the dot
// product reduces in a fixed tree. No float atomics anywhere.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cub/cub.cuh>
#include <stdexcept>
#include <string>

#include "dtype_dispatch.h"
#include "permute.h"

namespace pathmoe {
namespace cuda {
namespace {

constexpr int kThreads = 256;
// Tokens one thread scans per expert when building the routing permutation.
constexpr int64_t kChunkTokens = 64;
constexpr int64_t kMaxBlocks = (int64_t{1} << 31) - 1;
constexpr size_t kAlign = 256;

void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess)
    throw std::runtime_error(std::string("pathmoe ops (CUDA) ") + what + ": " +
                             cudaGetErrorString(status));
}

void check(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument("pathmoe ops (CUDA): " + message);
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
size_t align_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }
unsigned grid_for(int64_t items) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(items, kMaxBlocks)));
}
cudaStream_t as_stream(void* stream) { return static_cast<cudaStream_t>(stream); }

// Carves aligned sub-buffers out of the caller's workspace.
class Workspace {
 public:
  Workspace(void* base, int64_t bytes) : base_(static_cast<char*>(base)), bytes_(bytes) {}
  template <typename T>
  T* take(size_t count) {
    T* p = reinterpret_cast<T*>(base_ + used_);
    used_ += align_up(count * sizeof(T));
    check(static_cast<int64_t>(used_) <= bytes_, "workspace too small");
    return p;
  }
  void* rest(size_t bytes) {
    check(static_cast<int64_t>(used_ + bytes) <= bytes_, "workspace too small");
    return base_ + used_;
  }

 private:
  char* base_;
  int64_t bytes_;
  size_t used_ = 0;
};

template <typename T>
struct Element;
template <>
struct Element<float> {
  using Acc = float;
  __device__ static Acc load(float x) { return x; }
  __device__ static float store(Acc x) { return x; }
};
template <>
struct Element<double> {
  using Acc = double;
  __device__ static Acc load(double x) { return x; }
  __device__ static double store(Acc x) { return x; }
};
template <>
struct Element<__nv_bfloat16> {
  using Acc = float;
  __device__ static Acc load(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ static __nv_bfloat16 store(Acc x) { return __float2bfloat16_rn(x); }
};
template <>
struct Element<__half> {
  using Acc = float;
  __device__ static Acc load(__half x) { return __half2float(x); }
  __device__ static __half store(Acc x) { return __float2half_rn(x); }
};

// kVec elements moved as one 16-byte access (kVec = 1: scalar fallback).
template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

template <typename Fn>
void dispatch_dtype(DType dtype, Fn&& fn) {
  dispatch_dtype_as<float, double, __nv_bfloat16, __half>(dtype, fn, "pathmoe ops (CUDA)");
}

// Calls fn(std::integral_constant<int, kVec>) with the widest access every row allows.
template <typename T, typename Fn>
void dispatch_vec(int64_t hidden, std::initializer_list<const void*> pointers, Fn&& fn) {
  constexpr int kWide = 16 / sizeof(T);
  bool aligned = hidden % kWide == 0;
  for (const void* p : pointers)
    aligned = aligned && (p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0);
  if (aligned)
    fn(std::integral_constant<int, kWide>{});
  else
    fn(std::integral_constant<int, 1>{});
}

int threads_for(int64_t packs) {
  return static_cast<int>(std::min<int64_t>(kThreads, std::max<int64_t>(32, ceil_div(packs, 32) * 32)));
}

// launch(T{}, integral_constant<kVec>, threads) for the element type and the widest access.
template <typename Launch>
void for_rows(DType dtype, int64_t hidden, std::initializer_list<const void*> pointers,
              Launch&& launch) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    dispatch_vec<T>(hidden, pointers, [&](auto vec) {
      launch(tag, vec, threads_for(hidden / decltype(vec)::value));
    });
  });
}

// ---------------------------------------------------------------- index construction

// counts[e * chunks + c] = routed tokens of expert e in token chunk c. Adjacent threads read
// adjacent experts of the same routing-map row (coalesced).
__global__ void count_routing_kernel(const uint8_t* map, int64_t tokens, int64_t experts,
                                     int64_t chunks, int64_t* counts) {
  const int64_t id = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (id >= chunks * experts) return;
  const int64_t c = id / experts, e = id % experts;
  const int64_t last = min(tokens, (c + 1) * kChunkTokens);
  int64_t n = 0;
  for (int64_t t = c * kChunkTokens; t < last; ++t) n += map[t * experts + e] != 0;
  counts[e * chunks + c] = n;
}

// starts = exclusive scan of counts (expert-major), so starts[e * chunks + c] is where chunk c
// writes its tokens of expert e in the dropless layout.
__global__ void fill_routing_kernel(const uint8_t* map, int64_t tokens, int64_t experts,
                                    int64_t chunks, const int64_t* counts, const int64_t* starts,
                                    int64_t capacity, int64_t* out) {
  const int64_t id = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (id >= chunks * experts) return;
  const int64_t c = id / experts, e = id % experts;
  const int64_t first = c * kChunkTokens, last = min(tokens, first + kChunkTokens);
  if (capacity < 0) {
    int64_t position = starts[e * chunks + c];
    for (int64_t t = first; t < last; ++t)
      if (map[t * experts + e]) out[position++] = t;
    return;
  }
  const int64_t expert_begin = starts[e * chunks];
  const int64_t routed = starts[e * chunks + chunks - 1] + counts[e * chunks + chunks - 1] -
                         expert_begin;
  const int64_t kept = min(routed, capacity);
  int64_t rank = starts[e * chunks + c] - expert_begin;
  for (int64_t t = first; t < last; ++t) {
    if (map[t * experts + e]) {
      if (rank < capacity) out[e * capacity + rank] = t;
      ++rank;
    } else {
      const int64_t slot = kept + (t - rank);  // padding: non-routed tokens in order
      if (slot < capacity) out[e * capacity + slot] = t;
    }
  }
}

__global__ void iota_kernel(int64_t n, int64_t* out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = i;
}

// offsets[t] = first position of token t in the sorted keys (lower bound), t in [0, tokens].
__global__ void offsets_kernel(const int64_t* sorted_keys, int64_t rows, int64_t tokens,
                               int64_t* offsets) {
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t <= tokens;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t lo = 0, hi = rows;
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (sorted_keys[mid] < t)
        lo = mid + 1;
      else
        hi = mid;
    }
    offsets[t] = lo;
  }
}

int end_bit_for(int64_t tokens) {
  int bits = 1;
  while (bits < 63 && (int64_t{1} << bits) <= tokens) ++bits;
  return bits;
}

size_t routing_scan_bytes(int64_t n) {
  size_t bytes = 0;
  check_cuda(cub::DeviceScan::ExclusiveSum(nullptr, bytes, static_cast<int64_t*>(nullptr),
                                           static_cast<int64_t*>(nullptr), n),
             "scan size query");
  return bytes;
}

size_t radix_sort_bytes(int64_t n, int end_bit) {
  size_t bytes = 0;
  check_cuda(cub::DeviceRadixSort::SortPairs(nullptr, bytes, static_cast<const int64_t*>(nullptr),
                                             static_cast<int64_t*>(nullptr),
                                             static_cast<const int64_t*>(nullptr),
                                             static_cast<int64_t*>(nullptr), n, 0, end_bit),
             "sort size query");
  return bytes;
}

// ---------------------------------------------------------------- row kernels

// One block per token: each thread loads a pack of the token's row once and writes it to all of
// the token's permuted rows (scaled by their weights).
template <typename T, int kVec, bool kWeighted>
__global__ void scatter_rows_kernel(const T* __restrict__ src, int64_t tokens,
                                    const int64_t* __restrict__ offsets,
                                    const int64_t* __restrict__ slots,
                                    const typename Element<T>::Acc* __restrict__ weights,
                                    int64_t hidden, T* __restrict__ dst, int64_t dst_rows) {
  using E = Element<T>;
  using P = Pack<T, kVec>;
  const int64_t packs = hidden / kVec;
  for (int64_t t = blockIdx.x; t < tokens; t += gridDim.x) {
    const int64_t first = offsets[t], last = offsets[t + 1];
    const P* s = reinterpret_cast<const P*>(src + t * hidden);
    for (int64_t i = threadIdx.x; i < packs; i += blockDim.x) {
      const P p = s[i];
      for (int64_t r = first; r < last; ++r) {
        const int64_t j = slots[r];
        if (j < 0 || j >= dst_rows) continue;
        P out = p;
        if (kWeighted) {
          const auto w = weights[j];
#pragma unroll
          for (int k = 0; k < kVec; ++k) out.v[k] = E::store(E::load(p.v[k]) * w);
        }
        reinterpret_cast<P*>(dst + j * hidden)[i] = out;
      }
    }
  }
}

template <typename T, int kVec, bool kWeighted>
__global__ void segment_sum_kernel(const T* __restrict__ src, int64_t src_rows,
                                   const int64_t* __restrict__ offsets,
                                   const int64_t* __restrict__ slots,
                                   const typename Element<T>::Acc* __restrict__ weights,
                                   int64_t tokens, int64_t hidden, T* __restrict__ dst) {
  using E = Element<T>;
  using Acc = typename E::Acc;
  using P = Pack<T, kVec>;
  const int64_t packs = hidden / kVec;
  for (int64_t t = blockIdx.x; t < tokens; t += gridDim.x) {
    const int64_t first = offsets[t], last = offsets[t + 1];
    P* d = reinterpret_cast<P*>(dst + t * hidden);
    for (int64_t i = threadIdx.x; i < packs; i += blockDim.x) {
      Acc acc[kVec];
#pragma unroll
      for (int k = 0; k < kVec; ++k) acc[k] = Acc(0);
      for (int64_t r = first; r < last; ++r) {
        const int64_t j = slots[r];
        if (j < 0 || j >= src_rows) continue;
        const P p = reinterpret_cast<const P*>(src + j * hidden)[i];
        const Acc w = kWeighted ? weights[j] : Acc(1);
#pragma unroll
        for (int k = 0; k < kVec; ++k) acc[k] += kWeighted ? E::load(p.v[k]) * w : E::load(p.v[k]);
      }
      P out;
#pragma unroll
      for (int k = 0; k < kVec; ++k) out.v[k] = E::store(acc[k]);
      d[i] = out;
    }
  }
}

// Sum of one value per thread in a fixed tree (deterministic for a fixed block size).
template <typename Acc>
__device__ Acc block_sum(Acc value) {
  __shared__ Acc warp_sums[kThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  if (lane == 0) warp_sums[warp] = value;
  __syncthreads();
  Acc total = Acc(0);
  if (warp == 0) {
    total = lane < static_cast<int>(blockDim.x / 32) ? warp_sums[lane] : Acc(0);
    for (int offset = 16; offset > 0; offset /= 2) total += __shfl_down_sync(0xffffffffu, total, offset);
  }
  __syncthreads();  // warp_sums is reused by the next row
  return total;
}

// One block per token; for each of its rows j: grad_rows[j] = grad_out[t] * w[j] and
// grad_weights[j] = <grad_out[t], rows[j]> (block_sum: fixed order).
template <typename T, int kVec, bool kWriteRows>
__global__ void scatter_dot_kernel(const T* __restrict__ grad_out, int64_t tokens,
                                   const int64_t* __restrict__ offsets,
                                   const int64_t* __restrict__ slots,
                                   const typename Element<T>::Acc* __restrict__ weights,
                                   const T* __restrict__ rows, int64_t num_rows, int64_t hidden,
                                   T* __restrict__ grad_rows,
                                   typename Element<T>::Acc* __restrict__ grad_weights) {
  using E = Element<T>;
  using Acc = typename E::Acc;
  using P = Pack<T, kVec>;
  const int64_t packs = hidden / kVec;
  for (int64_t t = blockIdx.x; t < tokens; t += gridDim.x) {
    const P* g = reinterpret_cast<const P*>(grad_out + t * hidden);
    for (int64_t r = offsets[t]; r < offsets[t + 1]; ++r) {
      const int64_t j = slots[r];
      if (j < 0 || j >= num_rows) continue;  // uniform across the block: no divergent sync
      const P* y = reinterpret_cast<const P*>(rows + j * hidden);
      const Acc w = weights[j];
      Acc partial = Acc(0);
      for (int64_t i = threadIdx.x; i < packs; i += blockDim.x) {
        const P gp = g[i];
        const P yp = y[i];
        P out;
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          const Acc gv = E::load(gp.v[k]);
          out.v[k] = E::store(gv * w);
          partial += gv * E::load(yp.v[k]);
        }
        if (kWriteRows) reinterpret_cast<P*>(grad_rows + j * hidden)[i] = out;
      }
      const Acc total = block_sum(partial);
      if (threadIdx.x == 0) grad_weights[j] = total;
    }
  }
}

template <typename T>
const typename Element<T>::Acc* acc_ptr(const void* p) {
  return static_cast<const typename Element<T>::Acc*>(p);
}

}  // namespace

int64_t routing_map_workspace_bytes(int64_t num_tokens, int64_t num_experts) {
  const int64_t n = std::max<int64_t>(1, ceil_div(num_tokens, kChunkTokens)) * num_experts;
  return static_cast<int64_t>(2 * align_up(n * sizeof(int64_t)) + routing_scan_bytes(n));
}

void routing_map_to_indices(const uint8_t* routing_map, int64_t num_tokens, int64_t num_experts,
                            int64_t capacity, int64_t* sorted_indices, void* workspace,
                            int64_t workspace_bytes, void* stream) {
  check(num_tokens >= 0 && num_experts >= 1, "routing map needs tokens >= 0 and experts >= 1");
  check(capacity <= num_tokens, "capacity exceeds the number of tokens: nothing to pad with");
  const int64_t chunks = std::max<int64_t>(1, ceil_div(num_tokens, kChunkTokens));
  const int64_t n = chunks * num_experts;
  Workspace ws(workspace, workspace_bytes);
  int64_t* counts = ws.take<int64_t>(n);
  int64_t* starts = ws.take<int64_t>(n);
  size_t scan_bytes = routing_scan_bytes(n);
  void* scan_temp = ws.rest(scan_bytes);
  const cudaStream_t s = as_stream(stream);
  const unsigned blocks = grid_for(ceil_div(n, kThreads));
  count_routing_kernel<<<blocks, kThreads, 0, s>>>(routing_map, num_tokens, num_experts, chunks,
                                                   counts);
  check_cuda(cudaGetLastError(), "count_routing_kernel");
  check_cuda(cub::DeviceScan::ExclusiveSum(scan_temp, scan_bytes, counts, starts, n, s), "scan");
  fill_routing_kernel<<<blocks, kThreads, 0, s>>>(routing_map, num_tokens, num_experts, chunks,
                                                  counts, starts, capacity, sorted_indices);
  check_cuda(cudaGetLastError(), "fill_routing_kernel");
}

int64_t token_csr_workspace_bytes(int64_t num_rows, int64_t num_tokens) {
  return static_cast<int64_t>(2 * align_up(std::max<int64_t>(num_rows, 1) * sizeof(int64_t)) +
                              radix_sort_bytes(num_rows, end_bit_for(num_tokens)));
}

void token_csr(const int64_t* sorted_indices, int64_t num_rows, int64_t num_tokens,
               int64_t* offsets, int64_t* slots, void* workspace, int64_t workspace_bytes,
               void* stream) {
  check(num_rows >= 0 && num_tokens >= 0, "token_csr needs rows >= 0 and tokens >= 0");
  Workspace ws(workspace, workspace_bytes);
  int64_t* keys = ws.take<int64_t>(std::max<int64_t>(num_rows, 1));
  int64_t* rows = ws.take<int64_t>(std::max<int64_t>(num_rows, 1));
  const int end_bit = end_bit_for(num_tokens);
  size_t sort_bytes = radix_sort_bytes(num_rows, end_bit);
  void* sort_temp = ws.rest(sort_bytes);
  const cudaStream_t s = as_stream(stream);
  if (num_rows > 0) {
    iota_kernel<<<grid_for(ceil_div(num_rows, kThreads)), kThreads, 0, s>>>(num_rows, rows);
    check_cuda(cudaGetLastError(), "iota_kernel");
    // Radix sort is stable: a token's rows keep ascending row order.
    check_cuda(cub::DeviceRadixSort::SortPairs(sort_temp, sort_bytes, sorted_indices, keys, rows,
                                               slots, num_rows, 0, end_bit, s),
               "radix sort");
  }
  offsets_kernel<<<grid_for(ceil_div(num_tokens + 1, kThreads)), kThreads, 0, s>>>(
      keys, num_rows, num_tokens, offsets);
  check_cuda(cudaGetLastError(), "offsets_kernel");
}

void scatter_rows(DType dtype, const void* src, int64_t num_tokens, const int64_t* offsets,
                  const int64_t* slots, const void* weights, int64_t hidden, void* dst,
                  int64_t dst_rows, void* stream) {
  if (num_tokens == 0 || hidden == 0) return;
  for_rows(dtype, hidden, {src, dst}, [&](auto tag, auto vec, int threads) {
    using T = decltype(tag);
    with_flag(weights != nullptr, [&](auto weighted) {
      scatter_rows_kernel<T, decltype(vec)::value, decltype(weighted)::value>
          <<<grid_for(num_tokens), threads, 0, as_stream(stream)>>>(
              static_cast<const T*>(src), num_tokens, offsets, slots, acc_ptr<T>(weights), hidden,
              static_cast<T*>(dst), dst_rows);
    });
    check_cuda(cudaGetLastError(), "scatter_rows_kernel");
  });
}

void segment_sum_rows(DType dtype, const void* src, int64_t src_rows, const int64_t* offsets,
                      const int64_t* slots, const void* weights, int64_t num_tokens,
                      int64_t hidden, void* dst, void* stream) {
  if (num_tokens == 0 || hidden == 0) return;
  for_rows(dtype, hidden, {src, dst}, [&](auto tag, auto vec, int threads) {
    using T = decltype(tag);
    with_flag(weights != nullptr, [&](auto weighted) {
      segment_sum_kernel<T, decltype(vec)::value, decltype(weighted)::value>
          <<<grid_for(num_tokens), threads, 0, as_stream(stream)>>>(
              static_cast<const T*>(src), src_rows, offsets, slots, acc_ptr<T>(weights),
              num_tokens, hidden, static_cast<T*>(dst));
    });
    check_cuda(cudaGetLastError(), "segment_sum_kernel");
  });
}

void scatter_rows_and_dot(DType dtype, const void* grad_out, int64_t num_tokens,
                          const int64_t* offsets, const int64_t* slots, const void* weights,
                          const void* rows, int64_t num_rows, int64_t hidden, void* grad_rows,
                          void* grad_weights, void* stream) {
  if (num_tokens == 0) return;
  // threads_for gives whole warps, at most kThreads: what block_sum assumes.
  for_rows(dtype, hidden, {grad_out, rows, grad_rows}, [&](auto tag, auto vec, int threads) {
    using T = decltype(tag);
    with_flag(grad_rows != nullptr, [&](auto write_rows) {
      scatter_dot_kernel<T, decltype(vec)::value, decltype(write_rows)::value>
          <<<grid_for(num_tokens), threads, 0, as_stream(stream)>>>(
              static_cast<const T*>(grad_out), num_tokens, offsets, slots, acc_ptr<T>(weights),
              static_cast<const T*>(rows), num_rows, hidden, static_cast<T*>(grad_rows),
              static_cast<typename Element<T>::Acc*>(grad_weights));
    });
    check_cuda(cudaGetLastError(), "scatter_dot_kernel");
  });
}

}  // namespace cuda
}  // namespace pathmoe
