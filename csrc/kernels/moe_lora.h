// moe_lora: token-routed LoRA experts, output mixing (docs/API.md, moe_lora). Torch-free CPU
// kernels, and the CUDA ones at the end (moe_lora_cuda.cu).
//
// Row n of x picks k experts (slots s = n*k + j, expert e = ids[n, j], weight w[n, j]):
//   z_s = x_n @ A_e                                  [r]      (shrink, per slot)
//   y_n (+)= scale * sum_j w_nj * z_s @ B_e           [d_out]  (expand, per row)
// backward, with g_s = scale * grad_y_n @ B_e^T [r]:
//   dw_s = z_s . g_s;  gz_s = w_s * g_s
//   dx_n (+)= sum_j gz_s @ A_e^T                      (the expand kernel with A^T, no weights)
//   dA_e = sum_{s of e} x_n^T gz_s;  dB_e = sum_{s of e} scale * w_s * z_s^T grad_y_n
// Work is over slots, never over (row, expert) pairs: cost grows with N*k, not N*E.
//
// Determinism: every sum has one fixed order and code path that depend on the ids alone, not on
// how the caller splits the work across threads: z_s and g_s are sums over columns in column
// order (a short tile of slots is padded, never run by other code); a row of y / dx sums its
// slots by (expert, j) ascending; dA_e / dB_e sum their slots in slot order.
//
// Ids outside [0, E) are never dereferenced: such a slot's z / gz / dw are NaN, its row of y and
// dx is NaN, and it adds nothing to dA / dB.
#pragma once

#include <cstdint>
#include <vector>

#include "common.h"

namespace mhr_ops {

constexpr int64_t kMoeRowBlock = 64;  // rows per expand block (the unit the caller parallelizes over)

// Which expert each slot uses.
struct MoeRouting {
  const void* ids = nullptr;  // [N, k] int32 / int64, element strides below
  IndexType index_type = IndexType::kInt64;
  int64_t ids_stride_n = 0;
  int64_t ids_stride_j = 0;
  int64_t rows = 0;     // N
  int64_t top_k = 0;    // k
  int64_t experts = 0;  // E
};

// Expert of slot s, or -1 when its id is outside [0, E).
int64_t moe_expert_of(const MoeRouting& r, int64_t slot);

// Valid slots grouped by expert (a stable counting sort), for the weight gradients.
struct MoeSlotPlan {
  std::vector<int64_t> order;    // valid slots, expert 0's first, each expert's ascending
  std::vector<int64_t> start;    // [E + 1]: expert e's slots are order[start[e] .. start[e+1])
  std::vector<int64_t> invalid;  // slots whose id is outside [0, E), ascending
};

// O(N*k + E).
MoeSlotPlan moe_plan_slots(const MoeRouting& r);

// One pass over blocks of kMoeRowBlock rows; each block's slots sorted by (expert, slot):
//  1. shrink (src set): g_s = shrink_scale * src[n(s)] @ S_e, in tiles of slots of one expert;
//     forward (z null): v[s] = g_s; backward (z set): v[s] = w_s g_s, dw[s] = z_s . g_s.
//  2. expand (y set): y[n] (+)= sum over n's slots, by (expert, j), of (expand_scale * c_s * v[s])
//     @ X_e, with c_s = w_s when expand_weighted, else 1.
// forward: src x, S = A, y with X = B (weighted); backward: src grad_y, S = B^T, y = dx with
// X = A^T (unweighted). An invalid slot's v and dw are NaN and its row of y is NaN.
struct MoeRowsParams {
  MoeRouting routing;
  int64_t rank = 0;               // r
  const void* weights = nullptr;  // [N, k] of T, element strides below
  int64_t w_stride_n = 0;
  int64_t w_stride_j = 0;
  void* v = nullptr;  // [N*k, r] of T, contiguous: written by the shrink, else read
  // shrink (src null: skipped)
  const void* src = nullptr;  // [N, d_src] of T, unit column stride
  int64_t src_stride_n = 0;
  const void* shrink_mats = nullptr;  // [E, d_src, r] of T, contiguous
  int64_t d_src = 0;
  double shrink_scale = 1.0;
  const void* z = nullptr;  // backward: the forward's z [N*k, r] of T, contiguous
  void* dw = nullptr;       // backward: [N*k] of T, contiguous
  // expand (y null: skipped)
  const void* expand_mats = nullptr;  // [E, r, d_dst] of T, contiguous
  int64_t d_dst = 0;
  double expand_scale = 1.0;
  bool expand_weighted = false;
  void* y = nullptr;  // [N, d_dst] of T, unit column stride
  int64_t y_stride_n = 0;
  bool accumulate = false;  // y += update (else y = update)
  // [d_dst] of T, or null: without accumulate, y = bias + update (moe_lora_linear's CPU forward,
  // which then accumulates the base GEMM into y). CPU rows pass only: the CUDA one rejects it.
  const void* bias = nullptr;
};

// Rows [row_begin, row_end); T = float or double; use_avx2: the AVX2 + FMA build where the CPU
// has it. Results do not depend on how the caller splits the rows.
template <typename T>
void moe_lora_rows_cpu(const MoeRowsParams& p, int64_t row_begin, int64_t row_end, bool use_avx2);

// Expert weight gradients, as tasks: task t < E * ceil(d_in / block) writes a column block of
// dA_e, the others a column block of dB_e, with block = kMoeCpuColBlock on the CPU and kMoeColBlock
// on CUDA. Every expert's gradient is written whole (zero for an expert no slot uses); each task
// sums its expert's slots in the plan's order.
constexpr int64_t kMoeColBlock = 16;
constexpr int64_t kMoeCpuColBlock = 512;
struct MoeWgradParams {
  const void* x = nullptr;  // [N, d_in] of T, unit column stride
  int64_t x_stride_n = 0;
  const void* grad_y = nullptr;  // [N, d_out] of T, unit column stride
  int64_t gy_stride_n = 0;
  const void* z = nullptr;        // [N*k, r] of T: the forward's bottleneck
  const void* gz = nullptr;       // [N*k, r] of T: from the backward shrink
  const void* weights = nullptr;  // [N, k] of T, element strides below
  int64_t w_stride_n = 0;
  int64_t w_stride_j = 0;
  double scale = 1.0;
  void* dA = nullptr;  // [E, d_in, r] of T, contiguous; null: not needed
  void* dB = nullptr;  // [E, r, d_out] of T, contiguous; null: not needed
  int64_t experts = 0;
  int64_t d_in = 0;
  int64_t d_out = 0;
  int64_t rank = 0;
  int64_t top_k = 0;
};

// Inline: the CUDA side too.
inline int64_t moe_wgrad_task_count(int64_t experts, int64_t d_in, int64_t d_out, int64_t block) {
  return experts * ((d_in + block - 1) / block + (d_out + block - 1) / block);
}
inline int64_t moe_lora_wgrad_tasks(int64_t experts, int64_t d_in, int64_t d_out) {
  return moe_wgrad_task_count(experts, d_in, d_out, kMoeColBlock);
}
inline int64_t moe_lora_wgrad_cpu_tasks(int64_t experts, int64_t d_in, int64_t d_out) {
  return moe_wgrad_task_count(experts, d_in, d_out, kMoeCpuColBlock);
}
// The CPU's dA tasks, [0, this): a caller that wants only dA or only dB runs just its range.
inline int64_t moe_lora_wgrad_cpu_a_tasks(int64_t experts, int64_t d_in) {
  return moe_wgrad_task_count(experts, d_in, 0, kMoeCpuColBlock);
}
template <typename T>
void moe_lora_wgrad_cpu(const MoeWgradParams& p, const MoeSlotPlan& plan, int64_t task_begin, int64_t task_end,
                        bool use_avx2);

#if defined(MHR_OPS_WITH_CUDA)
// CUDA (moe_lora_cuda.cu, SIMT): the same passes and contracts. `data` is the dtype of src and y
// (rows pass) and of x and grad_y (wgrad); weights, matrices, v, z, gz, dw, dA and dB are of its
// accumulation type (fp32; fp64 for fp64 data). Each returns a cudaError_t value.
constexpr int64_t kMoeRowsMaxSmem = 48 * 1024;  // the rows pass's shared memory (grows with k and E)
int64_t moe_lora_rows_cuda_smem(int64_t top_k, int64_t experts);
int moe_lora_rows_cuda(const MoeRowsParams& p, DType data, void* stream);
// Whether moe_lora_rows_cuda runs the tensor-core kernel (moe_lora_tc_cuda.cu): fp16 / bf16 data,
// more than kMoeTensorCoreMinRows rows (below that the SIMT kernel's per-slot warps waste less on
// padding), and its shared memory (grows with k and E) within kMoeRowsMaxSmem. Its results agree
// with the SIMT kernel's to fp32 rounding (fp32 operands as two tf32 terms each), except y / dx of
// bf16 data, which carry the tf32 rounding of v and of the expand's matrices; not bit for bit.
constexpr int64_t kMoeTensorCoreMinRows = kMoeRowBlock;
bool moe_lora_uses_tensor_cores(DType data, int64_t rows, int64_t top_k, int64_t experts);
int moe_lora_rows_tc(const MoeRowsParams& p, DType data, void* stream);
// The weight gradients on tensor cores, which moe_lora_wgrad_cuda runs for every fp16 / bf16 data:
// tasks of kMoeTcColBlock columns (moe_lora_wgrad_tc_tasks), the same contract as the SIMT wgrad,
// each sum over the expert's slots in plan order, results to fp32 rounding.
constexpr int64_t kMoeTcColBlock = 64;
inline int64_t moe_lora_wgrad_tc_tasks(int64_t experts, int64_t d_in, int64_t d_out) {
  return moe_wgrad_task_count(experts, d_in, d_out, kMoeTcColBlock);
}
inline bool moe_lora_wgrad_uses_tensor_cores(DType data) { return data == DType::kFloat16 || data == DType::kBFloat16; }
int moe_lora_wgrad_tc(const MoeWgradParams& p, const int64_t* order, const int64_t* start, DType data, void* stream);
// The weight gradients' slot plan on the device, no host sync: counts [E], start [E + 1] and order
// [N * k] (valid slots by expert, each expert's ascending), all int64 device buffers.
int moe_lora_plan_cuda(const MoeRouting& r, int64_t* counts, int64_t* start, int64_t* order, void* stream);
int moe_lora_wgrad_cuda(const MoeWgradParams& p, const int64_t* order, const int64_t* start, DType data, void* stream);
#endif

}  // namespace mhr_ops
