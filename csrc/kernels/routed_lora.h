// routed_lora: per-row routed low-rank update (SPEC section 3). Torch-free.
//
// Row n of x belongs to group g = group_ids[n / rows_per_group_id]. Its adapter mixes the skill
// inventory with that group's routing weights w[g, k, s], head block by head block:
//   z_n = sum_k x_n[k-block] @ (sum_s w[g,k,s] A[k,s])                       [r], fp32
//   y_n[k-block] (+)= scale * z_n @ (sum_s w[g,k,s] B[k,s])                   [d_out/h]
#pragma once

#include <cstdint>

#include "common.h"

namespace mhr_ops {

// Sizes of one routed_lora problem (checked by the binding: csrc/torch/args/routed_lora_args.h).
struct LoraDims {
  int64_t rows = 0;  // N
  int64_t d_in = 0;
  int64_t d_out = 0;
  int64_t heads = 0;        // h
  int64_t skills = 0;       // S
  int64_t rank = 0;         // r
  int64_t groups = 0;       // G
  int64_t dk_in = 0;        // d_in / h
  int64_t dk_out = 0;       // d_out / h
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

}  // namespace mhr_ops
