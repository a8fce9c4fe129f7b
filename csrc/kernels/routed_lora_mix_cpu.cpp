#include "routed_lora_mix_cpu.h"

namespace mhr_ops {
namespace {

// Calls fn(n, wi, pi) for every row n in [n_begin, n_end), head k and skill s, with
// wi = (n*h + k)*S + s indexing the per-row weights [N, h, S] and pi = ((k*N + n)*S + s)*r the
// start of that (k, n, s) rank vector in a projection laid out [h, N, S, r].
template <typename Fn>
void for_row_head_skill(const LoraMixDims& d, int64_t n_begin, int64_t n_end, Fn&& fn) {
  const int64_t H = d.heads, S = d.skills, R = d.rank, N = d.rows;
  for (int64_t n = n_begin; n < n_end; ++n)
    for (int64_t k = 0; k < H; ++k)
      for (int64_t s = 0; s < S; ++s) fn(n, (n * H + k) * S + s, ((k * N + n) * S + s) * R);
}

}  // namespace

template <typename T>
void lora_mix_rows_cpu(const LoraMixDims& d, const T* row_w, const T* proj, T* z, int64_t n_begin, int64_t n_end) {
  const int64_t R = d.rank;
  for (int64_t n = n_begin; n < n_end; ++n)
    for (int64_t j = 0; j < R; ++j) z[n * R + j] = T(0);
  for_row_head_skill(d, n_begin, n_end, [&](int64_t n, int64_t wi, int64_t pi) {
    for (int64_t j = 0; j < R; ++j) z[n * R + j] += row_w[wi] * proj[pi + j];
  });
}

template <typename T>
void lora_spread_rows_cpu(const LoraMixDims& d, const T* row_w, const T* v, T* out, int64_t n_begin, int64_t n_end) {
  const int64_t R = d.rank;
  for_row_head_skill(d, n_begin, n_end, [&](int64_t n, int64_t wi, int64_t pi) {
    for (int64_t j = 0; j < R; ++j) out[pi + j] = row_w[wi] * v[n * R + j];
  });
}

template <typename T>
void lora_row_weight_grads_cpu(const LoraMixDims& d, const T* U, const T* gz, const T* Tm, const T* z, T* out,
                               int64_t n_begin, int64_t n_end) {
  const int64_t R = d.rank;
  for_row_head_skill(d, n_begin, n_end, [&](int64_t n, int64_t wi, int64_t pi) {
    T acc = 0;
    for (int64_t j = 0; j < R; ++j) acc += U[pi + j] * gz[n * R + j] + Tm[pi + j] * z[n * R + j];
    out[wi] = acc;
  });
}

template <typename T>
void lora_swap_pairs_cpu(const T* src, T* dst, int64_t a, int64_t b, int64_t c, int64_t e, T scale) {
  for (int64_t i = 0; i < a; ++i)
    for (int64_t j = 0; j < b; ++j) {
      const T* blk = src + (i * b + j) * c * e;  // [c, e]
      T* out = dst + (j * a + i) * e * c;        // [e, c]
      for (int64_t ci = 0; ci < c; ++ci)
        for (int64_t ei = 0; ei < e; ++ei) out[ei * c + ci] = scale * blk[ci * e + ei];
    }
}

#define MHR_MIX_INSTANTIATE(T)                                                                                        \
  template void lora_mix_rows_cpu<T>(const LoraMixDims&, const T*, const T*, T*, int64_t, int64_t);                   \
  template void lora_spread_rows_cpu<T>(const LoraMixDims&, const T*, const T*, T*, int64_t, int64_t);                \
  template void lora_row_weight_grads_cpu<T>(const LoraMixDims&, const T*, const T*, const T*, const T*, T*, int64_t, \
                                             int64_t);                                                                \
  template void lora_swap_pairs_cpu<T>(const T*, T*, int64_t, int64_t, int64_t, int64_t, T);
MHR_MIX_INSTANTIATE(float)
MHR_MIX_INSTANTIATE(double)
#undef MHR_MIX_INSTANTIATE

}  // namespace mhr_ops
