// CUDA kernels of moe_lora (see moe_lora.h): SIMT, the CPU kernels' passes and contract. For fp16 /
// bf16 data past kMoeTensorCoreMinRows rows, moe_lora_rows_cuda runs the tensor-core rows pass of
// moe_lora_tc_cuda.cu instead (moe_lora_uses_tensor_cores), and moe_lora_wgrad_cuda its tensor-core
// weight gradients for all fp16 / bf16 data; the slot plan stays SIMT.
//
// moe_rows_kernel: one block per kMoeRowBlock rows. The block sorts its rows' slots by (expert,
//   slot) in shared memory (a stable counting sort of at most 64 k slots), then
//   1. shrink: a warp per slot, in that order, v[s] = shrink_scale * src[n] @ S_e (lanes split the
//      reduction, a shuffle tree sums it), with the backward's w_s g_s and dw_s = z_s . g_s;
//   2. expand: threads over the output columns, y[n] (+)= sum over n's slots by (expert, j) of
//      (expand_scale * c_s) * (v[s] @ X_e).
// moe_plan_*_kernel: the weight gradients' slot plan on the device (no host sync, fixed grids, so
//   CUDA-graph safe): per expert a count, one scan, then a stable fill (block-wide ballot prefix
//   sums) of order[start[e] ..) with expert e's slots ascending.
// moe_wgrad_kernel: a block per task (moe_lora_wgrad_tasks: a 16-column block of dA_e or dB_e),
//   summing its expert's slots in plan order: deterministic, no atomics.
//
// Every sum has one order fixed by the ids alone (SPEC section 8). Ids outside [0, E) are never
// dereferenced: the slot's v and dw are NaN, its row of y NaN, and it adds nothing to dA / dB.
// Data (src, y, and x / grad_y of the wgrad) are of the `data` dtype; weights, matrices, v, z, gz
// and dw of its accumulation type (fp32; fp64 for fp64 data).
#include <cstdint>

#include "cuda_primitives.cuh"
#include "moe_lora.h"
#include "moe_lora_cuda.cuh"

namespace mhr_ops {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRankChunk = 32;  // rank values a warp's lanes hold per shrink pass (one per lane)

template <typename acc_t>
__device__ __forceinline__ acc_t quiet_nan() {
  return acc_t(NAN);
}

using moe_cuda::expert_of;

template <typename xt>
__global__ void __launch_bounds__(kThreads) moe_rows_kernel(const MoeRowsParams p) {
  using acc_t = typename AccType<xt>::type;
  MHR_DYNAMIC_SHARED(int, smem);
  const MoeRouting& rt = p.routing;
  const int k = static_cast<int>(rt.top_k), E = static_cast<int>(rt.experts);
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kMoeRowBlock;
  const int rows = static_cast<int>(n0 + kMoeRowBlock <= rt.rows ? kMoeRowBlock : rt.rows - n0);
  const int slots = rows * k;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  // the block's slots sorted by (expert, slot)
  const moe_cuda::BlockSlots sorted = moe_cuda::sort_block_slots<kThreads>(rt, n0, rows, smem);
  const int* slot_exp = sorted.slot_exp;
  const int* order = sorted.order;
  const int* row_slots = sorted.row_slots;

  const acc_t* w = static_cast<const acc_t*>(p.weights);
  acc_t* v = static_cast<acc_t*>(p.v);
  const int64_t rank = p.rank;

  // ---- 1. shrink: a warp per slot, in sorted order ----
  if (p.src != nullptr) {
    const xt* src = static_cast<const xt*>(p.src);
    const acc_t* mats = static_cast<const acc_t*>(p.shrink_mats);
    const acc_t* z = static_cast<const acc_t*>(p.z);
    acc_t* dw = static_cast<acc_t*>(p.dw);
    for (int q = warp; q < slots; q += kWarps) {
      const int i = order[q], e = slot_exp[i];
      const int64_t s = n0 * k + i, n = n0 + i / k, j = i % k;
      acc_t* vs = v + s * rank;
      if (e == E) {  // invalid id: never dereferenced
        for (int64_t c = lane; c < rank; c += 32) st_global(vs + c, quiet_nan<acc_t>());
        if (z != nullptr && dw != nullptr && lane == 0) st_global(dw + s, quiet_nan<acc_t>());
        continue;
      }
      const acc_t ws = z != nullptr ? ld_global(w + n * p.w_stride_n + j * p.w_stride_j) : acc_t(1);
      const acc_t* S = mats + static_cast<int64_t>(e) * p.d_src * rank;
      const xt* row = src + n * p.src_stride_n;
      acc_t dot = 0;  // z_s . g_s, this lane's rank values
      for (int64_t r0 = 0; r0 < rank; r0 += kRankChunk) {
        const int width = static_cast<int>(rank - r0 < kRankChunk ? rank - r0 : kRankChunk);
        acc_t acc[kRankChunk];
#pragma unroll
        for (int t = 0; t < kRankChunk; ++t) acc[t] = 0;
        for (int64_t c = lane; c < p.d_src; c += 32) {
          const acc_t xv = to_acc<acc_t>(ld_global(row + c));
          const acc_t* Sc = S + c * rank + r0;
#pragma unroll
          for (int t = 0; t < kRankChunk; ++t)
            if (t < width) acc[t] += xv * ld_global(Sc + t);
        }
        acc_t mine = 0;  // lane t keeps rank value r0 + t
#pragma unroll
        for (int t = 0; t < kRankChunk; ++t) {
          if (t >= width) break;  // warp-uniform
          const acc_t sum = warp_sum(acc[t]);
          if (lane == t) mine = sum;
        }
        if (lane < width) {
          const acc_t g = static_cast<acc_t>(p.shrink_scale) * mine;
          if (z != nullptr) {
            dot += ld_global(z + s * rank + r0 + lane) * g;
            st_global(vs + r0 + lane, ws * g);
          } else {
            st_global(vs + r0 + lane, g);
          }
        }
      }
      if (z != nullptr && dw != nullptr) {
        const acc_t total = warp_sum(dot);
        if (lane == 0) st_global(dw + s, total);
      }
    }
  }
  if (p.y == nullptr) return;
  __syncthreads();  // v of the block's slots written (global writes are visible after the barrier)

  // ---- 2. expand: threads over the output columns, rows in turn ----
  xt* y = static_cast<xt*>(p.y);
  const acc_t* mats = static_cast<const acc_t*>(p.expand_mats);
  const acc_t scale = static_cast<acc_t>(p.expand_scale);
  for (int r = 0; r < rows; ++r) {
    const int64_t n = n0 + r;
    bool bad = false;
    for (int t = 0; t < k; ++t) bad |= slot_exp[row_slots[r * k + t]] == E;
    for (int64_t c = tid; c < p.d_dst; c += kThreads) {
      acc_t out = 0;
      for (int t = 0; t < k && !bad; ++t) {
        const int i = row_slots[r * k + t], e = slot_exp[i];
        const int64_t s = n0 * k + i;
        const acc_t cs =
            scale * (p.expand_weighted ? ld_global(w + n * p.w_stride_n + (i % k) * p.w_stride_j) : acc_t(1));
        const acc_t* X = mats + static_cast<int64_t>(e) * rank * p.d_dst + c;
        const acc_t* vs = v + s * rank;
        acc_t part = 0;  // v[s] . X_e[:, c]; c_s is applied once per slot, not per rank value
        for (int64_t u = 0; u < rank; ++u) part += ld_global(vs + u) * ld_global(X + u * p.d_dst);
        out += cs * part;
      }
      if (bad) out = quiet_nan<acc_t>();
      xt* yp = y + n * p.y_stride_n + c;
      st_global(yp, from_acc<xt>(p.accumulate ? to_acc<acc_t>(ld_global(yp)) + out : out));
    }
  }
}

// ---- the slot plan ----

// Block e counts expert e's slots.
__global__ void __launch_bounds__(kThreads) moe_plan_count_kernel(const MoeRouting r, int64_t* counts) {
  MHR_SHARED(int64_t, part, [kWarps]);
  const int64_t e = blockIdx.x;
  int64_t c = 0;
  for (int64_t s = threadIdx.x; s < r.rows * r.top_k; s += kThreads) c += expert_of(r, s) == e;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) c += __shfl_xor_sync(0xffffffffu, c, offset);
  if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = c;
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t total = 0;
    for (int w = 0; w < kWarps; ++w) total += part[w];
    st_global(counts + e, total);
  }
}

// One thread: start[0] = 0, start[e + 1] = start[e] + counts[e].
__global__ void moe_plan_scan_kernel(const int64_t* counts, int64_t* start, int64_t experts) {
  int64_t at = 0;
  st_global(start, at);
  for (int64_t e = 0; e < experts; ++e) {
    at += ld_global(counts + e);
    st_global(start + e + 1, at);
  }
}

// Block e writes its slots, ascending, to order[start[e] ..): chunks of kThreads slots, each
// placed by a block-wide prefix sum of ballots.
__global__ void __launch_bounds__(kThreads)
    moe_plan_fill_kernel(const MoeRouting r, const int64_t* start, int64_t* order) {
  MHR_SHARED(int, warp_count, [kWarps]);
  const int64_t e = blockIdx.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int64_t at = ld_global(start + e);
  for (int64_t base = 0; base < r.rows * r.top_k; base += kThreads) {
    const int64_t s = base + threadIdx.x;
    const bool mine = s < r.rows * r.top_k && expert_of(r, s) == e;
    const unsigned ballot = __ballot_sync(0xffffffffu, mine);
    if (lane == 0) warp_count[warp] = __popc(ballot);
    __syncthreads();
    int before = __popc(ballot & ((1u << lane) - 1u)), total = 0;
    for (int w = 0; w < kWarps; ++w) {
      before += w < warp ? warp_count[w] : 0;
      total += warp_count[w];
    }
    if (mine) st_global(order + at + before, s);
    at += total;
    __syncthreads();  // warp_count is rewritten by the next chunk
  }
}

// ---- the weight gradients ----

template <typename xt>
__global__ void __launch_bounds__(kThreads)
    moe_wgrad_kernel(const MoeWgradParams p, const int64_t* order, const int64_t* start) {
  using acc_t = typename AccType<xt>::type;
  const int64_t in_blocks = (p.d_in + kMoeColBlock - 1) / kMoeColBlock;
  const int64_t task = blockIdx.x;
  const bool is_a = task < p.experts * in_blocks;
  const int64_t local = is_a ? task : task - p.experts * in_blocks;
  const int64_t cols = is_a ? p.d_in : p.d_out;
  const int64_t blocks = (cols + kMoeColBlock - 1) / kMoeColBlock;
  const int64_t e = local / blocks, c0 = (local % blocks) * kMoeColBlock;
  acc_t* out = static_cast<acc_t*>(is_a ? p.dA : p.dB);
  if (out == nullptr) return;
  const xt* data = static_cast<const xt*>(is_a ? p.x : p.grad_y);
  const int64_t data_stride = is_a ? p.x_stride_n : p.gy_stride_n;
  const acc_t* bott = static_cast<const acc_t*>(is_a ? p.gz : p.z);  // gz for dA, z for dB
  const acc_t* w = static_cast<const acc_t*>(p.weights);
  const int64_t q0 = ld_global(start + e), q1 = ld_global(start + e + 1);
  // Thread -> (rank u, column c0 + cc), columns fastest.
  for (int64_t idx = threadIdx.x; idx < kMoeColBlock * p.rank; idx += kThreads) {
    const int64_t u = idx / kMoeColBlock, c = c0 + idx % kMoeColBlock;
    if (c >= cols) continue;
    acc_t sum = 0;
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t s = ld_global(order + q), n = s / p.top_k, j = s % p.top_k;
      acc_t b = ld_global(bott + s * p.rank + u);
      if (!is_a) b *= ld_global(w + n * p.w_stride_n + j * p.w_stride_j);
      sum += to_acc<acc_t>(ld_global(data + n * data_stride + c)) * b;
    }
    // dB's scale, once per pair rather than per slot; an expert without slots stays exactly 0
    if (!is_a && q1 > q0) sum *= static_cast<acc_t>(p.scale);
    // dA_e [d_in, r] at (c, u); dB_e [r, d_out] at (u, c)
    st_global(is_a ? out + (e * p.d_in + c) * p.rank + u : out + (e * p.rank + u) * p.d_out + c, sum);
  }
}

template <typename xt>
int launch_rows(const MoeRowsParams& p, cudaStream_t stream) {
  const int64_t blocks = (p.routing.rows + kMoeRowBlock - 1) / kMoeRowBlock;
  const size_t smem = sizeof(int) * static_cast<size_t>(moe_cuda::sort_smem_ints(p.routing.top_k, p.routing.experts));
  MHR_LAUNCH(moe_rows_kernel<xt>, dim3(static_cast<unsigned>(blocks)), kThreads, smem, stream, p);
  return static_cast<int>(cudaGetLastError());
}

template <typename xt>
int launch_wgrad(const MoeWgradParams& p, const int64_t* order, const int64_t* start, cudaStream_t stream) {
  const int64_t tasks = moe_lora_wgrad_tasks(p.experts, p.d_in, p.d_out);
  MHR_LAUNCH(moe_wgrad_kernel<xt>, dim3(static_cast<unsigned>(tasks)), kThreads, 0, stream, p, order, start);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int64_t moe_lora_rows_cuda_smem(int64_t top_k, int64_t experts) {
  return static_cast<int64_t>(sizeof(int)) * moe_cuda::sort_smem_ints(top_k, experts);
}

int moe_lora_rows_cuda(const MoeRowsParams& p, DType data, void* stream) {
  if (p.routing.rows == 0) return 0;
  if (p.bias != nullptr || moe_lora_rows_cuda_smem(p.routing.top_k, p.routing.experts) > kMoeRowsMaxSmem ||
      (p.routing.rows + kMoeRowBlock - 1) / kMoeRowBlock > 0x7fffffffLL)
    return static_cast<int>(cudaErrorInvalidValue);
  if (moe_lora_uses_tensor_cores(data, p.routing.rows, p.routing.top_k, p.routing.experts))
    return moe_lora_rows_tc(p, data, stream);
  MHR_DISPATCH_CUDA_FLOAT(data, return launch_rows<scalar_t>(p, static_cast<cudaStream_t>(stream)));
  return static_cast<int>(cudaErrorInvalidValue);
}

int moe_lora_plan_cuda(const MoeRouting& r, int64_t* counts, int64_t* start, int64_t* order, void* stream) {
  const cudaStream_t st = static_cast<cudaStream_t>(stream);
  if (r.experts > 0x7fffffffLL) return static_cast<int>(cudaErrorInvalidValue);
  const dim3 grid(static_cast<unsigned>(r.experts));
  MHR_LAUNCH(moe_plan_count_kernel, grid, kThreads, 0, st, r, counts);
  if (const cudaError_t e = cudaGetLastError(); e != cudaSuccess) return static_cast<int>(e);
  MHR_LAUNCH(moe_plan_scan_kernel, dim3(1), 1, 0, st, counts, start, r.experts);
  if (const cudaError_t e = cudaGetLastError(); e != cudaSuccess) return static_cast<int>(e);
  MHR_LAUNCH(moe_plan_fill_kernel, grid, kThreads, 0, st, r, start, order);
  return static_cast<int>(cudaGetLastError());
}

int moe_lora_wgrad_cuda(const MoeWgradParams& p, const int64_t* order, const int64_t* start, DType data, void* stream) {
  if (moe_lora_wgrad_tasks(p.experts, p.d_in, p.d_out) > 0x7fffffffLL) return static_cast<int>(cudaErrorInvalidValue);
  if (moe_lora_wgrad_uses_tensor_cores(data)) return moe_lora_wgrad_tc(p, order, start, data, stream);
  MHR_DISPATCH_CUDA_FLOAT(data, return launch_wgrad<scalar_t>(p, order, start, static_cast<cudaStream_t>(stream)));
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace mhr_ops
