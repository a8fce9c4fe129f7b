// routed_lora: per-row routed low-rank update (SPEC section 3). Torch-free.
//
// Row n of x belongs to group g = group_ids[n / rows_per_group_id]. Its adapter mixes the skill
// inventory with that group's routing weights w[g, k, s], head block by head block:
//   z_n = sum_k x_n[k-block] @ (sum_s w[g,k,s] A[k,s])                       [r], fp32
//   y_n[k-block] (+)= scale * z_n @ (sum_s w[g,k,s] B[k,s])                   [d_out/h]
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

namespace mhr_ops {

// Sizes of one routed_lora problem (checked by the binding: csrc/torch/routed_lora_args.h).
struct LoraDims {
  int64_t rows = 0;    // N
  int64_t d_in = 0;
  int64_t d_out = 0;
  int64_t heads = 0;   // h
  int64_t skills = 0;  // S
  int64_t rank = 0;    // r
  int64_t groups = 0;  // G
  int64_t dk_in = 0;   // d_in / h
  int64_t dk_out = 0;  // d_out / h
  int64_t rows_per_id = 1;  // row n uses group_ids[n / rows_per_id]
};

// Where a skill matrix element lives: M[k, s](row, col) = base[k*stride_k + s*stride_s +
// row*stride_row + col*stride_col]. Strides in elements.
struct SkillMatrices {
  const void* data = nullptr;  // element type: the kernel's matrix type
  int64_t stride_k = 0;
  int64_t stride_s = 0;
  int64_t stride_row = 0;
  int64_t stride_col = 0;
};

// Routing of rows to groups, and the groups' mixing weights.
struct RowRouting {
  // weights: [num_groups, num_heads, num_skills], fp32 (fp64 when the data is fp64). Strides in
  // elements.
  const void* weights = nullptr;
  int64_t w_stride_g = 0;
  int64_t w_stride_k = 0;
  int64_t w_stride_s = 0;
  // group_ids: row n uses group group_ids[(n / rows_per_group_id) * ids_stride]. An id outside
  // [0, num_groups) is never dereferenced: that row's output is NaN.
  const void* group_ids = nullptr;
  IndexType index_type = IndexType::kInt64;
  int64_t ids_stride = 1;
  int64_t rows_per_group_id = 1;
  int64_t num_groups = 0;  // G
  int64_t num_heads = 0;   // h
  int64_t num_skills = 0;  // S
};

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
  bool accumulate = false;  // y += update (else y = update, or bias + update)
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

// x86 instruction sets the kernel below has variants for, in increasing order.
enum class CpuIsa : int { kNone = 0, kAvx2 = 1, kAvx512 = 2 };

// The variant that takes this problem on this CPU, using no instruction set above max_isa:
// AVX-512 for ranks 4, 8, 16, 32 (d_in and d_out multiples of 16 / rank below rank 16), AVX2
// + FMA for ranks 8 and 16; both need unit column strides. kNone: the caller runs its BLAS path.
CpuIsa routed_lora_group_grads_isa(int64_t rank, int64_t d_in, int64_t d_out, int64_t x_stride_c,
                                   int64_t gy_stride_c, CpuIsa max_isa);
// Runs variant `isa`; returns false (doing nothing) if that variant does not take the problem.
bool routed_lora_group_grads_cpu(const LoraGroupGradParams& p, CpuIsa isa);

// The forward's variant for this problem: AVX-512 only, same ranks and shapes as above.
CpuIsa routed_lora_group_forward_isa(int64_t rank, int64_t d_in, int64_t d_out, CpuIsa max_isa);
bool routed_lora_group_forward_cpu(const LoraGroupForwardParams& p, CpuIsa isa);

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
