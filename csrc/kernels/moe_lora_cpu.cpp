// moe_lora CPU kernels (see moe_lora.h). Loops are ordered so that the innermost runs over a
// contiguous rank vector or output row, which the compiler vectorizes; every sum has one fixed
// order, whatever the tile a slot lands in (one accumulator per output element, no partial sums).
#include "moe_lora.h"

// No FMA contraction in this file: at -O3 GCC versions some loops on run-time alias checks, and
// the versions contracted differently, so a row's bits depended on where its scratch row sat.
// Without contraction every version rounds alike (the sums' order is fixed by the code).
#pragma GCC optimize("fp-contract=off")

#include <algorithm>
#include <limits>
#include <utility>

#include "cpu_lanes.h"
#include "cpu_scratch.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MHR_MOE_X86 1
#endif
// Bodies are inlined into one wrapper per instruction set (portable, AVX2 + FMA).
#define MHR_MOE_INLINE inline __attribute__((always_inline))

namespace mhr_ops {

int64_t moe_expert_of(const MoeRouting& r, int64_t slot) {
  const int64_t n = slot / r.top_k, j = slot % r.top_k;
  const int64_t e =
      r.index_type == IndexType::kInt32
          ? static_cast<int64_t>(static_cast<const int32_t*>(r.ids)[n * r.ids_stride_n + j * r.ids_stride_j])
          : static_cast<const int64_t*>(r.ids)[n * r.ids_stride_n + j * r.ids_stride_j];
  return e >= 0 && e < r.experts ? e : -1;
}

MoeSlotPlan moe_plan_slots(const MoeRouting& r) {
  MoeSlotPlan plan;
  const int64_t slots = r.rows * r.top_k;
  std::vector<int64_t> expert(slots);
  plan.start.assign(r.experts + 1, 0);
  for (int64_t s = 0; s < slots; ++s) {
    expert[s] = moe_expert_of(r, s);
    if (expert[s] < 0)
      plan.invalid.push_back(s);
    else
      ++plan.start[expert[s] + 1];
  }
  for (int64_t e = 0; e < r.experts; ++e) plan.start[e + 1] += plan.start[e];
  plan.order.resize(plan.start[r.experts]);
  std::vector<int64_t> next(plan.start.begin(), plan.start.end() - 1);
  for (int64_t s = 0; s < slots; ++s)
    if (expert[s] >= 0) plan.order[next[expert[s]]++] = s;
  return plan;
}

namespace {

// Elements ahead that the loops over scattered rows prefetch (no hardware stream follows them).
constexpr int64_t kMoePrefetch = 64;

template <typename T>
MHR_MOE_INLINE T weight_of(const void* w, int64_t stride_n, int64_t stride_j, int64_t top_k, int64_t s) {
  return static_cast<const T*>(w)[(s / top_k) * stride_n + (s % top_k) * stride_j];
}

// acc[t][0 .. R) = src[t][0 .. d) @ m  (m: [d, R] row-major), one accumulator per (t, j) summed
// over c in order: the same bits for any kT. A compile-time rank of 2 or more keeps the sums as
// vectors over the rank (explicitly: left to itself, GCC vectorizes over t instead, gathering
// from kT rows element by element).
template <typename T, int kR, int kT>
MHR_MOE_INLINE void project(const T* const* src, const T* __restrict m, int64_t d, int64_t R, T* __restrict out) {
  if constexpr (kR >= 2) {
    constexpr int L = kR < 8 ? kR : 8, kV = kR / L;
    using V = typename Lanes<T, L>::type;
    V acc[kT][kV];
    for (int t = 0; t < kT; ++t)
      for (int v = 0; v < kV; ++v) acc[t][v] = V{};
    for (int64_t c = 0; c < d; ++c) {
      if (c % 16 == 0)  // a line of each row ahead: the slots' rows are scattered
        for (int t = 0; t < kT; ++t) __builtin_prefetch(src[t] + c + kMoePrefetch);
      V mv[kV];
      for (int v = 0; v < kV; ++v) mv[v] = reinterpret_cast<const V*>(m + c * kR)[v];
      for (int t = 0; t < kT; ++t) {
        const T xv = src[t][c];
        for (int v = 0; v < kV; ++v) acc[t][v] += xv * mv[v];
      }
    }
    for (int t = 0; t < kT; ++t)
      for (int v = 0; v < kV; ++v) reinterpret_cast<V*>(out + t * kR)[v] = acc[t][v];
  } else if constexpr (kR == 1) {
    T acc[kT] = {};
    for (int64_t c = 0; c < d; ++c)
      for (int t = 0; t < kT; ++t) acc[t] += src[t][c] * m[c];
    for (int t = 0; t < kT; ++t) out[t] = acc[t];
  } else {
    std::fill(out, out + kT * R, T(0));
    for (int64_t c = 0; c < d; ++c)
      for (int t = 0; t < kT; ++t) {
        const T xv = src[t][c];
        for (int64_t j = 0; j < R; ++j) out[t * R + j] += xv * m[c * R + j];
      }
  }
}

// Shrink of one block's slots, runs of one expert cut into tiles of kT slots; a short tile is
// padded with its last slot, so every slot goes through the same code (the same bits whatever
// its neighbours). g = shrink_scale * src[n(s)] @ S_e; forward: v[s] = g; backward: v[s] = w_s g,
// dw[s] = z_s . g.
template <typename T, int kR>
MHR_MOE_INLINE void rows_shrink(const MoeRowsParams& p, const std::pair<int64_t, int64_t>* entries, int64_t count,
                                T* tmp) {
  constexpr int kT = kR >= 32 ? 2 : kR >= 16 ? 4 : kR > 0 ? 8 : 4;
  const int64_t R = kR > 0 ? kR : p.rank, K = p.routing.top_k;
  const T scale = static_cast<T>(p.shrink_scale);
  for (int64_t i = 0; i < count;) {
    const int64_t e = entries[i].first;
    int64_t run = i;
    while (run < count && entries[run].first == e) ++run;
    const T* m = static_cast<const T*>(p.shrink_mats) + e * p.d_src * R;
    for (int64_t t0 = i; t0 < run; t0 += kT) {
      const T* src[kT];
      for (int t = 0; t < kT; ++t)
        src[t] = static_cast<const T*>(p.src) + (entries[std::min(t0 + t, run - 1)].second / K) * p.src_stride_n;
      project<T, kR, kT>(src, m, p.d_src, R, tmp);
      for (int64_t t = 0; t < std::min<int64_t>(kT, run - t0); ++t) {
        const int64_t s = entries[t0 + t].second;
        T* v = static_cast<T*>(p.v) + s * R;
        const T* g = tmp + t * R;
        if (p.z == nullptr) {
          for (int64_t j = 0; j < R; ++j) v[j] = scale * g[j];
          continue;
        }
        const T w = weight_of<T>(p.weights, p.w_stride_n, p.w_stride_j, K, s);
        const T* z = static_cast<const T*>(p.z) + s * R;
        T dot = 0;
        for (int64_t j = 0; j < R; ++j) {
          const T gj = scale * g[j];
          v[j] = w * gj;
          dot += z[j] * gj;
        }
        static_cast<T*>(p.dw)[s] = dot;
      }
    }
    i = run;
  }
}

// a[0 .. width) += sum_j u[j] * m[j*d + c]: kChunk columns as 8 vectors in registers (8
// independent FMA chains), a shorter chunk element by element in the same order.
template <typename T, int kR, int kChunk>
MHR_MOE_INLINE void expand_chunk(const T* __restrict u, const T* __restrict m, int64_t d, int64_t R, int64_t width,
                                 T* __restrict a) {
  if constexpr (kR > 0) {
    if (width == kChunk) {
      using V = typename Lanes<T, kChunk / 8>::type;
      V acc[8];
      for (int v = 0; v < 8; ++v) acc[v] = reinterpret_cast<const V*>(a)[v];
      for (int j = 0; j < kR; ++j) {
        const T uj = u[j];
        const V* mj = reinterpret_cast<const V*>(m + j * d);
        for (int v = 0; v < 8; ++v) acc[v] += uj * mj[v];
      }
      for (int v = 0; v < 8; ++v) reinterpret_cast<V*>(a)[v] = acc[v];
      return;
    }
  }
  for (int64_t c = 0; c < width; ++c) {
    T v = a[c];
    for (int64_t j = 0; j < R; ++j) v += u[j] * m[j * d + c];
    a[c] = v;
  }
}

// Blocks of kMoeRowBlock rows: the block's slots sorted by (expert, slot), the optional shrink,
// the scaled vectors u, then column chunks of the block's sums accumulated slot by slot (a chunk of
// X_e stays in L1 across the slots of one expert), written into y row by row after the last chunk
// (or chunk by chunk for rows too wide to keep whole); a row with an invalid slot is NaN. Each
// element sums its slots in the same order either way: the same bits.
template <typename T, int kR>
MHR_MOE_INLINE void rows_pass(const MoeRowsParams& p, int64_t row_begin, int64_t row_end) {
  constexpr int64_t kChunk = 64;
  const int64_t R = kR > 0 ? kR : p.rank, K = p.routing.top_k, d = p.d_dst;
  const size_t max_slots = static_cast<size_t>(kMoeRowBlock * K);
  auto* entries = thread_scratch<std::pair<int64_t, int64_t>>(max_slots);  // (expert, slot)
  // Whole-row sums when the block's fit in half of a 1 MB L2: y is then written row by row in one
  // pass after the expand. Written chunk by chunk instead, a block's 64-column pieces of y lie a
  // row stride apart (4 KB at d 1024): no hardware stream follows them, and `y += a` stalled on
  // loads that follow stores to the same columns of the row before (4K aliasing): a third of the
  // accumulating pass (bench/NOTES.md, moe_lora on CPU). Rows padded by 64 bytes: no two rows of
  // sums at a multiple of 4 KB.
  const int64_t row_sums = (d + 15) / 16 * 16 + 16;
  const bool whole = kMoeRowBlock * row_sums * static_cast<int64_t>(sizeof(T)) <= 512 * 1024;
  const int64_t lda = whole ? row_sums : kChunk;
  T* u = thread_scratch<T>(max_slots * R + kMoeRowBlock * lda + 8 * R);
  T* acc = u + max_slots * R;
  T* tmp = acc + kMoeRowBlock * lda;
  const T nan = std::numeric_limits<T>::quiet_NaN();
  const T* X = static_cast<const T*>(p.expand_mats);
  const T* bias = static_cast<const T*>(p.bias);
  for (int64_t b0 = row_begin; b0 < row_end; b0 += kMoeRowBlock) {
    const int64_t b1 = std::min(row_end, b0 + kMoeRowBlock);
    bool bad[kMoeRowBlock] = {};
    int64_t count = 0;
    for (int64_t s = b0 * K; s < b1 * K; ++s) {
      const int64_t e = moe_expert_of(p.routing, s);
      if (e >= 0) {
        entries[count++] = {e, s};
        continue;
      }
      bad[s / K - b0] = true;
      if (p.src != nullptr) std::fill(static_cast<T*>(p.v) + s * R, static_cast<T*>(p.v) + (s + 1) * R, nan);
      if (p.dw != nullptr) static_cast<T*>(p.dw)[s] = nan;
    }
    std::sort(entries, entries + count);
    if (p.src != nullptr) rows_shrink<T, kR>(p, entries, count, tmp);
    if (p.y == nullptr) continue;
    for (int64_t i = 0; i < count; ++i) {
      const int64_t s = entries[i].second;
      T coef = static_cast<T>(p.expand_scale);
      if (p.expand_weighted) coef *= weight_of<T>(p.weights, p.w_stride_n, p.w_stride_j, K, s);
      const T* v = static_cast<const T*>(p.v) + s * R;
      for (int64_t j = 0; j < R; ++j) u[i * R + j] = coef * v[j];
    }
    // y[n][c0, c0 + width) from the block's sums: row n's value of column c0 at acc[(n - b0) * lda]
    auto write = [&](int64_t c0, int64_t width) {
      for (int64_t n = b0; n < b1; ++n) {
        T* y = static_cast<T*>(p.y) + n * p.y_stride_n + c0;
        const T* a = acc + (n - b0) * lda;
        if (bad[n - b0])
          std::fill(y, y + width, nan);
        else if (p.accumulate)
          for (int64_t c = 0; c < width; ++c) y[c] += a[c];
        else if (bias != nullptr)
          for (int64_t c = 0; c < width; ++c) y[c] = bias[c0 + c] + a[c];
        else
          std::copy(a, a + width, y);
      }
    };
    if (whole) std::fill(acc, acc + (b1 - b0) * lda, T(0));
    for (int64_t c0 = 0; c0 < d; c0 += kChunk) {
      const int64_t width = std::min(kChunk, d - c0);
      const int64_t ac0 = whole ? c0 : 0;
      if (!whole) std::fill(acc, acc + (b1 - b0) * kChunk, T(0));
      for (int64_t i = 0; i < count; ++i)
        expand_chunk<T, kR, kChunk>(u + i * R, X + entries[i].first * R * d + c0, d, R, width,
                                    acc + (entries[i].second / K - b0) * lda + ac0);
      if (!whole) write(c0, width);
    }
    if (whole) write(0, d);
  }
}

// The weight gradients, one task per kMoeCpuColBlock-column block of dA_e or dB_e. A task walks
// its expert's slots in the plan's order in chunks of kMoeSlotChunk, and adds each chunk to the
// block's sums column group by column group, accumulators in registers, reading the chunk's rows of
// x (or grad_y) in place and prefetching them (each row a run of up to kMoeCpuColBlock values: 16
// columns per task made every row read a cache-line miss, and the old kernel 4x slower). Every
// output element is one sum over the expert's slots in plan order, a multiply and an add per slot
// (no contraction), so a column's bits do not depend on the group it falls in.
constexpr int64_t kMoeSlotChunk = 32;

// rows[q] = the chunk's rows from column c0 (row of slot s: src + (s / top_k) * stride).
template <typename T>
MHR_MOE_INLINE void chunk_rows(const void* src, int64_t stride, int64_t top_k, const int64_t* slots, int64_t count,
                               int64_t c0, const T** rows) {
  for (int64_t q = 0; q < count; ++q) rows[q] = static_cast<const T*>(src) + (slots[q] / top_k) * stride + c0;
}

// dA_e[c0 + c, :] += sum over the chunk of rows[q][c] * gz_{s_q}; acc [kMoeCpuColBlock][R].
template <typename T, int kR>
MHR_MOE_INLINE void chunk_a(const T* const* rows, const T* const* g, int64_t count, int64_t W, int64_t R,
                            T* __restrict acc) {
  int64_t c = 0;
  if constexpr (kR >= 2) {
    // kC columns x kV vectors of L rank values per group: at most 8 accumulator registers.
    constexpr int L = kR < 8 ? kR : 8, kV = kR / L, kC = 8 / kV < 1 ? 1 : 8 / kV;
    using V = typename Lanes<T, L>::type;
    for (; c + kC <= W; c += kC) {
      V a[kC][kV];
      for (int i = 0; i < kC; ++i)
        for (int v = 0; v < kV; ++v) a[i][v] = reinterpret_cast<const V*>(acc + (c + i) * kR)[v];
      for (int64_t q = 0; q < count; ++q) {
        const T* xq = rows[q] + c;
        __builtin_prefetch(xq + kMoePrefetch);
        V gv[kV];
        for (int v = 0; v < kV; ++v) gv[v] = reinterpret_cast<const V*>(g[q])[v];
        for (int i = 0; i < kC; ++i) {
          const T xv = xq[i];
          for (int v = 0; v < kV; ++v) a[i][v] += xv * gv[v];
        }
      }
      for (int i = 0; i < kC; ++i)
        for (int v = 0; v < kV; ++v) reinterpret_cast<V*>(acc + (c + i) * kR)[v] = a[i][v];
    }
  }
  for (; c < W; ++c)
    for (int64_t q = 0; q < count; ++q) {
      const T xv = rows[q][c];
      for (int64_t j = 0; j < R; ++j) acc[c * R + j] += xv * g[q][j];
    }
}

// dB_e[j, c0 + c] += sum over the chunk of u_q[j] * rows[q][c] (u_q = scale w_s z_s);
// acc [R][kMoeCpuColBlock].
template <typename T, int kR>
MHR_MOE_INLINE void chunk_b(const T* const* rows, const T* __restrict u, int64_t count, int64_t W, int64_t R,
                            T* __restrict acc) {
  constexpr int L = 8;
  using V = typename Lanes<T, L>::type;
  int64_t c = 0;
  if constexpr (kR > 0) {
    constexpr int kJ = kR < 8 ? kR : 8;  // rank rows x one vector of 8 columns per group
    for (; c + L <= W; c += L)
      for (int jb = 0; jb < kR; jb += kJ) {
        V a[kJ];
        for (int j = 0; j < kJ; ++j) a[j] = *reinterpret_cast<const V*>(acc + (jb + j) * kMoeCpuColBlock + c);
        for (int64_t q = 0; q < count; ++q) {
          __builtin_prefetch(rows[q] + c + kMoePrefetch);
          const V yv = *reinterpret_cast<const V*>(rows[q] + c);
          const T* uq = u + q * kR + jb;
          for (int j = 0; j < kJ; ++j) a[j] += uq[j] * yv;
        }
        for (int j = 0; j < kJ; ++j) *reinterpret_cast<V*>(acc + (jb + j) * kMoeCpuColBlock + c) = a[j];
      }
  }
  for (; c < W; ++c)
    for (int64_t j = 0; j < R; ++j) {
      T a = acc[j * kMoeCpuColBlock + c];
      for (int64_t q = 0; q < count; ++q) a += u[q * R + j] * rows[q][c];
      acc[j * kMoeCpuColBlock + c] = a;
    }
}

template <typename T, int kR>
MHR_MOE_INLINE void wgrad(const MoeWgradParams& p, const MoeSlotPlan& plan, int64_t task_begin, int64_t task_end) {
  const int64_t R = kR > 0 ? kR : p.rank, K = p.top_k;
  const int64_t blocks_a = (p.d_in + kMoeCpuColBlock - 1) / kMoeCpuColBlock;
  const int64_t blocks_b = (p.d_out + kMoeCpuColBlock - 1) / kMoeCpuColBlock;
  // acc [kMoeCpuColBlock * R], u [kMoeSlotChunk * R]
  T* acc = thread_scratch<T>(static_cast<size_t>((kMoeCpuColBlock + kMoeSlotChunk) * R));
  T* u = acc + kMoeCpuColBlock * R;
  const T* rows[kMoeSlotChunk];
  for (int64_t t = task_begin; t < task_end; ++t) {
    const bool is_a = t < p.experts * blocks_a;
    const int64_t local = is_a ? t : t - p.experts * blocks_a;
    const int64_t blocks = is_a ? blocks_a : blocks_b;
    const int64_t e = local / blocks, c0 = (local % blocks) * kMoeCpuColBlock;
    const int64_t W = std::min(kMoeCpuColBlock, (is_a ? p.d_in : p.d_out) - c0);
    if (is_a ? p.dA == nullptr : p.dB == nullptr) continue;
    std::fill(acc, acc + kMoeCpuColBlock * R, T(0));
    for (int64_t i0 = plan.start[e]; i0 < plan.start[e + 1]; i0 += kMoeSlotChunk) {
      const int64_t count = std::min(kMoeSlotChunk, plan.start[e + 1] - i0);
      const int64_t* slots = plan.order.data() + i0;
      if (is_a) {
        chunk_rows(p.x, p.x_stride_n, K, slots, count, c0, rows);
        const T* g[kMoeSlotChunk];
        for (int64_t q = 0; q < count; ++q) g[q] = static_cast<const T*>(p.gz) + slots[q] * R;
        chunk_a<T, kR>(rows, g, count, W, R, acc);
      } else {
        chunk_rows(p.grad_y, p.gy_stride_n, K, slots, count, c0, rows);
        for (int64_t q = 0; q < count; ++q) {
          const int64_t s = slots[q];
          const T coef = static_cast<T>(p.scale) * weight_of<T>(p.weights, p.w_stride_n, p.w_stride_j, K, s);
          const T* z = static_cast<const T*>(p.z) + s * R;
          for (int64_t j = 0; j < R; ++j) u[q * R + j] = coef * z[j];
        }
        chunk_b<T, kR>(rows, u, count, W, R, acc);
      }
    }
    if (is_a) {
      std::copy(acc, acc + W * R, static_cast<T*>(p.dA) + (e * p.d_in + c0) * R);
    } else {
      T* dB = static_cast<T*>(p.dB) + e * R * p.d_out + c0;
      for (int64_t j = 0; j < R; ++j)
        std::copy(acc + j * kMoeCpuColBlock, acc + j * kMoeCpuColBlock + W, dB + j * p.d_out);
    }
  }
}

// The instantiations for one instruction set: MHR_CPU_RANK_DISPATCH (cpu_lanes.h).

template <typename T>
void rows_portable(const MoeRowsParams& p, int64_t b, int64_t e) {
  MHR_CPU_RANK_DISPATCH(rows_pass, T, p.rank, p, b, e)
}
template <typename T>
void wgrad_portable(const MoeWgradParams& p, const MoeSlotPlan& plan, int64_t b, int64_t e) {
  MHR_CPU_RANK_DISPATCH(wgrad, T, p.rank, p, plan, b, e)
}
#if defined(MHR_MOE_X86)
template <typename T>
__attribute__((target("avx2,fma"))) void rows_avx2(const MoeRowsParams& p, int64_t b, int64_t e) {
  MHR_CPU_RANK_DISPATCH(rows_pass, T, p.rank, p, b, e)
}
template <typename T>
__attribute__((target("avx2,fma"))) void wgrad_avx2(const MoeWgradParams& p, const MoeSlotPlan& plan, int64_t b,
                                                    int64_t e) {
  MHR_CPU_RANK_DISPATCH(wgrad, T, p.rank, p, plan, b, e)
}
bool cpu_has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}
#endif

}  // namespace

template <typename T>
void moe_lora_rows_cpu(const MoeRowsParams& p, int64_t row_begin, int64_t row_end, bool use_avx2) {
#if defined(MHR_MOE_X86)
  if (use_avx2 && cpu_has_avx2()) return rows_avx2<T>(p, row_begin, row_end);
#endif
  (void)use_avx2;
  rows_portable<T>(p, row_begin, row_end);
}

template <typename T>
void moe_lora_wgrad_cpu(const MoeWgradParams& p, const MoeSlotPlan& plan, int64_t task_begin, int64_t task_end,
                        bool use_avx2) {
#if defined(MHR_MOE_X86)
  if (use_avx2 && cpu_has_avx2()) return wgrad_avx2<T>(p, plan, task_begin, task_end);
#endif
  (void)use_avx2;
  wgrad_portable<T>(p, plan, task_begin, task_end);
}

template void moe_lora_rows_cpu<float>(const MoeRowsParams&, int64_t, int64_t, bool);
template void moe_lora_rows_cpu<double>(const MoeRowsParams&, int64_t, int64_t, bool);
template void moe_lora_wgrad_cpu<float>(const MoeWgradParams&, const MoeSlotPlan&, int64_t, int64_t, bool);
template void moe_lora_wgrad_cpu<double>(const MoeWgradParams&, const MoeSlotPlan&, int64_t, int64_t, bool);

}  // namespace mhr_ops
