// Argument checks and RouteParams construction for the route op, shared by the CPU and CUDA
// registrations.
#pragma once

#include <optional>
#include <string_view>

#include <ATen/core/Tensor.h>

#include "../../kernels/route.h"

namespace mhr_ops {

// Checks every argument of route / route_backward (the op's contract: ValueError in Python, messages
// name the argument) and fills the sizes and options of a RouteParams. top_k: None keeps every skill. Pointers and
// strides are left to set_route_tensors.
RouteParams make_route_params(const at::Tensor& logits, const at::Tensor& task_ids,
                              const std::optional<at::Tensor>& noise, int64_t n_skills, std::string_view mode,
                              double temperature, std::optional<int64_t> top_k, double eps);

// Points P at the data of logits, task_ids and (if defined) noise, with their strides.
void set_route_tensors(RouteParams& P, const at::Tensor& logits, const at::Tensor& task_ids, const at::Tensor& noise);

// Checks grad_weights against P ([G, h, S], same dtype as logits) and points P at it.
void set_route_grad(RouteParams& P, const at::Tensor& grad_weights, const at::Tensor& logits);

}  // namespace mhr_ops
