// Binding-layer helpers: map torch types onto the torch-free kernel layer's enums.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>

#include "../kernels/common.h"

namespace mhr_ops {

// How Python prints a shape, (2, 3) or (6,), and a dtype, torch.float32 or float32: the op's
// errors read as the Python layer's did when it held the checks.
inline std::string py_shape(c10::IntArrayRef sizes) {
  std::string s = "(";
  for (size_t i = 0; i < sizes.size(); ++i) s += (i ? ", " : "") + std::to_string(sizes[i]);
  return s + (sizes.size() == 1 ? ",)" : ")");
}
inline std::string dtype_name(at::ScalarType t) { return std::string(c10::getDtypeNames(t).first); }
inline std::string py_dtype(at::ScalarType t) { return "torch." + dtype_name(t); }

// The kernel layer's element type for a floating tensor; `arg` names it in the error.
inline DType kernel_dtype(const at::Tensor& t, const char* arg) {
  switch (t.scalar_type()) {
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kFloat:
      return DType::kFloat32;
    case at::kDouble:
      return DType::kFloat64;
    default:
      TORCH_CHECK_VALUE(false, arg, ": expected dtype in (float16, bfloat16, float32, float64), got ",
                        dtype_name(t.scalar_type()));
  }
}

// The kernel layer's index type for an integer tensor; `arg` names it in the error.
inline IndexType kernel_index_type(const at::Tensor& t, const char* arg) {
  TORCH_CHECK_VALUE(t.scalar_type() == at::kLong || t.scalar_type() == at::kInt, arg,
                    ": expected dtype in (int32, int64), got ", dtype_name(t.scalar_type()));
  return t.scalar_type() == at::kInt ? IndexType::kInt32 : IndexType::kInt64;
}

inline void check_same_device(const at::Tensor& t, const char* arg, const at::Tensor& ref, const char* ref_arg) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), arg, ": expected a tensor on ", ref.device(), " (the device of ",
                    ref_arg, "), got ", t.device());
}

// torch.finfo(dtype).eps and .tiny, as torch.distributions uses them.
// A [rows, cols] CPU operand in a layout every path takes as it is: unit column stride and rows
// that do not overlap (padded rows stay, a transposed or broadcast operand is copied). The
// kernel choice and the summation order then depend on the values alone, not on how the caller
// laid them out: autograd hands the backward an expanded grad_y for `y.sum()` where AOT dispatch
// hands it a contiguous one, and both must give the same bits (determinism contract).
inline at::Tensor rows_layout(const at::Tensor& t) {
  const bool ok = t.dim() == 2 && (t.size(1) <= 1 || t.stride(1) == 1) && (t.size(0) <= 1 || t.stride(0) >= t.size(1));
  return ok ? t : t.contiguous();
}

inline double finfo_eps(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return 0.0009765625;  // 2^-10
    case at::kBFloat16:
      return 0.0078125;  // 2^-7
    case at::kFloat:
      return 1.1920928955078125e-07;  // 2^-23
    default:
      return 2.220446049250313e-16;  // 2^-52
  }
}
inline double finfo_tiny(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return 6.103515625e-05;  // 2^-14
    case at::kBFloat16:
    case at::kFloat:
      return 1.1754943508222875e-38;  // 2^-126
    default:
      return 2.2250738585072014e-308;  // 2^-1022
  }
}

}  // namespace mhr_ops
