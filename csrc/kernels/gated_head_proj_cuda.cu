// CUDA forward of gated_head_proj (see gated_head_proj.h): two kernels.
//
// fp16 / bf16: tensor cores (gated_head_proj_tc_kernel). The product is computed transposed,
// y^T = W o^T, so that the rows of o are the mma's n8 dimension: the row granularity at which work
// can be skipped is 8 rows, not 16. A block owns 64 outputs x 64 rows and runs head by head: it
// packs the rows that open the head into consecutive slots (a ballot prefix sum), stages only
// those rows of o (so a closed head's o is never read, NaN or not) and the head's weight slice,
// and multiplies on tensor cores for ceil(open / 8) n8 tiles. The head's product is scaled by the
// gate in fp32 and added into the block's fp32 accumulator in shared memory at each slot's row.
// So the tensor-core work is that of the open (row, head) pairs, rounded up to 8 rows per head and
// block, whatever the pattern of open heads: no sorting, no atomics, deterministic, and the gated
// o is never formed (the gate is applied to the fp32 product, not rounded into o).
//
// fp32 / fp64: SIMT (gated_head_proj_kernel), exact in the accumulation type as torch's default
// fp32 matmuls are. A block computes a [32 rows x 64 outputs] tile; the K loop runs head by head:
// a head no row of the tile opens is skipped outright, and a warp (one row of the tile per pass)
// skips the FMAs of a head its row closes.
#include "cuda_primitives.cuh"
#include "gated_head_proj.h"
#include "mma.cuh"

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

// ---- tensor cores (fp16 / bf16) ------------------------------------------------------------

constexpr int kTcThreads = 128;        // 4 warps, each one m16 tile of outputs
constexpr int kTcOut = 64;             // outputs per block (the mma's M)
constexpr int kTcRows = 64;            // rows per block (the mma's N: up to 8 n8 tiles)
constexpr int kTcK = 64;               // head columns staged per step (4 k16 steps)
constexpr int kTcLd = kTcK + 8;        // 144-byte tile rows: 16-byte aligned, conflict-free ldmatrix
constexpr int kTcAccLd = kTcRows + 1;  // fp32 accumulator rows

// 16-byte aligned shared storage for a tile of 16-bit elements (ldmatrix needs aligned rows).
struct alignas(16) Smem16 {
  unsigned char bytes[16];
};

template <typename scalar_t>
__device__ __forceinline__ void mma16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);
template <>
__device__ __forceinline__ void mma16<__half>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  mma_m16n8k16_f16(d, a, b, d);
}
template <>
__device__ __forceinline__ void mma16<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  mma_m16n8k16_bf16(d, a, b, d);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kTcThreads) gated_head_proj_tc_kernel(const GatedHeadProjParams p) {
  MHR_SHARED(Smem16, w_raw, [kTcOut * kTcLd * 2 / 16]);   // W[d0 + m, h*Dh + c0 + c] at [m][c]
  MHR_SHARED(Smem16, o_raw, [kTcRows * kTcLd * 2 / 16]);  // o[row of slot s, h, c0 + c] at [s][c]
  MHR_SHARED(float, acc, [kTcOut][kTcAccLd]);             // y^T of the block: [output][row]
  MHR_SHARED(int, slot_row, [kTcRows]);                   // the head's open rows, packed
  MHR_SHARED(float, slot_gate, [kTcRows]);
  MHR_SHARED(unsigned, open_mask, [kTcRows / 32]);
  scalar_t* wt = reinterpret_cast<scalar_t*>(w_raw);
  scalar_t* ot = reinterpret_cast<scalar_t*>(o_raw);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kTcRows;
  const int64_t d0 = static_cast<int64_t>(blockIdx.y) * kTcOut;
  const scalar_t* o = static_cast<const scalar_t*>(p.o);
  const scalar_t* gates = static_cast<const scalar_t*>(p.gates);
  const scalar_t* w = static_cast<const scalar_t*>(p.weight);
  const scalar_t zero = from_acc<scalar_t>(0.f);
  for (int e = tid; e < kTcOut * kTcAccLd; e += kTcThreads) (&acc[0][0])[e] = 0.f;

  for (int64_t h = 0; h < p.num_heads; ++h) {
    __syncthreads();  // the previous head's tiles and slots are consumed
    float gv = 0.f;
    bool open = false;
    if (tid < kTcRows) {
      const int64_t n = n0 + tid;
      if (n < p.num_rows) gv = to_acc<float>(ld_global(gates + n * p.g_stride_n + h * p.g_stride_h));
      open = gv != 0.f;  // NaN counts as open, so it propagates
      const unsigned ballot = __ballot_sync(0xffffffffu, open);
      if (lane == 0) open_mask[warp] = ballot;
    }
    __syncthreads();
    const unsigned below = open_mask[0];
    const int count = __popc(below) + __popc(open_mask[1]);
    if (count == 0) continue;  // block-uniform: no row of the block opens head h
    if (open) {
      const int slot = __popc((warp ? open_mask[1] : below) & ((1u << lane) - 1u)) + (warp ? __popc(below) : 0);
      slot_row[slot] = tid;
      slot_gate[slot] = gv;
    }
    const int n_tiles = (count + 7) / 8;
    float part[kTcRows / 8][4];
#pragma unroll
    for (int nt = 0; nt < kTcRows / 8; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) part[nt][i] = 0.f;

    for (int64_t c0 = 0; c0 < p.head_dim; c0 += kTcK) {
      __syncthreads();  // slots written; the previous chunk's tiles consumed
      for (int e = tid; e < kTcOut * kTcK; e += kTcThreads) {
        const int m = e / kTcK, c = e % kTcK;
        const int64_t d = d0 + m, col = c0 + c;
        wt[m * kTcLd + c] = (d < p.out_features && col < p.head_dim)
                                ? ld_global(w + d * p.w_stride_d + (h * p.head_dim + col) * p.w_stride_k)
                                : zero;
      }
      for (int e = tid; e < n_tiles * 8 * kTcK; e += kTcThreads) {
        const int s = e / kTcK, c = e % kTcK;
        const int64_t col = c0 + c;
        ot[s * kTcLd + c] =
            (s < count && col < p.head_dim)
                ? ld_global(o + (n0 + slot_row[s]) * p.o_stride_n + h * p.o_stride_h + col * p.o_stride_c)
                : zero;
      }
      __syncthreads();
      const int k_steps = static_cast<int>((p.head_dim - c0 < kTcK ? p.head_dim - c0 + 15 : kTcK) / 16);
      for (int ks = 0; ks < k_steps; ++ks) {
        // A: this warp's 16 outputs x 16 columns; matrix j of ldmatrix.x4 is rows 8(j%2).., cols 8(j/2)..
        uint32_t a[4];
        const int j = lane >> 3, r = lane & 7;
        ldmatrix_x4(a, wt + (warp * 16 + (j & 1) * 8 + r) * kTcLd + ks * 16 + (j >> 1) * 8);
#pragma unroll
        for (int nt = 0; nt < kTcRows / 8; ++nt) {
          if (nt >= n_tiles) break;  // block-uniform
          // B: 16 columns x 8 slots, from the [slot][column] tile (K-major per slot, as .col wants).
          uint32_t b[2];
          ldmatrix_x2(b, ot + (nt * 8 + r) * kTcLd + ks * 16 + (j & 1) * 8);
          mma16<scalar_t>(part[nt], a, b);
        }
      }
    }
    // part[nt][i] is y^T at (output warp*16 + g + 8(i/2), slot nt*8 + 2t + i%2): gate it in fp32
    // and add it at the slot's row. Within a warp the (output, row) pairs are distinct; across
    // heads another lane may own the pair, hence the __syncwarp.
#pragma unroll
    for (int nt = 0; nt < kTcRows / 8; ++nt) {
      if (nt >= n_tiles) break;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int slot = nt * 8 + 2 * t + (i & 1);
        if (slot < count) acc[warp * 16 + g + 8 * (i >> 1)][slot_row[slot]] += slot_gate[slot] * part[nt][i];
      }
    }
    __syncwarp();
  }
  __syncthreads();
  scalar_t* y = static_cast<scalar_t*>(p.y);
  const scalar_t* bias = static_cast<const scalar_t*>(p.bias);
  for (int e = tid; e < kTcRows * kTcOut; e += kTcThreads) {
    const int r = e / kTcOut, m = e % kTcOut;
    const int64_t n = n0 + r, d = d0 + m;
    if (n >= p.num_rows || d >= p.out_features) continue;
    const float v = acc[m][r] + (bias ? to_acc<float>(ld_global(bias + d)) : 0.f);
    st_global(y + n * p.out_features + d, from_acc<scalar_t>(v));
  }
}

template <typename scalar_t>
int launch_tc(const GatedHeadProjParams& p, cudaStream_t stream) {
  if (p.num_rows == 0 || p.out_features == 0) return 0;
  const dim3 grid(static_cast<unsigned>((p.num_rows + kTcRows - 1) / kTcRows),
                  static_cast<unsigned>((p.out_features + kTcOut - 1) / kTcOut));
  MHR_LAUNCH(gated_head_proj_tc_kernel<scalar_t>, grid, kTcThreads, 0, stream, p);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int gated_head_proj_fwd_cuda(const GatedHeadProjParams& p, DType dtype, void* stream) {
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kFloat16:
      return p.out_features > 65535LL * kTcOut ? static_cast<int>(cudaErrorInvalidValue) : launch_tc<__half>(p, st);
    case DType::kBFloat16:
      return p.out_features > 65535LL * kTcOut ? static_cast<int>(cudaErrorInvalidValue)
                                               : launch_tc<__nv_bfloat16>(p, st);
    case DType::kFloat32:
      return p.out_features > 65535LL * kCols ? static_cast<int>(cudaErrorInvalidValue) : launch<float>(p, st);
    case DType::kFloat64:
      return p.out_features > 65535LL * kCols ? static_cast<int>(cudaErrorInvalidValue) : launch<double>(p, st);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace mhr_ops
