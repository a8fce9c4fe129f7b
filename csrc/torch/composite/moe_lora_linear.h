// moe_lora_linear over the backends' ops (composite/moe_lora_linear.cpp), for the CPU kernel's
// half-precision case too.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace mhr_ops {

// F.linear(x, weight, bias), then moe_lora_add_ into its output through the dispatcher; (y, z).
std::tuple<at::Tensor, at::Tensor> moe_lora_linear_unfused(const at::Tensor& x, const at::Tensor& weight,
                                                           const std::optional<at::Tensor>& bias, const at::Tensor& A,
                                                           const at::Tensor& B, const at::Tensor& topk_weights,
                                                           const at::Tensor& topk_ids, double scale);

}  // namespace mhr_ops
