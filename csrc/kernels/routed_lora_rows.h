// routed_lora forward on the CPU for rows in any group order, without BLAS. Torch-free.
//
// Two row-tile kernels (tiles of up to kLoraRowTile rows; plain loops over the rank, which the
// compiler vectorizes), for the problems where the grouped path's runs are short:
//  - project-then-mix in registers (LoraRowsParams): every row of a tile projects its head blocks
//    of x onto all S skills, weights them with its own group's w[g, k, s] and sums: no mixed
//    adapter is formed. The skill matrices are read once per tile, so few rows (decode, one row
//    per task) cost one pass over A and B.
//  - gathered (LoraGatheredParams): rows listed by group (a counting sort by the caller), each
//    group's adapter mixed once beforehand (A_g [d_in, r], scale * B_g [r, d_out]); a tile of
//    rows of one group reads its adapter once. Many rows over few groups (serving many examples
//    of a few tasks) cost one pass over x and one over y, as plain LoRA would.
// Both write z = x @ A_g [N, r] per row (the backward's bottleneck) and y (+)= scale z @ B_g.
#pragma once

#include <cstdint>

namespace mhr_ops {

constexpr int64_t kLoraRowTile = 8;

// Rows [start, start + rows) of one group, and the slot of that group's mixed adapter in the
// caller's per-slot buffers. For the gathered kernel, start indexes the grouped row list.
struct LoraRun {
  int64_t start = 0;
  int64_t rows = 0;
  int64_t group = 0;
  int64_t slot = 0;
};

struct LoraRowsParams {
  const void* x = nullptr;  // [N, d_in] of T, unit column stride
  int64_t x_stride_n = 0;
  const void* A = nullptr;        // [h, S, d_in/h, r] of T, contiguous
  const void* B = nullptr;        // [h, S, r, d_out/h] of T, contiguous
  const void* weights = nullptr;  // [G, h, S] of T, contiguous
  // group of each row [N]; an id outside [0, G) is never dereferenced: that row's z and y are NaN.
  const int64_t* row_group = nullptr;
  void* y = nullptr;  // [N, d_out] of T, unit column stride
  int64_t y_stride_n = 0;
  bool accumulate = false;  // y += update (else y = update)
  void* z = nullptr;        // out: [N, r] of T, contiguous
  int64_t d_in = 0;
  int64_t d_out = 0;
  int64_t heads = 0;
  int64_t skills = 0;
  int64_t rank = 0;
  int64_t groups = 0;
  double scale = 1.0;
};

// Rows [row_begin, row_end) (any groups), T = float or double. use_avx2: the AVX2 + FMA build of
// the loops where the CPU has it (the caller passes what ATEN_CPU_CAPABILITY allows).
template <typename T>
void routed_lora_rows_forward_cpu(const LoraRowsParams& p, int64_t row_begin, int64_t row_end, bool use_avx2);

struct LoraGatheredParams {
  const void* x = nullptr;  // [N, d_in] of T, unit column stride
  int64_t x_stride_n = 0;
  void* y = nullptr;  // [N, d_out] of T, unit column stride
  int64_t y_stride_n = 0;
  bool accumulate = false;          // y += update (else y = update, or bias + update)
  const void* bias = nullptr;       // [d_out] of T, contiguous, added when not accumulating; may be null
  void* z = nullptr;                // out: [N, r] of T, contiguous
  const void* a_mix = nullptr;      // [slots, d_in, r] of T, contiguous: A_g of each slot
  const void* b_mix = nullptr;      // [slots, r, d_out] of T, contiguous: scale * B_g of each slot
  const int64_t* rows = nullptr;    // row indices, grouped: piece i is rows[pieces[i].start ...]
  const LoraRun* pieces = nullptr;  // [pieces]: offset into rows, number of rows, slot in a_mix / b_mix
  int64_t d_in = 0;
  int64_t d_out = 0;
  int64_t rank = 0;
};

// Pieces [piece_begin, piece_end); pieces write disjoint rows. T = float or double.
template <typename T>
void routed_lora_gathered_forward_cpu(const LoraGatheredParams& p, int64_t piece_begin, int64_t piece_end,
                                      bool use_avx2);

// The backward of the project-then-mix kernel, one row at a time (for few rows: a training step of
// short sequences, one task each): per row it re-projects x and grad_y onto every skill, so the
// cost is ~4 S times plain LoRA's; batches of many rows take the caller's BLAS paths.
//   gz = scale * sum_{k,s} w[k,s] * (gy[k-block] @ B[k,s]^T)         (written per row, [N, r])
//   dx[k-block] (+)= sum_s w[k,s] * gz @ A[k,s]^T                       (optional)
//   dA[k,s] += w[k,s] * x[k-block]^T gz;  dB[k,s] += scale w[k,s] z^T gy[k-block]
//   dw[g,k,s] += (x[k-block] @ A[k,s]) . gz + scale * z . (gy[k-block] @ B[k,s]^T)
// dA, dB, dw are summed into the caller's accumulators (zeroed by it; one set per thread).
struct LoraRowsGradParams {
  const void* x = nullptr;  // [N, d_in] of T, unit column stride
  int64_t x_stride_n = 0;
  const void* grad_y = nullptr;  // [N, d_out] of T, unit column stride
  int64_t gy_stride_n = 0;
  const void* z = nullptr;             // the forward's bottleneck [N, r] of T, contiguous
  const void* A = nullptr;             // [h, S, d_in/h, r] of T, contiguous
  const void* B = nullptr;             // [h, S, r, d_out/h] of T, contiguous
  const void* weights = nullptr;       // [G, h, S] of T, contiguous
  const int64_t* row_group = nullptr;  // [N], ids in [0, G) (checked by the caller)
  void* gz = nullptr;                  // out: [N, r] of T, contiguous
  void* dx = nullptr;                  // [N, d_in] of T, unit column stride; null: not needed
  int64_t dx_stride_n = 0;
  bool dx_accumulate = false;
  int64_t d_in = 0;
  int64_t d_out = 0;
  int64_t heads = 0;
  int64_t skills = 0;
  int64_t rank = 0;
  double scale = 1.0;
};

// Rows [row_begin, row_end); dA [h, S, d_in/h, r], dB [h, S, r, d_out/h], dw [G, h, S] of T are
// accumulated into (each may be null when not needed). T = float or double; use_avx2 as above.
template <typename T>
void routed_lora_rows_backward_cpu(const LoraRowsGradParams& p, int64_t row_begin, int64_t row_end, T* dA, T* dB, T* dw,
                                   bool use_avx2);

// Stable counting sort of rows by group: order[0 .. N) lists rows of group 0, then group 1, ...
// (each in row order); start[g] / count[g] locate group g's rows (start has G + 1 entries).
// Rows whose group is outside [0, G) are left out of `order` (their count is returned).
int64_t sort_rows_by_group(const int64_t* row_group, int64_t rows, int64_t groups, int64_t* order, int64_t* start);

}  // namespace mhr_ops
