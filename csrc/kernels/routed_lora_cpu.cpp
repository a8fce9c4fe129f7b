// CPU kernel for the grouped routed_lora backward (see routed_lora.h), fp32: for a tile of
// rows, one pass over grad_y computes both gz = grad_y @ (scale B_g^T) and the dB_g^T partial,
// and one pass over x the dA_g partial, with gz held in registers. BLAS needs three thin GEMMs
// (three cold passes over the rows) for the same work. Two variants:
//  - AVX-512: ranks 4, 8, 16, 32. A vector holds kP = 16 / r columns' rank vectors when r < 16
//    (the [d, r] matrices are interleaved into a per-thread scratch so that one broadcast load
//    of kP consecutive grad_y / x values feeds a whole vector), or r / 16 vectors per column.
//  - AVX2 + FMA: ranks 8 and 16, one column's rank vector in one or two 8-lane vectors.
// Other ranks, CPUs or layouts: the caller runs its BLAS path.
#include "routed_lora_cpu.h"

#include "cpu_scratch.h"

#include <cstring>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define MHR_HAVE_X86_PATHS 1
#endif

namespace mhr_ops {

#if defined(MHR_HAVE_X86_PATHS)
namespace {

// ---- AVX2: kRows rows starting at n0, rank = 8 * kV ----
template <int kV, int kRows>
__attribute__((target("avx2,fma"))) void avx2_tile(const LoraGroupGradParams& p, const float* a_rows, int64_t n0) {
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
  if (a_rows == nullptr) return;
  // dx pass: dx[t, c] (+)= sum_j gz[t, j] A_g[c, j], 8 columns at a time (a_rows = A_g^T [r, d_in])
  const int64_t full = p.d_in / 8 * 8;
  for (int t = 0; t < kRows; ++t) {
    float* o = static_cast<float*>(p.dx) + (n0 + t) * p.dx_stride_n;
    const float* g = gz_out + t * kR;
    for (int64_t c = 0; c < full; c += 8) {
      __m256 acc = p.dx_accumulate ? _mm256_loadu_ps(o + c) : _mm256_setzero_ps();
      for (int j = 0; j < kR; ++j)
        acc = _mm256_fmadd_ps(_mm256_set1_ps(g[j]), _mm256_loadu_ps(a_rows + j * p.d_in + c), acc);
      _mm256_storeu_ps(o + c, acc);
    }
    for (int64_t c = full; c < p.d_in; ++c) {
      float acc = p.dx_accumulate ? o[c] : 0.f;
      for (int j = 0; j < kR; ++j) acc += g[j] * a_rows[j * p.d_in + c];
      o[c] = acc;
    }
  }
}

// [d, r] row-major -> its transpose [r, d].
inline void transpose_to_rows(const float* m, int64_t d, int64_t r, float* rows) {
  for (int64_t c = 0; c < d; ++c)
    for (int64_t j = 0; j < r; ++j) rows[j * d + c] = m[c * r + j];
}

template <int kV>
void avx2_rows(const LoraGroupGradParams& p) {
  constexpr int kTile = kV == 1 ? 4 : 2;  // gz and the scaled z of a tile stay in registers
  float* rows = nullptr;                  // A_g^T for the dx pass
  if (p.dx != nullptr) {
    rows = thread_scratch<float>(static_cast<size_t>(p.d_in) * p.rank);
    transpose_to_rows(static_cast<const float*>(p.a_mix), p.d_in, p.rank, rows);
  }
  int64_t n = p.row_begin;
  for (; n + kTile <= p.row_end; n += kTile) avx2_tile<kV, kTile>(p, rows, n);
  for (; n < p.row_end; ++n) avx2_tile<kV, 1>(p, rows, n);
}

// ---- AVX-512 ----
// Layout of a [d, r] matrix M in vectors: column group q (columns q*kP .. q*kP + kP - 1) is kV
// vectors; lane L of the group (L = 16 v + l) holds M[q*kP + L % kP, L / kP]. For kP = 1 that
// is M's own row-major layout.
template <int kR>
struct Avx512Shape {
  static constexpr int kP = kR < 16 ? 16 / kR : 1;  // columns per vector
  static constexpr int kV = kR < 16 ? 1 : kR / 16;  // vectors per column group
  static constexpr int kLanes = 16 * kV;            // = kR * kP
  static constexpr int kRows = kV == 1 ? 8 : 4;     // rows per tile: 2 * kRows * kV accumulators
};

// kP consecutive floats at src, repeated across the vector (a broadcast load).
template <int kP>
__attribute__((target("avx512f"))) inline __m512 broadcast_columns(const float* src) {
  if constexpr (kP == 1) {
    return _mm512_set1_ps(*src);
  } else if constexpr (kP == 2) {
    double pair;
    std::memcpy(&pair, src, sizeof(pair));
    return _mm512_castpd_ps(_mm512_set1_pd(pair));
  } else {
    static_assert(kP == 4, "kP is 1, 2 or 4");
    return _mm512_maskz_broadcast_f32x4(0xFFFF, _mm_loadu_ps(src));  // (the unmasked form warns in GCC 12)
  }
}

// A rank vector v [kR] spread over a column group's lanes: out[L] = v[L / kP].
template <int kR>
inline void spread_rank(const float* v, float scale, float* out) {
  using S = Avx512Shape<kR>;
  for (int lane = 0; lane < S::kLanes; ++lane) out[lane] = scale * v[lane / S::kP];
}

// [d, kR] row-major <-> the vector layout (only called for kP > 1; d % kP == 0).
template <int kR>
void to_vector_layout(const float* m, int64_t d, float* out) {
  using S = Avx512Shape<kR>;
  for (int64_t q = 0; q < d / S::kP; ++q)
    for (int lane = 0; lane < S::kLanes; ++lane)
      out[q * S::kLanes + lane] = m[(q * S::kP + lane % S::kP) * kR + lane / S::kP];
}
template <int kR>
void add_from_vector_layout(const float* in, int64_t d, float* m) {
  using S = Avx512Shape<kR>;
  for (int64_t q = 0; q < d / S::kP; ++q)
    for (int lane = 0; lane < S::kLanes; ++lane)
      m[(q * S::kP + lane % S::kP) * kR + lane / S::kP] += in[q * S::kLanes + lane];
}

// out[t, c] (+)= sum_j v[t, j] m_rows[j, c] for kRows rows, 16 columns at a time (masked tail):
// the forward's y = z @ (scale B_g) and the backward's dx = gz @ A_g^T. m_rows: [kR, d].
// Without accumulate, out starts from `init` [d] (a bias) when given, else zero.
template <int kR, int kRows>
__attribute__((target("avx512f"))) inline void avx512_expand(const float* v, const float* m_rows, int64_t d, float* out,
                                                             int64_t out_stride, bool accumulate,
                                                             const float* init = nullptr) {
  constexpr int kChunk = kR < 16 ? kR : 16;  // rows of m_rows held in registers at a time
  for (int64_t c = 0; c < d; c += 16) {
    const int64_t cols = d - c < 16 ? d - c : 16;
    const __mmask16 mask = static_cast<__mmask16>((1u << cols) - 1u);
    for (int j0 = 0; j0 < kR; j0 += kChunk) {
      __m512 m[kChunk];
      for (int jj = 0; jj < kChunk; ++jj) m[jj] = _mm512_maskz_loadu_ps(mask, m_rows + (j0 + jj) * d + c);
      for (int t = 0; t < kRows; ++t) {
        float* o = out + t * out_stride + c;
        __m512 acc = (j0 > 0 || accumulate) ? _mm512_maskz_loadu_ps(mask, o)
                     : init != nullptr      ? _mm512_maskz_loadu_ps(mask, init + c)
                                            : _mm512_setzero_ps();
        for (int jj = 0; jj < kChunk; ++jj) acc = _mm512_fmadd_ps(_mm512_set1_ps(v[t * kR + j0 + jj]), m[jj], acc);
        _mm512_mask_storeu_ps(o, mask, acc);
      }
    }
  }
}

// The [d, r] operands of one call in the vector layout.
struct VectorOperands {
  const float* bt;      // [d_out / kP, kLanes]
  float* dbt;           // accumulators, same layout
  float* da;            // [d_in / kP, kLanes]
  const float* a_rows;  // A_g^T [r, d_in] for the dx pass (null: no dx)
};

template <int kR, int kRows>
__attribute__((target("avx512f"))) void avx512_tile(const LoraGroupGradParams& p, const VectorOperands& m, int64_t n0) {
  using S = Avx512Shape<kR>;
  constexpr int kP = S::kP, kV = S::kV;
  const float* gy[kRows];
  const float* x[kRows];
  for (int t = 0; t < kRows; ++t) {
    gy[t] = static_cast<const float*>(p.grad_y) + (n0 + t) * p.gy_stride_n;
    x[t] = static_cast<const float*>(p.x) + (n0 + t) * p.x_stride_n;
  }
  __m512 acc[kRows][kV], spread[kRows][kV];
  alignas(64) float lanes[S::kLanes];
  for (int t = 0; t < kRows; ++t) {
    spread_rank<kR>(static_cast<const float*>(p.z) + (n0 + t) * kR, static_cast<float>(p.scale), lanes);
    for (int v = 0; v < kV; ++v) {
      acc[t][v] = _mm512_setzero_ps();
      spread[t][v] = _mm512_load_ps(lanes + 16 * v);
    }
  }
  // grad_y pass: acc[t] += gy[t, cols] * bt[cols];  dbt[cols] += gy[t, cols] * scale * z[t]
  // (two partial sums for dbt halve its dependency chain across the tile's rows).
  const int64_t groups_out = p.d_out / kP;
  for (int64_t q = 0; q < groups_out; ++q) {
    __m512 b[kV], d0[kV], d1[kV];
    for (int v = 0; v < kV; ++v) {
      b[v] = _mm512_loadu_ps(m.bt + (q * kV + v) * 16);
      d0[v] = _mm512_loadu_ps(m.dbt + (q * kV + v) * 16);
      d1[v] = _mm512_setzero_ps();
    }
    for (int t = 0; t < kRows; ++t) {
      const __m512 g = broadcast_columns<kP>(gy[t] + q * kP);
      for (int v = 0; v < kV; ++v) {
        acc[t][v] = _mm512_fmadd_ps(g, b[v], acc[t][v]);
        if (t % 2 == 0)
          d0[v] = _mm512_fmadd_ps(g, spread[t][v], d0[v]);
        else
          d1[v] = _mm512_fmadd_ps(g, spread[t][v], d1[v]);
      }
    }
    for (int v = 0; v < kV; ++v) _mm512_storeu_ps(m.dbt + (q * kV + v) * 16, _mm512_add_ps(d0[v], d1[v]));
  }
  // gz[t, j] = sum over the kP column slots of acc[t] at rank j; written out and spread again.
  float* gz_out = static_cast<float*>(p.gz) + n0 * kR;
  for (int t = 0; t < kRows; ++t) {
    for (int v = 0; v < kV; ++v) _mm512_store_ps(lanes + 16 * v, acc[t][v]);
    float* g = gz_out + t * kR;
    for (int j = 0; j < kR; ++j) {
      float sum = 0.f;
      for (int slot = 0; slot < kP; ++slot) sum += lanes[j * kP + slot];
      g[j] = sum;
    }
    spread_rank<kR>(g, 1.f, lanes);
    for (int v = 0; v < kV; ++v) spread[t][v] = _mm512_load_ps(lanes + 16 * v);
  }
  // x pass: da[cols] += x[t, cols] * gz[t]
  const int64_t groups_in = p.d_in / kP;
  for (int64_t q = 0; q < groups_in; ++q) {
    __m512 a0[kV], a1[kV];
    for (int v = 0; v < kV; ++v) {
      a0[v] = _mm512_loadu_ps(m.da + (q * kV + v) * 16);
      a1[v] = _mm512_setzero_ps();
    }
    for (int t = 0; t < kRows; ++t) {
      const __m512 xv = broadcast_columns<kP>(x[t] + q * kP);
      for (int v = 0; v < kV; ++v) {
        if (t % 2 == 0)
          a0[v] = _mm512_fmadd_ps(xv, spread[t][v], a0[v]);
        else
          a1[v] = _mm512_fmadd_ps(xv, spread[t][v], a1[v]);
      }
    }
    for (int v = 0; v < kV; ++v) _mm512_storeu_ps(m.da + (q * kV + v) * 16, _mm512_add_ps(a0[v], a1[v]));
  }
  // dx pass: dx[t] (+)= gz[t] @ A_g^T
  if (m.a_rows != nullptr)
    avx512_expand<kR, kRows>(gz_out, m.a_rows, p.d_in, static_cast<float*>(p.dx) + n0 * p.dx_stride_n, p.dx_stride_n,
                             p.dx_accumulate);
}

template <int kR>
void avx512_rows(const LoraGroupGradParams& p) {
  using S = Avx512Shape<kR>;
  VectorOperands m{static_cast<const float*>(p.bt_mix), static_cast<float*>(p.dbt), static_cast<float*>(p.da), nullptr};
  // Scratch kept per thread: A_g^T rows for the dx pass, and for kP > 1 the three [d, r]
  // matrices in the vector layout.
  const size_t n_out = static_cast<size_t>(p.d_out) * kR, n_in = static_cast<size_t>(p.d_in) * kR;
  float* buf = thread_scratch<float>(2 * n_out + 2 * n_in);
  if (p.dx != nullptr) {
    transpose_to_rows(static_cast<const float*>(p.a_mix), p.d_in, kR, buf + 2 * n_out + n_in);
    m.a_rows = buf + 2 * n_out + n_in;
  }
  if constexpr (S::kP > 1) {
    to_vector_layout<kR>(static_cast<const float*>(p.bt_mix), p.d_out, buf);
    std::memset(buf + n_out, 0, (n_out + n_in) * sizeof(float));
    m.bt = buf;
    m.dbt = buf + n_out;
    m.da = buf + 2 * n_out;
  }
  int64_t n = p.row_begin;
  for (; n + S::kRows <= p.row_end; n += S::kRows) avx512_tile<kR, S::kRows>(p, m, n);
  for (; n < p.row_end; ++n) avx512_tile<kR, 1>(p, m, n);
  if constexpr (S::kP > 1) {
    add_from_vector_layout<kR>(m.dbt, p.d_out, static_cast<float*>(p.dbt));
    add_from_vector_layout<kR>(m.da, p.d_in, static_cast<float*>(p.da));
  }
}

// ---- AVX-512 forward ----
// x pass: z[t] = x[t] @ A_g (A_g in the vector layout); y pass: y[t, c] (+)= sum_j z[t, j]
// b_rows[j, c], 16 columns at a time with b_rows = scale * B_g [r, d_out] row-major.
template <int kR, int kRows>
__attribute__((target("avx512f"))) void avx512_forward_tile(const LoraGroupForwardParams& p, const float* a_vec,
                                                            const float* b_rows, int64_t n0) {
  using S = Avx512Shape<kR>;
  constexpr int kP = S::kP, kV = S::kV;
  const float* x[kRows];
  for (int t = 0; t < kRows; ++t) x[t] = static_cast<const float*>(p.x) + (n0 + t) * p.x_stride_n;
  __m512 acc[kRows][kV];
  for (int t = 0; t < kRows; ++t)
    for (int v = 0; v < kV; ++v) acc[t][v] = _mm512_setzero_ps();
  const int64_t groups_in = p.d_in / kP;
  for (int64_t q = 0; q < groups_in; ++q) {
    __m512 a[kV];
    for (int v = 0; v < kV; ++v) a[v] = _mm512_loadu_ps(a_vec + (q * kV + v) * 16);
    for (int t = 0; t < kRows; ++t) {
      const __m512 xv = broadcast_columns<kP>(x[t] + q * kP);
      for (int v = 0; v < kV; ++v) acc[t][v] = _mm512_fmadd_ps(xv, a[v], acc[t][v]);
    }
  }
  float* z = static_cast<float*>(p.z) + n0 * kR;
  alignas(64) float lanes[S::kLanes];
  for (int t = 0; t < kRows; ++t) {
    for (int v = 0; v < kV; ++v) _mm512_store_ps(lanes + 16 * v, acc[t][v]);
    for (int j = 0; j < kR; ++j) {
      float sum = 0.f;
      for (int slot = 0; slot < kP; ++slot) sum += lanes[j * kP + slot];
      z[t * kR + j] = sum;
    }
  }
  avx512_expand<kR, kRows>(z, b_rows, p.d_out, static_cast<float*>(p.y) + n0 * p.y_stride_n, p.y_stride_n, p.accumulate,
                           static_cast<const float*>(p.bias));
}

template <int kR>
void avx512_forward_rows(const LoraGroupForwardParams& p) {
  using S = Avx512Shape<kR>;
  // Scratch per thread: scale * B_g as [r, d_out] rows, and A_g in the vector layout (kP > 1).
  const size_t n_out = static_cast<size_t>(p.d_out) * kR, n_in = static_cast<size_t>(p.d_in) * kR;
  float* b_rows = thread_scratch<float>(n_out + n_in);
  transpose_to_rows(static_cast<const float*>(p.bt_mix), p.d_out, kR, b_rows);
  const float* a_vec = static_cast<const float*>(p.a_mix);
  if constexpr (S::kP > 1) {
    to_vector_layout<kR>(a_vec, p.d_in, b_rows + n_out);
    a_vec = b_rows + n_out;
  }
  int64_t n = p.row_begin;
  for (; n + S::kRows <= p.row_end; n += S::kRows) avx512_forward_tile<kR, S::kRows>(p, a_vec, b_rows, n);
  for (; n < p.row_end; ++n) avx512_forward_tile<kR, 1>(p, a_vec, b_rows, n);
}

bool cpu_has(CpuIsa isa) {
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  return isa == CpuIsa::kAvx512 ? avx512 : isa == CpuIsa::kAvx2 ? avx2 : true;
}

}  // namespace
#endif

CpuIsa routed_lora_group_grads_isa(int64_t rank, int64_t d_in, int64_t d_out, int64_t x_stride_c, int64_t gy_stride_c,
                                   CpuIsa max_isa) {
#if defined(MHR_HAVE_X86_PATHS)
  if (x_stride_c != 1 || gy_stride_c != 1) return CpuIsa::kNone;
  if (max_isa >= CpuIsa::kAvx512 && cpu_has(CpuIsa::kAvx512) && (rank == 4 || rank == 8 || rank == 16 || rank == 32)) {
    const int64_t cols = rank < 16 ? 16 / rank : 1;  // Avx512Shape<rank>::kP
    if (d_in % cols == 0 && d_out % cols == 0) return CpuIsa::kAvx512;
  }
  if (max_isa >= CpuIsa::kAvx2 && cpu_has(CpuIsa::kAvx2) && (rank == 8 || rank == 16)) return CpuIsa::kAvx2;
#else
  (void)rank, (void)d_in, (void)d_out, (void)x_stride_c, (void)gy_stride_c, (void)max_isa;
#endif
  return CpuIsa::kNone;
}

CpuIsa routed_lora_group_forward_isa(int64_t rank, int64_t d_in, int64_t d_out, CpuIsa max_isa) {
  return routed_lora_group_grads_isa(rank, d_in, d_out, 1, 1, max_isa) == CpuIsa::kAvx512 ? CpuIsa::kAvx512
                                                                                          : CpuIsa::kNone;
}

bool routed_lora_group_forward_cpu(const LoraGroupForwardParams& p, CpuIsa isa) {
  if (isa != CpuIsa::kAvx512 || routed_lora_group_forward_isa(p.rank, p.d_in, p.d_out, isa) != isa) return false;
#if defined(MHR_HAVE_X86_PATHS)
  switch (p.rank) {
    case 4:
      avx512_forward_rows<4>(p);
      return true;
    case 8:
      avx512_forward_rows<8>(p);
      return true;
    case 16:
      avx512_forward_rows<16>(p);
      return true;
    case 32:
      avx512_forward_rows<32>(p);
      return true;
    default:
      return false;
  }
#else
  return false;
#endif
}

bool routed_lora_group_grads_cpu(const LoraGroupGradParams& p, CpuIsa isa) {
  if (isa == CpuIsa::kNone ||
      routed_lora_group_grads_isa(p.rank, p.d_in, p.d_out, p.x_stride_c, p.gy_stride_c, isa) != isa)
    return false;
#if defined(MHR_HAVE_X86_PATHS)
  if (isa == CpuIsa::kAvx512) {
    switch (p.rank) {
      case 4:
        avx512_rows<4>(p);
        return true;
      case 8:
        avx512_rows<8>(p);
        return true;
      case 16:
        avx512_rows<16>(p);
        return true;
      case 32:
        avx512_rows<32>(p);
        return true;
      default:
        return false;
    }
  }
  if (p.rank == 8) {
    avx2_rows<1>(p);
    return true;
  }
  if (p.rank == 16) {
    avx2_rows<2>(p);
    return true;
  }
#endif
  return false;
}

}  // namespace mhr_ops
