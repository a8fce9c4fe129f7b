// Tensor-core forms of moe_lora's rows pass and weight gradients (moe_lora.h). moe_lora_rows_cuda
// runs the rows pass here where moe_lora_uses_tensor_cores says so, moe_lora_wgrad_cuda the weight
// gradients for all fp16 / bf16 data (moe_tc_wgrad_kernel, described above it). The rows pass: fp16 / bf16 data with
// the fp32 experts, v, z, weights and dw of the SIMT kernel, as tf32 mma.sync (mma.cuh) with fp32 accumulation. Same
// contract and launch grid as moe_rows_kernel: one block of 4 warps per kMoeRowBlock rows, which sorts its slots by
// (expert, slot) (moe_lora_cuda.cuh), then
//  1. shrink, grouped by expert: the sorted slots are cut into tiles of at most 16 slots of one
//     expert. A tile is one m16 operand whose rows are its slots' rows of src, so
//     P = src[rows of the tile] @ S_e (16 x r) runs on tensor cores, with each 64-column chunk of
//     the block's src rows staged once in shared memory for all the tiles of a pass. Epilogue per
//     slot, g = shrink_scale P: v[s] = g (forward), or with z, v[s] = w_s g and dw_s = z_s . g.
//  2. expand: warp w owns rows 16w .. 16w + 15. Per 64-column step, and per expert e that its rows
//     use (ascending), Y += Vw_e @ X_e on tensor cores, where Vw_e[m, u] sums (expand_scale c_s)
//     v[s][u] over row m's slots of expert e (zero where row m does not use e). The A operand is
//     built in registers from v, which step 1 of the same block wrote. A column step whose X_e
//     values hold an inf or NaN is summed without tensor cores (expand_exact), since the zero A
//     rows of the rows that do not use e would otherwise turn it into NaN in their outputs.
// Tensor-core work: the shrink runs each expert's slots rounded up to 16 per block; the expand
// runs 16 rows per expert a warp's rows use (at most min(E, 16 k)), so its flops grow with the
// experts of a 16-row group, not with E.
//
// Operands are tf32 bit patterns: 16-bit data convert exactly. An fp32 operand (the experts, the
// expand's mixed v, the wgrad's bottleneck) is split into two tf32 terms, hi = rna(v) and lo =
// rna(v - hi) (cvt.rna, float_to_tf32), and the products hi.hi + hi.lo + lo.hi summed (lo.lo
// dropped; against an exact 16-bit operand two products), about fp32's accuracy: the fp32 results
// (z, gz, dw, dA, dB) stay at fp32's level, as plain PyTorch's fp32 math would. One exception: the
// expand into bf16 data (y, dx) takes one tf32 term per operand, since rounding to bf16 dominates
// that error (one term into fp16 would exceed twice plain PyTorch's error). Every sum has one order fixed by the ids
// alone (SPEC section 8): tiles in sorted order, the expand's experts ascending, each mma's k order. Ids outside [0, E)
// are never dereferenced: the slot's v and dw are NaN, its row of y NaN (as the SIMT kernel).
#include <cstdint>
#include <type_traits>

#include "cuda_primitives.cuh"
#include "mma.cuh"
#include "moe_lora_cuda.cuh"

namespace mhr_ops {
namespace {

constexpr int kThreads = 128;  // 4 warps
constexpr int kWarps = kThreads / 32;
constexpr int kM = 16;            // rows of an mma tile
constexpr int kChunk = 64;        // shrink: src columns staged per step (8 k8 mma steps)
constexpr int kPadA = 4;          // row padding of the staged src: conflict-free A fragments
constexpr int kRankTiles = 4;     // shrink: n8 tiles per pass over src (32 rank values)
constexpr int kTilesPerWarp = 4;  // shrink: slot tiles each warp holds per pass over src
constexpr int kExpandTiles = 8;   // expand: n8 tiles per column step (64 columns)
constexpr int kLds = kChunk + kPadA;

__device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ uint32_t bits_of(float v) { return static_cast<uint32_t>(__float_as_int(v)); }
__device__ __forceinline__ float quiet_nan_f() { return __int_as_float(0x7fc00000); }

// An fp32 value as tf32 terms: hi = rna(v), and with kSplit lo = rna(v - hi) (else 0).
struct Tf32Terms {
  uint32_t hi, lo;
};
__device__ __forceinline__ bool finite_bits(uint32_t u) { return (u & 0x7f800000u) != 0x7f800000u; }
template <bool kSplit>
__device__ __forceinline__ Tf32Terms tf32_terms(float v) {
  uint32_t hi = float_to_tf32(v);
  if (!kSplit) return {hi, 0u};
  if (!finite_bits(hi)) {
    if (!finite_bits(bits_of(v))) return {hi, 0u};  // inf / NaN: the value itself (inf - inf would be NaN)
    hi = (bits_of(v) & 0x80000000u) | 0x7f7fe000u;  // rounding overflowed: the largest finite tf32
  }
  return {hi, float_to_tf32(v - __int_as_float(static_cast<int>(hi)))};
}

__host__ __device__ inline int64_t max_tiles(int64_t top_k, int64_t experts) {
  const int64_t slots = kMoeRowBlock * top_k;
  return slots / kM + (experts < slots ? experts : slots);  // whole tiles, plus one partial per expert
}
__host__ __device__ inline int64_t warp_experts(int64_t top_k, int64_t experts) {
  return experts < kM * top_k ? experts : kM * top_k;  // experts a warp's 16 rows can use
}
// Dynamic shared ints: the sorted slots, the tiles (first sorted index, count), per warp its
// experts' count then list, and the tile count.
__host__ __device__ inline int64_t tc_smem_ints(int64_t top_k, int64_t experts) {
  return moe_cuda::sort_smem_ints(top_k, experts) + 2 * max_tiles(top_k, experts) +
         kWarps * (1 + warp_experts(top_k, experts)) + 1;
}
constexpr int64_t kStaticSmemBytes = sizeof(float) * kMoeRowBlock * kLds;

// The sums of a step, tile or task that meets an inf or NaN in an operand that tensor cores would
// multiply by a zero (a padding row, a row without the expert, or a zero tf32 lo term) are taken
// without tensor cores, in the SIMT kernels' order, so that non-finite values reach exactly the
// results they reach there (inf * 0 would be NaN elsewhere).
// P[slot, col] of the shrink: src row `row` (of the slot) . S_e[:, col].
template <typename xt>
__device__ float shrink_exact(const MoeRowsParams& p, const xt* row, const float* S, int64_t col) {
  float sum = 0.f;
  for (int64_t c = 0; c < p.d_src; ++c) sum += to_acc<float>(ld_global(row + c)) * ld_global(S + c * p.rank + col);
  return sum;
}

// y[n0 + m, col] without tensor cores, as the SIMT kernel sums it: over row m's slots by (expert,
// j), (expand_scale c_s) (v[s] . X_e[:, col]).
__device__ float expand_exact(const MoeRowsParams& p, const moe_cuda::BlockSlots& b, int64_t n0, int m, int64_t col) {
  const int64_t k = p.routing.top_k;
  const float* v = static_cast<const float*>(p.v);
  const float* w = static_cast<const float*>(p.weights);
  const float* mats = static_cast<const float*>(p.expand_mats);
  float out = 0.f;
  for (int j = 0; j < k; ++j) {
    const int i = b.row_slots[m * k + j];
    const float* X = mats + static_cast<int64_t>(b.slot_exp[i]) * p.rank * p.d_dst + col;
    const float* vs = v + (n0 * k + i) * p.rank;
    float part = 0.f;
    for (int64_t u = 0; u < p.rank; ++u) part += ld_global(vs + u) * ld_global(X + u * p.d_dst);
    const float c = p.expand_weighted ? ld_global(w + (n0 + m) * p.w_stride_n + (i % k) * p.w_stride_j) : 1.f;
    out += static_cast<float>(p.expand_scale) * c * part;
  }
  return out;
}

// Vw_e[m, u] of the expand's A operand: row m's slots of expert e, (expand_scale c_s) v[s][u].
__device__ __forceinline__ float mixed_v(const MoeRowsParams& p, const moe_cuda::BlockSlots& b, int64_t n0, int rows,
                                         int m, int e, int64_t u) {
  if (m >= rows || u >= p.rank) return 0.f;
  const int64_t k = p.routing.top_k;
  const float* v = static_cast<const float*>(p.v);
  const float* w = static_cast<const float*>(p.weights);
  float sum = 0.f;
  for (int j = 0; j < k; ++j) {
    const int i = b.row_slots[m * k + j];
    if (b.slot_exp[i] != e) continue;
    const float c = p.expand_weighted ? ld_global(w + (n0 + m) * p.w_stride_n + (i % k) * p.w_stride_j) : 1.f;
    sum += static_cast<float>(p.expand_scale) * c * ld_global(v + (n0 * k + i) * p.rank + u);
  }
  return sum;
}

template <typename xt>
__global__ void __launch_bounds__(kThreads) moe_tc_rows_kernel(const MoeRowsParams p) {
  constexpr bool kSplit = !std::is_same<xt, __nv_bfloat16>::value;  // the expand's terms (see the top)
  MHR_DYNAMIC_SHARED(int, smem);
  MHR_SHARED(float, xs, [kMoeRowBlock * kLds]);  // a chunk of the block's src rows, as tf32 values
  const MoeRouting& rt = p.routing;
  const int k = static_cast<int>(rt.top_k), E = static_cast<int>(rt.experts);
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kMoeRowBlock;
  const int rows = static_cast<int>(n0 + kMoeRowBlock <= rt.rows ? kMoeRowBlock : rt.rows - n0);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const int64_t rank = p.rank;

  const moe_cuda::BlockSlots b = moe_cuda::sort_block_slots<kThreads>(rt, n0, rows, smem);
  const int n_max_tiles = static_cast<int>(max_tiles(k, E)), n_warp_exp = static_cast<int>(warp_experts(k, E));
  int* tile_q = smem + moe_cuda::sort_smem_ints(k, E);  // [max_tiles] first sorted index of tile
  int* tile_n = tile_q + n_max_tiles;                   // [max_tiles] its slots, 1 to 16
  int* warp_n = tile_n + n_max_tiles;                   // [kWarps] experts the warp's rows use
  int* warp_exp = warp_n + kWarps;                      // [kWarps][n_warp_exp] those experts, ascending
  int* tile_count = warp_exp + kWarps * n_warp_exp;     // [1]
  if (tid == 0) {                                       // runs of at most 16 slots of one expert, in sorted order
    int T = 0;
    for (int e = 0; e < E; ++e)
      for (int q = b.start[e]; q < b.start[e + 1]; q += kM) {
        tile_q[T] = q;
        tile_n[T] = b.start[e + 1] - q < kM ? b.start[e + 1] - q : kM;
        ++T;
      }
    *tile_count = T;
  }
  if (lane == 0) {  // the experts of the warp's rows: the valid sorted slots are by expert
    int c = 0;
    int* mine = warp_exp + warp * n_warp_exp;
    for (int q = 0; q < b.start[E]; ++q) {
      const int i = b.order[q];
      if (i / k / kM != warp) continue;
      const int e = b.slot_exp[i];
      if (c == 0 || mine[c - 1] != e) mine[c++] = e;
    }
    warp_n[warp] = c;
  }
  __syncthreads();

  // ---- 1. shrink ----
  if (p.src != nullptr) {
    const xt* src = static_cast<const xt*>(p.src);
    const float* mats = static_cast<const float*>(p.shrink_mats);
    const float* w = static_cast<const float*>(p.weights);
    const float* z = static_cast<const float*>(p.z);
    float* v = static_cast<float*>(p.v);
    float* dw = static_cast<float*>(p.dw);
    const float shrink_scale = static_cast<float>(p.shrink_scale);
    for (int q = b.start[E] + tid / 32; q < b.start[E + 1]; q += kWarps) {  // invalid ids: NaN
      const int64_t s = n0 * k + b.order[q];
      for (int64_t c = lane; c < rank; c += 32) st_global(v + s * rank + c, quiet_nan_f());
      if (z != nullptr && dw != nullptr && lane == 0) st_global(dw + s, quiet_nan_f());
    }
    const int T = *tile_count;
    for (int64_t r0 = 0; r0 < rank; r0 += 8 * kRankTiles) {
      const int n_tiles = static_cast<int>(imin(kRankTiles, (rank - r0 + 7) / 8));
      for (int t0 = 0; t0 < T; t0 += kWarps * kTilesPerWarp) {
        float acc[kTilesPerWarp][kRankTiles][4];
#pragma unroll
        for (int a = 0; a < kTilesPerWarp; ++a)
#pragma unroll
          for (int nt = 0; nt < kRankTiles; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[a][nt][i] = 0.f;
        bool nonfinite[kTilesPerWarp] = {};  // this lane's src values of the tile's real rows
        for (int64_t c0 = 0; c0 < p.d_src; c0 += kChunk) {
          __syncthreads();  // the previous chunk's fragments are read
          for (int e = tid; e < kMoeRowBlock * kChunk; e += kThreads) {
            const int row = e / kChunk, c = e % kChunk;
            float val = 0.f;
            if (row < rows && c0 + c < p.d_src)
              val = to_acc<float>(ld_global(src + (n0 + row) * p.src_stride_n + c0 + c));
            xs[row * kLds + c] = val;
          }
          __syncthreads();
#pragma unroll
          for (int a = 0; a < kTilesPerWarp; ++a) {
            const int tile = t0 + a * kWarps + warp;
            if (tile >= T) break;  // warp-uniform
            const int q0 = tile_q[tile], cnt = tile_n[tile];
            const float* S = mats + static_cast<int64_t>(b.slot_exp[b.order[q0]]) * p.d_src * rank;
            // this lane's A rows (tile rows g and g + 8); a padding row reads row 0, unused
            const float* xa = xs + (g < cnt ? b.order[q0 + g] / k : 0) * kLds;
            const float* xb = xs + (g + 8 < cnt ? b.order[q0 + g + 8] / k : 0) * kLds;
            for (int k0 = 0; k0 < kChunk && c0 + k0 < p.d_src; k0 += 8) {
              const uint32_t fa[4] = {bits_of(xa[k0 + t]), bits_of(xb[k0 + t]), bits_of(xa[k0 + t + 4]),
                                      bits_of(xb[k0 + t + 4])};
              nonfinite[a] |= (g < cnt && (!finite_bits(fa[0]) || !finite_bits(fa[2]))) ||
                              (g + 8 < cnt && (!finite_bits(fa[1]) || !finite_bits(fa[3])));
              const int64_t c1 = c0 + k0 + t, c2 = c1 + 4;
#pragma unroll
              for (int nt = 0; nt < kRankTiles; ++nt) {
                if (nt >= n_tiles) break;  // block-uniform
                const int64_t col = r0 + nt * 8 + g;
                const Tf32Terms b0 =
                    tf32_terms<true>(c1 < p.d_src && col < rank ? ld_global(S + c1 * rank + col) : 0.f);
                const Tf32Terms b1 =
                    tf32_terms<true>(c2 < p.d_src && col < rank ? ld_global(S + c2 * rank + col) : 0.f);
                const uint32_t lo[2] = {b0.lo, b1.lo};  // the small term first
                mma_m16n8k8_tf32(acc[a][nt], fa, lo, acc[a][nt]);
                const uint32_t hi[2] = {b0.hi, b1.hi};
                mma_m16n8k8_tf32(acc[a][nt], fa, hi, acc[a][nt]);
              }
            }
          }
        }
        // epilogue: C element i of n-tile nt is (tile row g + 8 (i / 2), rank r0 + 8 nt + 2t + i % 2)
#pragma unroll
        for (int a = 0; a < kTilesPerWarp; ++a) {
          const int tile = t0 + a * kWarps + warp;
          if (tile >= T) break;
          const int q0 = tile_q[tile], cnt = tile_n[tile];
          const bool exact = __ballot_sync(0xffffffffu, nonfinite[a]) != 0u;  // warp-uniform
          const float* S = mats + static_cast<int64_t>(b.slot_exp[b.order[q0]]) * p.d_src * rank;
          float dot[2] = {0.f, 0.f};
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int m = g + 8 * h;
            if (m >= cnt) continue;
            const int i = b.order[q0 + m];
            const int64_t s = n0 * k + i;
            const float ws = z != nullptr ? ld_global(w + (n0 + i / k) * p.w_stride_n + (i % k) * p.w_stride_j) : 1.f;
#pragma unroll
            for (int nt = 0; nt < kRankTiles; ++nt) {
              if (nt >= n_tiles) break;
#pragma unroll
              for (int c = 0; c < 2; ++c) {
                const int64_t col = r0 + nt * 8 + 2 * t + c;
                if (col >= rank) continue;
                const float pv =
                    exact ? shrink_exact(p, src + (n0 + i / k) * p.src_stride_n, S, col) : acc[a][nt][2 * h + c];
                const float gv = shrink_scale * pv;
                if (z != nullptr) {
                  dot[h] += ld_global(z + s * rank + col) * gv;
                  st_global(v + s * rank + col, ws * gv);
                } else {
                  st_global(v + s * rank + col, gv);
                }
              }
            }
          }
          if (z != nullptr && dw != nullptr) {  // dw_s: the quad's partial dots, then one lane writes
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              dot[h] += __shfl_xor_sync(0xffffffffu, dot[h], 1);
              dot[h] += __shfl_xor_sync(0xffffffffu, dot[h], 2);
              const int m = g + 8 * h;
              if (t == 0 && m < cnt) {
                float* d = dw + n0 * k + b.order[q0 + m];
                st_global(d, r0 == 0 ? dot[h] : ld_global(d) + dot[h]);  // later rank passes add
              }
            }
          }
        }
      }
    }
  }
  if (p.y == nullptr) return;
  __syncthreads();  // v of the block's slots written (global writes are visible after the barrier)

  // ---- 2. expand: warp w's rows 16w .. 16w + 15 ----
  if (warp * kM >= rows) return;  // warp-uniform: no rows
  xt* y = static_cast<xt*>(p.y);
  const float* mats = static_cast<const float*>(p.expand_mats);
  const int ma = warp * kM + g, mb = ma + 8;  // block rows of this lane's A / C fragment rows
  bool bad[2] = {false, false};               // a row with an invalid id is NaN
  for (int h = 0; h < 2; ++h) {
    const int m = h == 0 ? ma : mb;
    if (m < rows)
      for (int j = 0; j < k; ++j) bad[h] |= b.slot_exp[b.row_slots[m * k + j]] == E;
  }
  const int n_exp = warp_n[warp];
  const int* experts = warp_exp + warp * n_warp_exp;
  for (int64_t c0 = 0; c0 < p.d_dst; c0 += 8 * kExpandTiles) {
    const int n_tiles = static_cast<int>(imin(kExpandTiles, (p.d_dst - c0 + 7) / 8));
    float acc[kExpandTiles][4];
#pragma unroll
    for (int nt = 0; nt < kExpandTiles; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[nt][i] = 0.f;
    // A non-finite X_e value times the zero A rows of the rows that do not use expert e (or a
    // non-finite A value times a zero lo term) would make outputs NaN: a warp whose step meets one
    // computes that step's outputs without tensor cores instead, as the SIMT kernel does.
    bool nonfinite = false;
    for (int x = 0; x < n_exp; ++x) {
      const int e = experts[x];
      const float* X = mats + static_cast<int64_t>(e) * rank * p.d_dst;
      for (int64_t u0 = 0; u0 < rank; u0 += 8) {
        const int64_t u1 = u0 + t, u2 = u1 + 4;
        const float va[4] = {mixed_v(p, b, n0, rows, ma, e, u1), mixed_v(p, b, n0, rows, mb, e, u1),
                             mixed_v(p, b, n0, rows, ma, e, u2), mixed_v(p, b, n0, rows, mb, e, u2)};
        for (const float val : va) nonfinite |= !finite_bits(bits_of(val));
        const Tf32Terms a0 = tf32_terms<kSplit>(va[0]), a1 = tf32_terms<kSplit>(va[1]), a2 = tf32_terms<kSplit>(va[2]),
                        a3 = tf32_terms<kSplit>(va[3]);
        const uint32_t a_hi[4] = {a0.hi, a1.hi, a2.hi, a3.hi}, a_lo[4] = {a0.lo, a1.lo, a2.lo, a3.lo};
#pragma unroll
        for (int nt = 0; nt < kExpandTiles; ++nt) {
          if (nt >= n_tiles) break;  // warp-uniform
          const int64_t col = c0 + nt * 8 + g;
          const float x1 = u1 < rank && col < p.d_dst ? ld_global(X + u1 * p.d_dst + col) : 0.f;
          const float x2 = u2 < rank && col < p.d_dst ? ld_global(X + u2 * p.d_dst + col) : 0.f;
          nonfinite |= !finite_bits(bits_of(x1)) || !finite_bits(bits_of(x2));
          const Tf32Terms b0 = tf32_terms<kSplit>(x1), b1 = tf32_terms<kSplit>(x2);
          const uint32_t b_hi[2] = {b0.hi, b1.hi};
          if (kSplit) {  // the small terms first
            const uint32_t b_lo[2] = {b0.lo, b1.lo};
            mma_m16n8k8_tf32(acc[nt], a_lo, b_hi, acc[nt]);
            mma_m16n8k8_tf32(acc[nt], a_hi, b_lo, acc[nt]);
          }
          mma_m16n8k8_tf32(acc[nt], a_hi, b_hi, acc[nt]);
        }
      }
    }
    const bool exact = __ballot_sync(0xffffffffu, nonfinite) != 0u;  // warp-uniform
#pragma unroll
    for (int nt = 0; nt < kExpandTiles; ++nt) {
      if (nt >= n_tiles) break;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int h = i / 2, m = h == 0 ? ma : mb;
        const int64_t col = c0 + nt * 8 + 2 * t + i % 2;
        if (m >= rows || col >= p.d_dst) continue;
        const float out = bad[h] ? quiet_nan_f() : exact ? expand_exact(p, b, n0, m, col) : acc[nt][i];
        xt* yp = y + (n0 + m) * p.y_stride_n + col;
        st_global(yp, from_acc<xt>(p.accumulate ? to_acc<float>(ld_global(yp)) + out : out));
      }
    }
  }
}

// ---- the weight gradients ----
// moe_tc_wgrad_kernel: a block per task (moe_lora_wgrad_tc_tasks: a 64-column block of dA_e or
// dB_e), D [64 columns][r] = Data_e^T @ Q_e summed over expert e's slots in plan order, 32 slots a
// chunk: Data_e's rows are the slots' rows of x (dA) or grad_y (dB), staged exact (16-bit data);
// Q_e's are gz[s] (dA) or w_s z[s] (dB, the scale applied once at the end), staged as two tf32
// terms. Warp w holds columns 16w .. 16w + 15; each 32-rank pass re-stages. No atomics: each task
// writes its block of dA_e (or dB_e) once, zero for an expert without slots.
constexpr int kWgSlots = 32;                // slots staged per chunk (4 k8 mma steps)
constexpr int kWgLdd = kMoeTcColBlock + 8;  // [slot][column] data tile: conflict-free A fragments
constexpr int kWgLdq = 8 * kRankTiles + 8;  // [slot][rank] bottleneck tiles: conflict-free B fragments

// D[c, u] of a wgrad task without tensor cores (see shrink_exact), in the SIMT kernel's order.
template <typename xt>
__device__ float wgrad_exact(const MoeWgradParams& p, bool is_a, const int64_t* order, int64_t q0, int64_t q1,
                             int64_t c, int64_t u) {
  const xt* data = static_cast<const xt*>(is_a ? p.x : p.grad_y);
  const int64_t stride = is_a ? p.x_stride_n : p.gy_stride_n;
  const float* bott = static_cast<const float*>(is_a ? p.gz : p.z);
  const float* w = static_cast<const float*>(p.weights);
  float sum = 0.f;
  for (int64_t q = q0; q < q1; ++q) {
    const int64_t s = ld_global(order + q), n = s / p.top_k;
    float bv = ld_global(bott + s * p.rank + u);
    if (!is_a) bv *= ld_global(w + n * p.w_stride_n + (s % p.top_k) * p.w_stride_j);
    sum += to_acc<float>(ld_global(data + n * stride + c)) * bv;
  }
  return sum;
}

template <typename xt>
__global__ void __launch_bounds__(kThreads)
    moe_tc_wgrad_kernel(const MoeWgradParams p, const int64_t* order, const int64_t* start) {
  MHR_SHARED(float, ds, [kWgSlots * kWgLdd]);
  MHR_SHARED(uint32_t, q_hi, [kWgSlots * kWgLdq]);
  MHR_SHARED(uint32_t, q_lo, [kWgSlots * kWgLdq]);
  MHR_SHARED(int64_t, slot_row, [kWgSlots]);
  MHR_SHARED(float, slot_w, [kWgSlots]);
  const int64_t in_blocks = (p.d_in + kMoeTcColBlock - 1) / kMoeTcColBlock;
  const int64_t task = blockIdx.x;
  const bool is_a = task < p.experts * in_blocks;
  const int64_t local = is_a ? task : task - p.experts * in_blocks;
  const int64_t cols = is_a ? p.d_in : p.d_out;
  const int64_t blocks = (cols + kMoeTcColBlock - 1) / kMoeTcColBlock;
  const int64_t e = local / blocks, c0 = (local % blocks) * kMoeTcColBlock;
  float* out = static_cast<float*>(is_a ? p.dA : p.dB);
  if (out == nullptr) return;  // block-uniform: that gradient is not wanted
  const xt* data = static_cast<const xt*>(is_a ? p.x : p.grad_y);
  const int64_t data_stride = is_a ? p.x_stride_n : p.gy_stride_n;
  const float* bott = static_cast<const float*>(is_a ? p.gz : p.z);  // gz for dA, z for dB
  const float* w = static_cast<const float*>(p.weights);
  const int64_t rank = p.rank;
  const int64_t q0 = ld_global(start + e), q1 = ld_global(start + e + 1);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const int m0 = warp * kM;  // the warp's columns within the block
  const float scale = is_a || q1 == q0 ? 1.f : static_cast<float>(p.scale);

  for (int64_t r0 = 0; r0 < rank; r0 += 8 * kRankTiles) {
    const int n_tiles = static_cast<int>(imin(kRankTiles, (rank - r0 + 7) / 8));
    float acc[kRankTiles][4];
#pragma unroll
    for (int nt = 0; nt < kRankTiles; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[nt][i] = 0.f;
    bool nonfinite = false;  // a non-finite data value (padding is zero): see shrink_exact
    for (int64_t qc = q0; qc < q1; qc += kWgSlots) {
      __syncthreads();  // the previous chunk's fragments are read
      for (int i = tid; i < kWgSlots; i += kThreads) {
        int64_t row = -1;
        float ws = 0.f;
        if (qc + i < q1) {
          const int64_t s = ld_global(order + qc + i), n = s / p.top_k;
          row = s;  // the slot; its row of data is s / k
          ws = is_a ? 1.f : ld_global(w + n * p.w_stride_n + (s % p.top_k) * p.w_stride_j);
        }
        slot_row[i] = row;
        slot_w[i] = ws;
      }
      __syncthreads();
      for (int i = tid; i < kWgSlots * kMoeTcColBlock; i += kThreads) {
        const int sl = i / kMoeTcColBlock, c = i % kMoeTcColBlock;
        const int64_t s = slot_row[sl];
        float v = 0.f;
        if (s >= 0 && c0 + c < cols) v = to_acc<float>(ld_global(data + (s / p.top_k) * data_stride + c0 + c));
        ds[sl * kWgLdd + c] = v;
      }
      for (int i = tid; i < kWgSlots * 8 * kRankTiles; i += kThreads) {
        const int sl = i / (8 * kRankTiles), u = i % (8 * kRankTiles);
        const int64_t s = slot_row[sl];
        const Tf32Terms q =
            tf32_terms<true>(s >= 0 && r0 + u < rank ? slot_w[sl] * ld_global(bott + s * rank + r0 + u) : 0.f);
        q_hi[sl * kWgLdq + u] = q.hi;
        q_lo[sl * kWgLdq + u] = q.lo;
      }
      __syncthreads();
#pragma unroll
      for (int k0 = 0; k0 < kWgSlots; k0 += 8) {
        // A (m = column, k = slot) = ds[slot][column]
        const uint32_t fa[4] = {bits_of(ds[(k0 + t) * kWgLdd + m0 + g]), bits_of(ds[(k0 + t) * kWgLdd + m0 + g + 8]),
                                bits_of(ds[(k0 + t + 4) * kWgLdd + m0 + g]),
                                bits_of(ds[(k0 + t + 4) * kWgLdd + m0 + g + 8])};
        for (const uint32_t u : fa) nonfinite |= !finite_bits(u);
#pragma unroll
        for (int nt = 0; nt < kRankTiles; ++nt) {
          if (nt >= n_tiles) break;  // block-uniform
          const int n = nt * 8 + g;
          const uint32_t lo[2] = {q_lo[(k0 + t) * kWgLdq + n], q_lo[(k0 + t + 4) * kWgLdq + n]};
          const uint32_t hi[2] = {q_hi[(k0 + t) * kWgLdq + n], q_hi[(k0 + t + 4) * kWgLdq + n]};
          mma_m16n8k8_tf32(acc[nt], fa, lo, acc[nt]);  // the small term first
          mma_m16n8k8_tf32(acc[nt], fa, hi, acc[nt]);
        }
      }
    }
    const bool exact = __ballot_sync(0xffffffffu, nonfinite) != 0u;  // warp-uniform
    // C element i of n-tile nt: (column m0 + g + 8 (i / 2), rank r0 + 8 nt + 2t + i % 2)
#pragma unroll
    for (int nt = 0; nt < kRankTiles; ++nt) {
      if (nt >= n_tiles) break;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int64_t c = c0 + m0 + g + 8 * (i / 2), u = r0 + nt * 8 + 2 * t + i % 2;
        if (c >= cols || u >= rank) continue;
        // dA_e [d_in, r] at (c, u); dB_e [r, d_out] at (u, c)
        st_global(is_a ? out + (e * p.d_in + c) * rank + u : out + (e * rank + u) * p.d_out + c,
                  scale * (exact ? wgrad_exact<xt>(p, is_a, order, q0, q1, c, u) : acc[nt][i]));
      }
    }
  }
}

template <typename xt>
int launch(const MoeRowsParams& p, cudaStream_t stream) {
  const int64_t blocks = (p.routing.rows + kMoeRowBlock - 1) / kMoeRowBlock;
  const size_t smem = sizeof(int) * static_cast<size_t>(tc_smem_ints(p.routing.top_k, p.routing.experts));
  MHR_LAUNCH(moe_tc_rows_kernel<xt>, dim3(static_cast<unsigned>(blocks)), kThreads, smem, stream, p);
  return static_cast<int>(cudaGetLastError());
}

template <typename xt>
int launch_wgrad(const MoeWgradParams& p, const int64_t* order, const int64_t* start, cudaStream_t stream) {
  const int64_t tasks = moe_lora_wgrad_tc_tasks(p.experts, p.d_in, p.d_out);
  MHR_LAUNCH(moe_tc_wgrad_kernel<xt>, dim3(static_cast<unsigned>(tasks)), kThreads, 0, stream, p, order, start);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int moe_lora_wgrad_tc(const MoeWgradParams& p, const int64_t* order, const int64_t* start, DType data, void* stream) {
  if (data == DType::kFloat16) return launch_wgrad<__half>(p, order, start, static_cast<cudaStream_t>(stream));
  if (data == DType::kBFloat16) return launch_wgrad<__nv_bfloat16>(p, order, start, static_cast<cudaStream_t>(stream));
  return static_cast<int>(cudaErrorInvalidValue);
}

bool moe_lora_uses_tensor_cores(DType data, int64_t rows, int64_t top_k, int64_t experts) {
  return (data == DType::kFloat16 || data == DType::kBFloat16) && rows > kMoeTensorCoreMinRows &&
         static_cast<int64_t>(sizeof(int)) * tc_smem_ints(top_k, experts) + kStaticSmemBytes <= kMoeRowsMaxSmem;
}

int moe_lora_rows_tc(const MoeRowsParams& p, DType data, void* stream) {
  if (data == DType::kFloat16) return launch<__half>(p, static_cast<cudaStream_t>(stream));
  if (data == DType::kBFloat16) return launch<__nv_bfloat16>(p, static_cast<cudaStream_t>(stream));
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace mhr_ops
