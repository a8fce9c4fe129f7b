// moe_lora CPU kernels (see moe_lora.h). Loops are ordered so that the innermost runs over a
// contiguous rank vector or output row, which the compiler vectorizes; every sum has one fixed
// order, whatever the tile a slot lands in (one accumulator per output element, no partial sums).
#include "moe_lora.h"

#include <algorithm>
#include <limits>
#include <utility>

#include "cpu_scratch.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MHR_MOE_X86 1
#endif
// Bodies are inlined into one wrapper per instruction set (portable, AVX2 + FMA).
#define MHR_MOE_INLINE inline __attribute__((always_inline))

namespace mhr_ops {

int64_t moe_expert_of(const MoeRouting& r, int64_t slot) {
  const int64_t n = slot / r.top_k, j = slot % r.top_k;
  const int64_t e = r.index_type == IndexType::kInt32
                        ? static_cast<int64_t>(static_cast<const int32_t*>(r.ids)[n * r.ids_stride_n + j * r.ids_stride_j])
                        : static_cast<const int64_t*>(r.ids)[n * r.ids_stride_n + j * r.ids_stride_j];
  return e >= 0 && e < r.experts ? e : -1;
}

MoeSlotPlan moe_plan_slots(const MoeRouting& r, int64_t max_piece_slots) {
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
  // Pieces start at multiples of kMoeSlotTile slots within their expert: every slot then lands
  // in the same tile (or the same tail) whatever the piece size, so its bits do not change.
  const int64_t step = std::max<int64_t>(1, (max_piece_slots + kMoeSlotTile - 1) / kMoeSlotTile) * kMoeSlotTile;
  for (int64_t e = 0; e < r.experts; ++e)
    for (int64_t b = plan.start[e]; b < plan.start[e + 1]; b += step) {
      plan.piece_begin.push_back(b);
      plan.piece_end.push_back(std::min(b + step, plan.start[e + 1]));
      plan.piece_expert.push_back(e);
    }
  return plan;
}

template <typename T>
void moe_lora_fill_invalid_cpu(const MoeSlotPlan& plan, T* out, int64_t rank, T* dw) {
  const T nan = std::numeric_limits<T>::quiet_NaN();
  for (const int64_t s : plan.invalid) {
    std::fill(out + s * rank, out + (s + 1) * rank, nan);
    if (dw != nullptr) dw[s] = nan;
  }
}

int64_t moe_lora_wgrad_tasks(int64_t experts, int64_t d_in, int64_t d_out) {
  return experts * ((d_in + kMoeColBlock - 1) / kMoeColBlock + (d_out + kMoeColBlock - 1) / kMoeColBlock);
}

namespace {

template <typename T>
MHR_MOE_INLINE T weight_of(const void* w, int64_t stride_n, int64_t stride_j, int64_t top_k, int64_t s) {
  return static_cast<const T*>(w)[(s / top_k) * stride_n + (s % top_k) * stride_j];
}

// acc[t][0 .. R) = src[t][0 .. d) @ m  (m: [d, R] row-major), one accumulator per (t, j) summed
// over c in order: the same bits for any kT.
template <typename T, int kR, int kT>
MHR_MOE_INLINE void project(const T* const* src, const T* __restrict m, int64_t d, int64_t R, T* __restrict out) {
  if constexpr (kR > 0) {
    T acc[kT][kR] = {};
    for (int64_t c = 0; c < d; ++c) {
      const T* mr = m + c * kR;
      for (int t = 0; t < kT; ++t) {
        const T xv = src[t][c];
        for (int j = 0; j < kR; ++j) acc[t][j] += xv * mr[j];
      }
    }
    for (int t = 0; t < kT; ++t)
      for (int j = 0; j < kR; ++j) out[t * kR + j] = acc[t][j];
  } else {
    std::fill(out, out + kT * R, T(0));
    for (int64_t c = 0; c < d; ++c)
      for (int t = 0; t < kT; ++t) {
        const T xv = src[t][c];
        for (int64_t j = 0; j < R; ++j) out[t * R + j] += xv * m[c * R + j];
      }
  }
}

template <typename T, int kR, int kT>
MHR_MOE_INLINE void shrink_tile(const MoeShrinkParams& p, const int64_t* slots, const T* m, T* tmp) {
  const int64_t R = kR > 0 ? kR : p.rank;
  const T* src[kT];
  for (int t = 0; t < kT; ++t) src[t] = static_cast<const T*>(p.src) + (slots[t] / p.top_k) * p.src_stride_n;
  project<T, kR, kT>(src, m, p.d, R, tmp);
  const T scale = static_cast<T>(p.scale);
  T* out = static_cast<T*>(p.out);
  for (int t = 0; t < kT; ++t) {
    const int64_t s = slots[t];
    T* o = out + s * R;
    const T* g = tmp + t * R;
    if (p.weights == nullptr) {
      for (int64_t j = 0; j < R; ++j) o[j] = scale * g[j];
      continue;
    }
    const T w = weight_of<T>(p.weights, p.w_stride_n, p.w_stride_j, p.top_k, s);
    const T* z = static_cast<const T*>(p.z) + s * R;
    T dot = 0;
    for (int64_t j = 0; j < R; ++j) {
      const T gj = scale * g[j];
      o[j] = w * gj;
      dot += z[j] * gj;
    }
    static_cast<T*>(p.dw)[s] = dot;
  }
}

template <typename T, int kR>
MHR_MOE_INLINE void shrink(const MoeShrinkParams& p, const MoeSlotPlan& plan, int64_t piece_begin, int64_t piece_end) {
  // kT * kR accumulators stay in registers; kT divides kMoeSlotTile (tiles never straddle pieces).
  constexpr int kT = kR >= 32 ? 2 : kR >= 16 ? 4 : static_cast<int>(kMoeSlotTile);
  const int64_t R = kR > 0 ? kR : p.rank;
  T* tmp = thread_scratch<T>(static_cast<size_t>(kT * R));
  for (int64_t i = piece_begin; i < piece_end; ++i) {
    const T* m = static_cast<const T*>(p.mats) + plan.piece_expert[i] * p.d * R;
    const int64_t* slots = plan.order.data();
    int64_t b = plan.piece_begin[i];
    for (; b + kT <= plan.piece_end[i]; b += kT) shrink_tile<T, kR, kT>(p, slots + b, m, tmp);
    for (; b < plan.piece_end[i]; ++b) shrink_tile<T, kR, 1>(p, slots + b, m, tmp);
  }
}

// One block of rows: its slots sorted by (expert, slot), scaled vectors u, then column chunks of
// y accumulated slot by slot (a chunk of M_e stays in L1 across the slots of one expert).
template <typename T, int kR>
MHR_MOE_INLINE void expand(const MoeExpandParams& p, int64_t row_begin, int64_t row_end) {
  constexpr int64_t kChunk = 64;
  const int64_t R = kR > 0 ? kR : p.rank, K = p.routing.top_k, d = p.d;
  const size_t max_slots = static_cast<size_t>(kMoeRowBlock * K);
  auto* entries = thread_scratch<std::pair<int64_t, int64_t>>(max_slots);  // (expert, slot)
  T* u = thread_scratch<T>(max_slots * R + kMoeRowBlock * kChunk);
  T* acc = u + max_slots * R;
  const T nan = std::numeric_limits<T>::quiet_NaN();
  const T* M = static_cast<const T*>(p.mats);
  for (int64_t b0 = row_begin; b0 < row_end; b0 += kMoeRowBlock) {
    const int64_t b1 = std::min(row_end, b0 + kMoeRowBlock);
    bool bad[kMoeRowBlock] = {};
    int64_t count = 0;
    for (int64_t s = b0 * K; s < b1 * K; ++s) {
      const int64_t e = moe_expert_of(p.routing, s);
      if (e < 0)
        bad[s / K - b0] = true;
      else
        entries[count++] = {e, s};
    }
    std::sort(entries, entries + count);
    for (int64_t i = 0; i < count; ++i) {
      const int64_t s = entries[i].second;
      T coef = static_cast<T>(p.scale);
      if (p.weights != nullptr) coef *= weight_of<T>(p.weights, p.w_stride_n, p.w_stride_j, K, s);
      const T* v = static_cast<const T*>(p.v) + s * R;
      for (int64_t j = 0; j < R; ++j) u[i * R + j] = coef * v[j];
    }
    for (int64_t c0 = 0; c0 < d; c0 += kChunk) {
      const int64_t width = std::min(kChunk, d - c0);
      std::fill(acc, acc + (b1 - b0) * kChunk, T(0));
      for (int64_t i = 0; i < count; ++i) {
        const T* m = M + entries[i].first * R * d + c0;
        const T* ui = u + i * R;
        T* __restrict a = acc + (entries[i].second / K - b0) * kChunk;
        for (int64_t c = 0; c < width; ++c) {
          T v = a[c];
          if constexpr (kR > 0) {
            for (int j = 0; j < kR; ++j) v += ui[j] * m[j * d + c];
          } else {
            for (int64_t j = 0; j < R; ++j) v += ui[j] * m[j * d + c];
          }
          a[c] = v;
        }
      }
      for (int64_t n = b0; n < b1; ++n) {
        T* y = static_cast<T*>(p.y) + n * p.y_stride_n + c0;
        const T* a = acc + (n - b0) * kChunk;
        if (bad[n - b0])
          std::fill(y, y + width, nan);
        else if (p.accumulate)
          for (int64_t c = 0; c < width; ++c) y[c] += a[c];
        else
          std::copy(a, a + width, y);
      }
    }
  }
}

// dA_e[c0 .. c0+W, :] = sum over e's slots of x_n[c0 ..]^T gz_s.
template <typename T, int kR, int kW>
MHR_MOE_INLINE void wgrad_a(const MoeWgradParams& p, const MoeSlotPlan& plan, int64_t e, int64_t c0, int64_t W,
                            T* __restrict acc) {
  const int64_t R = kR > 0 ? kR : p.rank;
  std::fill(acc, acc + kMoeColBlock * R, T(0));
  for (int64_t i = plan.start[e]; i < plan.start[e + 1]; ++i) {
    const int64_t s = plan.order[i];
    const T* x = static_cast<const T*>(p.x) + (s / p.top_k) * p.x_stride_n + c0;
    const T* g = static_cast<const T*>(p.gz) + s * R;
    const int64_t width = kW > 0 ? kW : W;
    for (int64_t c = 0; c < width; ++c) {
      const T xv = x[c];
      if constexpr (kR > 0) {
        for (int j = 0; j < kR; ++j) acc[c * kR + j] += xv * g[j];
      } else {
        for (int64_t j = 0; j < R; ++j) acc[c * R + j] += xv * g[j];
      }
    }
  }
  std::copy(acc, acc + W * R, static_cast<T*>(p.dA) + (e * p.d_in + c0) * R);
}

// dB_e[:, c0 .. c0+W] = sum over e's slots of (scale w_s z_s)^T grad_y_n[c0 ..].
template <typename T, int kR, int kW>
MHR_MOE_INLINE void wgrad_b(const MoeWgradParams& p, const MoeSlotPlan& plan, int64_t e, int64_t c0, int64_t W,
                            T* __restrict acc) {
  const int64_t R = kR > 0 ? kR : p.rank;
  const int64_t width = kW > 0 ? kW : W;
  std::fill(acc, acc + kMoeColBlock * R, T(0));
  for (int64_t i = plan.start[e]; i < plan.start[e + 1]; ++i) {
    const int64_t s = plan.order[i];
    const T* gy = static_cast<const T*>(p.grad_y) + (s / p.top_k) * p.gy_stride_n + c0;
    const T* z = static_cast<const T*>(p.z) + s * R;
    const T coef = static_cast<T>(p.scale) * weight_of<T>(p.weights, p.w_stride_n, p.w_stride_j, p.top_k, s);
    for (int64_t j = 0; j < R; ++j) {
      const T v = coef * z[j];
      T* __restrict a = acc + j * kMoeColBlock;
      for (int64_t c = 0; c < width; ++c) a[c] += v * gy[c];
    }
  }
  T* dB = static_cast<T*>(p.dB) + e * R * p.d_out + c0;
  for (int64_t j = 0; j < R; ++j) std::copy(acc + j * kMoeColBlock, acc + j * kMoeColBlock + W, dB + j * p.d_out);
}

template <typename T, int kR>
MHR_MOE_INLINE void wgrad(const MoeWgradParams& p, const MoeSlotPlan& plan, int64_t task_begin, int64_t task_end) {
  const int64_t R = kR > 0 ? kR : p.rank;
  const int64_t blocks_a = (p.d_in + kMoeColBlock - 1) / kMoeColBlock;
  const int64_t blocks_b = (p.d_out + kMoeColBlock - 1) / kMoeColBlock;
  T* acc = thread_scratch<T>(static_cast<size_t>(kMoeColBlock * R));
  for (int64_t t = task_begin; t < task_end; ++t) {
    const bool is_a = t < p.experts * blocks_a;
    const int64_t local = is_a ? t : t - p.experts * blocks_a;
    const int64_t blocks = is_a ? blocks_a : blocks_b;
    const int64_t e = local / blocks, c0 = (local % blocks) * kMoeColBlock;
    const int64_t W = std::min(kMoeColBlock, (is_a ? p.d_in : p.d_out) - c0);
    if (is_a && p.dA != nullptr) {
      W == kMoeColBlock ? wgrad_a<T, kR, kMoeColBlock>(p, plan, e, c0, W, acc) : wgrad_a<T, kR, 0>(p, plan, e, c0, W, acc);
    } else if (!is_a && p.dB != nullptr) {
      W == kMoeColBlock ? wgrad_b<T, kR, kMoeColBlock>(p, plan, e, c0, W, acc) : wgrad_b<T, kR, 0>(p, plan, e, c0, W, acc);
    }
  }
}

// The instantiations for one instruction set: the common ranks at compile time, others at run time.
#define MHR_MOE_DISPATCH(BODY, T, RANK, ...)  \
  switch (RANK) {                             \
    case 1: return BODY<T, 1>(__VA_ARGS__);   \
    case 2: return BODY<T, 2>(__VA_ARGS__);   \
    case 4: return BODY<T, 4>(__VA_ARGS__);   \
    case 8: return BODY<T, 8>(__VA_ARGS__);   \
    case 16: return BODY<T, 16>(__VA_ARGS__); \
    case 32: return BODY<T, 32>(__VA_ARGS__); \
    default: return BODY<T, 0>(__VA_ARGS__);  \
  }

template <typename T>
void shrink_portable(const MoeShrinkParams& p, const MoeSlotPlan& plan, int64_t b, int64_t e) {
  MHR_MOE_DISPATCH(shrink, T, p.rank, p, plan, b, e)
}
template <typename T>
void expand_portable(const MoeExpandParams& p, int64_t b, int64_t e) {
  MHR_MOE_DISPATCH(expand, T, p.rank, p, b, e)
}
template <typename T>
void wgrad_portable(const MoeWgradParams& p, const MoeSlotPlan& plan, int64_t b, int64_t e) {
  MHR_MOE_DISPATCH(wgrad, T, p.rank, p, plan, b, e)
}
#if defined(MHR_MOE_X86)
template <typename T>
__attribute__((target("avx2,fma"))) void shrink_avx2(const MoeShrinkParams& p, const MoeSlotPlan& plan, int64_t b,
                                                      int64_t e) {
  MHR_MOE_DISPATCH(shrink, T, p.rank, p, plan, b, e)
}
template <typename T>
__attribute__((target("avx2,fma"))) void expand_avx2(const MoeExpandParams& p, int64_t b, int64_t e) {
  MHR_MOE_DISPATCH(expand, T, p.rank, p, b, e)
}
template <typename T>
__attribute__((target("avx2,fma"))) void wgrad_avx2(const MoeWgradParams& p, const MoeSlotPlan& plan, int64_t b,
                                                     int64_t e) {
  MHR_MOE_DISPATCH(wgrad, T, p.rank, p, plan, b, e)
}
bool cpu_has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}
#endif

}  // namespace

template <typename T>
void moe_lora_shrink_cpu(const MoeShrinkParams& p, const MoeSlotPlan& plan, int64_t piece_begin, int64_t piece_end,
                         bool use_avx2) {
#if defined(MHR_MOE_X86)
  if (use_avx2 && cpu_has_avx2()) return shrink_avx2<T>(p, plan, piece_begin, piece_end);
#endif
  (void)use_avx2;
  shrink_portable<T>(p, plan, piece_begin, piece_end);
}

template <typename T>
void moe_lora_expand_cpu(const MoeExpandParams& p, int64_t row_begin, int64_t row_end, bool use_avx2) {
#if defined(MHR_MOE_X86)
  if (use_avx2 && cpu_has_avx2()) return expand_avx2<T>(p, row_begin, row_end);
#endif
  (void)use_avx2;
  expand_portable<T>(p, row_begin, row_end);
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

template void moe_lora_fill_invalid_cpu<float>(const MoeSlotPlan&, float*, int64_t, float*);
template void moe_lora_fill_invalid_cpu<double>(const MoeSlotPlan&, double*, int64_t, double*);
template void moe_lora_shrink_cpu<float>(const MoeShrinkParams&, const MoeSlotPlan&, int64_t, int64_t, bool);
template void moe_lora_shrink_cpu<double>(const MoeShrinkParams&, const MoeSlotPlan&, int64_t, int64_t, bool);
template void moe_lora_expand_cpu<float>(const MoeExpandParams&, int64_t, int64_t, bool);
template void moe_lora_expand_cpu<double>(const MoeExpandParams&, int64_t, int64_t, bool);
template void moe_lora_wgrad_cpu<float>(const MoeWgradParams&, const MoeSlotPlan&, int64_t, int64_t, bool);
template void moe_lora_wgrad_cpu<double>(const MoeWgradParams&, const MoeSlotPlan&, int64_t, int64_t, bool);

}  // namespace mhr_ops
