// CPU kernel for the grouped routed_lora backward (see routed_lora.h), AVX2 + FMA, fp32, ranks
// 8 and 16: for a tile of rows, one pass over grad_y computes both gz = grad_y @ (scale B_g^T)
// and the dB_g^T partial, and one pass over x the dA_g partial, with gz held in registers. BLAS
// needs three thin GEMMs (three cold passes) for the same work. Other cases return false and the
// caller uses BLAS.
#include "routed_lora.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define MHR_HAVE_AVX2_PATH 1
#endif

namespace mhr_ops {

#if defined(MHR_HAVE_AVX2_PATH)
namespace {

// kRows rows starting at n0, rank = 8 * kV.
template <int kV, int kRows>
__attribute__((target("avx2,fma"))) void group_tile(const LoraGroupGradParams& p, int64_t n0) {
  constexpr int kR = 8 * kV;
  const float* gy = static_cast<const float*>(p.grad_y) + n0 * p.gy_stride_n;
  const float* x = static_cast<const float*>(p.x) + n0 * p.x_stride_n;
  const float* z = static_cast<const float*>(p.z) + n0 * kR;
  const float* bt = static_cast<const float*>(p.bt_mix);
  float* dbt = static_cast<float*>(p.dbt);
  float* da = static_cast<float*>(p.da);
  const __m256 scale = _mm256_set1_ps(static_cast<float>(p.scale));
  __m256 gz[kRows][kV], zs[kRows][kV];
  for (int t = 0; t < kRows; ++t)
    for (int v = 0; v < kV; ++v) {
      gz[t][v] = _mm256_setzero_ps();
      zs[t][v] = _mm256_mul_ps(_mm256_loadu_ps(z + t * kR + 8 * v), scale);
    }
  // grad_y pass: gz[t] += gy[t, c] * bt[c, :];  dbt[c, :] += gy[t, c] * scale * z[t, :]
  for (int64_t c = 0; c < p.d_out; ++c) {
    __m256 b[kV], d[kV];
    for (int v = 0; v < kV; ++v) {
      b[v] = _mm256_loadu_ps(bt + c * kR + 8 * v);
      d[v] = _mm256_loadu_ps(dbt + c * kR + 8 * v);
    }
    for (int t = 0; t < kRows; ++t) {
      const __m256 g = _mm256_set1_ps(gy[t * p.gy_stride_n + c]);
      for (int v = 0; v < kV; ++v) {
        gz[t][v] = _mm256_fmadd_ps(g, b[v], gz[t][v]);
        d[v] = _mm256_fmadd_ps(g, zs[t][v], d[v]);
      }
    }
    for (int v = 0; v < kV; ++v) _mm256_storeu_ps(dbt + c * kR + 8 * v, d[v]);
  }
  // x pass: da[c, :] += x[t, c] * gz[t]
  for (int64_t c = 0; c < p.d_in; ++c) {
    __m256 a[kV];
    for (int v = 0; v < kV; ++v) a[v] = _mm256_loadu_ps(da + c * kR + 8 * v);
    for (int t = 0; t < kRows; ++t) {
      const __m256 xv = _mm256_set1_ps(x[t * p.x_stride_n + c]);
      for (int v = 0; v < kV; ++v) a[v] = _mm256_fmadd_ps(xv, gz[t][v], a[v]);
    }
    for (int v = 0; v < kV; ++v) _mm256_storeu_ps(da + c * kR + 8 * v, a[v]);
  }
  float* gz_out = static_cast<float*>(p.gz) + n0 * kR;
  for (int t = 0; t < kRows; ++t)
    for (int v = 0; v < kV; ++v) _mm256_storeu_ps(gz_out + t * kR + 8 * v, gz[t][v]);
}

template <int kV>
void group_rows(const LoraGroupGradParams& p) {
  constexpr int kTile = kV == 1 ? 4 : 2;  // gz and the scaled z of a tile stay in registers
  int64_t n = p.row_begin;
  for (; n + kTile <= p.row_end; n += kTile) group_tile<kV, kTile>(p, n);
  for (; n < p.row_end; ++n) group_tile<kV, 1>(p, n);
}

}  // namespace
#endif

bool routed_lora_group_grads_supported(int64_t rank, int64_t x_stride_c, int64_t gy_stride_c) {
#if defined(MHR_HAVE_AVX2_PATH)
  static const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has_avx2 && (rank == 8 || rank == 16) && x_stride_c == 1 && gy_stride_c == 1;
#else
  (void)rank, (void)x_stride_c, (void)gy_stride_c;
  return false;
#endif
}

void routed_lora_group_grads_cpu(const LoraGroupGradParams& p) {
#if defined(MHR_HAVE_AVX2_PATH)
  if (p.rank == 8)
    group_rows<1>(p);
  else if (p.rank == 16)
    group_rows<2>(p);
#else
  (void)p;
#endif
}

}  // namespace mhr_ops
