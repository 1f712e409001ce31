// pybind11 bindings of the raw-pointer ops. Pointers arrive as integers (tensor.data_ptr(),
// 0 for "none"); the Python layer (megatron_pathmoe/ops/_kernels.py) owns allocation,
// validation and the choice of threads/stream. The GIL is released while a kernel runs.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "permute.h"

#ifndef PATHMOE_OPS_CUDA_ARCHS
#define PATHMOE_OPS_CUDA_ARCHS "unknown"
#endif

#ifndef PATHMOE_OPS_BUILD_HASH
#define PATHMOE_OPS_BUILD_HASH "unknown"
#endif

// The build label, findable in the file without loading it (megatron_pathmoe/ops/_build.py
// file_build_hash): a stale module is never loaded next to a current one.
extern "C" __attribute__((used, visibility("default"))) const char pathmoe_ops_build_label[] =
    "pathmoe-ops-build:" PATHMOE_OPS_BUILD_HASH;

namespace py = pybind11;

namespace {

using Ptr = std::uintptr_t;

template <typename T>
T* as(Ptr p) {
  return reinterpret_cast<T*>(p);
}

pathmoe::DType dtype_of(int code) { return static_cast<pathmoe::DType>(code); }

// The row kernels of one backend; Tail is the trailing argument (CPU threads, CUDA stream).
struct CpuRows {
  using Tail = int;
  static int tail(int threads) { return threads; }
  static constexpr auto scatter_rows = &pathmoe::cpu::scatter_rows;
  static constexpr auto segment_sum_rows = &pathmoe::cpu::segment_sum_rows;
  static constexpr auto scatter_rows_and_dot = &pathmoe::cpu::scatter_rows_and_dot;
};

#ifdef PATHMOE_WITH_CUDA
struct CudaRows {
  using Tail = Ptr;
  static void* tail(Ptr stream) { return as<void>(stream); }
  static constexpr auto scatter_rows = &pathmoe::cuda::scatter_rows;
  static constexpr auto segment_sum_rows = &pathmoe::cuda::segment_sum_rows;
  static constexpr auto scatter_rows_and_dot = &pathmoe::cuda::scatter_rows_and_dot;
};
#endif

template <typename Rows>
void bind_rows(py::module_& m) {
  using Tail = typename Rows::Tail;
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def(
      "scatter_rows",
      [](int dtype, Ptr src, int64_t tokens, Ptr offsets, Ptr slots, Ptr weights, int64_t hidden,
         Ptr dst, int64_t dst_rows, Tail tail) {
        Rows::scatter_rows(dtype_of(dtype), as<const void>(src), tokens,
                           as<const int64_t>(offsets), as<const int64_t>(slots),
                           as<const void>(weights), hidden, as<void>(dst), dst_rows,
                           Rows::tail(tail));
      },
      nogil);
  m.def(
      "segment_sum_rows",
      [](int dtype, Ptr src, int64_t src_rows, Ptr offsets, Ptr slots, Ptr weights,
         int64_t tokens, int64_t hidden, Ptr dst, Tail tail) {
        Rows::segment_sum_rows(dtype_of(dtype), as<const void>(src), src_rows,
                               as<const int64_t>(offsets), as<const int64_t>(slots),
                               as<const void>(weights), tokens, hidden, as<void>(dst),
                               Rows::tail(tail));
      },
      nogil);
  m.def(
      "scatter_rows_and_dot",
      [](int dtype, Ptr grad_out, int64_t tokens, Ptr offsets, Ptr slots, Ptr weights, Ptr rows,
         int64_t num_rows, int64_t hidden, Ptr grad_rows, Ptr grad_weights, Tail tail) {
        Rows::scatter_rows_and_dot(dtype_of(dtype), as<const void>(grad_out), tokens,
                                   as<const int64_t>(offsets), as<const int64_t>(slots),
                                   as<const void>(weights), as<const void>(rows), num_rows,
                                   hidden, as<void>(grad_rows), as<void>(grad_weights),
                                   Rows::tail(tail));
      },
      nogil);
}

void bind_cpu(py::module_& m) {
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def(
      "routing_map_to_indices",
      [](Ptr map, int64_t tokens, int64_t experts, int64_t capacity, Ptr out, int threads) {
        pathmoe::cpu::routing_map_to_indices(as<const uint8_t>(map), tokens, experts, capacity,
                                             as<int64_t>(out), threads);
      },
      nogil);
  m.def(
      "token_csr",
      [](Ptr indices, int64_t rows, int64_t tokens, Ptr offsets, Ptr slots, int threads) {
        pathmoe::cpu::token_csr(as<const int64_t>(indices), rows, tokens, as<int64_t>(offsets),
                                as<int64_t>(slots), threads);
      },
      nogil);
  m.def("isa", &pathmoe::cpu::row_kernels_isa, "instruction set of the row kernels in use");
  bind_rows<CpuRows>(m);
}

#ifdef PATHMOE_WITH_CUDA
void bind_cuda(py::module_& m) {
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("routing_map_workspace_bytes", &pathmoe::cuda::routing_map_workspace_bytes);
  m.def("token_csr_workspace_bytes", &pathmoe::cuda::token_csr_workspace_bytes);
  m.def(
      "routing_map_to_indices",
      [](Ptr map, int64_t tokens, int64_t experts, int64_t capacity, Ptr out, Ptr workspace,
         int64_t workspace_bytes, Ptr stream) {
        pathmoe::cuda::routing_map_to_indices(as<const uint8_t>(map), tokens, experts, capacity,
                                              as<int64_t>(out), as<void>(workspace),
                                              workspace_bytes, as<void>(stream));
      },
      nogil);
  m.def(
      "token_csr",
      [](Ptr indices, int64_t rows, int64_t tokens, Ptr offsets, Ptr slots, Ptr workspace,
         int64_t workspace_bytes, Ptr stream) {
        pathmoe::cuda::token_csr(as<const int64_t>(indices), rows, tokens, as<int64_t>(offsets),
                                 as<int64_t>(slots), as<void>(workspace), workspace_bytes,
                                 as<void>(stream));
      },
      nogil);
  bind_rows<CudaRows>(m);
}
#endif  // PATHMOE_WITH_CUDA

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "megatron-pathmoe token-permutation kernels (see csrc/permute.h)";
  m.attr("build_hash") = PATHMOE_OPS_BUILD_HASH;
  auto cpu = m.def_submodule("cpu", "OpenMP kernels");
  bind_cpu(cpu);
#ifdef PATHMOE_WITH_CUDA
  m.attr("has_cuda") = true;
  // What TORCH_CUDA_ARCH_LIST built, e.g. "80;90+PTX" (checked against the GPU at load).
  m.attr("cuda_archs") = PATHMOE_OPS_CUDA_ARCHS;
  auto cuda = m.def_submodule("cuda", "CUDA kernels (architectures: see cuda_archs)");
  bind_cuda(cuda);
#else
  m.attr("has_cuda") = false;
  m.attr("cuda_archs") = "";
#endif
}
