// CPU token-permutation ops: OpenMP over rows/tokens, inner loops over the hidden dimension
// written so that the compiler vectorises them (contiguous, no aliasing, no branches).
#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "cpu_dtypes.h"
#include "permute.h"

namespace pathmoe {
namespace cpu {
namespace {

// Row kernels below this many elements are not worth waking the thread team for.
constexpr int64_t kParallelElements = 1 << 15;
// Index construction is a cheap pass over bytes/ints: parallel only when it is large.
constexpr int64_t kParallelIndexWork = 1 << 20;
// Outputs from this size on are advised to use transparent huge pages (see advise_huge_pages).
constexpr int64_t kHugePageMinBytes = int64_t{8} << 20;
// Hidden-dimension tile of the fp32 accumulators in segment_sum_rows (fits in L1).
constexpr int64_t kTile = 512;
// Independent partial sums in the dot product (lets the compiler vectorise it in order).
constexpr int kLanes = 16;

void check(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument("pathmoe ops: " + message);
}

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

// Parallelism that does not fail on out-of-range indices: loops record the first bad index.
struct BadIndex {
  int64_t value = 0;
  bool seen = false;
  void record(int64_t v) {
#pragma omp critical(pathmoe_bad_index)
    if (!seen) {
      seen = true;
      value = v;
    }
  }
  void raise_if_seen(const char* what, int64_t limit) const {
    check(!seen, std::string(what) + " index " + std::to_string(value) + " outside [0, " +
                     std::to_string(limit) + ")");
  }
};

// A large fresh output (torch.empty -> mmap) is first touched by the kernel, and with 4 KiB
// pages its page faults cost more than the copy itself (measured: 1.8 vs 9.6 GB/s for a
// 400 MB gather). Advising huge pages before the first write cuts the faults 512-fold. Only
// advice: memory that is already mapped or a kernel without THP is unaffected.
void advise_huge_pages(void* data, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  if (bytes < kHugePageMinBytes) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

template <typename T>
void gather_impl(const T* src, int64_t src_rows, const int64_t* index,
                 const typename Element<T>::Acc* weights, int64_t num_rows, int64_t hidden,
                 T* dst, int num_threads) {
  using E = Element<T>;
  BadIndex bad;
  advise_huge_pages(dst, num_rows * hidden * static_cast<int64_t>(sizeof(T)));
#pragma omp parallel for num_threads(num_threads) schedule(static) \
    if (num_rows * hidden > kParallelElements)
  for (int64_t j = 0; j < num_rows; ++j) {
    const int64_t t = index[j];
    T* __restrict d = dst + j * hidden;
    if (t < 0 || t >= src_rows) {
      bad.record(t);
      continue;
    }
    const T* __restrict s = src + t * hidden;
    if (weights == nullptr) {
      std::memcpy(d, s, sizeof(T) * hidden);
    } else {
      const auto w = weights[j];
      for (int64_t h = 0; h < hidden; ++h) d[h] = E::store(E::load(s[h]) * w);
    }
  }
  bad.raise_if_seen("gather_rows:", src_rows);
}

template <typename T, bool kWeighted>
void segment_sum_impl(const T* src, int64_t src_rows, const int64_t* offsets,
                      const int64_t* slots, const typename Element<T>::Acc* weights,
                      int64_t num_tokens, int64_t hidden, T* dst, int num_threads) {
  using E = Element<T>;
  using Acc = typename E::Acc;
  BadIndex bad;
  advise_huge_pages(dst, num_tokens * hidden * static_cast<int64_t>(sizeof(T)));
#pragma omp parallel for num_threads(num_threads) schedule(static) \
    if (num_tokens * hidden > kParallelElements)
  for (int64_t t = 0; t < num_tokens; ++t) {
    const int64_t first = offsets[t], last = offsets[t + 1];
    bool ok = true;
    for (int64_t r = first; r < last; ++r) {
      if (slots[r] < 0 || slots[r] >= src_rows) {
        bad.record(slots[r]);
        ok = false;
      }
    }
    if (!ok) continue;
    T* __restrict d = dst + t * hidden;
    for (int64_t h0 = 0; h0 < hidden; h0 += kTile) {
      const int64_t n = std::min(kTile, hidden - h0);
      Acc acc[kTile];
      for (int64_t i = 0; i < n; ++i) acc[i] = Acc(0);
      for (int64_t r = first; r < last; ++r) {
        const T* __restrict s = src + slots[r] * hidden + h0;
        if (kWeighted) {
          const Acc w = weights[slots[r]];
          for (int64_t i = 0; i < n; ++i) acc[i] += E::load(s[i]) * w;
        } else {
          for (int64_t i = 0; i < n; ++i) acc[i] += E::load(s[i]);
        }
      }
      for (int64_t i = 0; i < n; ++i) d[h0 + i] = E::store(acc[i]);
    }
  }
  bad.raise_if_seen("segment_sum_rows: slot", src_rows);
}

template <typename T, bool kWriteRows>
void gather_dot_impl(const T* grad_out, int64_t grad_out_rows, const int64_t* index,
                     const typename Element<T>::Acc* weights, const T* rows, int64_t num_rows,
                     int64_t hidden, T* grad_rows, typename Element<T>::Acc* grad_weights,
                     int num_threads) {
  using E = Element<T>;
  using Acc = typename E::Acc;
  BadIndex bad;
  const int64_t full = hidden - hidden % kLanes;
  if (kWriteRows) advise_huge_pages(grad_rows, num_rows * hidden * static_cast<int64_t>(sizeof(T)));
#pragma omp parallel for num_threads(num_threads) schedule(static) \
    if (num_rows * hidden > kParallelElements)
  for (int64_t j = 0; j < num_rows; ++j) {
    const int64_t t = index[j];
    if (t < 0 || t >= grad_out_rows) {
      bad.record(t);
      continue;
    }
    const T* __restrict g = grad_out + t * hidden;
    const T* __restrict y = rows + j * hidden;
    T* __restrict gy = kWriteRows ? grad_rows + j * hidden : nullptr;
    const Acc w = weights[j];
    Acc lanes[kLanes] = {};
    for (int64_t h = 0; h < full; h += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        const Acc gv = E::load(g[h + l]);
        if (kWriteRows) gy[h + l] = E::store(gv * w);
        lanes[l] += gv * E::load(y[h + l]);
      }
    }
    for (int64_t h = full; h < hidden; ++h) {
      const Acc gv = E::load(g[h]);
      if (kWriteRows) gy[h] = E::store(gv * w);
      lanes[h - full] += gv * E::load(y[h]);
    }
    for (int width = kLanes / 2; width > 0; width /= 2)
      for (int l = 0; l < width; ++l) lanes[l] += lanes[l + width];
    grad_weights[j] = lanes[0];
  }
  bad.raise_if_seen("gather_rows_and_dot:", grad_out_rows);
}

template <typename T>
const typename Element<T>::Acc* acc_ptr(const void* p) {
  return static_cast<const typename Element<T>::Acc*>(p);
}

}  // namespace

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

void gather_rows(DType dtype, const void* src, int64_t src_rows, const int64_t* index,
                 const void* weights, int64_t num_rows, int64_t hidden, void* dst,
                 int num_threads) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    gather_impl(static_cast<const T*>(src), src_rows, index, acc_ptr<T>(weights), num_rows,
                hidden, static_cast<T*>(dst), num_threads);
  });
}

void segment_sum_rows(DType dtype, const void* src, int64_t src_rows, const int64_t* offsets,
                      const int64_t* slots, const void* weights, int64_t num_tokens,
                      int64_t hidden, void* dst, int num_threads) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const auto* s = static_cast<const T*>(src);
    auto* d = static_cast<T*>(dst);
    if (weights != nullptr)
      segment_sum_impl<T, true>(s, src_rows, offsets, slots, acc_ptr<T>(weights), num_tokens,
                                hidden, d, num_threads);
    else
      segment_sum_impl<T, false>(s, src_rows, offsets, slots, nullptr, num_tokens, hidden, d,
                                 num_threads);
  });
}

void gather_rows_and_dot(DType dtype, const void* grad_out, int64_t grad_out_rows,
                         const int64_t* index, const void* weights, const void* rows,
                         int64_t num_rows, int64_t hidden, void* grad_rows, void* grad_weights,
                         int num_threads) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    using Acc = typename Element<T>::Acc;
    const auto* g = static_cast<const T*>(grad_out);
    const auto* y = static_cast<const T*>(rows);
    auto* gw = static_cast<Acc*>(grad_weights);
    if (grad_rows != nullptr)
      gather_dot_impl<T, true>(g, grad_out_rows, index, acc_ptr<T>(weights), y, num_rows, hidden,
                               static_cast<T*>(grad_rows), gw, num_threads);
    else
      gather_dot_impl<T, false>(g, grad_out_rows, index, acc_ptr<T>(weights), y, num_rows,
                                hidden, nullptr, gw, num_threads);
  });
}

}  // namespace cpu
}  // namespace pathmoe
