// Row-tile routed_lora forward kernels for the CPU (see routed_lora_rows.h). Loops are ordered so
// that the innermost runs over a contiguous rank vector or output row, which the compiler
// vectorizes; every sum has a fixed order (bitwise deterministic).
#include "routed_lora_rows.h"

#include "cpu_scratch.h"

#include <algorithm>
#include <limits>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MHR_ROWS_X86 1
#endif
// The bodies are inlined into one wrapper per instruction set (portable, AVX2 + FMA), which
// compiles them for that set.
#define MHR_ROWS_INLINE inline __attribute__((always_inline))

namespace mhr_ops {
namespace {

// yacc [rows, d_out] -> y rows (y = or += yacc, or bias + yacc).
template <typename T>
void store_rows(T* y, int64_t y_stride_n, const int64_t* row_of, int64_t rows, const T* yacc, int64_t d_out,
                bool accumulate, const T* bias) {
  for (int64_t t = 0; t < rows; ++t) {
    T* out = y + row_of[t] * y_stride_n;
    const T* acc = yacc + t * d_out;
    if (accumulate) {
      for (int64_t c = 0; c < d_out; ++c) out[c] += acc[c];
    } else if (bias != nullptr) {
      for (int64_t c = 0; c < d_out; ++c) out[c] = bias[c] + acc[c];
    } else {
      for (int64_t c = 0; c < d_out; ++c) out[c] = acc[c];
    }
  }
}

// Row pointers of a tile of up to kLoraRowTile rows. Full tiles run the loops below with
// kT = kLoraRowTile, the rows of a partial tile one at a time (kT = 1): compile-time trip counts.
template <typename T>
struct Tile {
  const T* x[kLoraRowTile];
  int64_t row[kLoraRowTile];
};

// out[t][0 .. R) = x[t][0 .. d) @ a   (a: [d, R] row-major), for the tile's rows: a is read once
// per tile. kR > 0: the rank at compile time (the accumulators stay in registers).
template <typename T, int kR, int kT>
MHR_ROWS_INLINE void project_tile(const Tile<T>& tile, int64_t x_offset, const T* __restrict a, int64_t d, int64_t R,
                                  T* __restrict out) {
  if constexpr (kR > 0) {
    // kP interleaved partial sums over c when the tile alone is too short to hide FMA latency.
    constexpr int kP = kT >= 4 ? 1 : 4;
    T acc[kP][kT][kR] = {};
    int64_t c = 0;
    for (; c + kP <= d; c += kP)
      for (int q = 0; q < kP; ++q) {
        const T* a_row = a + (c + q) * kR;
        for (int t = 0; t < kT; ++t) {
          const T xv = tile.x[t][x_offset + c + q];
          for (int j = 0; j < kR; ++j) acc[q][t][j] += xv * a_row[j];
        }
      }
    for (; c < d; ++c)
      for (int t = 0; t < kT; ++t) {
        const T xv = tile.x[t][x_offset + c];
        for (int j = 0; j < kR; ++j) acc[0][t][j] += xv * a[c * kR + j];
      }
    for (int t = 0; t < kT; ++t)
      for (int j = 0; j < kR; ++j) {
        T v = acc[0][t][j];
        for (int q = 1; q < kP; ++q) v += acc[q][t][j];
        out[t * kR + j] = v;
      }
  } else {
    std::fill(out, out + kT * R, T(0));
    for (int64_t c = 0; c < d; ++c)
      for (int t = 0; t < kT; ++t) {
        const T xv = tile.x[t][x_offset + c];
        for (int64_t j = 0; j < R; ++j) out[t * R + j] += xv * a[c * R + j];
      }
  }
}

// acc[t][c] += sum_j u[t][j] * b[j, c] for c < d (b: [R, d] row-major, acc rows acc_stride apart).
template <typename T, int kR, int kT>
MHR_ROWS_INLINE void expand_tile(const T* __restrict u, const T* __restrict b, int64_t d, int64_t R, T* __restrict acc,
                                 int64_t acc_stride) {
  if constexpr (kR > 0) {
    for (int t = 0; t < kT; ++t) {
      T* __restrict out = acc + t * acc_stride;
      const T* ut = u + t * kR;
      for (int64_t c = 0; c < d; ++c) {
        T v = out[c];
        for (int j = 0; j < kR; ++j) v += ut[j] * b[j * d + c];
        out[c] = v;
      }
    }
  } else {
    for (int t = 0; t < kT; ++t)
      for (int64_t j = 0; j < R; ++j) {
        const T uj = u[t * R + j];
        for (int64_t c = 0; c < d; ++c) acc[t * acc_stride + c] += uj * b[j * d + c];
      }
  }
}

// One tile of kT rows (x pointers and row numbers in `tile`) of the project-then-mix kernel.
template <typename T, int kR, int kT>
MHR_ROWS_INLINE void rows_tile(const LoraRowsParams& p, const Tile<T>& tile, T* z, T* proj, T* u, T* w, T* yacc) {
  const int64_t H = p.heads, S = p.skills, R = kR > 0 ? kR : p.rank, dk_in = p.d_in / H, dk_out = p.d_out / H;
  const T* A = static_cast<const T*>(p.A);
  const T* B = static_cast<const T*>(p.B);
  const T* W = static_cast<const T*>(p.weights);
  const T nan = std::numeric_limits<T>::quiet_NaN();
  for (int t = 0; t < kT; ++t) {
    const int64_t g = p.row_group[tile.row[t]];
    const bool valid = g >= 0 && g < p.groups;
    for (int64_t i = 0; i < H * S; ++i) w[t * H * S + i] = valid ? W[g * H * S + i] : nan;
  }
  // z[t] = sum_{k,s} w[t,k,s] * (x[t, k-block] @ A[k,s])
  std::fill(z, z + kT * R, T(0));
  for (int64_t k = 0; k < H; ++k)
    for (int64_t s = 0; s < S; ++s) {
      project_tile<T, kR, kT>(tile, k * dk_in, A + (k * S + s) * dk_in * R, dk_in, R, proj);
      for (int t = 0; t < kT; ++t) {
        const T wk = w[(t * H + k) * S + s];
        for (int64_t j = 0; j < R; ++j) z[t * R + j] += wk * proj[t * R + j];
      }
    }
  for (int t = 0; t < kT; ++t) std::copy(z + t * R, z + (t + 1) * R, static_cast<T*>(p.z) + tile.row[t] * R);
  // y[t, k-block] = sum_s (scale w[t,k,s] z[t]) @ B[k,s]
  std::fill(yacc, yacc + kT * p.d_out, T(0));
  for (int64_t k = 0; k < H; ++k)
    for (int64_t s = 0; s < S; ++s) {
      for (int t = 0; t < kT; ++t) {
        const T ws = static_cast<T>(p.scale) * w[(t * H + k) * S + s];
        for (int64_t j = 0; j < R; ++j) u[t * R + j] = ws * z[t * R + j];
      }
      expand_tile<T, kR, kT>(u, B + (k * S + s) * R * dk_out, dk_out, R, yacc + k * dk_out, p.d_out);
    }
  store_rows(static_cast<T*>(p.y), p.y_stride_n, tile.row, kT, yacc, p.d_out, p.accumulate,
             static_cast<const T*>(nullptr));
}

template <typename T, int kR>
MHR_ROWS_INLINE void rows_forward(const LoraRowsParams& p, int64_t row_begin, int64_t row_end) {
  const int64_t H = p.heads, S = p.skills, R = kR > 0 ? kR : p.rank;
  constexpr int kT = static_cast<int>(kLoraRowTile);
  // Scratch: z, projection and u [tile, r], the tile's weights [tile, h, S], yacc [tile, d_out].
  T* z = thread_scratch<T>(static_cast<size_t>(kT) * (3 * R + H * S + p.d_out));
  T* proj = z + kT * R;
  T* u = proj + kT * R;
  T* w = u + kT * R;
  T* yacc = w + kT * H * S;
  Tile<T> tile;
  int64_t n = row_begin;
  for (; n + kT <= row_end; n += kT) {
    for (int t = 0; t < kT; ++t) {
      tile.row[t] = n + t;
      tile.x[t] = static_cast<const T*>(p.x) + (n + t) * p.x_stride_n;
    }
    rows_tile<T, kR, kT>(p, tile, z, proj, u, w, yacc);
  }
  for (; n < row_end; ++n) {
    tile.row[0] = n;
    tile.x[0] = static_cast<const T*>(p.x) + n * p.x_stride_n;
    rows_tile<T, kR, 1>(p, tile, z, proj, u, w, yacc);
  }
}

// One tile of kT rows of one group (adapter a [d_in, r], scale * B_g b [r, d_out]).
template <typename T, int kR, int kT>
MHR_ROWS_INLINE void gathered_tile(const LoraGatheredParams& p, const Tile<T>& tile, const T* a, const T* b, T* z,
                                   T* yacc) {
  const int64_t R = kR > 0 ? kR : p.rank;
  project_tile<T, kR, kT>(tile, 0, a, p.d_in, R, z);  // z[t] = x[row_t] @ A_g
  for (int t = 0; t < kT; ++t) std::copy(z + t * R, z + (t + 1) * R, static_cast<T*>(p.z) + tile.row[t] * R);
  std::fill(yacc, yacc + kT * p.d_out, T(0));
  expand_tile<T, kR, kT>(z, b, p.d_out, R, yacc, p.d_out);  // y[row_t] (+)= z[t] @ (scale B_g)
  store_rows(static_cast<T*>(p.y), p.y_stride_n, tile.row, kT, yacc, p.d_out, p.accumulate,
             static_cast<const T*>(p.bias));
}

template <typename T, int kR>
MHR_ROWS_INLINE void gathered_forward(const LoraGatheredParams& p, int64_t piece_begin, int64_t piece_end) {
  const int64_t R = kR > 0 ? kR : p.rank;
  constexpr int kT = static_cast<int>(kLoraRowTile);
  T* z = thread_scratch<T>(static_cast<size_t>(kT) * (p.d_out + R));
  T* yacc = z + kT * R;
  Tile<T> tile;
  for (int64_t i = piece_begin; i < piece_end; ++i) {
    const LoraRun& piece = p.pieces[i];
    const T* a = static_cast<const T*>(p.a_mix) + piece.slot * p.d_in * R;
    const T* b = static_cast<const T*>(p.b_mix) + piece.slot * R * p.d_out;
    const int64_t* rows = p.rows + piece.start;
    const int64_t count = piece.rows;
    int64_t t0 = 0;
    for (; t0 + kT <= count; t0 += kT) {
      for (int t = 0; t < kT; ++t) {
        tile.row[t] = rows[t0 + t];
        tile.x[t] = static_cast<const T*>(p.x) + tile.row[t] * p.x_stride_n;
      }
      gathered_tile<T, kR, kT>(p, tile, a, b, z, yacc);
    }
    for (; t0 < count; ++t0) {
      tile.row[0] = rows[t0];
      tile.x[0] = static_cast<const T*>(p.x) + tile.row[0] * p.x_stride_n;
      gathered_tile<T, kR, 1>(p, tile, a, b, z, yacc);
    }
  }
}

// sum_c u[c] v[c] over n elements with kL independent partial sums (lanes), combined in a fixed
// order: vectorizes without reassociation, and the result does not depend on the build.
template <typename T>
MHR_ROWS_INLINE T lane_dot(const T* __restrict u, const T* __restrict v, int64_t n) {
  constexpr int kL = 8;
  T lane[kL] = {};
  int64_t c = 0;
  for (; c + kL <= n; c += kL)
    for (int l = 0; l < kL; ++l) lane[l] += u[c + l] * v[c + l];
  T acc = 0;
  for (int l = 0; l < kL; ++l) acc += lane[l];
  for (; c < n; ++c) acc += u[c] * v[c];
  return acc;
}

template <typename T, int kR>
MHR_ROWS_INLINE void rows_backward(const LoraRowsGradParams& p, int64_t row_begin, int64_t row_end, T* dA, T* dB,
                                   T* dw) {
  const int64_t H = p.heads, S = p.skills, R = kR > 0 ? kR : p.rank, dk_in = p.d_in / H, dk_out = p.d_out / H;
  const T* A = static_cast<const T*>(p.A);
  const T* B = static_cast<const T*>(p.B);
  const T* W = static_cast<const T*>(p.weights);
  const T scale = static_cast<T>(p.scale);
  // Scratch: gy projections [h, S, r], x projections [h, S, r], gz [r], u [r].
  T* pgy = thread_scratch<T>(static_cast<size_t>(2 * H * S * R + 2 * R));
  T* px = pgy + H * S * R;
  T* gz = px + H * S * R;
  T* u = gz + R;
  Tile<T> tile;
  for (int64_t n = row_begin; n < row_end; ++n) {
    const T* x = static_cast<const T*>(p.x) + n * p.x_stride_n;
    const T* gy = static_cast<const T*>(p.grad_y) + n * p.gy_stride_n;
    const T* z = static_cast<const T*>(p.z) + n * R;
    const int64_t g = p.row_group[n];
    const T* w = W + g * H * S;
    tile.row[0] = n;
    tile.x[0] = x;
    std::fill(gz, gz + R, T(0));
    for (int64_t k = 0; k < H; ++k)
      for (int64_t s = 0; s < S; ++s) {
        const int64_t ks = k * S + s;
        const T* b = B + ks * R * dk_out;  // [r, dk_out]
        for (int64_t j = 0; j < R; ++j) pgy[ks * R + j] = lane_dot(gy + k * dk_out, b + j * dk_out, dk_out);
        project_tile<T, kR, 1>(tile, k * dk_in, A + ks * dk_in * R, dk_in, R, px + ks * R);
        const T ws = scale * w[ks];
        for (int64_t j = 0; j < R; ++j) gz[j] += ws * pgy[ks * R + j];
      }
    std::copy(gz, gz + R, static_cast<T*>(p.gz) + n * R);
    for (int64_t k = 0; k < H; ++k)
      for (int64_t s = 0; s < S; ++s) {
        const int64_t ks = k * S + s;
        const T wk = w[ks];
        if (dw != nullptr) {
          T acc = 0;
          for (int64_t j = 0; j < R; ++j) acc += px[ks * R + j] * gz[j] + scale * z[j] * pgy[ks * R + j];
          dw[g * H * S + ks] += acc;
        }
        if (dA != nullptr) {  // dA[k,s][c, :] += w x[c] gz
          T* __restrict da = dA + ks * dk_in * R;
          for (int64_t c = 0; c < dk_in; ++c) {
            const T xv = wk * x[k * dk_in + c];
            for (int64_t j = 0; j < R; ++j) da[c * R + j] += xv * gz[j];
          }
        }
        if (dB != nullptr) {  // dB[k,s][j, :] += scale w z[j] gy[k-block]
          T* __restrict db = dB + ks * R * dk_out;
          for (int64_t j = 0; j < R; ++j) {
            const T coef = scale * wk * z[j];
            for (int64_t c = 0; c < dk_out; ++c) db[j * dk_out + c] += coef * gy[k * dk_out + c];
          }
        }
      }
    if (p.dx != nullptr) {  // dx[k-block] (+)= sum_s w gz @ A[k,s]^T
      T* dx = static_cast<T*>(p.dx) + n * p.dx_stride_n;
      for (int64_t k = 0; k < H; ++k) {
        T* __restrict out = dx + k * dk_in;
        if (!p.dx_accumulate) std::fill(out, out + dk_in, T(0));
        for (int64_t s = 0; s < S; ++s) {
          const T* a = A + (k * S + s) * dk_in * R;
          for (int64_t j = 0; j < R; ++j) u[j] = w[k * S + s] * gz[j];
          for (int64_t c = 0; c < dk_in; ++c) {
            T prod[kR > 0 ? kR : 1];
            T acc = 0;
            if constexpr (kR > 0) {
              for (int j = 0; j < kR; ++j) prod[j] = u[j] * a[c * kR + j];
              for (int j = 0; j < kR; ++j) acc += prod[j];
            } else {
              for (int64_t j = 0; j < R; ++j) acc += u[j] * a[c * R + j];
            }
            out[c] += acc;
          }
        }
      }
    }
  }
}

// The instantiations for one instruction set: the common ranks at compile time, others at run time.
#define MHR_ROWS_DISPATCH(BODY, T, P, B, E) \
  switch (P.rank) {                         \
    case 1:                                 \
      return BODY<T, 1>(P, B, E);           \
    case 2:                                 \
      return BODY<T, 2>(P, B, E);           \
    case 4:                                 \
      return BODY<T, 4>(P, B, E);           \
    case 8:                                 \
      return BODY<T, 8>(P, B, E);           \
    case 16:                                \
      return BODY<T, 16>(P, B, E);          \
    case 32:                                \
      return BODY<T, 32>(P, B, E);          \
    default:                                \
      return BODY<T, 0>(P, B, E);           \
  }

#define MHR_ROWS_BWD_DISPATCH(T, P, B, E, DA, DB, DW)   \
  switch (P.rank) {                                     \
    case 1:                                             \
      return rows_backward<T, 1>(P, B, E, DA, DB, DW);  \
    case 2:                                             \
      return rows_backward<T, 2>(P, B, E, DA, DB, DW);  \
    case 4:                                             \
      return rows_backward<T, 4>(P, B, E, DA, DB, DW);  \
    case 8:                                             \
      return rows_backward<T, 8>(P, B, E, DA, DB, DW);  \
    case 16:                                            \
      return rows_backward<T, 16>(P, B, E, DA, DB, DW); \
    case 32:                                            \
      return rows_backward<T, 32>(P, B, E, DA, DB, DW); \
    default:                                            \
      return rows_backward<T, 0>(P, B, E, DA, DB, DW);  \
  }

template <typename T>
void rows_portable(const LoraRowsParams& p, int64_t b, int64_t e) {
  MHR_ROWS_DISPATCH(rows_forward, T, p, b, e)
}
template <typename T>
void gathered_portable(const LoraGatheredParams& p, int64_t b, int64_t e) {
  MHR_ROWS_DISPATCH(gathered_forward, T, p, b, e)
}
#if defined(MHR_ROWS_X86)
template <typename T>
__attribute__((target("avx2,fma"))) void rows_avx2(const LoraRowsParams& p, int64_t b, int64_t e) {
  MHR_ROWS_DISPATCH(rows_forward, T, p, b, e)
}
template <typename T>
__attribute__((target("avx2,fma"))) void gathered_avx2(const LoraGatheredParams& p, int64_t b, int64_t e) {
  MHR_ROWS_DISPATCH(gathered_forward, T, p, b, e)
}
bool has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}
#endif

template <typename T>
void rows_backward_portable(const LoraRowsGradParams& p, int64_t b, int64_t e, T* dA, T* dB, T* dw) {
  MHR_ROWS_BWD_DISPATCH(T, p, b, e, dA, dB, dw)
}
#if defined(MHR_ROWS_X86)
template <typename T>
__attribute__((target("avx2,fma"))) void rows_backward_avx2(const LoraRowsGradParams& p, int64_t b, int64_t e, T* dA,
                                                            T* dB, T* dw) {
  MHR_ROWS_BWD_DISPATCH(T, p, b, e, dA, dB, dw)
}
#endif

}  // namespace

template <typename T>
void routed_lora_rows_backward_cpu(const LoraRowsGradParams& p, int64_t row_begin, int64_t row_end, T* dA, T* dB, T* dw,
                                   bool use_avx2) {
#if defined(MHR_ROWS_X86)
  if (use_avx2 && has_avx2()) return rows_backward_avx2<T>(p, row_begin, row_end, dA, dB, dw);
#endif
  (void)use_avx2;
  rows_backward_portable<T>(p, row_begin, row_end, dA, dB, dw);
}

template <typename T>
void routed_lora_rows_forward_cpu(const LoraRowsParams& p, int64_t row_begin, int64_t row_end, bool use_avx2) {
#if defined(MHR_ROWS_X86)
  if (use_avx2 && has_avx2()) return rows_avx2<T>(p, row_begin, row_end);
#endif
  (void)use_avx2;
  rows_portable<T>(p, row_begin, row_end);
}

template <typename T>
void routed_lora_gathered_forward_cpu(const LoraGatheredParams& p, int64_t piece_begin, int64_t piece_end,
                                      bool use_avx2) {
#if defined(MHR_ROWS_X86)
  if (use_avx2 && has_avx2()) return gathered_avx2<T>(p, piece_begin, piece_end);
#endif
  (void)use_avx2;
  gathered_portable<T>(p, piece_begin, piece_end);
}

int64_t sort_rows_by_group(const int64_t* row_group, int64_t rows, int64_t groups, int64_t* order, int64_t* start) {
  std::fill(start, start + groups + 1, int64_t(0));
  int64_t invalid = 0;
  for (int64_t n = 0; n < rows; ++n) {
    const int64_t g = row_group[n];
    if (g >= 0 && g < groups)
      ++start[g + 1];
    else
      ++invalid;
  }
  for (int64_t g = 0; g < groups; ++g) start[g + 1] += start[g];
  std::vector<int64_t> next(start, start + groups);
  for (int64_t n = 0; n < rows; ++n) {
    const int64_t g = row_group[n];
    if (g >= 0 && g < groups) order[next[g]++] = n;
  }
  return invalid;
}

template void routed_lora_rows_forward_cpu<float>(const LoraRowsParams&, int64_t, int64_t, bool);
template void routed_lora_rows_forward_cpu<double>(const LoraRowsParams&, int64_t, int64_t, bool);
template void routed_lora_gathered_forward_cpu<float>(const LoraGatheredParams&, int64_t, int64_t, bool);
template void routed_lora_gathered_forward_cpu<double>(const LoraGatheredParams&, int64_t, int64_t, bool);
template void routed_lora_rows_backward_cpu<float>(const LoraRowsGradParams&, int64_t, int64_t, float*, float*, float*,
                                                   bool);
template void routed_lora_rows_backward_cpu<double>(const LoraRowsGradParams&, int64_t, int64_t, double*, double*,
                                                    double*, bool);

}  // namespace mhr_ops
