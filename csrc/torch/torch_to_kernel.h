// Tensors into the torch-free kernel layer: its element and index types, the accumulation dtype,
// optional and unneeded tensors, and the CPU row layout.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <optional>

#include "../kernels/common.h"
#include "arg_errors.h"

namespace mhr_ops {

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

// The dtype every op computes and accumulates in: fp32, fp64 for fp64 (kernels/common.h,
// accumulation_dtype, is the kernel layer's side of the same rule).
inline at::ScalarType accumulation_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// An optional tensor argument (schema `Tensor?`) that was given: present and defined.
inline bool is_present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// A given optional tensor in `dtype`; an undefined tensor when absent.
inline at::Tensor optional_to(const std::optional<at::Tensor>& t, at::ScalarType dtype) {
  return is_present(t) ? t->to(dtype) : at::Tensor();
}

// A kernel's pointer to an optional operand: null when the tensor is undefined.
inline void* data_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

// A gradient as a backward op returns it: `grad` (computed in the accumulation dtype, maybe
// flattened) in `like`'s dtype and shape, or an empty tensor where the output mask skipped it.
inline at::Tensor grad_or_empty(const at::Tensor& grad, const at::Tensor& like) {
  return grad.defined() ? grad.to(like.scalar_type()).view(like.sizes()) : at::empty({0}, like.options());
}

// A [rows, cols] CPU operand in a layout every path takes as it is: unit column stride and rows
// that do not overlap (padded rows stay, a transposed or broadcast operand is copied). The
// kernel choice and the summation order then depend on the values alone, not on how the caller
// laid them out: autograd hands the backward an expanded grad_y for `y.sum()` where AOT dispatch
// hands it a contiguous one, and both must give the same bits (determinism contract).
inline at::Tensor rows_layout(const at::Tensor& t) {
  const bool ok = t.dim() == 2 && (t.size(1) <= 1 || t.stride(1) == 1) && (t.size(0) <= 1 || t.stride(0) >= t.size(1));
  return ok ? t : t.contiguous();
}

// torch.finfo(dtype).eps and .tiny, as torch.distributions uses them.
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
