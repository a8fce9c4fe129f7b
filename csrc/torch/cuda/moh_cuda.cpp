// CUDA registration of head_gates / head_gates_backward (one launch each) and gated_head_proj
// (the head-skipping kernels: tensor cores for 16-bit types, SIMT otherwise). Host code only.
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include "cuda_context.h"
#include "moh_args.h"
#include "tensor_utils.h"

namespace mhr_ops {
namespace {

at::Tensor opt(const std::optional<at::Tensor>& t) { return t.has_value() ? *t : at::Tensor(); }

at::Tensor head_gates_cuda(const at::Tensor& routed, const std::optional<at::Tensor>& shared,
                           const std::optional<at::Tensor>& stage, int64_t top_k, int64_t n_shared, bool binary) {
  const CudaDeviceGuard guard(routed.device());
  HeadGatesParams p = check_head_gates(routed, shared, stage, top_k, n_shared);
  p.binary = binary;
  set_head_gates_inputs(p, routed, opt(shared), opt(stage));
  at::Tensor gates = at::empty({p.num_rows, p.num_shared + p.num_routed}, routed.options());
  p.gates = gates.data_ptr();
  check_launch(head_gates_fwd_cuda(p, kernel_dtype(routed, "routed_logits"), current_stream()), "head_gates");
  return gates;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> head_gates_backward_cuda(
    const at::Tensor& grad_gates, const at::Tensor& routed, const std::optional<at::Tensor>& shared,
    const std::optional<at::Tensor>& stage, int64_t top_k, int64_t n_shared, bool binary) {
  const CudaDeviceGuard guard(routed.device());
  HeadGatesParams p = check_head_gates(routed, shared, stage, top_k, n_shared);
  p.binary = binary;
  TORCH_CHECK(grad_gates.dim() == 2 && grad_gates.size(0) == p.num_rows &&
                  grad_gates.size(1) == p.num_shared + p.num_routed && grad_gates.scalar_type() == routed.scalar_type(),
              "grad_gates: expected shape [", p.num_rows, ", ", p.num_shared + p.num_routed, "] of dtype ",
              routed.scalar_type(), ", got ", grad_gates.sizes(), " ", grad_gates.scalar_type());
  const at::Tensor s = opt(shared), st = opt(stage);
  set_head_gates_inputs(p, routed, s, st);
  p.grad_gates = grad_gates.data_ptr();
  p.grad_stride_n = grad_gates.stride(0);
  p.grad_stride_h = grad_gates.stride(1);
  // Binary gates have no gradient: zeros, and the kernel is not launched.
  auto out = [&](const at::Tensor& like) {
    return like.defined() ? (binary ? at::zeros(like.sizes(), like.options()) : at::empty(like.sizes(), like.options()))
                          : at::empty({0}, routed.options());
  };
  at::Tensor gr = out(routed), gs = out(s), gst = out(st);
  p.grad_routed = gr.data_ptr();
  p.grad_shared = s.defined() ? gs.data_ptr() : nullptr;
  p.grad_stage = st.defined() ? gst.data_ptr() : nullptr;
  check_launch(head_gates_bwd_cuda(p, kernel_dtype(routed, "routed_logits"), current_stream()), "head_gates_backward");
  return {gr, gs, gst};
}

at::Tensor gated_head_proj_cuda(const at::Tensor& o, const at::Tensor& gates, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias) {
  const CudaDeviceGuard guard(o.device());
  GatedHeadProjParams p = check_gated_head_proj(o, gates, weight, bias);
  const at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  at::Tensor y = at::empty({p.num_rows, p.out_features}, o.options());
  p.o = o.data_ptr();
  p.o_stride_n = o.stride(0);
  p.o_stride_h = o.stride(1);
  p.o_stride_c = o.stride(2);
  p.gates = gates.data_ptr();
  p.g_stride_n = gates.stride(0);
  p.g_stride_h = gates.stride(1);
  p.weight = weight.data_ptr();
  p.w_stride_d = weight.stride(0);
  p.w_stride_k = weight.stride(1);
  p.bias = b.defined() ? b.data_ptr() : nullptr;
  p.y = y.data_ptr();
  check_launch(gated_head_proj_fwd_cuda(p, kernel_dtype(o, "o"), current_stream()), "gated_head_proj");
  return y;
}

}  // namespace
}  // namespace mhr_ops

MHR_OPS_CUDA_KERNELS(m) {
  m.impl("head_gates", &mhr_ops::head_gates_cuda);
  m.impl("head_gates_backward", &mhr_ops::head_gates_backward_cuda);
  m.impl("gated_head_proj", &mhr_ops::gated_head_proj_cuda);
}
