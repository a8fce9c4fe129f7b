// Tensor-core kernels for routed_lora (see routed_lora.h and routed_lora_tc_cuda.h): the shrink,
// expand and wgrad of 16-bit activations, as tf32 mma.sync (mma.cuh) with fp32 accumulation.
//
// Design: mix outputs, not parameters (bench/NOTES.md records why). For head k, the S skill
// matrices side by side form one matrix Mcat_k [dk, S*r] (Mcat_k[c, s*r + j] = M[k, s](c, j)):
//   shrink: P = X_k @ Mcat_k on tensor cores, then z[n, j] += sum_s w[g(n), k, s] P[n, s*r + j]
//           in the epilogue, so no mixed adapter is ever formed and the rows' group order does not
//           matter.
//   expand: Y_k = Zw @ Mcat_k^T, with Zw[n, s*r + j] = w[g(n), k, s] z[n, j] built while staging.
//   wgrad:  dMcat_k = X_k^T @ Qw, with Qw[n, s*r + j] = w[g(n), k, s] Q[n, j]; each block owns its
//           slice of dM over all rows, so dM is written once, without atomics. The same pass
//           over X gives dw[g, k, s] += sum_j P[n, s*r + j] Q[n, j] from the shrink's products P.
// This costs S times the tensor-core flops of a premixed adapter, which at the shapes we serve is
// still well under the time the pass over the activations takes.
//
// Operands are staged in shared memory as fp32 values holding tf32 bit patterns: fp16 / bf16
// convert exactly, fp32 adapters and the fp32 bottleneck round to nearest (cvt.rna). All global
// accesses go through ld_global / st_global (counted by the emulation's traffic model), with
// consecutive lanes on the unit-stride dimension of each operand.
#include <cstdint>

#include "cuda_primitives.cuh"
#include "mma.cuh"
#include "routed_lora_tc_cuda.h"

namespace mhr_ops {
namespace {

constexpr int kThreads = 128;  // 4 warps
constexpr int kWarpRows = 16;  // rows of one mma tile (M)
constexpr int kTileRows = 4 * kWarpRows;
constexpr int kChunk = 32;         // reduction columns staged per step (4 k8 mma steps)
constexpr int kProjCols = 128;     // shrink: S*r columns per pass (16 n8 tiles per warp)
constexpr int kExpandCols = 64;    // expand: output columns per block (8 n8 tiles per warp)
constexpr int kWgradCols = 64;     // wgrad: S*r columns per block (8 n8 tiles per warp)
constexpr int kPadA = 4;           // row padding of [rows][k] tiles: conflict-free A fragments
constexpr int kPadB = 8;           // row padding of [k][cols] tiles: conflict-free B fragments
constexpr int64_t kBadGroup = -1;  // a row whose group id is outside [0, G): NaN output

__device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ int64_t imax(int64_t a, int64_t b) { return a < b ? b : a; }
__device__ __forceinline__ uint32_t bits_of(float v) { return static_cast<uint32_t>(__float_as_int(v)); }
__device__ __forceinline__ float tf32_value(float v) { return __int_as_float(static_cast<int>(float_to_tf32(v))); }

__device__ __forceinline__ float quiet_nan_f() { return __int_as_float(0x7fc00000); }

// A value on its way into a tile: 16-bit types are exact in tf32; fp32 rounds to nearest.
template <typename T>
__device__ __forceinline__ float to_tile(T v) {
  return tf32_value(to_acc<float>(v));
}
template <>
__device__ __forceinline__ float to_tile<__half>(__half v) {
  return __half2float(v);
}
template <>
__device__ __forceinline__ float to_tile<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

__device__ __forceinline__ int64_t tc_row_group(const RowRouting& r, int64_t n) {
  const int64_t slot = (n / r.rows_per_group_id) * r.ids_stride;
  const int64_t g = r.index_type == IndexType::kInt32
                        ? static_cast<int64_t>(ld_global(static_cast<const int32_t*>(r.group_ids) + slot))
                        : ld_global(static_cast<const int64_t*>(r.group_ids) + slot);
  return (g >= 0 && g < r.num_groups) ? g : kBadGroup;
}

__device__ __forceinline__ float tc_weight(const RowRouting& r, int64_t g, int64_t k, int64_t s) {
  return ld_global(static_cast<const float*>(r.weights) + g * r.w_stride_g + k * r.w_stride_k + s * r.w_stride_s);
}

template <typename mt>
__device__ __forceinline__ float tc_skill(const SkillMatrices& m, int64_t k, int64_t s, int64_t row, int64_t col) {
  return to_tile(ld_global(static_cast<const mt*>(m.data) + k * m.stride_k + s * m.stride_s + row * m.stride_row +
                           col * m.stride_col));
}

// Fragments from fp32 tiles holding tf32 patterns (mma.cuh gives the layouts): A [rows][k] at
// (m0, k0), B [k][cols] at (k0, n0).
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const float* tile, int ld, int m0, int k0) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  a[0] = bits_of(tile[(m0 + g) * ld + k0 + t]);
  a[1] = bits_of(tile[(m0 + g + 8) * ld + k0 + t]);
  a[2] = bits_of(tile[(m0 + g) * ld + k0 + t + 4]);
  a[3] = bits_of(tile[(m0 + g + 8) * ld + k0 + t + 4]);
}
__device__ __forceinline__ void load_b(uint32_t (&b)[2], const float* tile, int ld, int k0, int n0) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  b[0] = bits_of(tile[(k0 + t) * ld + n0 + g]);
  b[1] = bits_of(tile[(k0 + t + 4) * ld + n0 + g]);
}

// One staged chunk: every warp multiplies its 16 rows of A [kTileRows][kChunk] by n_tiles n8
// tiles of B [kChunk][...] into acc.
template <int kMaxTiles>
__device__ __forceinline__ void mma_chunk(float (&acc)[kMaxTiles][4], const float* a_tile, int lda, const float* b_tile,
                                          int ldb, int n_tiles) {
  const int m0 = (threadIdx.x >> 5) * kWarpRows;
#pragma unroll
  for (int k0 = 0; k0 < kChunk; k0 += 8) {
    uint32_t a[4];
    load_a(a, a_tile, lda, m0, k0);
#pragma unroll
    for (int nt = 0; nt < kMaxTiles; ++nt) {
      if (nt >= n_tiles) break;  // block-uniform: every lane of the warp agrees
      uint32_t b[2];
      load_b(b, b_tile, ldb, k0, nt * 8);
      mma_m16n8k8_tf32(acc[nt], a, b, acc[nt]);
    }
  }
}

// The accumulator tile into shared memory: out[row][col] of the block's kTileRows rows.
template <int kMaxTiles>
__device__ __forceinline__ void store_acc(const float (&acc)[kMaxTiles][4], float* out, int ld, int n_tiles) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int m0 = (threadIdx.x >> 5) * kWarpRows;
#pragma unroll
  for (int nt = 0; nt < kMaxTiles; ++nt) {
    if (nt >= n_tiles) break;
#pragma unroll
    for (int i = 0; i < 4; ++i) out[(m0 + g + 8 * (i / 2)) * ld + nt * 8 + 2 * t + i % 2] = acc[nt][i];
  }
}

template <int kMaxTiles>
__device__ __forceinline__ void zero_acc(float (&acc)[kMaxTiles][4]) {
#pragma unroll
  for (int nt = 0; nt < kMaxTiles; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[nt][i] = 0.f;
}

// Stages Mcat_k[c0 + c, col0 + col] for c < c_count, col < col_count into tile[c][col], or into
// tile[col][c] when `sr_rows`; zero outside [dk) x [S*r). `m` is viewed as M[k, s](c, j).
// Consecutive lanes walk c when it has unit stride in memory, else the S*r index.
template <typename mt>
__device__ void stage_skills(float* tile, int ld, bool sr_rows, const SkillMatrices& m, int64_t k, int64_t rank,
                             int64_t sr, int64_t dk, int64_t c0, int c_count, int64_t col0, int col_count) {
  const bool c_fast = m.stride_row == 1;
  for (int e = threadIdx.x; e < c_count * col_count; e += kThreads) {
    const int c = c_fast ? e % c_count : e / col_count;
    const int col = c_fast ? e / c_count : e % col_count;
    const int64_t cc = c0 + c, cl = col0 + col;
    float v = 0.f;
    if (cc < dk && cl < sr) v = tc_skill<mt>(m, k, cl / rank, cc, cl % rank);
    tile[sr_rows ? col * ld + c : c * ld + col] = v;
  }
}

// Stages rows [n0, n0 + kTileRows) x columns [col0, col0 + kChunk) of a data matrix into
// tile[row][col], zero outside the matrix.
template <typename xt>
__device__ void stage_data(float* tile, int ld, const xt* x, int64_t stride_n, int64_t stride_c, int64_t n0,
                           int64_t num_rows, int64_t col0, int64_t col_end) {
  const bool c_fast = stride_c == 1 || stride_n != 1;
  for (int e = threadIdx.x; e < kTileRows * kChunk; e += kThreads) {
    const int t = c_fast ? e / kChunk : e % kTileRows;
    const int c = c_fast ? e % kChunk : e / kTileRows;
    const int64_t n = n0 + t, col = col0 + c;
    float v = 0.f;
    if (n < num_rows && col < col_end) v = to_tile(ld_global(x + n * stride_n + col * stride_c));
    tile[t * ld + c] = v;
  }
}

__device__ void load_groups(const RowRouting& r, int64_t n0, int64_t num_rows, int64_t* gid) {
  for (int t = threadIdx.x; t < kTileRows; t += kThreads) {
    const int64_t n = n0 + t;
    gid[t] = n < num_rows ? tc_row_group(r, n) : kBadGroup;
  }
}

// ---------------------------------------------------------------------------------------------
// shrink: P = X_k @ Mcat_k per head for a tile of kTileRows rows, then
// z[n, :] = z_scale * sum_k sum_s w[g, k, s] P[n, s, :]. grid (row tiles).
constexpr int kShrinkStage = kTileRows * (kChunk + kPadA) + kChunk * (kProjCols + kPadB);
constexpr int kShrinkOut = kTileRows * (kProjCols + kPadA);
constexpr int kShrinkSmem = kShrinkStage > kShrinkOut ? kShrinkStage : kShrinkOut;

template <typename xt, typename mt>
__global__ void __launch_bounds__(kThreads) tc_shrink_kernel(const ShrinkParams p) {
  MHR_SHARED(float, smem, [kShrinkSmem]);  // staging tiles, then (after the k loop) the P tile
  MHR_SHARED(int64_t, gid, [kTileRows]);
  float* xs = smem;                                 // [kTileRows][kChunk + kPadA]
  float* ms = smem + kTileRows * (kChunk + kPadA);  // [kChunk][kProjCols + kPadB]
  float* ps = smem;                                 // [kTileRows][kProjCols + kPadA]
  constexpr int lda = kChunk + kPadA, ldb = kProjCols + kPadB, ldp = kProjCols + kPadA;

  const RowRouting& R = p.routing;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kTileRows;
  const int64_t r = p.rank, sr = R.num_skills * r;
  const xt* x = static_cast<const xt*>(p.x);
  float* z = static_cast<float*>(p.z);
  const float z_scale = static_cast<float>(p.z_scale);
  load_groups(R, n0, p.num_rows, gid);

  float acc[kProjCols / 8][4];
  bool first = true;  // the first contribution to z writes it
  for (int64_t k = 0; k < R.num_heads; ++k) {
    for (int64_t col0 = 0; col0 < sr; col0 += kProjCols) {
      const int cols = static_cast<int>(imin(kProjCols, sr - col0));
      const int n_tiles = (cols + 7) / 8;
      zero_acc(acc);
      for (int64_t c0 = 0; c0 < p.dk; c0 += kChunk) {
        __syncthreads();  // the previous readers of smem are done
        stage_data(xs, lda, x, p.x_stride_n, p.x_stride_c, n0, p.num_rows, k * p.dk + c0, k * p.dk + p.dk);
        stage_skills<mt>(ms, ldb, false, p.m, k, r, sr, p.dk, c0, kChunk, col0, n_tiles * 8);
        __syncthreads();
        mma_chunk(acc, xs, lda, ms, ldb, n_tiles);
      }
      __syncthreads();  // ps overlays the staging tiles
      store_acc(acc, ps, ldp, n_tiles);
      __syncthreads();
      // Thread e owns (row, j) pairs; it sums the tile's skills of column j into z.
      for (int64_t e = threadIdx.x; e < kTileRows * r; e += kThreads) {
        const int t = static_cast<int>(e / r);
        const int64_t j = e % r, n = n0 + t;
        if (n >= p.num_rows) continue;
        const int64_t g = gid[t];
        float v = 0.f;
        if (g == kBadGroup) {
          v = quiet_nan_f();
        } else {
          for (int64_t s = (col0 + r - 1 - j) / r; s * r + j < col0 + cols; ++s)
            v += tc_weight(R, g, k, s) * ps[t * ldp + (s * r + j - col0)];
        }
        float* dst = z + n * r + j;
        st_global(dst, first ? v * z_scale : ld_global(dst) + v * z_scale);
      }
      first = false;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// expand: Y[n, k-block cols] (+)= Zw @ Mcat_k^T, Zw[n, s*r + j] = y_scale w[g(n), k, s] z[n, j].
// grid (row tiles, heads x column tiles of kExpandCols).
constexpr int kExpandStage = kTileRows * (kChunk + kPadA) + kChunk * (kExpandCols + kPadB);
constexpr int kExpandOut = kTileRows * (kExpandCols + kPadA);
constexpr int kExpandSmem = kExpandStage > kExpandOut ? kExpandStage : kExpandOut;

template <typename xt, typename mt>
__global__ void __launch_bounds__(kThreads) tc_expand_kernel(const ExpandParams p, int64_t col_tiles) {
  MHR_SHARED(float, smem, [kExpandSmem]);
  MHR_SHARED(int64_t, gid, [kTileRows]);
  float* zs = smem;                                 // [kTileRows][kChunk + kPadA]
  float* ms = smem + kTileRows * (kChunk + kPadA);  // [kChunk][kExpandCols + kPadB]
  float* ys = smem;                                 // [kTileRows][kExpandCols + kPadA]
  constexpr int lda = kChunk + kPadA, ldb = kExpandCols + kPadB, ldy = kExpandCols + kPadA;

  const RowRouting& R = p.routing;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kTileRows;
  const int64_t k = blockIdx.y / col_tiles;
  const int64_t c0 = (blockIdx.y % col_tiles) * kExpandCols;
  const int cols = static_cast<int>(imin(kExpandCols, p.dk - c0));
  const int n_tiles = (cols + 7) / 8;
  const int64_t r = p.rank, sr = R.num_skills * r;
  const float* z = static_cast<const float*>(p.z);
  const float y_scale = static_cast<float>(p.y_scale);
  load_groups(R, n0, p.num_rows, gid);

  float acc[kExpandCols / 8][4];
  zero_acc(acc);
  for (int64_t kk0 = 0; kk0 < sr; kk0 += kChunk) {
    __syncthreads();
    for (int e = threadIdx.x; e < kTileRows * kChunk; e += kThreads) {
      const int t = e / kChunk, kk = e % kChunk;
      const int64_t n = n0 + t, col = kk0 + kk;
      float v = 0.f;
      if (n < p.num_rows && col < sr) {
        const int64_t g = gid[t], s = col / r, j = col % r;
        v = g == kBadGroup ? quiet_nan_f() : tf32_value(y_scale * tc_weight(R, g, k, s) * ld_global(z + n * r + j));
      }
      zs[t * lda + kk] = v;
    }
    // The expand's M[k, s] is [rank, dk]; viewed as (c, j) it is Mcat_k, staged as [S*r][dk].
    stage_skills<mt>(ms, ldb, true, SkillMatrices{p.m.data, p.m.stride_k, p.m.stride_s, p.m.stride_col, p.m.stride_row},
                     k, r, sr, p.dk, c0, n_tiles * 8, kk0, kChunk);
    __syncthreads();
    mma_chunk(acc, zs, lda, ms, ldb, n_tiles);
  }
  __syncthreads();
  store_acc(acc, ys, ldy, n_tiles);
  __syncthreads();
  xt* y = static_cast<xt*>(p.y);
  for (int e = threadIdx.x; e < kTileRows * kExpandCols; e += kThreads) {
    const int t = e / kExpandCols, c = e % kExpandCols;
    const int64_t n = n0 + t;
    if (n >= p.num_rows || c >= cols) continue;
    xt* dst = y + n * p.y_stride_n + (k * p.dk + c0 + c) * p.y_stride_c;
    float v = ys[t * ldy + c];
    if (p.accumulate) v += to_acc<float>(ld_global(dst));
    st_global(dst, from_acc<xt>(v));
  }
}

// ---------------------------------------------------------------------------------------------
// wgrad, for a block's (column tile of dk, tile of S*r, head), over all rows in chunks of kChunk:
//   dM:  dMcat_k[c, col] += q_scale * sum_n X[n, k-block c] Qw[n, col], written once (no atomics);
//   dw:  P = X[chunk, c tile] @ Mcat_k[c tile, col tile] (the shrink's products, restricted to the
//        block's tiles), dw[g, k, s] += q_scale * sum_n sum_j P[n, s*r + j] Q[n, j], summed over
//        a run of rows of one group in the chunk, then added atomically.
// Both read each X tile once, so the backward makes one pass over x (and one over grad_y) for
// the weight gradients. Rows of a group outside [0, G) give nothing.
constexpr int kWgradStage = kTileRows * (kChunk + kPadA) + kChunk * (kWgradCols + kPadB);
constexpr int kWgradOut = kTileRows * (kWgradCols + kPadA);
constexpr int kWgradMs = kTileRows * (kWgradCols + kPadB);  // Mcat_k tile, staged once (dw)
constexpr int kWgradPs = kChunk * (kWgradCols + kPadA);     // P of one chunk (dw)
constexpr int kWgradSmem = (kWgradStage > kWgradOut ? kWgradStage : kWgradOut) + kWgradMs + kWgradPs;

// A fragment of A = T^T from a tile T [k][m] (the X^T tile read back as X).
__device__ __forceinline__ void load_a_transposed(uint32_t (&a)[4], const float* tile, int ld, int m0, int k0) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  a[0] = bits_of(tile[(k0 + t) * ld + m0 + g]);
  a[1] = bits_of(tile[(k0 + t) * ld + m0 + g + 8]);
  a[2] = bits_of(tile[(k0 + t + 4) * ld + m0 + g]);
  a[3] = bits_of(tile[(k0 + t + 4) * ld + m0 + g + 8]);
}

template <typename xt, typename mt>
__global__ void __launch_bounds__(kThreads) tc_wgrad_kernel(const WgradParams p) {
  MHR_SHARED(float, smem, [kWgradSmem]);
  MHR_SHARED(int64_t, gid, [kChunk]);
  constexpr int lda = kChunk + kPadA, ldb = kWgradCols + kPadB, ldo = kWgradCols + kPadA;
  float* xs = smem;                                                        // X^T: [kTileRows (c)][lda (rows)]
  float* qs = smem + kTileRows * lda;                                      // Qw: [kChunk (rows)][ldb]
  float* out = smem;                                                       // dM tile: [kTileRows][ldo], at the end
  float* ms = smem + (kWgradStage > kWgradOut ? kWgradStage : kWgradOut);  // Mcat_k: [kTileRows (c)][ldb]
  float* ps = ms + kWgradMs;                                               // P: [kChunk (rows)][ldo]

  const RowRouting& R = p.routing;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kTileRows;
  const int64_t col0 = static_cast<int64_t>(blockIdx.y) * kWgradCols;
  const int64_t k = blockIdx.z;
  const int64_t r = p.rank, sr = R.num_skills * r;
  const int cols = static_cast<int>(imin(kWgradCols, sr - col0));
  const int n_tiles = (cols + 7) / 8;
  const bool want_dm = p.dm != nullptr, want_dw = p.dw != nullptr;
  const xt* x = static_cast<const xt*>(p.x);
  const float* q = static_cast<const float*>(p.q);
  const float q_scale = static_cast<float>(p.q_scale);
  const int warp = threadIdx.x >> 5;
  // dw: warp w multiplies rows 16 (w % 2) .. of the chunk by n8 tiles 4 (w / 2) .. 4 (w / 2) + 3.
  const int p_m0 = (warp & 1) * kWarpRows, p_nt0 = (warp >> 1) * 4;
  // dw: the skills whose columns meet this block's column tile.
  const int64_t s_begin = col0 / r, s_end = (col0 + cols + r - 1) / r;
  if (want_dw) stage_skills<mt>(ms, ldb, false, p.m, k, r, sr, p.dk, c0, kTileRows, col0, n_tiles * 8);

  float acc[kWgradCols / 8][4];
  zero_acc(acc);
  for (int64_t n0 = 0; n0 < p.num_rows; n0 += kChunk) {
    __syncthreads();  // the previous chunk's readers of gid / xs / qs / ps are done
    for (int t = threadIdx.x; t < kChunk; t += kThreads) {
      const int64_t n = n0 + t;
      gid[t] = n < p.num_rows ? tc_row_group(R, n) : kBadGroup;
    }
    __syncthreads();
    // X^T tile: element (c, t) = X[n0 + t, k*dk + c0 + c]; consecutive lanes along c.
    const bool c_fast = p.x_stride_c == 1 || p.x_stride_n != 1;
    for (int e = threadIdx.x; e < kTileRows * kChunk; e += kThreads) {
      const int c = c_fast ? e % kTileRows : e / kChunk;
      const int t = c_fast ? e / kTileRows : e % kChunk;
      const int64_t n = n0 + t, cc = c0 + c;
      float v = 0.f;
      if (n < p.num_rows && cc < p.dk && gid[t] != kBadGroup)
        v = to_tile(ld_global(x + n * p.x_stride_n + (k * p.dk + cc) * p.x_stride_c));
      xs[c * lda + t] = v;
    }
    if (want_dm) {
      for (int e = threadIdx.x; e < kChunk * kWgradCols; e += kThreads) {
        const int t = e / kWgradCols, col = e % kWgradCols;
        const int64_t n = n0 + t, cl = col0 + col;
        float v = 0.f;
        if (n < p.num_rows && cl < sr && gid[t] != kBadGroup)
          v = tf32_value(tc_weight(R, gid[t], k, cl / r) * ld_global(q + n * r + cl % r));
        qs[t * ldb + col] = v;
      }
    }
    __syncthreads();
    if (want_dm) mma_chunk(acc, xs, lda, qs, ldb, n_tiles);
    if (want_dw) {
      float pacc[4][4];
      zero_acc(pacc);
#pragma unroll 2
      for (int kc = 0; kc < kTileRows; kc += 8) {
        uint32_t a[4];
        load_a_transposed(a, xs, lda, p_m0, kc);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          if (p_nt0 + i >= n_tiles) break;  // warp-uniform
          uint32_t b[2];
          load_b(b, ms, ldb, kc, (p_nt0 + i) * 8);
          mma_m16n8k8_tf32(pacc[i], a, b, pacc[i]);
        }
      }
      const int lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
      for (int i = 0; i < 4; ++i) {
        if (p_nt0 + i >= n_tiles) break;
        for (int v = 0; v < 4; ++v) ps[(p_m0 + g + 8 * (v / 2)) * ldo + (p_nt0 + i) * 8 + 2 * t4 + v % 2] = pacc[i][v];
      }
      __syncthreads();
      // Thread e < skills in the tile walks the chunk's rows, flushing at each change of group.
      for (int64_t e = threadIdx.x; e < s_end - s_begin; e += kThreads) {
        const int64_t s = s_begin + e;
        const int64_t j_begin = imax(0, col0 - s * r), j_end = imin(r, col0 + cols - s * r);
        int64_t g_run = kBadGroup;
        float sum = 0.f;
        for (int t = 0; t < kChunk; ++t) {
          const int64_t n = n0 + t, g = gid[t];
          if (g != g_run) {
            if (g_run != kBadGroup && sum != 0.f)
              atomic_add_global(static_cast<float*>(p.dw) + (g_run * R.num_heads + k) * R.num_skills + s,
                                sum * q_scale);
            g_run = g;
            sum = 0.f;
          }
          if (g == kBadGroup) continue;  // includes rows past the end
          for (int64_t j = j_begin; j < j_end; ++j) sum += ps[t * ldo + (s * r + j - col0)] * ld_global(q + n * r + j);
        }
        if (g_run != kBadGroup && sum != 0.f)
          atomic_add_global(static_cast<float*>(p.dw) + (g_run * R.num_heads + k) * R.num_skills + s, sum * q_scale);
      }
    }
  }
  if (!want_dm) return;
  __syncthreads();
  store_acc(acc, out, ldo, n_tiles);
  __syncthreads();
  // dM[k, s](c, j) += out[c][col]; consecutive lanes along M's unit-stride index.
  float* dm = static_cast<float*>(p.dm);
  const bool m_c_fast = p.m.stride_row == 1;
  for (int e = threadIdx.x; e < kTileRows * kWgradCols; e += kThreads) {
    const int c = m_c_fast ? e % kTileRows : e / kWgradCols;
    const int col = m_c_fast ? e / kTileRows : e % kWgradCols;
    const int64_t cc = c0 + c, cl = col0 + col;
    if (cc >= p.dk || col >= cols) continue;
    float* dst = dm + k * p.m.stride_k + (cl / r) * p.m.stride_s + cc * p.m.stride_row + (cl % r) * p.m.stride_col;
    st_global(dst, ld_global(dst) + q_scale * out[c * ldo + col]);
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename xt, typename mt>
int launch_shrink(const ShrinkParams& p, cudaStream_t stream) {
  MHR_LAUNCH((tc_shrink_kernel<xt, mt>), dim3(static_cast<unsigned>(ceil_div(p.num_rows, kTileRows))), kThreads, 0,
             stream, p);
  return static_cast<int>(cudaGetLastError());
}

template <typename xt, typename mt>
int launch_expand(const ExpandParams& p, cudaStream_t stream) {
  const int64_t col_tiles = ceil_div(p.dk, kExpandCols);
  const dim3 grid(static_cast<unsigned>(ceil_div(p.num_rows, kTileRows)),
                  static_cast<unsigned>(p.routing.num_heads * col_tiles));
  MHR_LAUNCH((tc_expand_kernel<xt, mt>), grid, kThreads, 0, stream, p, col_tiles);
  return static_cast<int>(cudaGetLastError());
}

template <typename xt, typename mt>
int launch_wgrad(const WgradParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(p.dk, kTileRows)),
                  static_cast<unsigned>(ceil_div(p.routing.num_skills * p.rank, kWgradCols)),
                  static_cast<unsigned>(p.routing.num_heads));
  MHR_LAUNCH((tc_wgrad_kernel<xt, mt>), grid, kThreads, 0, stream, p);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

bool routed_lora_uses_tensor_cores(DType data, DType matrix, int64_t num_rows) {
  const bool pair_ok = (data == DType::kFloat16 && (matrix == DType::kFloat16 || matrix == DType::kFloat32)) ||
                       (data == DType::kBFloat16 && (matrix == DType::kBFloat16 || matrix == DType::kFloat32));
  return pair_ok && num_rows > kRoutedLoraTensorCoreMinRows;
}

int routed_lora_shrink_tc(const ShrinkParams& p, DType data, DType matrix, cudaStream_t stream) {
  MHR_DISPATCH_16BIT_PAIRS(data, matrix, launch_shrink<xt, mt>(p, stream));
  return static_cast<int>(cudaErrorInvalidValue);
}

int routed_lora_expand_tc(const ExpandParams& p, DType data, DType matrix, cudaStream_t stream) {
  MHR_DISPATCH_16BIT_PAIRS(data, matrix, launch_expand<xt, mt>(p, stream));
  return static_cast<int>(cudaErrorInvalidValue);
}

int routed_lora_wgrad_tc(const WgradParams& p, DType data, DType matrix, cudaStream_t stream) {
  MHR_DISPATCH_16BIT_PAIRS(data, matrix, launch_wgrad<xt, mt>(p, stream));
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace mhr_ops
