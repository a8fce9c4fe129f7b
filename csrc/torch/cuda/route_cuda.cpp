// CUDA registration of route / route_backward: checks, then one kernel launch on the current
// stream. Host code only; the kernels are in csrc/kernels/route_cuda.cu.
#include <ATen/ops/empty.h>

#include "../args/route_args.h"
#include "../torch_to_kernel.h"
#include "cuda_context.h"

namespace mhr_ops {
namespace {

void check_skills(const RouteParams& P) {
  TORCH_CHECK(P.num_skills <= route_cuda_max_skills(), "n_skills: the CUDA route kernel takes at most ",
              route_cuda_max_skills(), " skills, got ", P.num_skills);
}

at::Tensor route_cuda(const at::Tensor& logits, const at::Tensor& task_ids, const std::optional<at::Tensor>& noise,
                      int64_t n_skills, c10::string_view mode, double temperature, std::optional<int64_t> top_k,
                      double eps) {
  RouteParams P = make_route_params(logits, task_ids, noise, n_skills, mode, temperature, top_k, eps);
  check_skills(P);
  const CudaDeviceGuard guard(logits.device());
  set_route_tensors(P, logits, task_ids, noise.has_value() ? *noise : at::Tensor());
  at::Tensor weights = at::empty({P.num_groups, P.num_heads, P.num_skills}, logits.options());
  P.weights = weights.data_ptr();
  const int err = route_fwd_cuda(P, kernel_dtype(logits, "logits"), current_stream());
  check_launch(err, "route");
  return weights;
}

at::Tensor route_backward_cuda(const at::Tensor& grad_weights, const at::Tensor& logits, const at::Tensor& task_ids,
                               const std::optional<at::Tensor>& noise, int64_t n_skills, c10::string_view mode,
                               double temperature, std::optional<int64_t> top_k, double eps) {
  RouteParams P = make_route_params(logits, task_ids, noise, n_skills, mode, temperature, top_k, eps);
  check_skills(P);
  const CudaDeviceGuard guard(logits.device());
  set_route_tensors(P, logits, task_ids, noise.has_value() ? *noise : at::Tensor());
  set_route_grad(P, grad_weights, logits);
  // The kernel sums each task's gradient over its groups with atomics: in an order that varies
  // from run to run once two groups can share a task (any G > 1; the average mode has no
  // gradient and launches nothing).
  if (P.num_groups > 1 && P.num_heads > 0 && P.num_skills > 0 && P.mode != RouteMode::kAverage)
    alert_not_deterministic("route_backward (CUDA)");
  // Accumulate across groups that share a task in fp32 (fp64 for fp64 logits), then cast.
  const auto acc = accumulation_dtype(logits.scalar_type());
  at::Tensor grad_logits = at::empty({P.num_tasks, P.num_heads * P.num_skills}, logits.options().dtype(acc));
  P.grad_logits = grad_logits.data_ptr();
  const int err = route_bwd_cuda(P, kernel_dtype(logits, "logits"), current_stream());
  check_launch(err, "route_backward");
  return grad_logits.to(logits.scalar_type());
}

}  // namespace
}  // namespace mhr_ops

MHR_OPS_CUDA_KERNELS(m) {
  m.impl("route", &mhr_ops::route_cuda);
  m.impl("route_backward", &mhr_ops::route_backward_cuda);
}
