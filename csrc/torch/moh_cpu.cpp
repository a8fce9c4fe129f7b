// CPU registration of head_gates / head_gates_backward (torch-free per-row kernels, fp16/bf16
// computed in fp32) and gated_head_proj (ATen GEMM on the gated heads).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "moh_args.h"

namespace mhr_ops {
namespace {

at::ScalarType compute_dtype(const at::Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

at::Tensor maybe_to(const std::optional<at::Tensor>& t, at::ScalarType dtype) {
  return (t.has_value() && t->defined()) ? t->to(dtype) : at::Tensor();
}

template <typename Fn>
void for_rows(int64_t rows, Fn&& fn) {
  at::parallel_for(0, rows, 2048, fn);
}

at::Tensor head_gates_cpu(const at::Tensor& routed, const std::optional<at::Tensor>& shared,
                          const std::optional<at::Tensor>& stage, int64_t top_k, int64_t n_shared, bool binary) {
  HeadGatesParams p = check_head_gates(routed, shared, stage, top_k, n_shared);
  p.binary = binary;
  const auto ct = compute_dtype(routed);
  const at::Tensor r = routed.to(ct), s = maybe_to(shared, ct), st = maybe_to(stage, ct);
  set_head_gates_inputs(p, r, s, st);
  at::Tensor gates = at::empty({p.num_rows, p.num_shared + p.num_routed}, routed.options().dtype(ct));
  p.gates = gates.data_ptr();
  for_rows(p.num_rows, [&](int64_t b, int64_t e) {
    ct == at::kDouble ? head_gates_fwd_cpu<double>(p, b, e) : head_gates_fwd_cpu<float>(p, b, e);
  });
  return gates.to(routed.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> head_gates_backward_cpu(
    const at::Tensor& grad_gates, const at::Tensor& routed, const std::optional<at::Tensor>& shared,
    const std::optional<at::Tensor>& stage, int64_t top_k, int64_t n_shared, bool binary) {
  HeadGatesParams p = check_head_gates(routed, shared, stage, top_k, n_shared);
  p.binary = binary;
  TORCH_CHECK(grad_gates.dim() == 2 && grad_gates.size(0) == p.num_rows &&
                  grad_gates.size(1) == p.num_shared + p.num_routed,
              "grad_gates: expected shape [", p.num_rows, ", ", p.num_shared + p.num_routed, "], got ",
              grad_gates.sizes());
  const auto ct = compute_dtype(routed);
  const at::Tensor r = routed.to(ct), s = maybe_to(shared, ct), st = maybe_to(stage, ct), g = grad_gates.to(ct);
  set_head_gates_inputs(p, r, s, st);
  p.grad_gates = g.data_ptr();
  p.grad_stride_n = g.stride(0);
  p.grad_stride_h = g.stride(1);
  at::Tensor gr = at::zeros(r.sizes(), r.options());
  at::Tensor gs = s.defined() ? at::zeros(s.sizes(), s.options()) : at::empty({0}, r.options());
  at::Tensor gst = st.defined() ? at::zeros(st.sizes(), st.options()) : at::empty({0}, r.options());
  p.grad_routed = gr.data_ptr();
  p.grad_shared = s.defined() ? gs.data_ptr() : nullptr;
  p.grad_stage = st.defined() ? gst.data_ptr() : nullptr;
  if (!binary)
    for_rows(p.num_rows, [&](int64_t b, int64_t e) {
      ct == at::kDouble ? head_gates_bwd_cpu<double>(p, b, e) : head_gates_bwd_cpu<float>(p, b, e);
    });
  const auto dt = routed.scalar_type();
  return {gr.to(dt), gs.to(dt), gst.to(dt)};
}

at::Tensor gated_head_proj_cpu(const at::Tensor& o, const at::Tensor& gates, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias) {
  const GatedHeadProjParams p = check_gated_head_proj(o, gates, weight, bias);
  // The CPU path writes the gated heads once and runs one GEMM: BLAS beats skipping here. Closed
  // heads (gate exactly 0; NaN counts as open) are zeroed, not multiplied by 0 (SPEC section 5).
  const at::Tensor g = gates.unsqueeze(-1);
  const at::Tensor gated = (o * g).masked_fill_(g == 0, 0).reshape({p.num_rows, p.num_heads * p.head_dim});
  return at::linear(gated, weight, bias);
}

}  // namespace
}  // namespace mhr_ops

TORCH_LIBRARY_IMPL(mhr_ops, CPU, m) {
  m.impl("head_gates", &mhr_ops::head_gates_cpu);
  m.impl("head_gates_backward", &mhr_ops::head_gates_backward_cpu);
  m.impl("gated_head_proj", &mhr_ops::gated_head_proj_cpu);
}
