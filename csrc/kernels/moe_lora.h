// moe_lora: token-routed LoRA experts, output mixing (docs/API.md, moe_lora). Torch-free CPU kernels.
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
// Determinism: every sum has one fixed order that depends on the ids alone, not on how the
// caller splits the work across threads: z_s and g_s are sums over columns in column order; a
// row of y / dx sums its slots by (expert, j) ascending; dA_e / dB_e sum their slots in the
// counting sort's order (slot index ascending).
//
// Ids outside [0, E) are never dereferenced: such a slot's z / gz / dw are NaN, its row of y and
// dx is NaN, and it adds nothing to dA / dB.
#pragma once

#include <cstdint>
#include <vector>

#include "common.h"

namespace mhr_ops {

constexpr int64_t kMoeRowBlock = 16;  // rows per expand block (the unit the caller parallelizes over)
constexpr int64_t kMoeSlotTile = 8;   // slots per shrink tile

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

// Valid slots grouped by expert (a stable counting sort) and cut into pieces of one expert each.
struct MoeSlotPlan {
  std::vector<int64_t> order;          // valid slots, expert 0's first, each expert's ascending
  std::vector<int64_t> start;          // [E + 1]: expert e's slots are order[start[e] .. start[e+1])
  std::vector<int64_t> invalid;        // slots whose id is outside [0, E), ascending
  std::vector<int64_t> piece_begin;    // pieces: order[piece_begin[i] .. piece_end[i]) ...
  std::vector<int64_t> piece_end;
  std::vector<int64_t> piece_expert;   // ... all of expert piece_expert[i]
};

// O(N*k + E). Pieces hold max_piece_slots slots rounded up to a multiple of kMoeSlotTile (the
// last piece of an expert fewer), so results do not depend on max_piece_slots.
MoeSlotPlan moe_plan_slots(const MoeRouting& r, int64_t max_piece_slots);

// Per-slot shrink over pieces [piece_begin, piece_end) of `plan`:
//   out[s] = scale * src[n(s)] @ M_e
// or, in the backward (weights set): g = scale * src[n(s)] @ M_e, out[s] = w_s * g, dw[s] = z_s . g.
struct MoeShrinkParams {
  const void* src = nullptr;  // [N, d] of T, unit column stride: x, or grad_y
  int64_t src_stride_n = 0;
  const void* mats = nullptr;  // [E, d, r] of T, contiguous: A, or B^T
  int64_t d = 0;
  int64_t rank = 0;
  int64_t top_k = 0;
  double scale = 1.0;
  void* out = nullptr;  // [N*k, r] of T, contiguous
  // Backward only (null in the forward):
  const void* weights = nullptr;  // [N, k] of T, element strides below
  int64_t w_stride_n = 0;
  int64_t w_stride_j = 0;
  const void* z = nullptr;  // the forward's z [N*k, r] of T, contiguous
  void* dw = nullptr;       // [N*k] of T, contiguous
};

// T = float or double; use_avx2: the AVX2 + FMA build where the CPU has it.
template <typename T>
void moe_lora_shrink_cpu(const MoeShrinkParams& p, const MoeSlotPlan& plan, int64_t piece_begin, int64_t piece_end,
                         bool use_avx2);

// NaN into out[s] (r values) and, if given, dw[s], for every invalid slot of the plan.
template <typename T>
void moe_lora_fill_invalid_cpu(const MoeSlotPlan& plan, T* out, int64_t rank, T* dw);

// Per-row expand over rows [row_begin, row_end), in blocks of kMoeRowBlock rows:
//   y[n] (+)= sum over n's slots s, by (expert, j) ascending, of (scale * w_s * v[s]) @ M_e
// (w_s = 1 without weights). A row with an invalid slot is NaN.
struct MoeExpandParams {
  const void* v = nullptr;  // [N*k, r] of T, contiguous: z, or gz
  const void* weights = nullptr;  // [N, k] of T, element strides below; null: all 1
  int64_t w_stride_n = 0;
  int64_t w_stride_j = 0;
  double scale = 1.0;
  const void* mats = nullptr;  // [E, r, d] of T, contiguous: B, or A^T
  MoeRouting routing;
  void* y = nullptr;  // [N, d] of T, unit column stride
  int64_t y_stride_n = 0;
  bool accumulate = false;  // y += update (else y = update)
  int64_t d = 0;
  int64_t rank = 0;
};

template <typename T>
void moe_lora_expand_cpu(const MoeExpandParams& p, int64_t row_begin, int64_t row_end, bool use_avx2);

// Expert weight gradients, as tasks: task t < E * ceil(d_in / kMoeColBlock) writes a column block
// of dA_e, the others a column block of dB_e. Every expert's gradient is written whole (zero for an
// expert no slot uses); each task sums its expert's slots in the plan's order.
constexpr int64_t kMoeColBlock = 16;
struct MoeWgradParams {
  const void* x = nullptr;  // [N, d_in] of T, unit column stride
  int64_t x_stride_n = 0;
  const void* grad_y = nullptr;  // [N, d_out] of T, unit column stride
  int64_t gy_stride_n = 0;
  const void* z = nullptr;   // [N*k, r] of T: the forward's bottleneck
  const void* gz = nullptr;  // [N*k, r] of T: from the backward shrink
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

int64_t moe_lora_wgrad_tasks(int64_t experts, int64_t d_in, int64_t d_out);
template <typename T>
void moe_lora_wgrad_cpu(const MoeWgradParams& p, const MoeSlotPlan& plan, int64_t task_begin, int64_t task_end,
                        bool use_avx2);

}  // namespace mhr_ops
