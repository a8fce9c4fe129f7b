// Row-tile routed_lora forward kernels for the CPU (see routed_lora_rows.h). Loops are ordered so
// that the innermost runs over a contiguous rank vector or output row, which the compiler
// vectorizes; every sum has a fixed order (bitwise deterministic).
#include "routed_lora_rows.h"

#include "cpu_lanes.h"
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
// The Lanes helpers (cpu_lanes.h) are always inlined: no vector crosses a call, so GCC's note that
// a 256-bit vector's calling convention differs without AVX (the portable build) does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

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
  if constexpr (kR >= 2) {
    // kP interleaved partial sums over c when the tile alone is too short to hide FMA latency;
    // the sums are vectors over the rank (left to itself, GCC keeps them in memory).
    constexpr int kP = kT >= 4 ? 1 : 4, L = kR < 8 ? kR : 8, kV = kR / L;
    using V = typename Lanes<T, L>::type;
    V acc[kP][kT][kV];
    for (int q = 0; q < kP; ++q)
      for (int t = 0; t < kT; ++t)
        for (int v = 0; v < kV; ++v) acc[q][t][v] = V{};
    for (int64_t c0 = 0; c0 < d; c0 += kP)
      for (int q = 0; q < kP && c0 + q < d; ++q) {
        const int64_t c = c0 + q;
        V av[kV];
        for (int v = 0; v < kV; ++v) av[v] = load_lanes<T, L>(a + c * kR + v * L);
        for (int t = 0; t < kT; ++t) {
          const T xv = tile.x[t][x_offset + c];
          for (int v = 0; v < kV; ++v) acc[q][t][v] += xv * av[v];
        }
      }
    for (int t = 0; t < kT; ++t)
      for (int v = 0; v < kV; ++v) {
        V sum = acc[0][t][v];
        for (int q = 1; q < kP; ++q) sum += acc[q][t][v];
        store_lanes<T, L>(out + t * kR + v * L, sum);
      }
  } else if constexpr (kR == 1) {
    constexpr int kP = kT >= 4 ? 1 : 4;
    T acc[kP][kT] = {};
    int64_t c = 0;
    for (; c + kP <= d; c += kP)
      for (int q = 0; q < kP; ++q)
        for (int t = 0; t < kT; ++t) acc[q][t] += tile.x[t][x_offset + c + q] * a[c + q];
    for (; c < d; ++c)
      for (int t = 0; t < kT; ++t) acc[0][t] += tile.x[t][x_offset + c] * a[c];
    for (int t = 0; t < kT; ++t) {
      T v = acc[0][t];
      for (int q = 1; q < kP; ++q) v += acc[q][t];
      out[t] = v;
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

// Row pointers and routing weights (w[g_n, k, :], NaN for an out-of-range group) of the rows of
// tile `tile`, head k; returns the number of rows (kLoraRowTile, or fewer for the last tile).
template <typename T>
MHR_ROWS_INLINE int64_t head_tile(const LoraRowsParams& p, int64_t k, int64_t tile_index, Tile<T>& tile, T* w) {
  const int64_t S = p.skills, n0 = tile_index * kLoraRowTile;
  const int64_t rows = std::min<int64_t>(kLoraRowTile, p.rows - n0);
  const T* W = static_cast<const T*>(p.weights);
  const T nan = std::numeric_limits<T>::quiet_NaN();
  for (int64_t t = 0; t < rows; ++t) {
    const int64_t n = n0 + t, g = p.row_group[n];
    const bool valid = g >= 0 && g < p.groups;
    tile.row[t] = n;
    tile.x[t] = static_cast<const T*>(p.x) + n * p.x_stride_n;
    for (int64_t s = 0; s < S; ++s) w[t * S + s] = valid ? W[(g * p.heads + k) * S + s] : nan;
  }
  return rows;
}

// kProject for one head and a tile of kT rows starting at tile slot t0 (w: the tile's weights
// [tile, S]): zh[n, k] = sum_s w[t, s] * (x[n, k-block] @ A[k, s]).
template <typename T, int kR, int kT>
MHR_ROWS_INLINE void project_head(const LoraRowsParams& p, int64_t k, const Tile<T>& tile, int t0, const T* w, T* proj,
                                  T* zacc) {
  const int64_t S = p.skills, R = kR > 0 ? kR : p.rank, dk_in = p.d_in / p.heads;
  const T* A = static_cast<const T*>(p.A);
  Tile<T> sub;
  for (int t = 0; t < kT; ++t) sub.x[t] = tile.x[t0 + t], sub.row[t] = tile.row[t0 + t];
  std::fill(zacc, zacc + kT * R, T(0));
  for (int64_t s = 0; s < S; ++s) {
    project_tile<T, kR, kT>(sub, k * dk_in, A + (k * S + s) * dk_in * R, dk_in, R, proj);
    for (int t = 0; t < kT; ++t) {
      const T ws = w[(t0 + t) * S + s];
      for (int64_t j = 0; j < R; ++j) zacc[t * R + j] += ws * proj[t * R + j];
    }
  }
  T* zh = static_cast<T*>(p.zh);
  for (int t = 0; t < kT; ++t) std::copy(zacc + t * R, zacc + (t + 1) * R, zh + (sub.row[t] * p.heads + k) * R);
}

// kExpand for one head and kT rows from tile slot t0: y[n, k-block] (+)= sum_s (scale w z[n]) @ B[k, s].
template <typename T, int kR, int kT>
MHR_ROWS_INLINE void expand_head(const LoraRowsParams& p, int64_t k, const Tile<T>& tile, int t0, const T* w, T* u,
                                 T* yacc) {
  const int64_t S = p.skills, R = kR > 0 ? kR : p.rank, dk_out = p.d_out / p.heads;
  const T* B = static_cast<const T*>(p.B);
  const T* z = static_cast<const T*>(p.z);
  std::fill(yacc, yacc + kT * dk_out, T(0));
  for (int64_t s = 0; s < S; ++s) {
    for (int t = 0; t < kT; ++t) {
      const T ws = static_cast<T>(p.scale) * w[(t0 + t) * S + s];
      const T* zt = z + tile.row[t0 + t] * R;
      for (int64_t j = 0; j < R; ++j) u[t * R + j] = ws * zt[j];
    }
    expand_tile<T, kR, kT>(u, B + (k * S + s) * R * dk_out, dk_out, R, yacc, dk_out);
  }
  for (int t = 0; t < kT; ++t) {
    T* out = static_cast<T*>(p.y) + tile.row[t0 + t] * p.y_stride_n + k * dk_out;
    const T* acc = yacc + t * dk_out;
    if (p.accumulate)
      for (int64_t c = 0; c < dk_out; ++c) out[c] += acc[c];
    else
      std::copy(acc, acc + dk_out, out);
  }
}

template <typename T, int kR>
MHR_ROWS_INLINE void rows_forward_step(const LoraRowsParams& p, LoraRowsStep step, int64_t begin, int64_t end) {
  const int64_t H = p.heads, S = p.skills, R = kR > 0 ? kR : p.rank;
  constexpr int kT = static_cast<int>(kLoraRowTile);
  if (step == LoraRowsStep::kSumHeads) {
    const T* zh = static_cast<const T*>(p.zh);
    T* z = static_cast<T*>(p.z);
    for (int64_t n = begin; n < end; ++n)
      for (int64_t j = 0; j < R; ++j) {
        T v = zh[n * H * R + j];
        for (int64_t k = 1; k < H; ++k) v += zh[(n * H + k) * R + j];
        z[n * R + j] = v;
      }
    return;
  }
  // Scratch: the tile's weights [tile, S], proj / u and zacc [tile, r], yacc [tile, d_out / h].
  T* w = thread_scratch<T>(static_cast<size_t>(kT) * (S + 2 * R + p.d_out / H));
  T* proj = w + kT * S;
  T* zacc = proj + kT * R;
  T* yacc = zacc + kT * R;
  const int64_t tiles = lora_row_tiles(p.rows);
  Tile<T> tile;
  for (int64_t item = begin; item < end; ++item) {
    const int64_t k = item / tiles;
    const int64_t rows = head_tile(p, k, item % tiles, tile, w);
    const bool project = step == LoraRowsStep::kProject;
    if (rows == kT) {
      project ? project_head<T, kR, kT>(p, k, tile, 0, w, proj, zacc)
              : expand_head<T, kR, kT>(p, k, tile, 0, w, proj, yacc);
    } else {
      for (int t = 0; t < rows; ++t)
        project ? project_head<T, kR, 1>(p, k, tile, t, w, proj, zacc)
                : expand_head<T, kR, 1>(p, k, tile, t, w, proj, yacc);
    }
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

// out[j] = gy[0 .. d) . b[j, 0 .. d) for kJ rows j of b (rows d apart): kJ independent vector
// sums over the columns (one dot at a time would wait on its one accumulator), each summed in
// lane order, then the columns past the last full vector in order.
template <typename T, int kJ>
MHR_ROWS_INLINE void dots(const T* __restrict gy, const T* __restrict b, int64_t d, T* __restrict out) {
  constexpr int L = 32 / sizeof(T) > 0 ? static_cast<int>(32 / sizeof(T)) : 1;
  using V = typename Lanes<T, L>::type;
  V acc[kJ];
  for (int j = 0; j < kJ; ++j) acc[j] = V{};
  int64_t c = 0;
  for (; c + L <= d; c += L) {
    const V g = load_lanes<T, L>(gy + c);
    for (int j = 0; j < kJ; ++j) acc[j] += g * load_lanes<T, L>(b + j * d + c);
  }
  for (int j = 0; j < kJ; ++j) {
    T v = sum_lanes<T, L>(acc[j]);
    for (int64_t e = c; e < d; ++e) v += gy[e] * b[j * d + e];
    out[j] = v;
  }
}

// kProject of the backward, item (k, n): pgy[n, k, s] = gy[n, k-block] @ B[k,s]^T for every s,
// gzh[n, k] = scale * sum_s w pgy[n, k, s].
template <typename T, int kR>
MHR_ROWS_INLINE void grad_project(const LoraRowsGradParams& p, int64_t k, int64_t n) {
  const int64_t H = p.heads, S = p.skills, R = kR > 0 ? kR : p.rank, dk_out = p.d_out / H;
  const T* B = static_cast<const T*>(p.B);
  const T* w = static_cast<const T*>(p.weights) + (p.row_group[n] * H + k) * S;
  const T* gy = static_cast<const T*>(p.grad_y) + n * p.gy_stride_n + k * dk_out;
  const T scale = static_cast<T>(p.scale);
  T* pgy = static_cast<T*>(p.pgy) + (n * H + k) * S * R;
  T* gzh = static_cast<T*>(p.gzh) + (n * H + k) * R;
  std::fill(gzh, gzh + R, T(0));
  for (int64_t s = 0; s < S; ++s) {
    const T* b = B + (k * S + s) * R * dk_out;  // [r, dk_out]
    T* out = pgy + s * R;
    if constexpr (kR > 0) {
      constexpr int kJ = kR < 8 ? kR : 8;
      for (int64_t j = 0; j < kR; j += kJ) dots<T, kJ>(gy, b + j * dk_out, dk_out, out + j);
    } else {
      for (int64_t j = 0; j < R; ++j) dots<T, 1>(gy, b + j * dk_out, dk_out, out + j);
    }
    const T ws = scale * w[s];
    for (int64_t j = 0; j < R; ++j) gzh[j] += ws * out[j];
  }
}

// kWeights, item (k, s): dA[k,s] and dB[k,s] written whole, dw[g_n, k, s] accumulated row by row.
template <typename T, int kR>
MHR_ROWS_INLINE void grad_weights(const LoraRowsGradParams& p, int64_t k, int64_t s) {
  const int64_t H = p.heads, S = p.skills, R = kR > 0 ? kR : p.rank, N = p.rows;
  const int64_t dk_in = p.d_in / H, dk_out = p.d_out / H, ks = k * S + s;
  const T* x = static_cast<const T*>(p.x);
  const T* gy = static_cast<const T*>(p.grad_y);
  const T* z = static_cast<const T*>(p.z);
  const T* gz = static_cast<const T*>(p.gz);
  const T* W = static_cast<const T*>(p.weights);
  const T scale = static_cast<T>(p.scale);
  // The rows' weights for (k, s), and each row's x block scaled by it: wx[n, c] = w x[n, c].
  // Scratch (one thread_scratch buffer per call: a second request could move the first):
  // wn [N], wx [N, dk_in] (dA only), px [tile, r] (dw only).
  constexpr int kT = static_cast<int>(kLoraRowTile);
  const int64_t wx_size = p.dA ? N * dk_in : 0;
  T* wn = thread_scratch<T>(static_cast<size_t>(N + wx_size + kT * R));
  T* px = wn + N + wx_size;
  for (int64_t n = 0; n < N; ++n) wn[n] = W[p.row_group[n] * H * S + ks];
  if (p.dA != nullptr) {  // dA[k,s][c, :] = sum_n wx[n, c] gz[n]
    T* __restrict wx = wn + N;
    for (int64_t n = 0; n < N; ++n)
      for (int64_t c = 0; c < dk_in; ++c) wx[n * dk_in + c] = wn[n] * x[n * p.x_stride_n + k * dk_in + c];
    T* __restrict da = static_cast<T*>(p.dA) + ks * dk_in * R;
    int64_t c = 0;
    if constexpr (kR >= 2) {  // kC columns at a time: kC independent sums over the rows
      constexpr int L = kR < 8 ? kR : 8, kV = kR / L, kC = 4;
      using V = typename Lanes<T, L>::type;
      for (; c + kC <= dk_in; c += kC) {
        V acc[kC][kV];
        for (int q = 0; q < kC; ++q)
          for (int v = 0; v < kV; ++v) acc[q][v] = V{};
        for (int64_t n = 0; n < N; ++n) {
          V g[kV];
          for (int v = 0; v < kV; ++v) g[v] = load_lanes<T, L>(gz + n * kR + v * L);
          for (int q = 0; q < kC; ++q) {
            const T xv = wx[n * dk_in + c + q];
            for (int v = 0; v < kV; ++v) acc[q][v] += xv * g[v];
          }
        }
        for (int q = 0; q < kC; ++q)
          for (int v = 0; v < kV; ++v) store_lanes<T, L>(da + (c + q) * kR + v * L, acc[q][v]);
      }
    }
    for (; c < dk_in; ++c) {
      T* out = da + c * R;
      for (int64_t j = 0; j < R; ++j) out[j] = T(0);
      for (int64_t n = 0; n < N; ++n)
        for (int64_t j = 0; j < R; ++j) out[j] += wx[n * dk_in + c] * gz[n * R + j];
    }
  }
  if (p.dB != nullptr) {  // dB[k,s][j, :] = sum_n (scale w z[n, j]) gy[n, k-block], in column blocks
    T* __restrict db = static_cast<T*>(p.dB) + ks * R * dk_out;
    constexpr int L = static_cast<int>(32 / sizeof(T)), kV = 4;  // 4 independent vector sums
    using V = typename Lanes<T, L>::type;
    for (int64_t j = 0; j < R; ++j) {
      int64_t c0 = 0;
      for (; c0 + kV * L <= dk_out; c0 += kV * L) {
        V acc[kV];
        for (int v = 0; v < kV; ++v) acc[v] = V{};
        for (int64_t n = 0; n < N; ++n) {
          const T coef = scale * wn[n] * z[n * R + j];
          const T* g = gy + n * p.gy_stride_n + k * dk_out + c0;
          for (int v = 0; v < kV; ++v) acc[v] += coef * load_lanes<T, L>(g + v * L);
        }
        for (int v = 0; v < kV; ++v) store_lanes<T, L>(db + j * dk_out + c0 + v * L, acc[v]);
      }
      if (c0 < dk_out) {
        T* out = db + j * dk_out;
        std::fill(out + c0, out + dk_out, T(0));
        for (int64_t n = 0; n < N; ++n) {
          const T coef = scale * wn[n] * z[n * R + j];
          const T* g = gy + n * p.gy_stride_n + k * dk_out;
          for (int64_t c = c0; c < dk_out; ++c) out[c] += coef * g[c];
        }
      }
    }
  }
  if (p.dw != nullptr) {  // dw[g, k, s] += (x[n, k-block] @ A[k,s]) . gz[n] + scale z[n] . pgy[n, k, s]
    const T* a = static_cast<const T*>(p.A) + ks * dk_in * R;
    const T* pgy = static_cast<const T*>(p.pgy);
    T* dw = static_cast<T*>(p.dw);
    Tile<T> tile;
    for (int64_t n0 = 0; n0 < N; n0 += kT) {
      const int rows = static_cast<int>(std::min<int64_t>(kT, N - n0));
      for (int t = 0; t < rows; ++t) tile.x[t] = x + (n0 + t) * p.x_stride_n, tile.row[t] = n0 + t;
      if (rows == kT) {
        project_tile<T, kR, kT>(tile, k * dk_in, a, dk_in, R, px);
      } else {
        Tile<T> one;
        for (int t = 0; t < rows; ++t) {
          one.x[0] = tile.x[t];
          project_tile<T, kR, 1>(one, k * dk_in, a, dk_in, R, px + t * R);
        }
      }
      for (int t = 0; t < rows; ++t) {
        const int64_t n = n0 + t;
        const T* pg = pgy + ((n * H + k) * S + s) * R;
        T acc = 0;
        for (int64_t j = 0; j < R; ++j) acc += px[t * R + j] * gz[n * R + j] + scale * z[n * R + j] * pg[j];
        dw[p.row_group[n] * H * S + ks] += acc;
      }
    }
  }
}

// kDx, item (k, n): dx[n, k-block] (+)= sum_s w gz[n] @ A[k,s]^T, as (sum_s w A[k,s][c, :]) . gz[n]
// per column c: the skills are mixed over the rank vector (kC columns at a time, independent
// sums), and one horizontal sum per column remains.
template <typename T, int kR>
MHR_ROWS_INLINE void grad_dx(const LoraRowsGradParams& p, int64_t k, int64_t n) {
  const int64_t H = p.heads, S = p.skills, R = kR > 0 ? kR : p.rank, dk_in = p.d_in / H;
  const T* A = static_cast<const T*>(p.A) + k * S * dk_in * R;
  const T* w = static_cast<const T*>(p.weights) + (p.row_group[n] * H + k) * S;
  const T* gz = static_cast<const T*>(p.gz) + n * R;
  T* __restrict out = static_cast<T*>(p.dx) + n * p.dx_stride_n + k * dk_in;
  int64_t c = 0;
  if constexpr (kR >= 2) {
    constexpr int L = kR < 8 ? kR : 8, kV = kR / L, kC = 4;
    using V = typename Lanes<T, L>::type;
    V g[kV];
    for (int v = 0; v < kV; ++v) g[v] = load_lanes<T, L>(gz + v * L);
    for (; c + kC <= dk_in; c += kC) {
      V mix[kC][kV];
      for (int q = 0; q < kC; ++q)
        for (int v = 0; v < kV; ++v) mix[q][v] = V{};
      for (int64_t s = 0; s < S; ++s) {
        const T ws = w[s];
        const T* a = A + (s * dk_in + c) * kR;
        for (int q = 0; q < kC; ++q)
          for (int v = 0; v < kV; ++v) mix[q][v] += ws * load_lanes<T, L>(a + q * kR + v * L);
      }
      for (int q = 0; q < kC; ++q) {
        T acc = 0;
        for (int v = 0; v < kV; ++v) acc += sum_lanes<T, L>(mix[q][v] * g[v]);
        out[c + q] = p.dx_accumulate ? out[c + q] + acc : acc;
      }
    }
  }
  T fixed[kR > 0 ? kR : 1];
  T* __restrict mix = kR > 0 ? fixed : thread_scratch<T>(static_cast<size_t>(R));
  for (; c < dk_in; ++c) {
    for (int64_t j = 0; j < R; ++j) mix[j] = T(0);
    for (int64_t s = 0; s < S; ++s)
      for (int64_t j = 0; j < R; ++j) mix[j] += w[s] * A[(s * dk_in + c) * R + j];
    T acc = 0;
    for (int64_t j = 0; j < R; ++j) acc += mix[j] * gz[j];
    out[c] = p.dx_accumulate ? out[c] + acc : acc;
  }
}

template <typename T, int kR>
MHR_ROWS_INLINE void rows_backward_step(const LoraRowsGradParams& p, LoraRowsGradStep step, int64_t begin,
                                        int64_t end) {
  const int64_t H = p.heads, R = kR > 0 ? kR : p.rank, N = p.rows;
  for (int64_t item = begin; item < end; ++item) {
    switch (step) {
      case LoraRowsGradStep::kProject:
        grad_project<T, kR>(p, item / N, item % N);
        break;
      case LoraRowsGradStep::kSumHeads: {
        const T* gzh = static_cast<const T*>(p.gzh) + item * H * R;
        T* gz = static_cast<T*>(p.gz) + item * R;
        for (int64_t j = 0; j < R; ++j) {
          T v = gzh[j];
          for (int64_t k = 1; k < H; ++k) v += gzh[k * R + j];
          gz[j] = v;
        }
        break;
      }
      case LoraRowsGradStep::kWeights:
        grad_weights<T, kR>(p, item / p.skills, item % p.skills);
        break;
      case LoraRowsGradStep::kDx:
        if (p.dx != nullptr) grad_dx<T, kR>(p, item / N, item % N);
        break;
    }
  }
}

// The instantiations for one instruction set: MHR_CPU_RANK_DISPATCH (cpu_lanes.h).

template <typename T>
void rows_portable(const LoraRowsParams& p, LoraRowsStep step, int64_t b, int64_t e) {
  MHR_CPU_RANK_DISPATCH(rows_forward_step, T, p.rank, p, step, b, e)
}
template <typename T>
void gathered_portable(const LoraGatheredParams& p, int64_t b, int64_t e) {
  MHR_CPU_RANK_DISPATCH(gathered_forward, T, p.rank, p, b, e)
}
template <typename T>
void rows_backward_portable(const LoraRowsGradParams& p, LoraRowsGradStep step, int64_t b, int64_t e) {
  MHR_CPU_RANK_DISPATCH(rows_backward_step, T, p.rank, p, step, b, e)
}
#if defined(MHR_ROWS_X86)
template <typename T>
__attribute__((target("avx2,fma"))) void rows_avx2(const LoraRowsParams& p, LoraRowsStep step, int64_t b, int64_t e) {
  MHR_CPU_RANK_DISPATCH(rows_forward_step, T, p.rank, p, step, b, e)
}
template <typename T>
__attribute__((target("avx2,fma"))) void gathered_avx2(const LoraGatheredParams& p, int64_t b, int64_t e) {
  MHR_CPU_RANK_DISPATCH(gathered_forward, T, p.rank, p, b, e)
}
template <typename T>
__attribute__((target("avx2,fma"))) void rows_backward_avx2(const LoraRowsGradParams& p, LoraRowsGradStep step,
                                                            int64_t b, int64_t e) {
  MHR_CPU_RANK_DISPATCH(rows_backward_step, T, p.rank, p, step, b, e)
}
bool has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}
#endif

}  // namespace

template <typename T>
void routed_lora_rows_backward_step_cpu(const LoraRowsGradParams& p, LoraRowsGradStep step, int64_t begin, int64_t end,
                                        bool use_avx2) {
#if defined(MHR_ROWS_X86)
  if (use_avx2 && has_avx2()) return rows_backward_avx2<T>(p, step, begin, end);
#endif
  (void)use_avx2;
  rows_backward_portable<T>(p, step, begin, end);
}

template <typename T>
void routed_lora_rows_backward_cpu(const LoraRowsGradParams& p, bool use_avx2) {
  for (LoraRowsGradStep step :
       {LoraRowsGradStep::kProject, LoraRowsGradStep::kSumHeads, LoraRowsGradStep::kWeights, LoraRowsGradStep::kDx})
    routed_lora_rows_backward_step_cpu<T>(p, step, 0, lora_rows_grad_step_items(p, step), use_avx2);
}

template <typename T>
void routed_lora_rows_forward_step_cpu(const LoraRowsParams& p, LoraRowsStep step, int64_t begin, int64_t end,
                                       bool use_avx2) {
#if defined(MHR_ROWS_X86)
  if (use_avx2 && has_avx2()) return rows_avx2<T>(p, step, begin, end);
#endif
  (void)use_avx2;
  rows_portable<T>(p, step, begin, end);
}

template <typename T>
void routed_lora_rows_forward_cpu(const LoraRowsParams& p, bool use_avx2) {
  for (LoraRowsStep step : {LoraRowsStep::kProject, LoraRowsStep::kSumHeads, LoraRowsStep::kExpand})
    routed_lora_rows_forward_step_cpu<T>(p, step, 0, lora_rows_step_items(p, step), use_avx2);
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

#define MHR_ROWS_INSTANTIATE(T)                                                                                      \
  template void routed_lora_rows_forward_step_cpu<T>(const LoraRowsParams&, LoraRowsStep, int64_t, int64_t, bool);   \
  template void routed_lora_rows_forward_cpu<T>(const LoraRowsParams&, bool);                                        \
  template void routed_lora_gathered_forward_cpu<T>(const LoraGatheredParams&, int64_t, int64_t, bool);              \
  template void routed_lora_rows_backward_step_cpu<T>(const LoraRowsGradParams&, LoraRowsGradStep, int64_t, int64_t, \
                                                      bool);                                                         \
  template void routed_lora_rows_backward_cpu<T>(const LoraRowsGradParams&, bool);
MHR_ROWS_INSTANTIATE(float)
MHR_ROWS_INSTANTIATE(double)

}  // namespace mhr_ops
