// CPU registration of head_gates / head_gates_backward: the torch-free per-row kernels
// (kernels/head_gates_cpu.cpp), fp16 / bf16 computed in fp32.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../args/moh_args.h"
#include "../torch_to_kernel.h"

namespace mhr_ops {
namespace {

template <typename Fn>
void for_rows(int64_t rows, Fn&& fn) {
  at::parallel_for(0, rows, 2048, fn);
}

at::Tensor head_gates_cpu(const at::Tensor& routed, const std::optional<at::Tensor>& shared,
                          const std::optional<at::Tensor>& stage, int64_t top_k, int64_t n_shared, bool binary) {
  HeadGatesParams p = check_head_gates(routed, shared, stage, top_k, n_shared);
  p.binary = binary;
  const auto ct = accumulation_dtype(routed.scalar_type());
  const at::Tensor r = routed.to(ct), s = optional_to(shared, ct), st = optional_to(stage, ct);
  set_head_gates_inputs(p, r, s, st);
  at::Tensor gates = at::empty({p.num_rows, p.num_shared + p.num_routed}, routed.options().dtype(ct));
  p.gates = gates.data_ptr();
  for_rows(p.num_rows, [&](int64_t b, int64_t e) {
    ct == at::kDouble ? head_gates_fwd_cpu<double>(p, b, e) : head_gates_fwd_cpu<float>(p, b, e);
  });
  return gates.to(routed.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> head_gates_backward_cpu(const at::Tensor& grad_gates,
                                                                       const at::Tensor& routed,
                                                                       const std::optional<at::Tensor>& shared,
                                                                       const std::optional<at::Tensor>& stage,
                                                                       int64_t top_k, int64_t n_shared, bool binary) {
  HeadGatesParams p = check_head_gates(routed, shared, stage, top_k, n_shared);
  p.binary = binary;
  TORCH_CHECK(
      grad_gates.dim() == 2 && grad_gates.size(0) == p.num_rows && grad_gates.size(1) == p.num_shared + p.num_routed,
      "grad_gates: expected shape [", p.num_rows, ", ", p.num_shared + p.num_routed, "], got ", grad_gates.sizes());
  const auto ct = accumulation_dtype(routed.scalar_type());
  const at::Tensor r = routed.to(ct), s = optional_to(shared, ct), st = optional_to(stage, ct), g = grad_gates.to(ct);
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

}  // namespace
}  // namespace mhr_ops

TORCH_LIBRARY_IMPL(mhr_ops, CPU, m) {
  m.impl("head_gates", &mhr_ops::head_gates_cpu);
  m.impl("head_gates_backward", &mhr_ops::head_gates_backward_cpu);
}
