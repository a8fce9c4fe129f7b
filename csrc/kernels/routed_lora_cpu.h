// routed_lora's grouped CPU kernels (routed_lora_cpu.cpp): AVX2 / AVX-512 variants over the rows
// of one group, and the x86 instruction sets they use. Torch-free.
#pragma once

#include <cstdint>

#include "routed_lora.h"

namespace mhr_ops {

// The grouped CPU forward over rows [row_begin, row_end) of one group g: z = x @ A_g written per
// row, then y = (or +=) z @ (scale B_g) in one pass over y's rows. fp32 only.
struct LoraGroupForwardParams {
  const void* x = nullptr;  // [N, d_in], unit column stride
  int64_t x_stride_n = 0;
  void* y = nullptr;  // [N, d_out], unit column stride
  int64_t y_stride_n = 0;
  const void* a_mix = nullptr;   // A_g [d_in, r], contiguous
  const void* bt_mix = nullptr;  // scale * B_g^T [d_out, r], contiguous
  void* z = nullptr;             // out: [N, r] contiguous; rows [row_begin, row_end) written
  int64_t row_begin = 0;
  int64_t row_end = 0;
  int64_t d_in = 0;
  int64_t d_out = 0;
  int64_t rank = 0;
  bool accumulate = false;     // y += update (else y = update, or bias + update)
  const void* bias = nullptr;  // [d_out] contiguous, added when not accumulating; may be null
};

// The grouped CPU backward over rows [row_begin, row_end) of one group g with mixed adapter
// A_g / B_g: gz = grad_y @ (scale B_g^T) written per row, dA_g += x^T gz and dB_g^T += scale *
// grad_y^T z accumulated, and optionally dx = (or +=) gz @ A_g^T. fp32 only.
struct LoraGroupGradParams {
  const void* x = nullptr;  // [N, d_in]; rows stride x_stride_n, columns stride x_stride_c
  int64_t x_stride_n = 0;
  int64_t x_stride_c = 0;
  const void* grad_y = nullptr;  // [N, d_out]; strides as x
  int64_t gy_stride_n = 0;
  int64_t gy_stride_c = 0;
  const void* z = nullptr;       // the forward's bottleneck [N, r], contiguous
  const void* bt_mix = nullptr;  // scale * B_g^T [d_out, r], contiguous
  void* gz = nullptr;            // out: [N, r] contiguous; rows [row_begin, row_end) written
  void* da = nullptr;            // dA_g accumulator [d_in, r], contiguous
  void* dbt = nullptr;           // dB_g^T accumulator [d_out, r], contiguous
  // dx [N, d_in] rows (+)= gz @ A_g^T, unit column stride; null: no dx.
  void* dx = nullptr;
  int64_t dx_stride_n = 0;
  bool dx_accumulate = false;   // dx += (else dx =)
  const void* a_mix = nullptr;  // A_g [d_in, r], contiguous (read when dx is set)
  int64_t row_begin = 0;
  int64_t row_end = 0;
  int64_t d_in = 0;
  int64_t d_out = 0;
  int64_t rank = 0;
  double scale = 1.0;
};

// The variant that takes this problem on this CPU, using no instruction set above max_isa:
// AVX-512 for ranks 4, 8, 16, 32 (d_in and d_out multiples of 16 / rank below rank 16), AVX2
// + FMA for ranks 8 and 16; both need unit column strides. kNone: the caller runs its BLAS path.
CpuIsa routed_lora_group_grads_isa(int64_t rank, int64_t d_in, int64_t d_out, int64_t x_stride_c, int64_t gy_stride_c,
                                   CpuIsa max_isa);
// Runs variant `isa`; returns false (doing nothing) if that variant does not take the problem.
bool routed_lora_group_grads_cpu(const LoraGroupGradParams& p, CpuIsa isa);

// The forward's variant for this problem: AVX-512 only, same ranks and shapes as above.
CpuIsa routed_lora_group_forward_isa(int64_t rank, int64_t d_in, int64_t d_out, CpuIsa max_isa);
bool routed_lora_group_forward_cpu(const LoraGroupForwardParams& p, CpuIsa isa);

}  // namespace mhr_ops
