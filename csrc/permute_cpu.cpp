// CPU token-permutation ops: index construction (counting sorts over token chunks) and the
// dispatch of the row kernels (cpu_row_kernels.h) to the best variant for this CPU.
#include <algorithm>
#include <cstdlib>
#include <string>
#include <vector>

#include "cpu_common.h"
#include "cpu_row_kernels.h"
#include "permute.h"

namespace pathmoe {
namespace cpu {
namespace {

// Index construction is a cheap pass over bytes/ints: parallel only when it is large.
constexpr int64_t kParallelIndexWork = 1 << 20;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Contiguous chunks of [0, n), `per_thread` per thread (more chunks balance uneven rows).
struct Chunks {
  int64_t count;
  int64_t size;
  Chunks(int64_t n, int num_threads, int per_thread)
      : count(std::max<int64_t>(1, std::min<int64_t>(n, per_thread * std::max(num_threads, 1)))),
        size(ceil_div(std::max<int64_t>(n, 1), count)) {}
  int64_t begin(int64_t c, int64_t n) const { return std::min(n, c * size); }
  int64_t end(int64_t c, int64_t n) const { return std::min(n, (c + 1) * size); }
};

// AVX2 (+F16C) doubles the width of the conversions and sums (bf16/fp16 rows are compute-bound
// with SSE2 alone); the variant is chosen once, from what this CPU supports.
// PATHMOE_OPS_ISA=baseline forces the portable variant (tests compare the two bitwise).
const RowKernels& row_kernels() {
  static const RowKernels kernels = [] {
    const char* forced = std::getenv("PATHMOE_OPS_ISA");
    if (forced != nullptr && std::string(forced) == "baseline") return baseline_row_kernels();
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c"))
      return avx2_row_kernels();
#endif
    return baseline_row_kernels();
  }();
  return kernels;
}

}  // namespace

RowKernels baseline_row_kernels() { return make_row_kernels(); }

const char* row_kernels_isa() {
#if defined(__x86_64__)
  if (row_kernels().scatter != baseline_row_kernels().scatter) return "avx2";
#endif
  return "baseline";
}

void routing_map_to_indices(const uint8_t* routing_map, int64_t num_tokens, int64_t num_experts,
                            int64_t capacity, int64_t* sorted_indices, int num_threads) {
  check(num_tokens >= 0 && num_experts >= 1, "routing map needs tokens >= 0 and experts >= 1");
  check(capacity <= num_tokens, "capacity " + std::to_string(capacity) + " exceeds the " +
                                    std::to_string(num_tokens) + " tokens: nothing to pad with");
  const int64_t T = num_tokens, E = num_experts;
  const Chunks chunks(T, num_threads, 4);
  // ranks[c][e]: tokens of expert e in chunks before c (after the scan below).
  std::vector<int64_t> ranks(chunks.count * E, 0);
#pragma omp parallel for num_threads(num_threads) schedule(static) if (T * E > kParallelIndexWork)
  for (int64_t c = 0; c < chunks.count; ++c) {
    int64_t* counts = ranks.data() + c * E;
    for (int64_t t = chunks.begin(c, T); t < chunks.end(c, T); ++t)
      for (int64_t e = 0; e < E; ++e) counts[e] += routing_map[t * E + e] != 0;
  }
  std::vector<int64_t> routed(E, 0);
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t c = 0; c < chunks.count; ++c) {
      const int64_t n = ranks[c * E + e];
      ranks[c * E + e] = routed[e];
      routed[e] += n;
    }
  }
  std::vector<int64_t> expert_start(E, 0);
  for (int64_t e = 1; e < E; ++e) expert_start[e] = expert_start[e - 1] + routed[e - 1];

#pragma omp parallel for num_threads(num_threads) schedule(static) if (T * E > kParallelIndexWork)
  for (int64_t c = 0; c < chunks.count; ++c) {
    std::vector<int64_t> rank(ranks.begin() + c * E, ranks.begin() + (c + 1) * E);
    for (int64_t t = chunks.begin(c, T); t < chunks.end(c, T); ++t) {
      const uint8_t* row = routing_map + t * E;
      for (int64_t e = 0; e < E; ++e) {
        if (capacity < 0) {
          if (row[e]) sorted_indices[expert_start[e] + rank[e]++] = t;
        } else if (row[e]) {
          const int64_t r = rank[e]++;
          if (r < capacity) sorted_indices[e * capacity + r] = t;
        } else {
          // Padding slots follow the kept routed tokens, filled by non-routed tokens in order.
          const int64_t slot = std::min(routed[e], capacity) + (t - rank[e]);
          if (slot < capacity) sorted_indices[e * capacity + slot] = t;
        }
      }
    }
  }
}

void token_csr(const int64_t* sorted_indices, int64_t num_rows, int64_t num_tokens,
               int64_t* offsets, int64_t* slots, int num_threads) {
  check(num_rows >= 0 && num_tokens >= 0, "token_csr needs rows >= 0 and tokens >= 0");
  const int64_t N = num_rows, T = num_tokens;
  // One chunk per thread: the cursors take chunks * T entries.
  const Chunks chunks(N, num_threads, 1);
  // cursor[c][t]: rows of token t in chunks before c, then (after the scan) where they go.
  std::vector<int64_t> cursor(chunks.count * T, 0);
  BadIndex bad;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (N > kParallelIndexWork)
  for (int64_t c = 0; c < chunks.count; ++c) {
    int64_t* counts = cursor.data() + c * T;
    for (int64_t j = chunks.begin(c, N); j < chunks.end(c, N); ++j) {
      const int64_t t = sorted_indices[j];
      if (t < 0 || t >= T)
        bad.record(t);
      else
        ++counts[t];
    }
  }
  bad.raise_if_seen("sorted_indices: token", T);
  offsets[0] = 0;
  for (int64_t t = 0; t < T; ++t) {
    int64_t position = offsets[t];
    for (int64_t c = 0; c < chunks.count; ++c) {
      const int64_t n = cursor[c * T + t];
      cursor[c * T + t] = position;
      position += n;
    }
    offsets[t + 1] = position;
  }
#pragma omp parallel for num_threads(num_threads) schedule(static) if (N > kParallelIndexWork)
  for (int64_t c = 0; c < chunks.count; ++c) {
    int64_t* next = cursor.data() + c * T;
    for (int64_t j = chunks.begin(c, N); j < chunks.end(c, N); ++j)
      slots[next[sorted_indices[j]]++] = j;
  }
}

void scatter_rows(DType dtype, const void* src, int64_t num_tokens, const int64_t* offsets,
                  const int64_t* slots, const void* weights, int64_t hidden, void* dst,
                  int64_t dst_rows, int num_threads) {
  row_kernels().scatter(dtype, src, num_tokens, offsets, slots, weights, hidden, dst, dst_rows,
                        num_threads);
}

void segment_sum_rows(DType dtype, const void* src, int64_t src_rows, const int64_t* offsets,
                      const int64_t* slots, const void* weights, int64_t num_tokens,
                      int64_t hidden, void* dst, int num_threads) {
  row_kernels().segment_sum(dtype, src, src_rows, offsets, slots, weights, num_tokens, hidden,
                            dst, num_threads);
}

void scatter_rows_and_dot(DType dtype, const void* grad_out, int64_t num_tokens,
                          const int64_t* offsets, const int64_t* slots, const void* weights,
                          const void* rows, int64_t num_rows, int64_t hidden, void* grad_rows,
                          void* grad_weights, int num_threads) {
  row_kernels().scatter_and_dot(dtype, grad_out, num_tokens, offsets, slots, weights, rows,
                                num_rows, hidden, grad_rows, grad_weights, num_threads);
}

}  // namespace cpu
}  // namespace pathmoe
