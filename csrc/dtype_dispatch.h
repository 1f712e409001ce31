// Runtime values -> template arguments, shared by the CPU and CUDA kernels: the element type of
// a DType (each side names its own 16-bit types) and boolean flags.
#pragma once

#include <stdexcept>
#include <string>
#include <type_traits>

#include "permute.h"

namespace pathmoe {

// Calls fn(T{}) where T is F32, F64, BF16 or F16 as dtype says; throws on an unknown code.
template <typename F32, typename F64, typename BF16, typename F16, typename Fn>
void dispatch_dtype_as(DType dtype, Fn&& fn, const char* who) {
  switch (dtype) {
    case DType::kFloat32:
      return fn(F32{});
    case DType::kFloat64:
      return fn(F64{});
    case DType::kBFloat16:
      return fn(BF16{});
    case DType::kFloat16:
      return fn(F16{});
  }
  throw std::invalid_argument(std::string(who) + ": unknown dtype code " +
                              std::to_string(static_cast<int>(dtype)));
}

// fn(std::true_type{}) or fn(std::false_type{}): a runtime flag as a template argument.
template <typename Fn>
void with_flag(bool flag, Fn&& fn) {
  if (flag)
    fn(std::true_type{});
  else
    fn(std::false_type{});
}

}  // namespace pathmoe
