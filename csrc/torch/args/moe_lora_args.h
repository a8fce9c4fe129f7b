// Argument checks of moe_lora, moe_lora_add_ and moe_lora_backward (shared by every backend).
// Shape and dtype errors raise c10::ValueError / c10::TypeError (Python ValueError / TypeError),
// each naming the argument, what was expected and what came.
#pragma once

#include <ATen/core/Tensor.h>

namespace mhr_ops {

// Validated sizes of one moe_lora problem.
struct MoeDims {
  int64_t rows = 0;  // N
  int64_t d_in = 0;
  int64_t d_out = 0;
  int64_t experts = 0;  // E
  int64_t rank = 0;     // r
  int64_t top_k = 0;    // k
};

// x [N, d_in]; A [E, d_in, r]; B [E, r, d_out]; topk_weights [N, k] float; topk_ids [N, k] int32 /
// int64. Ids are not range-checked here (an out-of-range id gives a NaN row).
MoeDims check_moe_lora(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B, const at::Tensor& topk_weights,
                       const at::Tensor& topk_ids);

// out / grad_y: [N, d_out]; `dtype_of_x`: also x's dtype. On x's device.
void check_moe_rows(const at::Tensor& t, const char* arg, const at::Tensor& x, const MoeDims& d, bool dtype_of_x);

// moe_lora_add_'s out: as check_moe_rows in x's dtype, without internal overlap.
void check_moe_add_output(const at::Tensor& out, const at::Tensor& x, const MoeDims& d);

// moe_lora_backward's arguments: those of the forward, grad_y [N, d_out] on x's device, and z,
// the forward's bottleneck [N, k, r] in the compute dtype.
MoeDims check_moe_lora_backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                                const at::Tensor& topk_weights, const at::Tensor& topk_ids, const at::Tensor& z);

}  // namespace mhr_ops
