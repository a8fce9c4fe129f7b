// mhr_linear = F.linear(x, weight, bias) with routed_lora added into its output: one output
// allocation, no extra pass. Composite over the backends: at::linear, then routed_lora_add_
// through the dispatcher (each backend's kernel); its backward likewise over routed_lora_backward,
// with the base layer's grad_y @ weight accumulated into dx by the GEMM. The CPU has its own
// kernels for both (cpu/routed_lora_cpu.cpp, cpu/routed_lora_backward_cpu.cpp).
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include "../args/routed_lora_args.h"

namespace mhr_ops {
namespace {

std::tuple<at::Tensor, at::Tensor> mhr_linear(const at::Tensor& x, const at::Tensor& weight,
                                              const std::optional<at::Tensor>& bias, const at::Tensor& A,
                                              const at::Tensor& B, const at::Tensor& weights,
                                              const at::Tensor& group_ids, int64_t rows_per_group_id, double scale) {
  check_mhr_linear_base(x, weight, bias, check_routed_lora(x, A, B, weights, group_ids, rows_per_group_id));
  at::Tensor out = at::linear(x, weight, bias);
  static const auto add = c10::Dispatcher::singleton()
                              .findSchemaOrThrow("mhr_ops::routed_lora_add_", "")
                              .typed<at::Tensor(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                const at::Tensor&, const at::Tensor&, int64_t, double)>();
  at::Tensor z = add.call(out, x, A, B, weights, group_ids, rows_per_group_id, scale);
  return {out, z};
}

using Grads4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// mask: x, weight, bias, A, B, weights.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mhr_linear_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, bool has_bias, const at::Tensor& A,
    const at::Tensor& B, const at::Tensor& weights, const at::Tensor& group_ids, int64_t rows_per_group_id,
    double scale, const at::Tensor& z, std::array<bool, 6> mask) {
  const LoraDims d = check_routed_lora(x, A, B, weights, group_ids, rows_per_group_id);
  check_mhr_linear_base(x, weight, std::nullopt, d);
  check_rows_output(grad_y, "grad_y", x, d);
  static const auto lora_backward =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mhr_ops::routed_lora_backward", "")
          .typed<Grads4(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        const at::Tensor&, int64_t, double, const at::Tensor&, std::array<bool, 4>)>();
  // A gradient not asked for comes back empty (a tensor of its own: outputs must not alias).
  const auto empty = [&](const at::Tensor& like) { return at::empty({0}, like.options()); };
  at::Tensor dx, dA, dB, dw;
  if (mask[0] || mask[3] || mask[4] || mask[5])
    std::tie(dx, dA, dB, dw) = lora_backward.call(grad_y, x, A, B, weights, group_ids, rows_per_group_id, scale, z,
                                                  {mask[0], mask[3], mask[4], mask[5]});
  else
    dx = empty(x), dA = empty(A), dB = empty(B), dw = empty(weights);
  if (mask[0]) dx.addmm_(grad_y, weight);  // the base layer's part, added inside the GEMM
  const at::Tensor d_weight = mask[1] ? at::mm(grad_y.t(), x) : empty(x);
  const at::Tensor d_bias = mask[2] && has_bias ? grad_y.sum(0) : empty(x);
  return {dx, d_weight, d_bias, dA, dB, dw};
}

}  // namespace
}  // namespace mhr_ops

#if defined(MHR_OPS_CUDA_EMULATION)
// The emulated test build (cuda/cuda_context.h) stands the CUDA kernels in for the CPU ones: CPU
// tensors then take these composites, as CUDA tensors do, instead of the CPU's own kernels.
TORCH_LIBRARY_IMPL(mhr_ops, CPU, m) {
  m.impl("mhr_linear", &mhr_ops::mhr_linear);
  m.impl("mhr_linear_backward", &mhr_ops::mhr_linear_backward);
}
#else
TORCH_LIBRARY_IMPL(mhr_ops, CompositeExplicitAutograd, m) {
  m.impl("mhr_linear", &mhr_ops::mhr_linear);
  m.impl("mhr_linear_backward", &mhr_ops::mhr_linear_backward);
}
#endif
