// routed_lora on CUDA (routed_lora_cuda.cu, routed_lora_tc_cuda.cu): the kernels' params and
// entry points. Torch-free.
//
// The CUDA path never writes a mixed adapter to global memory: each row tile mixes the chunk of
// the skill matrices it is about to use in shared memory, once per distinct group in the tile.
//
// The same three CUDA kernels serve forward and backward, because every pass has one of three
// shapes. A "skill matrix" M[k, s] is addressed through element strides, so A, B and their
// transposes are all the same kernel:
//   shrink: Z[n, :] = z_scale * sum_k X[n, k-block] @ Mmix_g[k]          M[k,s]: [dk, r]
//   expand: Y[n, k-block] (+)= y_scale * Z[n, :] @ Mmix_g[k]              M[k,s]: [r, dk]
//   wgrad:  dM[k,s] += w[g,k,s] * sum_{n in g} X[n, k-block]^T Z[n, :] * q_scale   [dk, r]
//           dw[g,k,s] += <sum_{n in g} X[n, k-block]^T Z[n, :] * q_scale, M[k,s]>
// forward:  z = shrink(x, A); y = expand(z, B)
// backward: z = shrink(x, A); gz = shrink(gy, B^T, scale); dx = expand(gz, A^T);
//           dA, dw += wgrad(x, gz, A); dB, dw += wgrad(gy, z, B^T, scale)
#pragma once

#include <cstdint>

#include "common.h"
#include "routed_lora.h"

namespace mhr_ops {

struct ShrinkParams {
  // X: [num_rows, num_heads * dk], data type (fp16/bf16/fp32/fp64). Strides in elements.
  const void* x = nullptr;
  int64_t x_stride_n = 0;
  int64_t x_stride_c = 0;
  SkillMatrices m;  // M[k, s]: [dk, rank]
  RowRouting routing;
  // Z: [num_rows, rank] fp32 (fp64 for fp64 data), contiguous. Written, or atomically summed
  // into when the launcher splits the reduction (then it zeroes Z first).
  void* z = nullptr;
  int64_t num_rows = 0;  // N
  int64_t dk = 0;        // reduction columns per head (d_in/h for A, d_out/h for B^T)
  int64_t rank = 0;      // r, 1..128
  double z_scale = 1.0;
};

struct ExpandParams {
  // Z: [num_rows, rank] fp32 (fp64 for fp64 data), contiguous.
  const void* z = nullptr;
  SkillMatrices m;  // M[k, s]: [rank, dk]
  RowRouting routing;
  // Y: [num_rows, num_heads * dk], data type. Strides in elements. accumulate: Y += update.
  void* y = nullptr;
  int64_t y_stride_n = 0;
  int64_t y_stride_c = 0;
  bool accumulate = false;
  int64_t num_rows = 0;
  int64_t dk = 0;    // output columns per head
  int64_t rank = 0;  // r, 1..128
  double y_scale = 1.0;
};

struct WgradParams {
  // X: [num_rows, num_heads * dk], data type. Strides in elements.
  const void* x = nullptr;
  int64_t x_stride_n = 0;
  int64_t x_stride_c = 0;
  // Q: [num_rows, rank] fp32 (fp64 for fp64 data), contiguous.
  const void* q = nullptr;
  double q_scale = 1.0;
  SkillMatrices m;  // M[k, s]: [dk, rank], read for dw
  RowRouting routing;
  // dM: gradient of M in M's own layout (strides of `m` apply, relative to dm), fp32 (fp64),
  // zeroed by the caller, summed into atomically. Null: not needed.
  void* dm = nullptr;
  // dw: [num_groups, num_heads, num_skills] contiguous fp32 (fp64), zeroed by the caller,
  // summed into atomically. Null: not needed.
  void* dw = nullptr;
  int64_t num_rows = 0;
  int64_t dk = 0;
  int64_t rank = 0;
};

#if defined(MHR_OPS_WITH_CUDA)
// Data type x matrix type pairs: (fp16, fp16), (fp16, fp32), (bf16, bf16), (bf16, fp32),
// (fp32, fp32), (fp64, fp64). All return a cudaError_t value (0 on success), launch on `stream`
// and never synchronize with the host.
int routed_lora_shrink_cuda(const ShrinkParams& p, DType data, DType matrix, void* stream);
int routed_lora_expand_cuda(const ExpandParams& p, DType data, DType matrix, void* stream);
int routed_lora_wgrad_cuda(const WgradParams& p, DType data, DType matrix, void* stream);
// Whether these problems run on tensor cores (routed_lora_tc_cuda.cu): fp16 / bf16 data with
// adapters of the same type or fp32, and more than kRoutedLoraTensorCoreMinRows rows. The
// operands go through tf32 (fp16 / bf16 exactly; fp32 adapters and the fp32 bottleneck rounded to
// 10 explicit mantissa bits), with fp32 accumulation. Other problems (fp32 and fp64 data, which
// keep exact fp32 / fp64 products as torch does by default; decode-sized batches, where an mma
// tile would be mostly empty) run the SIMT kernels.
constexpr int64_t kRoutedLoraTensorCoreMinRows = 64;
bool routed_lora_uses_tensor_cores(DType data, DType matrix, int64_t num_rows);
// Whether routed_lora_shrink_cuda splits the reduction of this problem (dk columns per head)
// across blocks. Then it sums partial rows into Z with floating-point atomics, in an order that
// varies from run to run; unsplit, it writes Z once per element. The wgrad sums dw with atomics,
// and on the SIMT path dM too (across warps and row slices).
bool routed_lora_shrink_splits_cuda(DType data, DType matrix, int64_t num_rows, int64_t num_heads, int64_t dk);
constexpr int64_t kRoutedLoraMaxRank = 128;
#endif

}  // namespace mhr_ops
