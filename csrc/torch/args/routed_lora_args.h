// Argument checks shared by the CPU and CUDA registrations of routed_lora, mhr_linear, their
// backwards and task_lora_linear: the ops' contract. Failures raise ValueError in Python (TORCH_CHECK_VALUE) and name
// the argument; the Python layer checks only what the op cannot see (docs/API.md, Errors).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "../../kernels/routed_lora.h"

namespace mhr_ops {

// x [N, d_in]; A [h, S, d_in/h, r]; B [h, S, r, d_out/h]; weights [G, h, S];
// group_ids [N / rows_per_group_id]. Every failure names the argument.
LoraDims check_routed_lora(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B, const at::Tensor& weights,
                           const at::Tensor& group_ids, int64_t rows_per_group_id);

// out / grad_y: [N, d_out] in x's dtype, on x's device.
void check_rows_output(const at::Tensor& t, const char* arg, const at::Tensor& x, const LoraDims& d);

// routed_lora_add_'s out: as check_rows_output, and without internal overlap (the kernels write
// through out's strides, each element once: a broadcast or self-overlapping out would be written
// several times).
void check_add_output(const at::Tensor& out, const at::Tensor& x, const LoraDims& d);

// The backward's z: the forward's bottleneck [N, r] in the accumulation dtype (fp32, fp64 for fp64
// x), on x's device. Any strides.
void check_bottleneck(const at::Tensor& z, const at::Tensor& x, const LoraDims& d);

// A linear base layer (mhr_linear, moe_lora_linear): weight [d_out, d_in] and bias [d_out]
// (optional) in x's dtype, on x's device.
void check_linear_base(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       int64_t d_in, int64_t d_out);

// mhr_linear's base layer: check_linear_base with the problem's d_in and d_out.
void check_mhr_linear_base(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const LoraDims& d);

// task_lora_linear: x [N, d_in]; A [T, d_in, r] and B [T, r, d_out] in x's accumulation dtype (fp32,
// fp64 for fp64 x); task_ids [N / rows_per_task_id]; the base as check_mhr_linear_base. Returns the
// dims with one head and one skill per task (groups = T).
LoraDims check_task_lora_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                const at::Tensor& A, const at::Tensor& B, const at::Tensor& task_ids,
                                int64_t rows_per_task_id);

}  // namespace mhr_ops
