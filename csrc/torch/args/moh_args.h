// Argument checks for the Mixture-of-Head ops (head_gates, gated_head_proj), shared by the CPU
// and CUDA registrations.
#pragma once

#include <optional>

#include <ATen/core/Tensor.h>

#include "../../kernels/gated_head_proj.h"
#include "../../kernels/head_gates.h"

namespace mhr_ops {

// Checks the head_gates arguments and fills sizes and options (pointers are left to the caller).
HeadGatesParams check_head_gates(const at::Tensor& routed, const std::optional<at::Tensor>& shared,
                                 const std::optional<at::Tensor>& stage, int64_t top_k, int64_t n_shared);

// Points p at the logits (strides included) of tensors already in the compute dtype.
void set_head_gates_inputs(HeadGatesParams& p, const at::Tensor& routed, const at::Tensor& shared,
                           const at::Tensor& stage);

// Checks o [N, H, Dh], gates [N, H], weight [D, H*Dh], bias [D]; returns the filled params.
GatedHeadProjParams check_gated_head_proj(const at::Tensor& o, const at::Tensor& gates, const at::Tensor& weight,
                                          const std::optional<at::Tensor>& bias);

}  // namespace mhr_ops
