// The tensor-core forms of routed_lora's shrink, expand and wgrad (routed_lora_tc_cuda.cu), for
// the public entry points of routed_lora_cuda.cu, which choose them through
// routed_lora_uses_tensor_cores (routed_lora.h). Same parameters and contracts as those entry
// points, except that the shrink never splits its reduction (Z is written once per element), the
// wgrad writes dM without atomics, and only dw is summed with atomics.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "routed_lora_cuda.h"

// Returns the expression with xt / mt bound to the (data, matrix) pair if it is one of the four
// 16-bit-data pairs the tensor-core kernels take (fp16 or bf16 data; adapters of the same type or
// fp32); falls through otherwise. routed_lora_cuda.cu's full dispatch extends it.
#define MHR_DISPATCH_16BIT_PAIRS(data, matrix, ...)                 \
  if ((data) == DType::kFloat16 && (matrix) == DType::kFloat16) {   \
    using xt = __half;                                              \
    using mt = __half;                                              \
    return __VA_ARGS__;                                             \
  }                                                                 \
  if ((data) == DType::kFloat16 && (matrix) == DType::kFloat32) {   \
    using xt = __half;                                              \
    using mt = float;                                               \
    return __VA_ARGS__;                                             \
  }                                                                 \
  if ((data) == DType::kBFloat16 && (matrix) == DType::kBFloat16) { \
    using xt = __nv_bfloat16;                                       \
    using mt = __nv_bfloat16;                                       \
    return __VA_ARGS__;                                             \
  }                                                                 \
  if ((data) == DType::kBFloat16 && (matrix) == DType::kFloat32) {  \
    using xt = __nv_bfloat16;                                       \
    using mt = float;                                               \
    return __VA_ARGS__;                                             \
  }

namespace mhr_ops {

int routed_lora_shrink_tc(const ShrinkParams& p, DType data, DType matrix, cudaStream_t stream);
int routed_lora_expand_tc(const ExpandParams& p, DType data, DType matrix, cudaStream_t stream);
int routed_lora_wgrad_tc(const WgradParams& p, DType data, DType matrix, cudaStream_t stream);

}  // namespace mhr_ops
