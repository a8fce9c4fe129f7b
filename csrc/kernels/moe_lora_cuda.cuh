// Device code shared by moe_lora's rows kernels, SIMT (moe_lora_cuda.cu) and tensor-core
// (moe_lora_tc_cuda.cu): the routing lookup and a block's sort of its slots by expert.
#pragma once

#include <cstdint>

#include "cuda_primitives.cuh"
#include "moe_lora.h"

namespace mhr_ops {
namespace moe_cuda {

// Expert of slot s (= n * k + j), or `experts` when its id is outside [0, E).
__device__ __forceinline__ int64_t expert_of(const MoeRouting& r, int64_t slot) {
  const int64_t n = slot / r.top_k, j = slot % r.top_k;
  const int64_t at = n * r.ids_stride_n + j * r.ids_stride_j;
  const int64_t e = r.index_type == IndexType::kInt32
                        ? static_cast<int64_t>(ld_global(static_cast<const int32_t*>(r.ids) + at))
                        : ld_global(static_cast<const int64_t*>(r.ids) + at);
  return (e >= 0 && e < r.experts) ? e : r.experts;
}

// Shared ints of a block's sorted slots: slot experts, the sorted order, each row's slots by
// (expert, j), and the bucket starts (E valid buckets and one for invalid ids).
__host__ __device__ inline int64_t sort_smem_ints(int64_t top_k, int64_t experts) {
  return 3 * kMoeRowBlock * top_k + experts + 2;
}

// A block's slots (local index i = row * k + j of its rows [n0, n0 + rows)), in shared memory.
struct BlockSlots {
  int* slot_exp;   // [64 k] expert of slot i (E: invalid id)
  int* order;      // [64 k] slots by (expert, slot): expert e's are order[start[e] .. start[e + 1])
  int* row_slots;  // [64][k] row r's slots by (expert, j)
  int* start;      // [E + 2] bucket starts; bucket E holds the invalid ids, start[E + 1] = rows * k
};

// Sorts the slots of rows [n0, n0 + rows) by (expert, slot) into `smem` (sort_smem_ints ints): a
// stable counting sort. Called by every thread of the block; ends with a barrier.
template <int kThreads>
__device__ BlockSlots sort_block_slots(const MoeRouting& rt, int64_t n0, int rows, int* smem) {
  const int k = static_cast<int>(rt.top_k), E = static_cast<int>(rt.experts), slots = rows * k;
  const int tid = threadIdx.x;
  BlockSlots b;
  b.slot_exp = smem;
  b.order = b.slot_exp + kMoeRowBlock * k;
  b.row_slots = b.order + kMoeRowBlock * k;
  b.start = b.row_slots + kMoeRowBlock * k;
  for (int i = tid; i < slots; i += kThreads) b.slot_exp[i] = static_cast<int>(expert_of(rt, n0 * k + i));
  __syncthreads();
  for (int e = tid; e <= E; e += kThreads) {
    int c = 0;
    for (int i = 0; i < slots; ++i) c += b.slot_exp[i] == e;
    b.start[e + 1] = c;
  }
  if (tid == 0) b.start[0] = 0;
  __syncthreads();
  if (tid == 0)
    for (int e = 1; e <= E + 1; ++e) b.start[e] += b.start[e - 1];
  __syncthreads();
  for (int i = tid; i < slots; i += kThreads) {
    const int e = b.slot_exp[i];
    int before = 0;
    for (int q = 0; q < i; ++q) before += b.slot_exp[q] == e;
    b.order[b.start[e] + before] = i;
  }
  __syncthreads();
  for (int r = tid; r < rows; r += kThreads) {  // the sorted order restricted to row r
    int t = 0;
    for (int q = 0; q < slots && t < k; ++q)
      if (b.order[q] / k == r) b.row_slots[r * k + t++] = b.order[q];
  }
  __syncthreads();
  return b;
}

}  // namespace moe_cuda
}  // namespace mhr_ops
