// gated_head_proj: y[n] = sum_h gates[n,h] * o[n,h] @ W[:, h*Dh:(h+1)*Dh]^T + bias (SPEC section 5).
// Torch-free. The CUDA kernels never write the gated o and skip the arithmetic of a (row, head)
// whose gate is exactly 0 (gated_head_proj_cuda.cu: tensor cores for fp16 / bf16, in units of 8
// rows per head whatever the pattern of open heads; SIMT for fp32 / fp64).
#pragma once

#include <cstdint>

#include "common.h"

namespace mhr_ops {

struct GatedHeadProjParams {
  // o: [num_rows, num_heads, head_dim], scalar_t. Strides in elements.
  const void* o = nullptr;
  int64_t o_stride_n = 0;
  int64_t o_stride_h = 0;
  int64_t o_stride_c = 0;
  // gates: [num_rows, num_heads], scalar_t. Strides in elements.
  const void* gates = nullptr;
  int64_t g_stride_n = 0;
  int64_t g_stride_h = 0;
  // weight: [out_features, num_heads * head_dim], scalar_t. Strides in elements.
  const void* weight = nullptr;
  int64_t w_stride_d = 0;
  int64_t w_stride_k = 0;
  // bias: [out_features] contiguous scalar_t, or null.
  const void* bias = nullptr;
  // y: [num_rows, out_features], contiguous, scalar_t.
  void* y = nullptr;
  int64_t num_rows = 0;
  int64_t num_heads = 0;
  int64_t head_dim = 0;
  int64_t out_features = 0;
};

#if defined(MHR_OPS_WITH_CUDA)
// fp16 / bf16 on tensor cores, fp32 / fp64 SIMT; fp32 accumulation (fp64 for fp64). Returns a
// cudaError_t value.
int gated_head_proj_fwd_cuda(const GatedHeadProjParams& p, DType dtype, void* stream);
#endif

}  // namespace mhr_ops
