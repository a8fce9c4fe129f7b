// mhr_linear = F.linear(x, weight, bias) with routed_lora added into its output: one output
// allocation, no extra pass. Composite over the backends: at::linear, then routed_lora_add_
// through the dispatcher (each backend's kernel).
#include <ATen/ops/linear.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace mhr_ops {
namespace {

std::tuple<at::Tensor, at::Tensor> mhr_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                      const at::Tensor& A, const at::Tensor& B, const at::Tensor& weights,
                      const at::Tensor& group_ids, int64_t rows_per_group_id, double scale) {
  TORCH_CHECK(weight.dim() == 2, "weight: expected a 2-D tensor [d_out, d_in], got shape ", weight.sizes());
  TORCH_CHECK(x.dim() == 2 && x.size(1) == weight.size(1), "x: expected shape [N, ", weight.size(1),
              "] (weight's d_in), got ", x.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "weight: expected dtype ", x.scalar_type(),
              " (x's dtype), got ", weight.scalar_type());
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

TORCH_LIBRARY_IMPL(mhr_ops, CompositeExplicitAutograd, m) { m.impl("mhr_linear", &mhr_ops::mhr_linear); }
