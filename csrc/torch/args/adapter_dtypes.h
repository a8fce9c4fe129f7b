// The adapters' dtype rule of routed_lora, mhr_linear and moe_lora, in one place: A in x's dtype,
// or fp32 with fp16 / bf16 x (PEFT's default keeps adapters in fp32 under half activations); B in
// A's dtype. Failures raise ValueError in Python, in the Python layer's words.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "../torch_to_kernel.h"

namespace mhr_ops {

inline void check_adapter_dtypes(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B) {
  const bool half_x = x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16;
  TORCH_CHECK_VALUE(A.scalar_type() == x.scalar_type() || (half_x && A.scalar_type() == at::kFloat),
                    "A: expected dtype ", py_dtype(x.scalar_type()), (half_x ? " or torch.float32" : ""),
                    " for x of dtype ", py_dtype(x.scalar_type()), ", got ", py_dtype(A.scalar_type()));
  TORCH_CHECK_VALUE(B.scalar_type() == A.scalar_type(), "B: expected dtype ", py_dtype(A.scalar_type()),
                    " (A's dtype), got ", py_dtype(B.scalar_type()));
}

}  // namespace mhr_ops
