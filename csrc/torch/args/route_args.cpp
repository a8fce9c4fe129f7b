#include "route_args.h"

#include <c10/util/Exception.h>

#include "../torch_to_kernel.h"

namespace mhr_ops {

static RouteMode parse_route_mode(std::string_view mode) {
  if (mode == "sigmoid") return RouteMode::kSigmoid;
  if (mode == "relaxed_bernoulli") return RouteMode::kRelaxedBernoulli;
  if (mode == "softmax") return RouteMode::kSoftmax;
  if (mode == "average") return RouteMode::kAverage;
  TORCH_CHECK_VALUE(false, "mode: expected one of ('sigmoid', 'relaxed_bernoulli', 'softmax', 'average'), got '",
                    std::string(mode), "'");
}

RouteParams make_route_params(const at::Tensor& logits, const at::Tensor& task_ids,
                              const std::optional<at::Tensor>& noise, int64_t n_skills, std::string_view mode,
                              double temperature, std::optional<int64_t> top_k, double eps) {
  TORCH_CHECK_VALUE(logits.dim() == 2, "logits: expected a 2-D tensor [n_tasks, n_splits * n_skills], got shape ",
                    py_shape(logits.sizes()));
  kernel_dtype(logits, "logits");
  TORCH_CHECK_VALUE(n_skills >= 1, "n_skills: expected >= 1, got ", n_skills);
  TORCH_CHECK_VALUE(logits.size(1) % n_skills == 0, "logits: expected shape[1] (n_splits * n_skills) divisible by ",
                    "n_skills=", n_skills, ", got shape ", py_shape(logits.sizes()));
  TORCH_CHECK_VALUE(task_ids.dim() == 1, "task_ids: expected a 1-D tensor [G], got shape ", py_shape(task_ids.sizes()));
  kernel_index_type(task_ids, "task_ids");
  check_same_device(task_ids, "task_ids", logits, "logits");

  RouteParams P;
  P.mode = parse_route_mode(mode);
  TORCH_CHECK_VALUE(temperature > 0, "temperature: expected a number > 0, got ", temperature);
  TORCH_CHECK_VALUE(!top_k || (*top_k >= 1 && *top_k <= n_skills), "top_k: expected in [1, ", n_skills,
                    "] (1..n_skills), got ", top_k.value_or(0));
  TORCH_CHECK_VALUE(eps >= 0, "eps: expected a number >= 0, got ", eps);
  P.num_tasks = logits.size(0);
  P.num_skills = n_skills;
  P.num_heads = logits.size(1) / n_skills;
  P.num_groups = task_ids.size(0);
  P.temperature = temperature;
  P.top_k = top_k.value_or(0);
  P.eps = eps;
  P.clamp_eps = finfo_eps(logits.scalar_type());
  P.clamp_tiny = finfo_tiny(logits.scalar_type());

  const bool has_noise = is_present(noise);
  if (P.mode == RouteMode::kRelaxedBernoulli) {
    TORCH_CHECK_VALUE(has_noise, "noise: mode 'relaxed_bernoulli' needs the uniform noise tensor [G, h, S]");
    const at::Tensor& u = *noise;
    TORCH_CHECK_VALUE(u.dim() == 3 && u.size(0) == P.num_groups && u.size(1) == P.num_heads && u.size(2) == n_skills,
                      "noise: expected shape (", P.num_groups, ", ", P.num_heads, ", ", n_skills, ") [G, h, S], got ",
                      py_shape(u.sizes()));
    TORCH_CHECK_VALUE(u.scalar_type() == logits.scalar_type(), "noise: expected dtype ", py_dtype(logits.scalar_type()),
                      " (the logits dtype), got ", py_dtype(u.scalar_type()));
    check_same_device(u, "noise", logits, "logits");
  } else {
    TORCH_CHECK_VALUE(!has_noise, "noise: only mode 'relaxed_bernoulli' uses noise, got mode '", std::string(mode),
                      "'");
  }
  return P;
}

void set_route_tensors(RouteParams& P, const at::Tensor& logits, const at::Tensor& task_ids, const at::Tensor& noise) {
  P.logits = logits.data_ptr();
  P.logits_stride_t = logits.stride(0);
  P.logits_stride_c = logits.stride(1);
  P.task_ids = task_ids.data_ptr();
  P.index_type = kernel_index_type(task_ids, "task_ids");
  P.task_ids_stride = task_ids.stride(0);
  if (noise.defined()) {
    P.noise = noise.data_ptr();
    P.noise_stride_g = noise.stride(0);
    P.noise_stride_h = noise.stride(1);
    P.noise_stride_s = noise.stride(2);
  } else {
    P.noise = nullptr;
  }
}

void set_route_grad(RouteParams& P, const at::Tensor& grad_weights, const at::Tensor& logits) {
  TORCH_CHECK_VALUE(grad_weights.dim() == 3 && grad_weights.size(0) == P.num_groups &&
                        grad_weights.size(1) == P.num_heads && grad_weights.size(2) == P.num_skills,
                    "grad_weights: expected shape [", P.num_groups, ", ", P.num_heads, ", ", P.num_skills, "], got ",
                    grad_weights.sizes());
  TORCH_CHECK_VALUE(grad_weights.scalar_type() == logits.scalar_type(), "grad_weights: expected dtype ",
                    logits.scalar_type(), ", got ", grad_weights.scalar_type());
  check_same_device(grad_weights, "grad_weights", logits, "logits");
  P.grad_weights = grad_weights.data_ptr();
  P.grad_stride_g = grad_weights.stride(0);
  P.grad_stride_h = grad_weights.stride(1);
  P.grad_stride_s = grad_weights.stride(2);
}

}  // namespace mhr_ops
