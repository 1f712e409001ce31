// Helpers shared by the CPU index and row kernels.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace pathmoe {
namespace cpu {
// Internal linkage: this header is compiled once per instruction set (cpu_row_kernels.h), and
// no copy built for AVX2 may be shared with the baseline code.
namespace {

inline void check(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument("pathmoe ops: " + message);
}

// Out-of-range indices inside an OpenMP loop: threads record the first one, the caller throws
// after the loop (an exception cannot leave a parallel region).
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

}  // namespace
}  // namespace cpu
}  // namespace pathmoe
