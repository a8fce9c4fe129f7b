// mhr_linear = F.linear(x, weight, bias) with routed_lora added into its output: one output
// allocation, no extra pass. Composite over the backends: at::linear, then routed_lora_add_
// through the dispatcher (each backend's kernel). The CPU has its own kernel (routed_lora_cpu.cpp).
#include <ATen/ops/linear.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "routed_lora_args.h"

namespace mhr_ops {
namespace {

std::tuple<at::Tensor, at::Tensor> mhr_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                      const at::Tensor& A, const at::Tensor& B, const at::Tensor& weights,
                      const at::Tensor& group_ids, int64_t rows_per_group_id, double scale) {
  check_mhr_linear_base(x, weight, bias, check_routed_lora(x, A, B, weights, group_ids, rows_per_group_id));
  at::Tensor out = at::linear(x, weight, bias);
  static const auto add = c10::Dispatcher::singleton()
                              .findSchemaOrThrow("mhr_ops::routed_lora_add_", "")
                              .typed<at::Tensor(at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                                                double)>();
  at::Tensor z = add.call(out, x, A, B, weights, group_ids, rows_per_group_id, scale);
  return {out, z};
}

}  // namespace
}  // namespace mhr_ops

#if defined(MHR_OPS_CUDA_EMULATION)
// The emulated test build (cuda_context.h) stands the CUDA kernels in for the CPU ones: CPU
// tensors then take this composite, as CUDA tensors do, instead of the CPU's own kernel.
TORCH_LIBRARY_IMPL(mhr_ops, CPU, m) { m.impl("mhr_linear", &mhr_ops::mhr_linear); }
#else
TORCH_LIBRARY_IMPL(mhr_ops, CompositeExplicitAutograd, m) { m.impl("mhr_linear", &mhr_ops::mhr_linear); }
#endif
