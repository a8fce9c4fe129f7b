// routed_lora forward on the CPU for rows in any group order, without BLAS. Torch-free.
//
// Two row-tile kernels (tiles of up to kLoraRowTile rows; plain loops over the rank, which the
// compiler vectorizes), for the problems where the grouped path's runs are short:
//  - project-then-mix in registers (LoraRowsParams): every row of a tile projects its head blocks
//    of x onto all S skills, weights them with its own group's w[g, k, s] and sums: no mixed
//    adapter is formed. The skill matrices are read once per tile, so few rows (decode, one row
//    per task) cost one pass over A and B; it runs in steps over (head, row tile) items, so that
//    one row still keeps every thread busy.
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
  int64_t rows = 0;   // N
  void* y = nullptr;  // [N, d_out] of T, unit column stride
  int64_t y_stride_n = 0;
  bool accumulate = false;  // y += update (else y = update)
  void* z = nullptr;        // out: [N, r] of T, contiguous
  void* zh = nullptr;       // scratch: [N, h, r] of T, contiguous (each head's part of z)
  int64_t d_in = 0;
  int64_t d_out = 0;
  int64_t heads = 0;
  int64_t skills = 0;
  int64_t rank = 0;
  int64_t groups = 0;
  double scale = 1.0;
};

// The project-then-mix kernel runs in three steps, so that few rows (one decode token per task)
// still keep every thread busy: the steps' items are (head, row tile) pairs or rows, and every sum
// has a fixed order, so the result does not depend on how the items are split over threads.
//  - kProject, items head x tile (item = k * tiles + tile):
//      zh[n, k, :] = sum_s w[g_n, k, s] * (x[n, k-block] @ A[k, s])
//  - kSumHeads, items rows: z[n] = sum_k zh[n, k] (k in order)
//  - kExpand, items as kProject: y[n, k-block] (+)= sum_s (scale w[g_n, k, s] z[n]) @ B[k, s]
// Each step needs the previous one finished for all items.
enum class LoraRowsStep { kProject, kSumHeads, kExpand };
inline int64_t lora_row_tiles(int64_t rows) { return (rows + kLoraRowTile - 1) / kLoraRowTile; }
inline int64_t lora_rows_step_items(const LoraRowsParams& p, LoraRowsStep step) {
  return step == LoraRowsStep::kSumHeads ? p.rows : p.heads * lora_row_tiles(p.rows);
}

// Items [begin, end) of one step, T = float or double. use_avx2: the AVX2 + FMA build of the
// loops where the CPU has it (the caller passes what ATEN_CPU_CAPABILITY allows).
template <typename T>
void routed_lora_rows_forward_step_cpu(const LoraRowsParams& p, LoraRowsStep step, int64_t begin, int64_t end,
                                       bool use_avx2);
// All three steps over all items, one after the other on the calling thread.
template <typename T>
void routed_lora_rows_forward_cpu(const LoraRowsParams& p, bool use_avx2);

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

// The backward of the project-then-mix kernel (for few rows: a training step of short sequences,
// one task each), in steps over heads, (head, skill) pairs and rows like the forward's, so that
// each skill matrix and its gradient is read and written once per call, not once per row, and
// few rows still keep every thread busy. Per row n of group g (w = w[g, k, s]):
//   gz[n] = scale * sum_{k,s} w * (gy[n, k-block] @ B[k,s]^T)                       [N, r]
//   dA[k,s] = sum_n w x[n, k-block]^T gz[n];  dB[k,s] = scale sum_n w z[n]^T gy[n, k-block]
//   dw[g,k,s] += (x[n, k-block] @ A[k,s]) . gz[n] + scale * z[n] . (gy[n, k-block] @ B[k,s]^T)
//   dx[n, k-block] (+)= sum_s w gz[n] @ A[k,s]^T                                     (optional)
// The steps, each needing the previous one finished for all items:
//  - kProject, items head x row (item = k * N + n): pgy[n, k, s] = gy[n, k-block] @ B[k,s]^T for
//    every s, and gzh[n, k] = scale * sum_s w pgy[n, k, s]
//  - kSumHeads, items rows: gz[n] = sum_k gzh[n, k] (k in order)
//  - kWeights, items (head, skill) pairs (item = k * S + s): dA[k,s] and dB[k,s] written whole, and
//    dw[., k, s] accumulated over the rows in order (dw zeroed by the caller)
//  - kDx, items head x row: dx[n, k-block]
// Every sum has a fixed order: the result does not depend on how the items are split.
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
  int64_t rows = 0;                    // N
  void* gz = nullptr;                  // out: [N, r] of T, contiguous
  void* pgy = nullptr;                 // scratch: [N, h, S, r] of T
  void* gzh = nullptr;                 // scratch: [N, h, r] of T
  void* dA = nullptr;                  // out: [h, S, d_in/h, r] of T; null: not needed
  void* dB = nullptr;                  // out: [h, S, r, d_out/h] of T; null: not needed
  void* dw = nullptr;                  // [G, h, S] of T, zeroed by the caller; null: not needed
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

enum class LoraRowsGradStep { kProject, kSumHeads, kWeights, kDx };
inline int64_t lora_rows_grad_step_items(const LoraRowsGradParams& p, LoraRowsGradStep step) {
  switch (step) {
    case LoraRowsGradStep::kSumHeads:
      return p.rows;
    case LoraRowsGradStep::kWeights:
      return p.heads * p.skills;
    default:
      return p.heads * p.rows;
  }
}

// Items [begin, end) of one step. T = float or double; use_avx2 as above.
template <typename T>
void routed_lora_rows_backward_step_cpu(const LoraRowsGradParams& p, LoraRowsGradStep step, int64_t begin, int64_t end,
                                        bool use_avx2);
// All steps over all items, one after the other on the calling thread.
template <typename T>
void routed_lora_rows_backward_cpu(const LoraRowsGradParams& p, bool use_avx2);

// Stable counting sort of rows by group: order[0 .. N) lists rows of group 0, then group 1, ...
// (each in row order); start[g] / count[g] locate group g's rows (start has G + 1 entries).
// Rows whose group is outside [0, G) are left out of `order` (their count is returned).
int64_t sort_rows_by_group(const int64_t* row_group, int64_t rows, int64_t groups, int64_t* order, int64_t* start);

}  // namespace mhr_ops
