// moe_lora CPU kernels (see moe_lora.h). Loops are ordered so that the innermost runs over a
// contiguous rank vector or output row, which the compiler vectorizes; every sum has one fixed
// order, whatever the tile a slot lands in (one accumulator per output element, no partial sums).
#include "moe_lora.h"

// No FMA contraction in this file: at -O3 GCC versions some loops on run-time alias checks, and
// the versions contracted differently, so a row's bits depended on where its scratch row sat.
// Without contraction every version rounds alike (the sums' order is fixed by the code). The rows
// pass's AVX2 build fuses its multiply-adds explicitly instead (madd): std::fma rounds once in
// every version, vector or scalar.
#pragma GCC optimize("fp-contract=off")
// madd and the kernels pass vectors by value between always-inlined functions only: GCC's note
// that the ABI of a 256-bit vector argument differs without AVX does not apply (cpu_lanes.h).
#pragma GCC diagnostic ignored "-Wpsabi"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
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

// a * b + c, lane by lane: one rounding (std::fma, which GCC turns into vector FMAs) in the AVX2
// + FMA build, a multiply and an add in the portable one (where std::fma would be a library call).
// Vectors by value: a deduced V loses Lanes' alignment attribute, so a reference to one would be
// read with aligned loads (a crash on rows not 32-byte aligned).
template <typename V, typename S, size_t... kL>
MHR_MOE_INLINE V fma_lanes(S a, V b, V c, std::index_sequence<kL...>) {
  return V{std::fma(a, b[kL], c[kL])...};  // a vector built whole: GCC keeps it in registers
}

template <bool kFma, typename V, typename S>
MHR_MOE_INLINE V madd(S a, V b, V c) {
  if constexpr (kFma) {
    if constexpr (std::is_same_v<V, S>)
      return std::fma(a, b, c);
    else
      return fma_lanes(a, b, c, std::make_index_sequence<sizeof(V) / sizeof(S)>{});
  } else {
    return a * b + c;
  }
}

template <typename T>
MHR_MOE_INLINE T weight_of(const void* w, int64_t stride_n, int64_t stride_j, int64_t top_k, int64_t s) {
  return static_cast<const T*>(w)[(s / top_k) * stride_n + (s % top_k) * stride_j];
}

// acc[t][0 .. R) = src[t][0 .. d) @ m  (m: [d, R] row-major), one accumulator per (t, j) summed
// over c in order: the same bits for any kT. A compile-time rank of 2 or more keeps the sums as
// vectors over the rank (explicitly: left to itself, GCC vectorizes over t instead, gathering
// from kT rows element by element).
template <typename T, int kR, int kT, bool kFma>
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
#pragma GCC unroll 8
      for (int t = 0; t < kT; ++t) {
        const T xv = src[t][c];
#pragma GCC unroll 8
        for (int v = 0; v < kV; ++v) acc[t][v] = madd<kFma>(xv, mv[v], acc[t][v]);
      }
    }
    for (int t = 0; t < kT; ++t)
      for (int v = 0; v < kV; ++v) reinterpret_cast<V*>(out + t * kR)[v] = acc[t][v];
  } else if constexpr (kR == 1) {
    T acc[kT] = {};
    for (int64_t c = 0; c < d; ++c)
#pragma GCC unroll 8
      for (int t = 0; t < kT; ++t) acc[t] = madd<kFma>(src[t][c], m[c], acc[t]);
    for (int t = 0; t < kT; ++t) out[t] = acc[t];
  } else {
    std::fill(out, out + kT * R, T(0));
    for (int64_t c = 0; c < d; ++c)
      for (int t = 0; t < kT; ++t) {
        const T xv = src[t][c];
        for (int64_t j = 0; j < R; ++j) out[t * R + j] = madd<kFma>(xv, m[c * R + j], out[t * R + j]);
      }
  }
}

// Shrink of one block's slots, runs of one expert cut into tiles of kT slots; a short tile is
// padded with its last slot, so every slot goes through the same code (the same bits whatever
// its neighbours). g = shrink_scale * src[n(s)] @ S_e; forward: v[s] = g; backward: v[s] = w_s g,
// dw[s] = z_s . g.
template <typename T, int kR, bool kFma>
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
      project<T, kR, kT, kFma>(src, m, p.d_src, R, tmp);
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

// Row n's update on columns [c0, c0 + width): its count slots (entries ent[q], in (expert, slot)
// order) each add sum_j u_s[j] * mat_s[j*ldm + c] to one accumulator per column, then y = bias +
// sums, y += sums or y = sums. kChunk columns as 8 vectors in registers, a shorter chunk column by
// column in the same order.
template <typename T, int kR, int kChunk, bool kFma>
MHR_MOE_INLINE void expand_row(const int64_t* ent, int64_t count, const T* u, const T* const* mat, int64_t ldm,
                               int64_t R, int64_t width, const T* bias, bool accumulate, T* __restrict y) {
  if constexpr (kR > 0) {
    if (width == kChunk) {
      using V = typename Lanes<T, kChunk / 8>::type;
      V acc[8];
      for (int v = 0; v < 8; ++v) acc[v] = V{};
      for (int64_t q = 0; q < count; ++q) {
        const T* uq = u + ent[q] * kR;
        const T* mq = mat[ent[q]];
        for (int j = 0; j < kR; ++j) {
          const V* mj = reinterpret_cast<const V*>(mq + j * ldm);
#pragma GCC unroll 8  // the sums stay in registers (madd's calls keep GCC from unrolling it)
          for (int v = 0; v < 8; ++v) acc[v] = madd<kFma>(uq[j], mj[v], acc[v]);
        }
      }
      V* yv = reinterpret_cast<V*>(y);
      if (accumulate)
        for (int v = 0; v < 8; ++v) yv[v] += acc[v];
      else if (bias != nullptr)
        for (int v = 0; v < 8; ++v) yv[v] = reinterpret_cast<const V*>(bias)[v] + acc[v];
      else
        for (int v = 0; v < 8; ++v) yv[v] = acc[v];
      return;
    }
  }
  for (int64_t c = 0; c < width; ++c) {
    T a = 0;
    for (int64_t q = 0; q < count; ++q)
      for (int64_t j = 0; j < R; ++j) a = madd<kFma>(u[ent[q] * R + j], mat[ent[q]][j * ldm + c], a);
    y[c] = accumulate ? y[c] + a : bias != nullptr ? bias[c] + a : a;
  }
}

// Blocks of kMoeRowBlock rows: the block's slots sorted by (expert, slot), the optional shrink,
// the scaled vectors u, then the expand column chunk by column chunk, each row's sums in
// registers and written to y at once (a row with an invalid slot is NaN). Every element sums its
// slots in the same order in every variant: the same bits.
// - The chunk's rows of the block's experts' X are copied together when each expert serves a few
//   slots: X's rows lie d apart (4 KB at d 1024), so eight experts' rank rows of one chunk fall in
//   the same L1 sets and evict each other (the expand ran 1.5x slower in place).
// - y is written chunk by chunk, its rows kYAhead ahead fetched: pieces of rows 4 KB apart that no
//   hardware stream follows (without it the expand took 1.6x as long at N 2048).
template <typename T, int kR, bool kFma>
MHR_MOE_INLINE void rows_pass(const MoeRowsParams& p, int64_t row_begin, int64_t row_end) {
  constexpr int64_t kChunk = 64, kYAhead = 4;
  const int64_t R = kR > 0 ? kR : p.rank, K = p.routing.top_k, d = p.d_dst;
  const T* X = static_cast<const T*>(p.expand_mats);
  const int64_t max_slots = kMoeRowBlock * K, max_experts = std::min(max_slots, p.routing.experts);
  auto* entries = thread_scratch<std::pair<int64_t, int64_t>>(static_cast<size_t>(max_slots));  // (expert, slot)
  int64_t* row_ent = thread_scratch<int64_t>(static_cast<size_t>(max_slots));                   // [row][K]: its entries
  const T** mat = thread_scratch<const T*>(static_cast<size_t>(max_slots));                     // entry's X_e (packed)
  // X packed once for the whole call when its rows serve enough slots and it is small (256 KB at E
  // 8, r 8, d 1024), else chunk by chunk per block (or read in place, see below).
  const int64_t E = p.routing.experts, chunks = (d + kChunk - 1) / kChunk;
  const bool pack_all = p.y != nullptr && (row_end - row_begin) * K >= 64 * E && E * R * chunks * kChunk <= (1 << 18);
  const int64_t pack_size = pack_all ? E * R * chunks * kChunk : max_experts * R * kChunk;
  T* u = thread_scratch<T>(static_cast<size_t>(max_slots * R + 8 * R + pack_size));
  T* tmp = u + max_slots * R;
  T* packed = tmp + 8 * R;  // [chunk][E][R][kChunk] (pack_all), else [expert of the block][R][kChunk]
  if (pack_all)
    for (int64_t c0 = 0; c0 < d; c0 += kChunk)
      for (int64_t e = 0; e < E; ++e)
        for (int64_t j = 0; j < R; ++j) {
          const T* src = X + (e * R + j) * d + c0;
          std::copy(src, src + std::min(kChunk, d - c0), packed + ((c0 / kChunk * E + e) * R + j) * kChunk);
        }
  int64_t row_count[kMoeRowBlock];
  const T nan = std::numeric_limits<T>::quiet_NaN();
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
    if (p.src != nullptr) rows_shrink<T, kR, kFma>(p, entries, count, tmp);
    if (p.y == nullptr) continue;
    int64_t used = 0;  // the block's experts
    std::fill(row_count, row_count + (b1 - b0), int64_t{0});
    for (int64_t i = 0; i < count; ++i) {
      const int64_t s = entries[i].second, r = s / K - b0;
      T coef = static_cast<T>(p.expand_scale);
      if (p.expand_weighted) coef *= weight_of<T>(p.weights, p.w_stride_n, p.w_stride_j, K, s);
      const T* v = static_cast<const T*>(p.v) + s * R;
      for (int64_t j = 0; j < R; ++j) u[i * R + j] = coef * v[j];
      row_ent[r * K + row_count[r]++] = i;  // the block's order restricted to the row
      if (i == 0 || entries[i].first != entries[i - 1].first) ++used;
    }
    const bool pack = !pack_all && count >= 4 * used;
    for (int64_t i = 0, l = -1; i < count; ++i) {
      if (i == 0 || entries[i].first != entries[i - 1].first) ++l;
      const int64_t e = entries[i].first;
      mat[i] = pack_all ? packed + e * R * kChunk : pack ? packed + l * R * kChunk : X + e * R * d;
    }
    for (int64_t c0 = 0; c0 < d; c0 += kChunk) {
      const int64_t width = std::min(kChunk, d - c0);
      if (pack) {
        for (int64_t i = 0, l = 0; i < count; ++i) {
          if (i > 0 && entries[i].first == entries[i - 1].first) continue;
          const T* src = X + entries[i].first * R * d + c0;
          for (int64_t j = 0; j < R; ++j) std::copy(src + j * d, src + j * d + width, packed + (l * R + j) * kChunk);
          ++l;
        }
      }
      const int64_t ldm = pack || pack_all ? kChunk : d;
      for (int64_t n = b0; n < b1; ++n) {
        T* y = static_cast<T*>(p.y) + n * p.y_stride_n + c0;
        if (n + kYAhead < b1) {
          const char* ahead = reinterpret_cast<const char*>(y + kYAhead * p.y_stride_n);
          for (int64_t o = 0; o < width * static_cast<int64_t>(sizeof(T)); o += 64) __builtin_prefetch(ahead + o, 1);
        }
        if (bad[n - b0]) {
          std::fill(y, y + width, nan);
          continue;
        }
        expand_row<T, kR, kChunk, kFma>(row_ent + (n - b0) * K, row_count[n - b0], u, mat, ldm, R, width,
                                        bias != nullptr ? bias + c0 : nullptr, p.accumulate, y);
      }
      if (!pack)  // the next chunk of X_e
        for (int64_t i = 0; i < count; ++i) mat[i] += pack_all ? E * R * kChunk : kChunk;
    }
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

template <typename T, int kR>
MHR_MOE_INLINE void rows_plain(const MoeRowsParams& p, int64_t b, int64_t e) {
  rows_pass<T, kR, false>(p, b, e);
}
template <typename T, int kR>
MHR_MOE_INLINE void rows_fma(const MoeRowsParams& p, int64_t b, int64_t e) {
  rows_pass<T, kR, true>(p, b, e);
}

template <typename T>
void rows_portable(const MoeRowsParams& p, int64_t b, int64_t e) {
  MHR_CPU_RANK_DISPATCH(rows_plain, T, p.rank, p, b, e)
}
template <typename T>
void wgrad_portable(const MoeWgradParams& p, const MoeSlotPlan& plan, int64_t b, int64_t e) {
  MHR_CPU_RANK_DISPATCH(wgrad, T, p.rank, p, plan, b, e)
}
#if defined(MHR_MOE_X86)
template <typename T>
__attribute__((target("avx2,fma"))) void rows_avx2(const MoeRowsParams& p, int64_t b, int64_t e) {
  MHR_CPU_RANK_DISPATCH(rows_fma, T, p.rank, p, b, e)
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
