// The tensor-core forms of routed_lora's shrink, expand and wgrad (routed_lora_tc_cuda.cu), for
// the public entry points of routed_lora_cuda.cu, which choose them through
// routed_lora_uses_tensor_cores (routed_lora.h). Same parameters and contracts as those entry
// points, except that the shrink never splits its reduction (Z is written once per element), the
// wgrad writes dM without atomics, and only dw is summed with atomics.
#pragma once

#include <cuda_runtime.h>

#include "routed_lora.h"

namespace mhr_ops {

int routed_lora_shrink_tc(const ShrinkParams& p, DType data, DType matrix, cudaStream_t stream);
int routed_lora_expand_tc(const ExpandParams& p, DType data, DType matrix, cudaStream_t stream);
int routed_lora_wgrad_tc(const WgradParams& p, DType data, DType matrix, cudaStream_t stream);

}  // namespace mhr_ops
