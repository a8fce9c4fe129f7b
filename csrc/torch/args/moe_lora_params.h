// Kernel parameters of moe_lora's passes from tensors, shared by the CPU and CUDA bindings: the
// tensors are already in the dtypes and layouts the backend's kernels take (rows with unit column
// stride; experts, weights and the bottleneck contiguous in the accumulation dtype).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include "../../kernels/moe_lora.h"
#include "moe_lora_args.h"

namespace mhr_ops {

MoeRouting moe_routing(const at::Tensor& topk_ids, const MoeDims& d);

// The forward rows pass over x (already in the kernels' dtype and layout) into y [N, d_out]:
// z = x @ A_e per slot into z [N, k, r], y (+)= scale * sum_j w z @ B_e. It allocates z and converts
// the experts and the weights to the compute dtype, and holds them while the kernels run.
struct MoeForwardPass {
  at::Tensor z, A, B, w;
  MoeRowsParams params;
};
MoeForwardPass moe_forward_pass(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                                const at::Tensor& topk_weights, const at::Tensor& topk_ids, const MoeDims& d,
                                double scale, at::Tensor& y, bool accumulate);

// The backward rows pass's experts, transposed and contiguous in the compute dtype: Bt
// [E, d_out, r], and At [E, r, d_in] when dx is wanted (else undefined).
struct MoeTransposedExperts {
  at::Tensor Bt, At;
};
MoeTransposedExperts moe_transposed_experts(const at::Tensor& A, const at::Tensor& B, at::ScalarType compute_type,
                                            bool need_dx);

// Backward rows pass: gz = w * scale * grad_y @ B_e^T and dw = z . (scale * grad_y @ B_e^T) per
// slot (Bt [E, d_out, r]); dx = sum_j gz @ A_e^T (At [E, r, d_in]) when dx is defined.
MoeRowsParams moe_backward_params(const MoeRouting& routing, const MoeDims& d, const at::Tensor& w,
                                  const at::Tensor& grad_y, const at::Tensor& Bt, double scale, const at::Tensor& z,
                                  at::Tensor& gz, at::Tensor& dw, const at::Tensor& At, at::Tensor& dx);

// Weight gradients dA / dB (each where defined) from x, grad_y, z and gz (defined when dA is).
MoeWgradParams moe_wgrad_params(const MoeDims& d, const at::Tensor& x, const at::Tensor& grad_y, const at::Tensor& z,
                                const at::Tensor& gz, const at::Tensor& w, double scale, at::Tensor& dA,
                                at::Tensor& dB);

// moe_lora_add_ on a backend whose `forward(y, accumulate)` runs the forward into y and returns z:
// out accumulates in place when the kernels can write it (`in_place`); otherwise the update lands
// in a fresh tensor of out's shape in `update_dtype` and is added to out once.
template <typename Forward>
at::Tensor moe_add_into(at::Tensor& out, bool in_place, at::ScalarType update_dtype, Forward&& forward) {
  if (in_place) return forward(out, /*accumulate=*/true);
  at::Tensor y = at::empty(out.sizes(), out.options().dtype(update_dtype));
  at::Tensor z = forward(y, /*accumulate=*/false);
  out.add_(y);
  return z;
}

}  // namespace mhr_ops
