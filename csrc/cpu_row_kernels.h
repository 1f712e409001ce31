// CPU row kernels (scatter, segment sum, scatter + dot) as templates with internal linkage.
//
// Included by permute_cpu.cpp (baseline ISA) and permute_cpu_avx2.cpp (compiled with AVX2):
// each translation unit gets its own copy, compiled for its instruction set, and hands it out as
// a RowKernels table; permute_cpu.cpp picks one at run time. All variants compute the same
// sums in the same order, so results are bitwise identical whatever the CPU.
//
// Every kernel is token-major over the token CSR: each input row is read once, each output
// row written once (the byte model of benchmarks/permute_bench.py). Sums run over a token's rows
// in ascending row order in the accumulation type, 16 columns at a time so the partial sums stay
// in registers.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "cpu_common.h"
#include "cpu_dtypes.h"
#include "cpu_vec.h"
#include "permute.h"

namespace pathmoe {
namespace cpu {

// The row entry points of one instruction-set variant (signatures of permute.h).
struct RowKernels {
  decltype(&scatter_rows) scatter;
  decltype(&segment_sum_rows) segment_sum;
  decltype(&scatter_rows_and_dot) scatter_and_dot;
};

RowKernels baseline_row_kernels();
#if defined(__x86_64__)
RowKernels avx2_row_kernels();
#endif

namespace {

// Loops below this many elements are not worth waking the thread team for.
constexpr int64_t kParallelElements = 1 << 15;
// Outputs from this size on (well beyond the caches) get huge-page advice and streaming stores.
constexpr int64_t kLargeOutputBytes = int64_t{8} << 20;
// Columns staged per output write (the accumulators of a block live in registers).
constexpr int64_t kTile = 512;
// Columns summed together: two vectors of 8 partial sums stay in registers across the rows.
constexpr int kBlock = 2 * kVec;

// A large fresh output (torch.empty -> mmap) is first touched by the kernel; with 4 KiB pages
// its page faults can cost more than the copy itself. Advising huge pages before the first write
// cuts the faults 512-fold. Only advice: memory that is already mapped, or a kernel without
// transparent huge pages, is unaffected.
inline void advise_huge_pages(void* data, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

// Huge-page advice for a large output; true if its rows should be written with streaming stores.
inline bool prepare_output(void* data, int64_t bytes) {
  if (bytes < kLargeOutputBytes) return false;
  advise_huge_pages(data, bytes);
  return true;
}

// Copies n elements to dst. With `stream`, non-temporal stores (x86): for outputs far larger
// than the caches they skip the read-for-ownership of every destination line (measured on the
// dev machine: 30 vs 19 GB/s scattering 5 KiB rows). parallel_for fences them.
template <typename T>
inline void write_row(T* __restrict dst, const T* __restrict src, int64_t n, bool stream) {
  const int64_t bytes = n * static_cast<int64_t>(sizeof(T));
#if defined(__SSE2__)
  if (stream) {
    char* d = reinterpret_cast<char*>(dst);
    const char* s = reinterpret_cast<const char*>(src);
    const int64_t head =
        std::min<int64_t>(bytes, (16 - reinterpret_cast<uintptr_t>(d) % 16) % 16);
    std::memcpy(d, s, head);
    int64_t i = head;
    for (; i + 16 <= bytes; i += 16)
      _mm_stream_si128(reinterpret_cast<__m128i*>(d + i),
                       _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i)));
    std::memcpy(d + i, s + i, bytes - i);
    return;
  }
#endif
  std::memcpy(dst, src, bytes);
}

// body(i) for i in [0, n) on the thread team; every thread fences its streaming stores.
template <typename Body>
void parallel_for(int64_t n, int num_threads, bool parallel, Body&& body) {
#pragma omp parallel num_threads(num_threads) if (parallel)
  {
#pragma omp for schedule(static) nowait
    for (int64_t i = 0; i < n; ++i) body(i);
#if defined(__SSE2__)
    _mm_sfence();
#endif
  }
}

// Checks the slots of one token; false (and the bad slot recorded) if any is out of range.
inline bool slots_in_range(const int64_t* slots, int64_t first, int64_t last, int64_t rows,
                           BadIndex& bad) {
  bool ok = true;
  for (int64_t r = first; r < last; ++r) {
    if (slots[r] < 0 || slots[r] >= rows) {
      bad.record(slots[r]);
      ok = false;
    }
  }
  return ok;
}

template <typename T>
using AccOf = typename Element<T>::Acc;

// out[i] = sum over the rows slots[0..count) of base[slot][i] (* weights[slot]), i < n.
template <typename T, bool kWeighted>
PATHMOE_INLINE void sum_rows(const T* base, const int64_t* slots, int64_t count,
                     const AccOf<T>* weights, int64_t hidden, int64_t n, T* out) {
  using E = Element<T>;
  using Acc = AccOf<T>;
  using B = Block16<T>;
  const int64_t full = n - n % kBlock;
  for (int64_t i = 0; i < full; i += kBlock) {
    typename B::V low = {}, high = {};
    for (int64_t r = 0; r < count; ++r) {
      typename B::V row_low, row_high;
      B::load(base + slots[r] * hidden + i, row_low, row_high);
      if constexpr (kWeighted) {
        const Acc w = weights[slots[r]];
        row_low *= w;
        row_high *= w;
      }
      low += row_low;
      high += row_high;
    }
    B::store(out + i, low, high);
  }
  for (int64_t i = full; i < n; ++i) {
    Acc acc = Acc(0);
    for (int64_t r = 0; r < count; ++r) {
      const Acc v = E::load(base[slots[r] * hidden + i]);
      if constexpr (kWeighted)
        acc += v * weights[slots[r]];
      else
        acc += v;
    }
    out[i] = E::store(acc);
  }
}

// out[i] = in[i] * w, i < n.
template <typename T>
PATHMOE_INLINE void scale_row(const T* in, AccOf<T> w, int64_t n, T* out) {
  using E = Element<T>;
  using B = Block16<T>;
  const int64_t full = n - n % kBlock;
  for (int64_t i = 0; i < full; i += kBlock) {
    typename B::V low, high;
    B::load(in + i, low, high);
    B::store(out + i, low * w, high * w);
  }
  for (int64_t i = full; i < n; ++i) out[i] = E::store(E::load(in[i]) * w);
}

// Partial sums of <g, y> in kBlock lanes (lane c holds the columns = c mod kBlock of the whole
// blocks, then the tail), and out = g * w when kWriteRows. The same columns meet in the same
// order in every variant: deterministic, and bitwise equal across instruction sets.
template <typename T, bool kWriteRows>
PATHMOE_INLINE void scale_and_dot(const T* g, const T* y, AccOf<T> w, int64_t n, T* out,
                          AccOf<T>* lanes) {
  using E = Element<T>;
  using B = Block16<T>;
  const int64_t full = n - n % kBlock;
  typename B::V low = {}, high = {};
  for (int64_t i = 0; i < full; i += kBlock) {
    typename B::V g_low, g_high, y_low, y_high;
    B::load(g + i, g_low, g_high);
    B::load(y + i, y_low, y_high);
    if constexpr (kWriteRows) B::store(out + i, g_low * w, g_high * w);
    low += g_low * y_low;
    high += g_high * y_high;
  }
  for (int l = 0; l < kVec; ++l) {
    lanes[B::column(false, l)] += low[l];
    lanes[B::column(true, l)] += high[l];
  }
  for (int64_t i = full; i < n; ++i) {
    const AccOf<T> gv = E::load(g[i]);
    if constexpr (kWriteRows) out[i] = E::store(gv * w);
    lanes[i - full] += gv * E::load(y[i]);
  }
}

template <typename T, bool kWeighted>
void scatter_impl(const T* src, int64_t num_tokens, const int64_t* offsets, const int64_t* slots,
                  const AccOf<T>* weights, int64_t hidden, T* dst, int64_t dst_rows,
                  int num_threads) {
  BadIndex bad;
  const bool stream = prepare_output(dst, dst_rows * hidden * static_cast<int64_t>(sizeof(T)));
  parallel_for(num_tokens, num_threads, num_tokens * hidden > kParallelElements, [&](int64_t t) {
    if (!slots_in_range(slots, offsets[t], offsets[t + 1], dst_rows, bad)) return;
    const T* __restrict s = src + t * hidden;
    for (int64_t r = offsets[t]; r < offsets[t + 1]; ++r) {
      T* d = dst + slots[r] * hidden;
      if constexpr (!kWeighted) {
        write_row(d, s, hidden, stream);
      } else {
        for (int64_t h0 = 0; h0 < hidden; h0 += kTile) {
          const int64_t n = std::min(kTile, hidden - h0);
          T tile[kTile];
          scale_row(s + h0, weights[slots[r]], n, tile);
          write_row(d + h0, tile, n, stream);
        }
      }
    }
  });
  bad.raise_if_seen("scatter_rows: slot", dst_rows);
}

template <typename T, bool kWeighted>
void segment_sum_impl(const T* src, int64_t src_rows, const int64_t* offsets,
                      const int64_t* slots, const AccOf<T>* weights, int64_t num_tokens,
                      int64_t hidden, T* dst, int num_threads) {
  BadIndex bad;
  const bool stream = prepare_output(dst, num_tokens * hidden * static_cast<int64_t>(sizeof(T)));
  parallel_for(num_tokens, num_threads, num_tokens * hidden > kParallelElements, [&](int64_t t) {
    const int64_t first = offsets[t], last = offsets[t + 1];
    if (!slots_in_range(slots, first, last, src_rows, bad)) return;
    for (int64_t h0 = 0; h0 < hidden; h0 += kTile) {
      const int64_t n = std::min(kTile, hidden - h0);
      T tile[kTile];
      sum_rows<T, kWeighted>(src + h0, slots + first, last - first, weights, hidden, n, tile);
      write_row(dst + t * hidden + h0, tile, n, stream);
    }
  });
  bad.raise_if_seen("segment_sum_rows: slot", src_rows);
}

template <typename T, bool kWriteRows>
void scatter_dot_impl(const T* grad_out, int64_t num_tokens, const int64_t* offsets,
                      const int64_t* slots, const AccOf<T>* weights, const T* rows,
                      int64_t num_rows, int64_t hidden, T* grad_rows, AccOf<T>* grad_weights,
                      int num_threads) {
  using Acc = AccOf<T>;
  static_assert(kTile % kBlock == 0, "a tile holds whole blocks");
  BadIndex bad;
  const bool stream =
      kWriteRows && prepare_output(grad_rows, num_rows * hidden * static_cast<int64_t>(sizeof(T)));
  parallel_for(num_tokens, num_threads, num_tokens * hidden > kParallelElements, [&](int64_t t) {
    if (!slots_in_range(slots, offsets[t], offsets[t + 1], num_rows, bad)) return;
    const T* g = grad_out + t * hidden;
    for (int64_t r = offsets[t]; r < offsets[t + 1]; ++r) {
      const int64_t j = slots[r];
      Acc lanes[kBlock] = {};
      for (int64_t h0 = 0; h0 < hidden; h0 += kTile) {
        const int64_t n = std::min(kTile, hidden - h0);
        T tile[kTile];
        scale_and_dot<T, kWriteRows>(g + h0, rows + j * hidden + h0, weights[j], n, tile, lanes);
        if constexpr (kWriteRows) write_row(grad_rows + j * hidden + h0, tile, n, stream);
      }
      for (int width = kBlock / 2; width > 0; width /= 2)
        for (int l = 0; l < width; ++l) lanes[l] += lanes[l + width];
      grad_weights[j] = lanes[0];
    }
  });
  bad.raise_if_seen("scatter_rows_and_dot: slot", num_rows);
}

template <typename T>
const AccOf<T>* acc_ptr(const void* p) {
  return static_cast<const AccOf<T>*>(p);
}

void scatter_entry(DType dtype, const void* src, int64_t num_tokens, const int64_t* offsets,
                   const int64_t* slots, const void* weights, int64_t hidden, void* dst,
                   int64_t dst_rows, int num_threads) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    with_flag(weights != nullptr, [&](auto weighted) {
      scatter_impl<T, decltype(weighted)::value>(static_cast<const T*>(src), num_tokens, offsets,
                                                 slots, acc_ptr<T>(weights), hidden,
                                                 static_cast<T*>(dst), dst_rows, num_threads);
    });
  });
}

void segment_sum_entry(DType dtype, const void* src, int64_t src_rows, const int64_t* offsets,
                       const int64_t* slots, const void* weights, int64_t num_tokens,
                       int64_t hidden, void* dst, int num_threads) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    with_flag(weights != nullptr, [&](auto weighted) {
      segment_sum_impl<T, decltype(weighted)::value>(
          static_cast<const T*>(src), src_rows, offsets, slots, acc_ptr<T>(weights), num_tokens,
          hidden, static_cast<T*>(dst), num_threads);
    });
  });
}

void scatter_and_dot_entry(DType dtype, const void* grad_out, int64_t num_tokens,
                           const int64_t* offsets, const int64_t* slots, const void* weights,
                           const void* rows, int64_t num_rows, int64_t hidden, void* grad_rows,
                           void* grad_weights, int num_threads) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    with_flag(grad_rows != nullptr, [&](auto write_rows) {
      scatter_dot_impl<T, decltype(write_rows)::value>(
          static_cast<const T*>(grad_out), num_tokens, offsets, slots, acc_ptr<T>(weights),
          static_cast<const T*>(rows), num_rows, hidden, static_cast<T*>(grad_rows),
          static_cast<AccOf<T>*>(grad_weights), num_threads);
    });
  });
}

// This translation unit's variant.
RowKernels make_row_kernels() { return {&scatter_entry, &segment_sum_entry, &scatter_and_dot_entry}; }

}  // namespace
}  // namespace cpu
}  // namespace pathmoe
