// task_lora_linear over the backends' ops (composite/task_lora_linear.cpp), for the CPU kernel's
// half-precision case too, and its reshapes of x's leading dims.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace mhr_ops {

// x [..., d_in] as rows [N, d_in] (a view where the strides allow), and the rows' output
// y [N, d_out] back as [..., d_out]. x must have at least 2 dims (the op's check says so).
at::Tensor task_lora_rows(const at::Tensor& x);
at::Tensor task_lora_output(const at::Tensor& y, const at::Tensor& x);

at::Tensor task_lora_linear_unfused(const at::Tensor& x, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias, const at::Tensor& A, const at::Tensor& B,
                                    const at::Tensor& task_ids, int64_t rows_per_task_id);

}  // namespace mhr_ops
