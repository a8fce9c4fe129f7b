// CUDA forward of gated_head_proj (see gated_head_proj.h). A block computes a [32 rows x 64
// outputs] tile; the K loop runs head by head: a head no row of the tile opens is skipped
// outright, and a warp (one row of the tile per pass) skips the FMAs of a head its row closes.
#include "cuda_utils.cuh"
#include "gated_head_proj.h"

namespace mhr_ops {
namespace {

constexpr int kThreads = 256;
constexpr int kRows = 32;
constexpr int kCols = 64;
constexpr int kChunk = 32;
constexpr int kPerThread = kRows * kCols / kThreads;

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) gated_head_proj_kernel(const GatedHeadProjParams p) {
  using acc_t = typename AccType<scalar_t>::type;
  MHR_SHARED(acc_t, os, [kRows][kChunk + 1]);  // gated o chunk
  MHR_SHARED(acc_t, ws, [kCols][kChunk + 1]);  // weight chunk
  MHR_SHARED(acc_t, gs, [kRows]);
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int64_t d0 = static_cast<int64_t>(blockIdx.y) * kCols;
  const scalar_t* o = static_cast<const scalar_t*>(p.o);
  const scalar_t* g = static_cast<const scalar_t*>(p.gates);
  const scalar_t* w = static_cast<const scalar_t*>(p.weight);
  acc_t acc[kPerThread];
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) acc[i] = 0;

  for (int64_t h = 0; h < p.num_heads; ++h) {
    __syncthreads();
    bool open = false;
    if (threadIdx.x < kRows) {
      const int64_t n = n0 + threadIdx.x;
      const acc_t gv = n < p.num_rows ? to_acc<acc_t>(ld_global(g + n * p.g_stride_n + h * p.g_stride_h)) : acc_t(0);
      gs[threadIdx.x] = gv;
      open = gv != acc_t(0);  // NaN counts as open, so it propagates
    }
    if (!__syncthreads_or(open)) continue;  // the whole tile closes head h
    for (int64_t c0 = 0; c0 < p.head_dim; c0 += kChunk) {
      __syncthreads();
      for (int e = threadIdx.x; e < kRows * kChunk; e += kThreads) {
        const int t = e / kChunk, c = e % kChunk;
        const int64_t n = n0 + t;
        acc_t v = 0;
        if (n < p.num_rows && c0 + c < p.head_dim && gs[t] != acc_t(0))
          v = gs[t] * to_acc<acc_t>(ld_global(o + n * p.o_stride_n + h * p.o_stride_h + (c0 + c) * p.o_stride_c));
        os[t][c] = v;
      }
      for (int e = threadIdx.x; e < kCols * kChunk; e += kThreads) {
        const int dl = e / kChunk, c = e % kChunk;
        const int64_t d = d0 + dl;
        ws[dl][c] = (d < p.out_features && c0 + c < p.head_dim)
                        ? to_acc<acc_t>(ld_global(w + d * p.w_stride_d + (h * p.head_dim + c0 + c) * p.w_stride_k))
                        : acc_t(0);
      }
      __syncthreads();
#pragma unroll
      for (int i = 0; i < kPerThread; ++i) {
        const int e = threadIdx.x + i * kThreads;
        const int t = e / kCols, dl = e % kCols;
        if (gs[t] == acc_t(0)) continue;  // warp-uniform: a warp covers 32 outputs of one row
        acc_t a = acc[i];
#pragma unroll 8
        for (int c = 0; c < kChunk; ++c) a += os[t][c] * ws[dl][c];
        acc[i] = a;
      }
    }
  }
  scalar_t* y = static_cast<scalar_t*>(p.y);
  const scalar_t* bias = static_cast<const scalar_t*>(p.bias);
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int e = threadIdx.x + i * kThreads;
    const int64_t n = n0 + e / kCols, d = d0 + e % kCols;
    if (n >= p.num_rows || d >= p.out_features) continue;
    const acc_t v = acc[i] + (bias ? to_acc<acc_t>(ld_global(bias + d)) : acc_t(0));
    st_global(y + n * p.out_features + d, from_acc<scalar_t>(v));
  }
}

template <typename scalar_t>
int launch(const GatedHeadProjParams& p, cudaStream_t stream) {
  if (p.num_rows == 0 || p.out_features == 0) return 0;
  const dim3 grid(static_cast<unsigned>((p.num_rows + kRows - 1) / kRows),
                  static_cast<unsigned>((p.out_features + kCols - 1) / kCols));
  MHR_LAUNCH(gated_head_proj_kernel<scalar_t>, grid, kThreads, 0, stream, p);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int gated_head_proj_fwd_cuda(const GatedHeadProjParams& p, DType dtype, void* stream) {
  if (p.out_features > 65535LL * kCols) return static_cast<int>(cudaErrorInvalidValue);
  MHR_DISPATCH_CUDA_FLOAT(dtype, return launch<scalar_t>(p, static_cast<cudaStream_t>(stream)));
  return 0;
}

}  // namespace mhr_ops
