// CUDA kernels for routed_lora (see routed_lora.h): shrink, expand and wgrad, SIMT, fp32
// accumulation. A block owns a tile of rows; for each distinct group among its rows it mixes the
// chunk of the skill matrices it needs into shared memory (S FMAs per element, amortized over the
// tile's rows) and multiplies only the rows of that group. Rows of one example are contiguous in
// training, so a tile usually holds one or two groups. Mixed adapters never reach global memory.
#include <algorithm>
#include <cstdint>

#include "cuda_primitives.cuh"
#include "routed_lora_cuda.h"
#include "routed_lora_tc_cuda.h"

namespace mhr_ops {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxRank = static_cast<int>(kRoutedLoraMaxRank);
// Internal group values. User ids never reach them: row_group maps every id outside [0, G)
// (including -2 and -3, with validation skipped) to kBadGroup, whose rows come out NaN.
constexpr int64_t kBadGroup = -1;
constexpr int64_t kNoRow = -2;   // group id of a tile slot past the last row
constexpr int64_t kNoMore = -3;  // "no unprocessed group left" marker

template <typename acc_t>
__device__ __forceinline__ acc_t quiet_nan() {
  return acc_t(__int_as_float(0x7fc00000));
}

__device__ __forceinline__ int64_t row_group(const RowRouting& r, int64_t n) {
  const int64_t g = load_index(r.group_ids, r.index_type, r.ids_stride, n / r.rows_per_group_id);
  return (g >= 0 && g < r.num_groups) ? g : kBadGroup;
}

template <typename acc_t>
__device__ __forceinline__ acc_t route_weight(const RowRouting& r, int64_t g, int64_t k, int64_t s) {
  return ld_global(static_cast<const acc_t*>(r.weights) + g * r.w_stride_g + k * r.w_stride_k + s * r.w_stride_s);
}

template <typename mt, typename acc_t>
__device__ __forceinline__ acc_t skill_elem(const SkillMatrices& m, int64_t k, int64_t s, int64_t row, int64_t col) {
  return to_acc<acc_t>(ld_global(static_cast<const mt*>(m.data) + k * m.stride_k + s * m.stride_s + row * m.stride_row +
                                 col * m.stride_col));
}

// sum_s w[g,k,s] M[k,s](row, col); NaN for a group id outside [0, G) (never dereferenced).
template <typename mt, typename acc_t>
__device__ __forceinline__ acc_t mixed_elem(const SkillMatrices& m, const RowRouting& r, int64_t g, int64_t k,
                                            int64_t row, int64_t col) {
  if (g < 0 || g >= r.num_groups) return quiet_nan<acc_t>();
  acc_t v = 0;
  for (int64_t s = 0; s < r.num_skills; ++s)
    v += route_weight<acc_t>(r, g, k, s) * skill_elem<mt, acc_t>(m, k, s, row, col);
  return v;
}

// Distinct-group iteration over a tile's rows. gid[] holds each slot's group (kNoRow past the
// end); done[] marks processed slots. Returns the next group to process (block-uniform), or
// kNoMore. Must be called by all threads.
template <int kRows>
__device__ int64_t next_group(const int64_t* gid, bool* done, int64_t* current) {
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t g = kNoMore;
    for (int t = 0; t < kRows; ++t)
      if (!done[t]) {
        g = gid[t];
        break;
      }
    *current = g;
  }
  __syncthreads();
  const int64_t g = *current;
  if (g != kNoMore && threadIdx.x < kRows && gid[threadIdx.x] == g) done[threadIdx.x] = true;
  return g;  // done[] updates become visible at the next call's first barrier
}

template <int kRows>
__device__ void load_tile_groups(const RowRouting& r, int64_t n0, int64_t num_rows, int64_t* gid, bool* done) {
  if (threadIdx.x < kRows) {
    const int64_t n = n0 + threadIdx.x;
    gid[threadIdx.x] = n < num_rows ? row_group(r, n) : kNoRow;
    done[threadIdx.x] = n >= num_rows;
  }
}

// ---------------------------------------------------------------------------------------------
// shrink: Z[n, :] = z_scale * sum_k X[n, k-block] @ Mmix_g[k]. grid (row tiles, K splits).
constexpr int kShrinkRows = 32;
constexpr int kShrinkChunk = 32;
constexpr int kShrinkPerThread = kShrinkRows * kMaxRank / kThreads;

template <typename xt, typename mt>
__global__ void __launch_bounds__(kThreads) shrink_kernel(const ShrinkParams p, int64_t chunks_per_split) {
  using acc_t = typename AccType<xt>::type;
  MHR_SHARED(acc_t, xs, [kShrinkRows][kShrinkChunk + 1]);
  MHR_SHARED(acc_t, mix, [kShrinkChunk][kMaxRank]);
  MHR_SHARED(int64_t, gid, [kShrinkRows]);
  MHR_SHARED(bool, done, [kShrinkRows]);
  MHR_SHARED(int64_t, current, );

  const RowRouting& R = p.routing;
  const int r = static_cast<int>(p.rank);
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kShrinkRows;
  const int64_t chunks_per_head = (p.dk + kShrinkChunk - 1) / kShrinkChunk;
  const int64_t total_chunks = R.num_heads * chunks_per_head;
  const int64_t chunk_begin = static_cast<int64_t>(blockIdx.y) * chunks_per_split;
  const int64_t chunk_end = min(total_chunks, chunk_begin + chunks_per_split);
  const xt* x = static_cast<const xt*>(p.x);

  load_tile_groups<kShrinkRows>(R, n0, p.num_rows, gid, done);
  acc_t acc[kShrinkPerThread];
#pragma unroll
  for (int i = 0; i < kShrinkPerThread; ++i) acc[i] = 0;

  for (int64_t g = next_group<kShrinkRows>(gid, done, &current); g != kNoMore;
       g = next_group<kShrinkRows>(gid, done, &current)) {
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      const int64_t k = chunk / chunks_per_head;
      const int64_t c0 = (chunk % chunks_per_head) * kShrinkChunk;
      __syncthreads();  // previous chunk's readers are done with xs / mix
      for (int e = threadIdx.x; e < kShrinkRows * kShrinkChunk; e += kThreads) {
        const int t = e / kShrinkChunk, c = e % kShrinkChunk;
        const int64_t n = n0 + t, col = c0 + c;
        xs[t][c] = (gid[t] == g && col < p.dk)
                       ? to_acc<acc_t>(ld_global(x + n * p.x_stride_n + (k * p.dk + col) * p.x_stride_c))
                       : acc_t(0);
      }
      for (int e = threadIdx.x; e < kShrinkChunk * r; e += kThreads) {
        const int c = e / r, j = e % r;
        mix[c][j] = (c0 + c < p.dk) ? mixed_elem<mt, acc_t>(p.m, R, g, k, c0 + c, j) : acc_t(0);
      }
      __syncthreads();
#pragma unroll
      for (int i = 0; i < kShrinkPerThread; ++i) {
        const int e = threadIdx.x + i * kThreads;
        if (e >= kShrinkRows * r) break;
        const int t = e / r, j = e % r;
        if (gid[t] != g) continue;
        acc_t a = acc[i];
#pragma unroll 8
        for (int c = 0; c < kShrinkChunk; ++c) a += xs[t][c] * mix[c][j];
        acc[i] = a;
      }
    }
  }

  acc_t* z = static_cast<acc_t*>(p.z);
#pragma unroll
  for (int i = 0; i < kShrinkPerThread; ++i) {
    const int e = threadIdx.x + i * kThreads;
    if (e >= kShrinkRows * r) break;
    const int64_t n = n0 + e / r;
    if (n >= p.num_rows) continue;
    const acc_t v = acc[i] * static_cast<acc_t>(p.z_scale);
    if (gridDim.y > 1)
      atomic_add_global(z + n * r + e % r, v);
    else
      st_global(z + n * r + e % r, v);
  }
}

// ---------------------------------------------------------------------------------------------
// expand: Y[n, col] (+)= y_scale * Z[n, :] @ Mmix_g[k(col)][:, c(col)]. grid (row tiles, col tiles).
constexpr int kExpandRows = 32;
constexpr int kExpandCols = 64;
constexpr int kExpandRankChunk = 32;
constexpr int kExpandPerThread = kExpandRows * kExpandCols / kThreads;

template <typename xt, typename mt>
__global__ void __launch_bounds__(kThreads) expand_kernel(const ExpandParams p) {
  using acc_t = typename AccType<xt>::type;
  MHR_SHARED(acc_t, zs, [kExpandRows][kExpandRankChunk + 1]);
  MHR_SHARED(acc_t, mix, [kExpandRankChunk][kExpandCols]);
  MHR_SHARED(int64_t, gid, [kExpandRows]);
  MHR_SHARED(bool, done, [kExpandRows]);
  MHR_SHARED(int64_t, current, );

  const RowRouting& R = p.routing;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kExpandRows;
  const int64_t col0 = static_cast<int64_t>(blockIdx.y) * kExpandCols;
  const int64_t total_cols = R.num_heads * p.dk;
  const acc_t* z = static_cast<const acc_t*>(p.z);

  load_tile_groups<kExpandRows>(R, n0, p.num_rows, gid, done);
  acc_t acc[kExpandPerThread];
#pragma unroll
  for (int i = 0; i < kExpandPerThread; ++i) acc[i] = 0;

  for (int64_t g = next_group<kExpandRows>(gid, done, &current); g != kNoMore;
       g = next_group<kExpandRows>(gid, done, &current)) {
    for (int64_t j0 = 0; j0 < p.rank; j0 += kExpandRankChunk) {
      __syncthreads();
      for (int e = threadIdx.x; e < kExpandRows * kExpandRankChunk; e += kThreads) {
        const int t = e / kExpandRankChunk, jj = e % kExpandRankChunk;
        zs[t][jj] = (gid[t] == g && j0 + jj < p.rank) ? ld_global(z + (n0 + t) * p.rank + j0 + jj) : acc_t(0);
      }
      for (int e = threadIdx.x; e < kExpandRankChunk * kExpandCols; e += kThreads) {
        const int jj = e / kExpandCols, cl = e % kExpandCols;
        const int64_t col = col0 + cl;
        mix[jj][cl] = (j0 + jj < p.rank && col < total_cols)
                          ? mixed_elem<mt, acc_t>(p.m, R, g, col / p.dk, j0 + jj, col % p.dk)
                          : acc_t(0);
      }
      __syncthreads();
#pragma unroll
      for (int i = 0; i < kExpandPerThread; ++i) {
        const int e = threadIdx.x + i * kThreads;
        const int t = e / kExpandCols, cl = e % kExpandCols;
        if (gid[t] != g) continue;
        acc_t a = acc[i];
#pragma unroll 8
        for (int jj = 0; jj < kExpandRankChunk; ++jj) a += zs[t][jj] * mix[jj][cl];
        acc[i] = a;
      }
    }
  }

  xt* y = static_cast<xt*>(p.y);
#pragma unroll
  for (int i = 0; i < kExpandPerThread; ++i) {
    const int e = threadIdx.x + i * kThreads;
    const int64_t n = n0 + e / kExpandCols, col = col0 + e % kExpandCols;
    if (n >= p.num_rows || col >= total_cols) continue;
    xt* dst = y + n * p.y_stride_n + col * p.y_stride_c;
    acc_t v = acc[i] * static_cast<acc_t>(p.y_scale);
    if (p.accumulate) v += to_acc<acc_t>(ld_global(dst));
    st_global(dst, from_acc<xt>(v));
  }
}

// ---------------------------------------------------------------------------------------------
// wgrad: per (head k, column chunk) and a slice of rows, the plain partial
// P = sum_{n in run} X[n, k-block]^T Q[n, :] * q_scale is flushed at every group change into
// dM[k, s] += w[g,k,s] P and dw[g,k,s] += <P, M[k, s]>. grid (column chunks, heads, row slices).
constexpr int kWgradRows = 32;
constexpr int kWgradCols = 32;
constexpr int kWgradPerThread = kWgradCols * kMaxRank / kThreads;

template <typename xt, typename mt, typename acc_t>
__device__ void wgrad_flush(const WgradParams& p, int64_t g, int64_t k, int64_t c0, acc_t* acc) {
  const RowRouting& R = p.routing;
  const int r = static_cast<int>(p.rank);
  if (g >= 0 && g < R.num_groups) {
    const acc_t qs = static_cast<acc_t>(p.q_scale);
    acc_t* dm = static_cast<acc_t*>(p.dm);
    for (int64_t s = 0; s < R.num_skills; ++s) {
      const acc_t w = route_weight<acc_t>(R, g, k, s);
      acc_t dot = 0;
#pragma unroll
      for (int i = 0; i < kWgradPerThread; ++i) {
        const int e = threadIdx.x + i * kThreads;
        const int64_t c = c0 + e / r, j = e % r;
        if (e >= kWgradCols * r || c >= p.dk) continue;
        const acc_t v = acc[i] * qs;
        if (dm)
          atomic_add_global(dm + k * p.m.stride_k + s * p.m.stride_s + c * p.m.stride_row + j * p.m.stride_col, w * v);
        if (p.dw) dot += v * skill_elem<mt, acc_t>(p.m, k, s, c, j);
      }
      if (p.dw) {
        dot = warp_sum(dot);
        if ((threadIdx.x & 31) == 0 && dot != acc_t(0))
          atomic_add_global(static_cast<acc_t*>(p.dw) + (g * R.num_heads + k) * R.num_skills + s, dot);
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kWgradPerThread; ++i) acc[i] = 0;
}

template <typename xt, typename mt>
__global__ void __launch_bounds__(kThreads) wgrad_kernel(const WgradParams p, int64_t rows_per_slice) {
  using acc_t = typename AccType<xt>::type;
  MHR_SHARED(acc_t, xs, [kWgradRows][kWgradCols + 1]);
  MHR_SHARED(acc_t, qs, [kWgradRows][kMaxRank + 1]);
  MHR_SHARED(int64_t, gid, [kWgradRows]);

  const RowRouting& R = p.routing;
  const int r = static_cast<int>(p.rank);
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kWgradCols;
  const int64_t k = blockIdx.y;
  const int64_t n_begin = static_cast<int64_t>(blockIdx.z) * rows_per_slice;
  const int64_t n_end = min(p.num_rows, n_begin + rows_per_slice);
  if (n_begin >= n_end) return;
  const xt* x = static_cast<const xt*>(p.x);
  const acc_t* q = static_cast<const acc_t*>(p.q);

  acc_t acc[kWgradPerThread];
#pragma unroll
  for (int i = 0; i < kWgradPerThread; ++i) acc[i] = 0;
  int64_t g_cur = row_group(R, n_begin);

  for (int64_t t0 = n_begin; t0 < n_end; t0 += kWgradRows) {
    __syncthreads();
    for (int e = threadIdx.x; e < kWgradRows * kWgradCols; e += kThreads) {
      const int t = e / kWgradCols, c = e % kWgradCols;
      const int64_t n = t0 + t, col = c0 + c;
      xs[t][c] = (n < n_end && col < p.dk)
                     ? to_acc<acc_t>(ld_global(x + n * p.x_stride_n + (k * p.dk + col) * p.x_stride_c))
                     : acc_t(0);
    }
    for (int e = threadIdx.x; e < kWgradRows * r; e += kThreads) {
      const int t = e / r, j = e % r;
      const int64_t n = t0 + t;
      qs[t][j] = n < n_end ? ld_global(q + n * r + j) : acc_t(0);
    }
    if (threadIdx.x < kWgradRows) {
      const int64_t n = t0 + threadIdx.x;
      gid[threadIdx.x] = n < n_end ? row_group(R, n) : g_cur;
    }
    __syncthreads();
    const int rows = static_cast<int>(n_end - t0 < kWgradRows ? n_end - t0 : kWgradRows);
    for (int t = 0; t < rows; ++t) {
      if (gid[t] != g_cur) {  // block-uniform
        wgrad_flush<xt, mt>(p, g_cur, k, c0, acc);
        g_cur = gid[t];
      }
#pragma unroll
      for (int i = 0; i < kWgradPerThread; ++i) {
        const int e = threadIdx.x + i * kThreads;
        if (e < kWgradCols * r) acc[i] += xs[t][e / r] * qs[t][e % r];
      }
    }
  }
  wgrad_flush<xt, mt>(p, g_cur, k, c0, acc);
}

// ---------------------------------------------------------------------------------------------

int sm_count() {
  int device = 0, count = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 1;
  if (cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) return 1;
  return count > 0 ? count : 1;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Reduction chunks per block of the shrink: all of them, unless the row tiles alone would leave
// SMs idle (small N, e.g. decode); then the reduction is split across blocks.
int64_t shrink_chunks_per_split(int64_t num_rows, int64_t num_heads, int64_t dk) {
  const int64_t row_tiles = ceil_div(num_rows, kShrinkRows);
  const int64_t total_chunks = num_heads * ceil_div(dk, kShrinkChunk);
  const int64_t want_blocks = 2LL * sm_count();
  const int64_t splits =
      std::max<int64_t>(1, std::min<int64_t>(total_chunks, want_blocks / std::max<int64_t>(1, row_tiles)));
  return ceil_div(total_chunks, splits);
}

template <typename xt, typename mt>
int launch_shrink(const ShrinkParams& p, cudaStream_t stream) {
  using acc_t = typename AccType<xt>::type;
  const int64_t row_tiles = ceil_div(p.num_rows, kShrinkRows);
  const int64_t total_chunks = p.routing.num_heads * ceil_div(p.dk, kShrinkChunk);
  const int64_t chunks_per_split = shrink_chunks_per_split(p.num_rows, p.routing.num_heads, p.dk);
  const int64_t used_splits = ceil_div(total_chunks, chunks_per_split);
  if (used_splits > 1) {
    cudaError_t err = cudaMemsetAsync(p.z, 0, sizeof(acc_t) * p.num_rows * p.rank, stream);
    if (err != cudaSuccess) return static_cast<int>(err);
  }
  const dim3 grid(static_cast<unsigned>(row_tiles), static_cast<unsigned>(used_splits));
  MHR_LAUNCH((shrink_kernel<xt, mt>), grid, kThreads, 0, stream, p, chunks_per_split);
  return static_cast<int>(cudaGetLastError());
}

template <typename xt, typename mt>
int launch_expand(const ExpandParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(p.num_rows, kExpandRows)),
                  static_cast<unsigned>(ceil_div(p.routing.num_heads * p.dk, kExpandCols)));
  MHR_LAUNCH((expand_kernel<xt, mt>), grid, kThreads, 0, stream, p);
  return static_cast<int>(cudaGetLastError());
}

template <typename xt, typename mt>
int launch_wgrad(const WgradParams& p, cudaStream_t stream) {
  const int64_t col_tiles = ceil_div(p.dk, kWgradCols);
  const int64_t per_slice_blocks = col_tiles * p.routing.num_heads;
  const int64_t slices = std::max<int64_t>(
      1,
      std::min<int64_t>(ceil_div(p.num_rows, kWgradRows), 4LL * sm_count() / std::max<int64_t>(1, per_slice_blocks)));
  const int64_t rows_per_slice = ceil_div(p.num_rows, slices);
  const dim3 grid(static_cast<unsigned>(col_tiles), static_cast<unsigned>(p.routing.num_heads),
                  static_cast<unsigned>(ceil_div(p.num_rows, rows_per_slice)));
  MHR_LAUNCH((wgrad_kernel<xt, mt>), grid, kThreads, 0, stream, p, rows_per_slice);
  return static_cast<int>(cudaGetLastError());
}

bool shapes_ok(int64_t rows, int64_t rank, int64_t dk, const RowRouting& r) {
  return rank >= 1 && rank <= kRoutedLoraMaxRank && dk >= 1 && r.num_heads >= 1 && r.num_skills >= 1 &&
         r.num_heads <= 65535 && r.rows_per_group_id >= 1 && rows >= 0;
}

// Binds xt / mt to a supported (data, matrix) type pair and returns the expression.
#define MHR_DISPATCH_DATA_MATRIX(data, matrix, ...)                 \
  do {                                                              \
    MHR_DISPATCH_16BIT_PAIRS(data, matrix, __VA_ARGS__)             \
    if ((data) == DType::kFloat32 && (matrix) == DType::kFloat32) { \
      using xt = float;                                             \
      using mt = float;                                             \
      return __VA_ARGS__;                                           \
    }                                                               \
    if ((data) == DType::kFloat64 && (matrix) == DType::kFloat64) { \
      using xt = double;                                            \
      using mt = double;                                            \
      return __VA_ARGS__;                                           \
    }                                                               \
    return static_cast<int>(cudaErrorInvalidValue);                 \
  } while (0)

}  // namespace

int routed_lora_shrink_cuda(const ShrinkParams& p, DType data, DType matrix, void* stream) {
  if (!shapes_ok(p.num_rows, p.rank, p.dk, p.routing)) return static_cast<int>(cudaErrorInvalidValue);
  if (p.num_rows == 0) return 0;
  if (routed_lora_uses_tensor_cores(data, matrix, p.num_rows))
    return routed_lora_shrink_tc(p, data, matrix, static_cast<cudaStream_t>(stream));
  MHR_DISPATCH_DATA_MATRIX(data, matrix, launch_shrink<xt, mt>(p, static_cast<cudaStream_t>(stream)));
}

bool routed_lora_shrink_splits_cuda(DType data, DType matrix, int64_t num_rows, int64_t num_heads, int64_t dk) {
  if (num_rows <= 0 || num_heads <= 0 || dk <= 0) return false;
  if (routed_lora_uses_tensor_cores(data, matrix, num_rows)) return false;
  return shrink_chunks_per_split(num_rows, num_heads, dk) < num_heads * ceil_div(dk, kShrinkChunk);
}

int routed_lora_expand_cuda(const ExpandParams& p, DType data, DType matrix, void* stream) {
  if (!shapes_ok(p.num_rows, p.rank, p.dk, p.routing)) return static_cast<int>(cudaErrorInvalidValue);
  if (p.num_rows == 0) return 0;
  if (routed_lora_uses_tensor_cores(data, matrix, p.num_rows))
    return routed_lora_expand_tc(p, data, matrix, static_cast<cudaStream_t>(stream));
  MHR_DISPATCH_DATA_MATRIX(data, matrix, launch_expand<xt, mt>(p, static_cast<cudaStream_t>(stream)));
}

int routed_lora_wgrad_cuda(const WgradParams& p, DType data, DType matrix, void* stream) {
  if (!shapes_ok(p.num_rows, p.rank, p.dk, p.routing)) return static_cast<int>(cudaErrorInvalidValue);
  if (p.num_rows == 0 || (p.dm == nullptr && p.dw == nullptr)) return 0;
  if (routed_lora_uses_tensor_cores(data, matrix, p.num_rows))
    return routed_lora_wgrad_tc(p, data, matrix, static_cast<cudaStream_t>(stream));
  MHR_DISPATCH_DATA_MATRIX(data, matrix, launch_wgrad<xt, mt>(p, static_cast<cudaStream_t>(stream)));
}

}  // namespace mhr_ops
