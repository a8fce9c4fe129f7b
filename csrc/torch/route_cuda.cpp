// CUDA registration of route / route_backward: checks, then one kernel launch on the current
// stream. Host code only; the kernels are in csrc/kernels/route_cuda.cu.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include "route_args.h"
#include "tensor_utils.h"

namespace mhr_ops {
namespace {

void check_launch(int err, const char* what) {
  TORCH_CHECK(err == 0, what, " CUDA kernel failed: ", cudaGetErrorString(static_cast<cudaError_t>(err)));
}

void check_skills(const RouteParams& P) {
  TORCH_CHECK(P.num_skills <= route_cuda_max_skills(), "n_skills: the CUDA route kernel takes at most ",
              route_cuda_max_skills(), " skills, got ", P.num_skills);
}

at::Tensor route_cuda(const at::Tensor& logits, const at::Tensor& task_ids, const std::optional<at::Tensor>& noise,
                      int64_t n_skills, c10::string_view mode, double temperature, int64_t top_k, double eps) {
  RouteParams P = make_route_params(logits, task_ids, noise, n_skills, mode, temperature, top_k, eps);
  check_skills(P);
  const c10::cuda::CUDAGuard guard(logits.device());
  set_route_tensors(P, logits, task_ids, noise.has_value() ? *noise : at::Tensor());
  at::Tensor weights = at::empty({P.num_groups, P.num_heads, P.num_skills}, logits.options());
  P.weights = weights.data_ptr();
  const int err = route_fwd_cuda(P, kernel_dtype(logits, "logits"), c10::cuda::getCurrentCUDAStream().stream());
  check_launch(err, "route");
  return weights;
}

at::Tensor route_backward_cuda(const at::Tensor& grad_weights, const at::Tensor& logits, const at::Tensor& task_ids,
                               const std::optional<at::Tensor>& noise, int64_t n_skills, c10::string_view mode,
                               double temperature, int64_t top_k, double eps) {
  RouteParams P = make_route_params(logits, task_ids, noise, n_skills, mode, temperature, top_k, eps);
  check_skills(P);
  const c10::cuda::CUDAGuard guard(logits.device());
  set_route_tensors(P, logits, task_ids, noise.has_value() ? *noise : at::Tensor());
  set_route_grad(P, grad_weights, logits);
  // Accumulate across groups that share a task in fp32 (fp64 for fp64 logits), then cast.
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor grad_logits = at::empty({P.num_tasks, P.num_heads * P.num_skills}, logits.options().dtype(acc));
  P.grad_logits = grad_logits.data_ptr();
  const int err = route_bwd_cuda(P, kernel_dtype(logits, "logits"), c10::cuda::getCurrentCUDAStream().stream());
  check_launch(err, "route_backward");
  return grad_logits.to(logits.scalar_type());
}

}  // namespace
}  // namespace mhr_ops

TORCH_LIBRARY_IMPL(mhr_ops, CUDA, m) {
  m.impl("route", &mhr_ops::route_cuda);
  m.impl("route_backward", &mhr_ops::route_backward_cuda);
}
