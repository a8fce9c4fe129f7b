// Argument checks shared by the CPU and CUDA registrations of routed_lora, its backward and
// mhr_linear.
#pragma once

#include <ATen/core/Tensor.h>

namespace mhr_ops {

// Validated sizes of one routed_lora problem.
struct LoraDims {
  int64_t rows = 0;        // N
  int64_t d_in = 0;
  int64_t d_out = 0;
  int64_t heads = 0;       // h
  int64_t skills = 0;      // S
  int64_t rank = 0;        // r
  int64_t groups = 0;      // G
  int64_t dk_in = 0;       // d_in / h
  int64_t dk_out = 0;      // d_out / h
  int64_t rows_per_id = 1;
};

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

// mhr_linear's base layer: weight [d_out, d_in] in x's dtype, x [N, d_in].
void check_mhr_linear_base(const at::Tensor& x, const at::Tensor& weight);

}  // namespace mhr_ops
