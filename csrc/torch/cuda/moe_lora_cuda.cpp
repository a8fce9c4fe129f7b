// CUDA registration of moe_lora, moe_lora_add_ and moe_lora_backward: checks, then the SIMT
// kernels of csrc/kernels/moe_lora_cuda.cu. x, grad_y, y and dx stay in their dtype (the kernels
// read and write them as is); the experts, weights and the bottleneck are in the accumulation
// dtype (fp32; fp64 for fp64 x). The weight gradients' slot plan is built on the device: no host
// sync, fixed grids (CUDA-graph safe). Deterministic: no atomics. Host code only.
#include <ATen/ATen.h>

#include "../../kernels/moe_lora.h"
#include "../args/moe_lora_args.h"
#include "../args/moe_lora_params.h"
#include "../torch_to_kernel.h"
#include "cuda_context.h"

namespace mhr_ops {
namespace {

void check_smem(const MoeDims& d, const char* op) {
  TORCH_CHECK_VALUE(moe_lora_rows_cuda_smem(d.top_k, d.experts) <= kMoeRowsMaxSmem, op, ": top_k ", d.top_k, " with ",
                    d.experts, " experts needs ", moe_lora_rows_cuda_smem(d.top_k, d.experts),
                    " bytes of shared memory per 64-row block, over the ", kMoeRowsMaxSmem, " the CUDA kernel has");
}

// y [N, d_out] (x's dtype, unit column stride) = or += the update; returns z [N, k, r].
at::Tensor forward_into(at::Tensor& y, const at::Tensor& x_in, const at::Tensor& A_in, const at::Tensor& B_in,
                        const at::Tensor& w_in, const at::Tensor& ids, const MoeDims& d, double scale,
                        bool accumulate) {
  const at::Tensor x = rows_layout(x_in);
  const MoeForwardPass f = moe_forward_pass(x, A_in, B_in, w_in, ids, d, scale, y, accumulate);
  if (d.rows > 0) check_launch(moe_lora_rows_cuda(f.params, kernel_dtype(x, "x"), current_stream()), "moe_lora");
  return f.z;
}

std::tuple<at::Tensor, at::Tensor> moe_lora_cuda(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                                                 const at::Tensor& topk_weights, const at::Tensor& topk_ids,
                                                 double scale) {
  const CudaDeviceGuard guard(x.device());
  const MoeDims d = check_moe_lora(x, A, B, topk_weights, topk_ids);
  check_smem(d, "moe_lora (CUDA)");
  at::Tensor y = at::empty({d.rows, d.d_out}, x.options());
  at::Tensor z = forward_into(y, x, A, B, topk_weights, topk_ids, d, scale, /*accumulate=*/false);
  return {y, z};
}

at::Tensor moe_lora_add_cuda(at::Tensor& out, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                             const at::Tensor& topk_weights, const at::Tensor& topk_ids, double scale) {
  const CudaDeviceGuard guard(x.device());
  const MoeDims d = check_moe_lora(x, A, B, topk_weights, topk_ids);
  check_smem(d, "moe_lora_add_ (CUDA)");
  check_moe_add_output(out, x, d);
  // a column-strided out takes the update in x's dtype
  return moe_add_into(out, rows_layout(out).is_same(out), x.scalar_type(), [&](at::Tensor& y, bool acc) {
    return forward_into(y, x, A, B, topk_weights, topk_ids, d, scale, acc);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_lora_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x_in, const at::Tensor& A_in, const at::Tensor& B_in,
    const at::Tensor& topk_weights, const at::Tensor& topk_ids, double scale, const at::Tensor& z_in,
    std::array<bool, 4> mask) {
  const CudaDeviceGuard guard(x_in.device());
  const MoeDims d = check_moe_lora_backward(grad_y, x_in, A_in, B_in, topk_weights, topk_ids, z_in);
  check_smem(d, "moe_lora_backward (CUDA)");
  const auto ct = accumulation_dtype(x_in.scalar_type());
  // The kernels read x and grad_y in one dtype: theirs when they agree, else the compute dtype.
  const bool same = grad_y.scalar_type() == x_in.scalar_type();
  const at::Tensor x = rows_layout(same ? x_in : x_in.to(ct)), gy = rows_layout(same ? grad_y : grad_y.to(ct));
  const auto opts = x_in.options().dtype(ct);
  at::Tensor dx = mask[0] ? at::empty({d.rows, d.d_in}, x.options()) : at::Tensor();
  at::Tensor dA = mask[1] ? at::empty({d.experts, d.d_in, d.rank}, opts) : at::Tensor();
  at::Tensor dB = mask[2] ? at::empty({d.experts, d.rank, d.d_out}, opts) : at::Tensor();
  at::Tensor dw = mask[3] ? at::empty({d.rows, d.top_k}, opts) : at::Tensor();
  if (d.rows == 0) {  // the weight gradients of no slot
    if (dA.defined()) dA.zero_();
    if (dB.defined()) dB.zero_();
  } else if (mask[0] || mask[1] || mask[2] || mask[3]) {
    const at::Tensor z = z_in.contiguous(), w = topk_weights.to(ct);
    const MoeRouting routing = moe_routing(topk_ids, d);
    const DType data = kernel_dtype(x, "x");
    const bool need_gz = mask[0] || mask[1] || mask[3];
    at::Tensor gz = need_gz ? at::empty({d.rows * d.top_k, d.rank}, opts) : at::Tensor();
    at::Tensor dw_all = dw.defined() ? dw : need_gz ? at::empty({d.rows, d.top_k}, opts) : at::Tensor();
    if (need_gz) {  // one row-block pass: gz_s = w_s g_s, dw_s = z_s . g_s; dx_n = sum_j gz_s @ A_e^T
      const MoeTransposedExperts t = moe_transposed_experts(A_in, B_in, ct, mask[0]);
      const MoeRowsParams p = moe_backward_params(routing, d, w, gy, t.Bt, scale, z, gz, dw_all, t.At, dx);
      check_launch(moe_lora_rows_cuda(p, data, current_stream()), "moe_lora_backward");
    }
    if (mask[1] || mask[2]) {
      const auto iopts = x_in.options().dtype(at::kLong);
      at::Tensor counts = at::empty({d.experts}, iopts), start = at::empty({d.experts + 1}, iopts);
      at::Tensor order = at::empty({d.rows * d.top_k}, iopts);
      check_launch(moe_lora_plan_cuda(routing, counts.data_ptr<int64_t>(), start.data_ptr<int64_t>(),
                                      order.data_ptr<int64_t>(), current_stream()),
                   "moe_lora_backward (slot plan)");
      const MoeWgradParams wp = moe_wgrad_params(d, x, gy, z, gz, w, scale, dA, dB);
      check_launch(moe_lora_wgrad_cuda(wp, order.const_data_ptr<int64_t>(), start.const_data_ptr<int64_t>(), data,
                                       current_stream()),
                   "moe_lora_backward (weight gradients)");
    }
  }
  return {grad_or_empty(dx, x_in), grad_or_empty(dA, A_in), grad_or_empty(dB, B_in), grad_or_empty(dw, topk_weights)};
}

}  // namespace
}  // namespace mhr_ops

MHR_OPS_CUDA_KERNELS(m) {
  m.impl("moe_lora", &mhr_ops::moe_lora_cuda);
  m.impl("moe_lora_add_", &mhr_ops::moe_lora_add_cuda);
  m.impl("moe_lora_backward", &mhr_ops::moe_lora_backward_cuda);
}
