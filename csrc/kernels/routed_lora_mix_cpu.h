// routed_lora on the CPU: the per-row mixing loops of project-then-mix and the re-layouts the
// runs paths need, as plain loops over contiguous buffers (a few FLOPs per element: strided
// tensor reductions would cost more in dispatch than in arithmetic here). Torch-free; T = float
// or double. Row ranges [n_begin, n_end) let the caller split rows across threads.
//
// Project-then-mix lays a projection out as [h, N, S, r]: row n's rank vector for head k and
// skill s starts at ((k * N + n) * S + s) * r. Its per-row routing weights are [N, h, S].
#pragma once

#include <cstdint>

namespace mhr_ops {

// Sizes of a project-then-mix problem.
struct LoraMixDims {
  int64_t rows = 0;    // N
  int64_t heads = 0;   // h
  int64_t skills = 0;  // S
  int64_t rank = 0;    // r
};

// z[n, :] = sum_{k,s} row_w[n, k, s] * proj[k, n, s, :]        z [N, r], written
template <typename T>
void lora_mix_rows_cpu(const LoraMixDims& d, const T* row_w, const T* proj, T* z, int64_t n_begin, int64_t n_end);

// out[k, n, s, :] = row_w[n, k, s] * v[n, :]                   out [h, N, S, r], written
template <typename T>
void lora_spread_rows_cpu(const LoraMixDims& d, const T* row_w, const T* v, T* out, int64_t n_begin, int64_t n_end);

// The routing-weight gradient of every row:
// out[n, k, s] = U[k, n, s, :] . gz[n, :] + Tm[k, n, s, :] . z[n, :]     out [N, h, S], written
template <typename T>
void lora_row_weight_grads_cpu(const LoraMixDims& d, const T* U, const T* gz, const T* Tm, const T* z, T* out,
                               int64_t n_begin, int64_t n_end);

// dst [b, a, e, c] = scale * src [a, b, c, e] permuted (both contiguous): a batch of transposed
// [c, e] blocks with their two outer dims swapped. A plain loop: a permuted copy with a
// transposed last dimension costs several times more through ATen here.
template <typename T>
void lora_swap_pairs_cpu(const T* src, T* dst, int64_t a, int64_t b, int64_t c, int64_t e, T scale);

}  // namespace mhr_ops
