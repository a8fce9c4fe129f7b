// moe_lora_linear = F.linear(x, weight, bias) with moe_lora added into its output: one output
// allocation. Composite over the backends: at::linear, then moe_lora_add_ through the dispatcher
// (each backend's kernel); its backward likewise over moe_lora_backward, with the base layer's
// grad_y @ weight accumulated into dx by the GEMM (no separate sum of two dx tensors). The CPU has
// its own forward for fp32 / fp64 x (cpu/moe_lora_cpu.cpp) and takes this backward.
#include "moe_lora_linear.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include "../args/moe_lora_args.h"
#include "../args/routed_lora_args.h"

namespace mhr_ops {

std::tuple<at::Tensor, at::Tensor> moe_lora_linear_unfused(const at::Tensor& x, const at::Tensor& weight,
                                                           const std::optional<at::Tensor>& bias, const at::Tensor& A,
                                                           const at::Tensor& B, const at::Tensor& topk_weights,
                                                           const at::Tensor& topk_ids, double scale) {
  const MoeDims d = check_moe_lora(x, A, B, topk_weights, topk_ids);
  check_linear_base(x, weight, bias, d.d_in, d.d_out);
  at::Tensor out = at::linear(x, weight, bias);
  static const auto add = c10::Dispatcher::singleton()
                              .findSchemaOrThrow("mhr_ops::moe_lora_add_", "")
                              .typed<at::Tensor(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                const at::Tensor&, const at::Tensor&, double)>();
  at::Tensor z = add.call(out, x, A, B, topk_weights, topk_ids, scale);
  return {out, z};
}

namespace {

using Grads4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// mask: x, weight, bias, A, B, topk_weights.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> moe_lora_linear_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, bool has_bias, const at::Tensor& A,
    const at::Tensor& B, const at::Tensor& topk_weights, const at::Tensor& topk_ids, double scale, const at::Tensor& z,
    std::array<bool, 6> mask) {
  const MoeDims d = check_moe_lora_backward(grad_y, x, A, B, topk_weights, topk_ids, z);
  check_linear_base(x, weight, std::nullopt, d.d_in, d.d_out);
  static const auto moe_backward =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mhr_ops::moe_lora_backward", "")
          .typed<Grads4(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        const at::Tensor&, double, const at::Tensor&, std::array<bool, 4>)>();
  // A gradient not asked for comes back empty (a tensor of its own: outputs must not alias).
  const auto empty = [&](const at::Tensor& like) { return at::empty({0}, like.options()); };
  at::Tensor dx, dA, dB, dw;
  if (mask[0] || mask[3] || mask[4] || mask[5])
    std::tie(dx, dA, dB, dw) =
        moe_backward.call(grad_y, x, A, B, topk_weights, topk_ids, scale, z, {mask[0], mask[3], mask[4], mask[5]});
  else
    dx = empty(x), dA = empty(A), dB = empty(B), dw = empty(topk_weights);
  if (mask[0]) dx.addmm_(grad_y, weight);  // the base layer's part, added inside the GEMM
  const at::Tensor d_weight = mask[1] ? at::mm(grad_y.t(), x) : empty(weight);
  const at::Tensor d_bias = mask[2] && has_bias ? grad_y.sum(0) : empty(weight);
  return {dx, d_weight, d_bias, dA, dB, dw};
}

}  // namespace
}  // namespace mhr_ops

#if defined(MHR_OPS_CUDA_EMULATION)
// The emulated test build stands the CUDA kernels in for the CPU ones (see mhr_linear.cpp).
TORCH_LIBRARY_IMPL(mhr_ops, CPU, m) {
  m.impl("moe_lora_linear", &mhr_ops::moe_lora_linear_unfused);
  m.impl("moe_lora_linear_backward", &mhr_ops::moe_lora_linear_backward);
}
#else
TORCH_LIBRARY_IMPL(mhr_ops, CompositeExplicitAutograd, m) {
  m.impl("moe_lora_linear", &mhr_ops::moe_lora_linear_unfused);
  m.impl("moe_lora_linear_backward", &mhr_ops::moe_lora_linear_backward);
}
#endif
