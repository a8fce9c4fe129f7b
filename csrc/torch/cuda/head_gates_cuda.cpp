// CUDA registration of head_gates and head_gates_backward: checks, then one launch each
// (csrc/kernels/head_gates_cuda.cu). Host code only.
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include "../../kernels/head_gates.h"
#include "../args/moh_args.h"
#include "../torch_to_kernel.h"
#include "cuda_context.h"

namespace mhr_ops {
namespace {

at::Tensor head_gates_cuda(const at::Tensor& routed, const std::optional<at::Tensor>& shared,
                           const std::optional<at::Tensor>& stage, int64_t top_k, int64_t n_shared, bool binary) {
  const CudaDeviceGuard guard(routed.device());
  HeadGatesParams p = check_head_gates(routed, shared, stage, top_k, n_shared);
  p.binary = binary;
  set_head_gates_inputs(p, routed, shared.value_or(at::Tensor()), stage.value_or(at::Tensor()));
  at::Tensor gates = at::empty({p.num_rows, p.num_shared + p.num_routed}, routed.options());
  p.gates = gates.data_ptr();
  check_launch(head_gates_fwd_cuda(p, kernel_dtype(routed, "routed_logits"), current_stream()), "head_gates");
  return gates;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> head_gates_backward_cuda(const at::Tensor& grad_gates,
                                                                        const at::Tensor& routed,
                                                                        const std::optional<at::Tensor>& shared,
                                                                        const std::optional<at::Tensor>& stage,
                                                                        int64_t top_k, int64_t n_shared, bool binary) {
  const CudaDeviceGuard guard(routed.device());
  HeadGatesParams p = check_head_gates(routed, shared, stage, top_k, n_shared);
  p.binary = binary;
  TORCH_CHECK(grad_gates.dim() == 2 && grad_gates.size(0) == p.num_rows &&
                  grad_gates.size(1) == p.num_shared + p.num_routed && grad_gates.scalar_type() == routed.scalar_type(),
              "grad_gates: expected shape [", p.num_rows, ", ", p.num_shared + p.num_routed, "] of dtype ",
              routed.scalar_type(), ", got ", grad_gates.sizes(), " ", grad_gates.scalar_type());
  const at::Tensor s = shared.value_or(at::Tensor()), st = stage.value_or(at::Tensor());
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

}  // namespace
}  // namespace mhr_ops

MHR_OPS_CUDA_KERNELS(m) {
  m.impl("head_gates", &mhr_ops::head_gates_cuda);
  m.impl("head_gates_backward", &mhr_ops::head_gates_backward_cuda);
}
