#include "moe_lora_params.h"

#include "../torch_to_kernel.h"

namespace mhr_ops {
namespace {

MoeRowsParams rows_params(const MoeRouting& routing, const MoeDims& d, const at::Tensor& w) {
  MoeRowsParams p;
  p.routing = routing, p.rank = d.rank, p.weights = w.const_data_ptr();
  p.w_stride_n = w.stride(0), p.w_stride_j = w.stride(1);
  return p;
}

}  // namespace

MoeRouting moe_routing(const at::Tensor& topk_ids, const MoeDims& d) {
  MoeRouting r;
  r.ids = topk_ids.const_data_ptr();
  r.index_type = kernel_index_type(topk_ids, "topk_ids");
  r.ids_stride_n = topk_ids.stride(0);
  r.ids_stride_j = topk_ids.stride(1);
  r.rows = d.rows;
  r.top_k = d.top_k;
  r.experts = d.experts;
  return r;
}

MoeForwardPass moe_forward_pass(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                                const at::Tensor& topk_weights, const at::Tensor& topk_ids, const MoeDims& d,
                                double scale, at::Tensor& y, bool accumulate) {
  const auto ct = accumulation_dtype(x.scalar_type());
  MoeForwardPass f{at::empty({d.rows, d.top_k, d.rank}, x.options().dtype(ct)),
                   A.to(ct).contiguous(),
                   B.to(ct).contiguous(),
                   topk_weights.to(ct),
                   {}};
  MoeRowsParams& p = f.params;
  p = rows_params(moe_routing(topk_ids, d), d, f.w);
  p.v = f.z.data_ptr(), p.src = x.const_data_ptr(), p.src_stride_n = x.stride(0), p.shrink_mats = f.A.const_data_ptr();
  p.d_src = d.d_in, p.expand_mats = f.B.const_data_ptr(), p.d_dst = d.d_out, p.expand_scale = scale;
  p.expand_weighted = true, p.y = y.data_ptr(), p.y_stride_n = y.stride(0), p.accumulate = accumulate;
  return f;
}

MoeTransposedExperts moe_transposed_experts(const at::Tensor& A, const at::Tensor& B, at::ScalarType compute_type,
                                            bool need_dx) {
  return {B.to(compute_type).transpose(1, 2).contiguous(),
          need_dx ? A.to(compute_type).transpose(1, 2).contiguous() : at::Tensor()};
}

MoeRowsParams moe_backward_params(const MoeRouting& routing, const MoeDims& d, const at::Tensor& w,
                                  const at::Tensor& grad_y, const at::Tensor& Bt, double scale, const at::Tensor& z,
                                  at::Tensor& gz, at::Tensor& dw, const at::Tensor& At, at::Tensor& dx) {
  MoeRowsParams p = rows_params(routing, d, w);
  p.v = gz.data_ptr(), p.src = grad_y.const_data_ptr(), p.src_stride_n = grad_y.stride(0);
  p.shrink_mats = Bt.const_data_ptr(), p.d_src = d.d_out, p.shrink_scale = scale, p.z = z.const_data_ptr();
  p.dw = dw.data_ptr();
  if (dx.defined())
    p.expand_mats = At.const_data_ptr(), p.d_dst = d.d_in, p.y = dx.data_ptr(), p.y_stride_n = dx.stride(0);
  return p;
}

MoeWgradParams moe_wgrad_params(const MoeDims& d, const at::Tensor& x, const at::Tensor& grad_y, const at::Tensor& z,
                                const at::Tensor& gz, const at::Tensor& w, double scale, at::Tensor& dA,
                                at::Tensor& dB) {
  MoeWgradParams wp;
  wp.x = x.const_data_ptr(), wp.x_stride_n = x.stride(0), wp.grad_y = grad_y.const_data_ptr();
  wp.gy_stride_n = grad_y.stride(0), wp.z = z.const_data_ptr(), wp.gz = gz.defined() ? gz.const_data_ptr() : nullptr;
  wp.weights = w.const_data_ptr(), wp.w_stride_n = w.stride(0), wp.w_stride_j = w.stride(1);
  wp.scale = scale, wp.dA = data_or_null(dA), wp.dB = data_or_null(dB);
  wp.experts = d.experts, wp.d_in = d.d_in, wp.d_out = d.d_out, wp.rank = d.rank, wp.top_k = d.top_k;
  return wp;
}

}  // namespace mhr_ops
