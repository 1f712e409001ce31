// The row kernels compiled for AVX2 and F16C (x86-64 only; the builder adds -mavx2 -mf16c for
// this file). permute_cpu.cpp calls them only on CPUs that support both.
#include "cpu_row_kernels.h"

#if defined(__x86_64__)
namespace pathmoe {
namespace cpu {

RowKernels avx2_row_kernels() { return make_row_kernels(); }

}  // namespace cpu
}  // namespace pathmoe
#endif
