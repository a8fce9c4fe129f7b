// CPU registration of route / route_backward. fp16 and bf16 are computed in fp32 (the kernels
// take float and double only); the probability clamps keep the caller's dtype's limits.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>

#include "../args/route_args.h"
#include "../torch_to_kernel.h"

namespace mhr_ops {
namespace {

at::Tensor route_cpu(const at::Tensor& logits, const at::Tensor& task_ids, const std::optional<at::Tensor>& noise,
                     int64_t n_skills, c10::string_view mode, double temperature, std::optional<int64_t> top_k,
                     double eps) {
  RouteParams P = make_route_params(logits, task_ids, noise, n_skills, mode, temperature, top_k, eps);
  const auto dtype = accumulation_dtype(logits.scalar_type());
  const at::Tensor l = logits.to(dtype), u = optional_to(noise, dtype);
  set_route_tensors(P, l, task_ids, u);
  at::Tensor weights = at::empty({P.num_groups, P.num_heads, P.num_skills}, logits.options().dtype(dtype));
  P.weights = weights.data_ptr();
  // Grain: about 16K skill elements per task handed to a thread.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, P.num_skills));
  at::parallel_for(0, P.num_groups * P.num_heads, grain, [&](int64_t begin, int64_t end) {
    if (dtype == at::kDouble)
      route_fwd_cpu<double>(P, begin, end);
    else
      route_fwd_cpu<float>(P, begin, end);
  });
  return weights.to(logits.scalar_type());
}

at::Tensor route_backward_cpu(const at::Tensor& grad_weights, const at::Tensor& logits, const at::Tensor& task_ids,
                              const std::optional<at::Tensor>& noise, int64_t n_skills, c10::string_view mode,
                              double temperature, std::optional<int64_t> top_k, double eps) {
  RouteParams P = make_route_params(logits, task_ids, noise, n_skills, mode, temperature, top_k, eps);
  const auto dtype = accumulation_dtype(logits.scalar_type());
  const at::Tensor l = logits.to(dtype), u = optional_to(noise, dtype);
  set_route_tensors(P, l, task_ids, u);
  set_route_grad(P, grad_weights, logits);
  const at::Tensor gw = grad_weights.to(dtype);
  P.grad_weights = gw.data_ptr();
  P.grad_stride_g = gw.stride(0);
  P.grad_stride_h = gw.stride(1);
  P.grad_stride_s = gw.stride(2);
  at::Tensor grad_logits = at::zeros({P.num_tasks, P.num_heads * P.num_skills}, logits.options().dtype(dtype));
  P.grad_logits = grad_logits.data_ptr();
  // Threads own disjoint task ranges: no two write the same gradient row, and each row sums its
  // groups in order, so the result does not depend on the thread count.
  const bool parallel = P.num_groups * P.num_heads * P.num_skills >= 16384;
  at::parallel_for(0, P.num_tasks, parallel ? 1 : P.num_tasks, [&](int64_t begin, int64_t end) {
    if (dtype == at::kDouble)
      route_bwd_cpu<double>(P, begin, end);
    else
      route_bwd_cpu<float>(P, begin, end);
  });
  return grad_logits.to(logits.scalar_type());
}

}  // namespace
}  // namespace mhr_ops

TORCH_LIBRARY_IMPL(mhr_ops, CPU, m) {
  m.impl("route", &mhr_ops::route_cpu);
  m.impl("route_backward", &mhr_ops::route_backward_cpu);
}
