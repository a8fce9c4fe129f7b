// What the CPU forward (routed_lora_cpu.cpp) and backward (routed_lora_backward_cpu.cpp) of
// routed_lora share: the plan's inputs, the problem's tensors in the compute dtype, and the ATen
// steps of the runs and project-then-mix paths around the kernels of routed_lora_mix_cpu.h.
#pragma once

#include <ATen/core/Tensor.h>

#include <utility>
#include <vector>

#include "../../kernels/routed_lora_plan_cpu.h"
#include "cpu_isa.h"

namespace mhr_ops {

// group_ids [N / rows_per_id] (int32 or int64, any stride) for the planner.
LoraGroupIds lora_group_ids(const at::Tensor& group_ids);

// The problem's tensors in the compute dtype, skill matrices reshaped for per-head GEMMs.
struct LoraOperands {
  at::Tensor x;  // [N, d_in], unit column stride (rows_layout)
  at::Tensor w;  // [G, h, S]
  at::Tensor A;  // [h, S, dk_in * r]
  at::Tensor B;  // [h, S, r * dk_out]
};
LoraOperands lora_operands(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B, const at::Tensor& weights,
                           const LoraDims& d);

// Mixed adapters of `groups` (one batched GEMM per matrix, over heads):
// A_g [n, d_in, r] and scale * B_g^T [n, d_out, r], both contiguous.
std::pair<at::Tensor, at::Tensor> mix_groups(const LoraOperands& o, const std::vector<int64_t>& groups,
                                             const LoraDims& d, double scale);

// src [a, b, c, e] -> scale * src permuted to [b, a, e, c], contiguous.
at::Tensor swap_pairs(const at::Tensor& src, double scale);

// Project-then-mix. Per-row weights [N, h, S] of row_group's groups; x [N, d_in] -> [h, N, dk_in];
// A as [h, dk_in, S*r]; B as [h, S*r, dk_out]; proj [h, N, S*r] -> z [N, r] mixed with row_w;
// v [N, r] -> [h, N, S*r] spread with row_w; the routing-weight gradient of every row [N, h, S].
at::Tensor row_weights(const LoraOperands& o, const std::vector<int64_t>& row_group);
at::Tensor heads_of(const at::Tensor& t, int64_t h);
at::Tensor a_cat(const LoraOperands& o, const LoraDims& d);
at::Tensor b_cat(const LoraOperands& o, const LoraDims& d);
at::Tensor mix_rows(const at::Tensor& proj, const at::Tensor& row_w, const LoraDims& d);
at::Tensor spread_rows(const at::Tensor& v, const at::Tensor& row_w, const LoraDims& d);
at::Tensor row_weight_grads(const at::Tensor& U, const at::Tensor& gz, const at::Tensor& T, const at::Tensor& z,
                            const LoraDims& d);

// t[run rows, :] = value for every run (rows of out-of-range group ids).
void fill_rows(const at::Tensor& t, const std::vector<LoraRun>& runs, double value);

}  // namespace mhr_ops
