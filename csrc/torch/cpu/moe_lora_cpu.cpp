// CPU registration of moe_lora, moe_lora_add_, moe_lora_backward and moe_lora_linear's forward
// (its backward is the composite: composite/moe_lora_linear.cpp). The arithmetic is the
// torch-free kernels of csrc/kernels/moe_lora.h in fp32 (fp64 for fp64 x): forward and the x
// side of the backward in one pass over row blocks (each block's slots grouped by expert), in
// parallel over blocks; the weight gradients over (expert, column block), their slots grouped by
// expert with a counting sort on the host (the ids are host-visible on the CPU). No per-expert ATen calls: the
// per-expert row counts (N*k/E) are small, and BLAS on gathered rows would cost a gather and a scatter pass on top.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <string>

#include "../../kernels/moe_lora.h"
#include "../args/moe_lora_args.h"
#include "../args/moe_lora_params.h"
#include "../args/routed_lora_args.h"
#include "../composite/moe_lora_linear.h"
#include "../torch_to_kernel.h"
#include "cpu_isa.h"

namespace mhr_ops {
namespace {

// The row-block pass over all rows, blocks in parallel (each writes its own rows and slots).
template <typename T>
void rows_parallel(const MoeRowsParams& p, const MoeDims& d) {
  const bool avx2 = allowed_cpu_isa() >= CpuIsa::kAvx2;
  const int64_t blocks = (d.rows + kMoeRowBlock - 1) / kMoeRowBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t b, int64_t e) {
    moe_lora_rows_cpu<T>(p, b * kMoeRowBlock, std::min(d.rows, e * kMoeRowBlock), avx2);
  });
}

// y [N, d_out] (compute dtype, unit column stride) = or += the update; returns z [N, k, r]. With
// `bias` (the compute dtype, contiguous) and no accumulate, y = bias + update.
at::Tensor forward_into(at::Tensor& y, const at::Tensor& x_in, const at::Tensor& A_in, const at::Tensor& B_in,
                        const at::Tensor& w_in, const at::Tensor& ids, const MoeDims& d, double scale, bool accumulate,
                        const void* bias = nullptr) {
  const at::Tensor x = rows_layout(x_in.to(accumulation_dtype(x_in.scalar_type())));
  MoeForwardPass f = moe_forward_pass(x, A_in, B_in, w_in, ids, d, scale, y, accumulate);
  f.params.bias = bias;
  if (d.rows > 0)
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "moe_lora_forward", [&] { rows_parallel<scalar_t>(f.params, d); });
  return f.z;
}

std::tuple<at::Tensor, at::Tensor> moe_lora_cpu(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                                                const at::Tensor& topk_weights, const at::Tensor& topk_ids,
                                                double scale) {
  const MoeDims d = check_moe_lora(x, A, B, topk_weights, topk_ids);
  const auto ct = accumulation_dtype(x.scalar_type());
  at::Tensor y = at::empty({d.rows, d.d_out}, x.options().dtype(ct));
  at::Tensor z = forward_into(y, x, A, B, topk_weights, topk_ids, d, scale, /*accumulate=*/false);
  return {y.to(x.scalar_type()), z};
}

at::Tensor moe_lora_add_cpu(at::Tensor& out, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                            const at::Tensor& topk_weights, const at::Tensor& topk_ids, double scale) {
  const MoeDims d = check_moe_lora(x, A, B, topk_weights, topk_ids);
  check_moe_add_output(out, x, d);
  const auto ct = accumulation_dtype(x.scalar_type());
  // a half-precision or column-strided out takes the update in the compute dtype
  return moe_add_into(out, out.scalar_type() == ct && rows_layout(out).is_same(out), ct, [&](at::Tensor& y, bool acc) {
    return forward_into(y, x, A, B, topk_weights, topk_ids, d, scale, acc);
  });
}

// moe_lora_linear for fp32 / fp64 x: the rows pass writes y = bias + update (no pass over a base
// output), then the base GEMM accumulates into y (beta = 1). Half-precision x takes the composite
// (composite/moe_lora_linear.cpp): F.linear, then the update added into its output.
std::tuple<at::Tensor, at::Tensor> moe_lora_linear_cpu(const at::Tensor& x_in, const at::Tensor& weight,
                                                       const std::optional<at::Tensor>& bias, const at::Tensor& A,
                                                       const at::Tensor& B, const at::Tensor& topk_weights,
                                                       const at::Tensor& topk_ids, double scale) {
  if (x_in.scalar_type() != accumulation_dtype(x_in.scalar_type()))  // half x (a wrong dtype: its checks say so)
    return moe_lora_linear_unfused(x_in, weight, bias, A, B, topk_weights, topk_ids, scale);
  const at::Tensor x = rows_layout(x_in);  // the rows pass and the base GEMM see one layout
  const MoeDims d = check_moe_lora(x, A, B, topk_weights, topk_ids);
  check_linear_base(x, weight, bias, d.d_in, d.d_out);
  const at::Tensor b = is_present(bias) ? bias->contiguous() : at::Tensor();
  at::Tensor y = at::empty({d.rows, d.d_out}, x.options());
  at::Tensor z = forward_into(y, x, A, B, topk_weights, topk_ids, d, scale, /*accumulate=*/false,
                              b.defined() ? b.const_data_ptr() : nullptr);
  y.addmm_(x, weight.t());
  return {y, z};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_lora_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x_in, const at::Tensor& A_in, const at::Tensor& B_in,
    const at::Tensor& topk_weights, const at::Tensor& topk_ids, double scale, const at::Tensor& z_in,
    std::array<bool, 4> mask) {
  const MoeDims d = check_moe_lora_backward(grad_y, x_in, A_in, B_in, topk_weights, topk_ids, z_in);
  const auto ct = accumulation_dtype(x_in.scalar_type());
  const auto opts = x_in.options().dtype(ct);
  at::Tensor dx = mask[0] ? at::empty({d.rows, d.d_in}, opts) : at::Tensor();
  // The weight-gradient tasks write every expert's gradient whole: no zero fill but for no rows.
  at::Tensor dA = mask[1] ? at::empty({d.experts, d.d_in, d.rank}, opts) : at::Tensor();
  at::Tensor dB = mask[2] ? at::empty({d.experts, d.rank, d.d_out}, opts) : at::Tensor();
  at::Tensor dw = mask[3] ? at::empty({d.rows, d.top_k}, opts) : at::Tensor();
  if (d.rows == 0) {  // the weight gradients of no slot
    if (dA.defined()) dA.zero_();
    if (dB.defined()) dB.zero_();
  } else if (mask[0] || mask[1] || mask[2] || mask[3]) {
    const at::Tensor x = rows_layout(x_in.to(ct)), gy = rows_layout(grad_y.to(ct)), z = z_in.contiguous();
    const at::Tensor w = topk_weights.to(ct);
    const MoeRouting routing = moe_routing(topk_ids, d);
    const bool avx2 = allowed_cpu_isa() >= CpuIsa::kAvx2;
    const bool need_gz = mask[0] || mask[1] || mask[3];
    at::Tensor gz = need_gz ? at::empty({d.rows * d.top_k, d.rank}, opts) : at::Tensor();
    at::Tensor dw_all = dw.defined() ? dw : need_gz ? at::empty({d.rows, d.top_k}, opts) : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES(ct, "moe_lora_backward", [&] {
      if (need_gz) {  // one row-block pass: gz_s = w_s g_s, dw_s = z_s . g_s; dx_n = sum_j gz_s @ A_e^T
        const MoeTransposedExperts t = moe_transposed_experts(A_in, B_in, ct, mask[0]);
        const MoeRowsParams p = moe_backward_params(routing, d, w, gy, t.Bt, scale, z, gz, dw_all, t.At, dx);
        rows_parallel<scalar_t>(p, d);
      }
      if (mask[1] || mask[2]) {
        const MoeWgradParams wp = moe_wgrad_params(d, x, gy, z, gz, w, scale, dA, dB);
        const MoeSlotPlan plan = moe_plan_slots(routing);
        const int64_t a_tasks = moe_lora_wgrad_cpu_a_tasks(d.experts, d.d_in);  // dA's tasks first, then dB's
        at::parallel_for(mask[1] ? 0 : a_tasks,
                         mask[2] ? moe_lora_wgrad_cpu_tasks(d.experts, d.d_in, d.d_out) : a_tasks, 1,
                         [&](int64_t b, int64_t e) { moe_lora_wgrad_cpu<scalar_t>(wp, plan, b, e, avx2); });
      }
    });
  }
  return {grad_or_empty(dx, x_in), grad_or_empty(dA, A_in), grad_or_empty(dB, B_in), grad_or_empty(dw, topk_weights)};
}

}  // namespace
}  // namespace mhr_ops

TORCH_LIBRARY_IMPL(mhr_ops, CPU, m) {
  m.impl("moe_lora", &mhr_ops::moe_lora_cpu);
  m.impl("moe_lora_add_", &mhr_ops::moe_lora_add_cpu);
  m.impl("moe_lora_backward", &mhr_ops::moe_lora_backward_cpu);
  m.impl("moe_lora_linear", &mhr_ops::moe_lora_linear_cpu);
}
