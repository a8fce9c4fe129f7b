// head_gates: Mixture-of-Head attention gates (SPEC section 5). Torch-free.
//
// Per row n (token):
//   routed:  g_r = softmax(routed_logits[n]) restricted to its top_k (ties to the lower head),
//            renormalized over the kept heads, times top_k; 0 for the others
//   shared:  g_s = softmax(shared_logits[n]) * Hs  (all ones when Hs <= 1 or no shared logits)
//   stage:   [a1, a2] = softmax(stage_logits[n]) * 2  (both 1 when absent)
//   gates[n] = concat(a1 * g_s, a2 * g_r)
//   binary:  1 for the shared heads and the kept routed heads, 0 elsewhere (no gradient)
// The per-row math is written once, for one thread per row, and shared by the CPU and CUDA
// kernels. It keeps no per-head arrays: softmax terms are recomputed (H is at most a few dozen).
#pragma once

#include <cstdint>

#include "common.h"

namespace mhr_ops {

struct HeadGatesParams {
  // routed_logits: [num_rows, num_routed], scalar_t. Strides in elements.
  const void* routed = nullptr;
  int64_t routed_stride_n = 0;
  int64_t routed_stride_h = 0;
  // shared_logits: [num_rows, num_shared] or null (then shared gates are 1). Strides in elements.
  const void* shared = nullptr;
  int64_t shared_stride_n = 0;
  int64_t shared_stride_h = 0;
  // stage_logits: [num_rows, 2] or null (then a1 = a2 = 1). Strides in elements.
  const void* stage = nullptr;
  int64_t stage_stride_n = 0;
  int64_t stage_stride_h = 0;
  // gates (forward output): [num_rows, num_shared + num_routed], contiguous, scalar_t.
  void* gates = nullptr;
  // grad_gates (backward input): [num_rows, num_shared + num_routed], scalar_t. Strides in elements.
  const void* grad_gates = nullptr;
  int64_t grad_stride_n = 0;
  int64_t grad_stride_h = 0;
  // Backward outputs, contiguous, scalar_t, shaped like their logits (null when the logits are).
  void* grad_routed = nullptr;
  void* grad_shared = nullptr;
  void* grad_stage = nullptr;
  int64_t num_rows = 0;    // N
  int64_t num_routed = 0;  // Hr >= 1
  int64_t num_shared = 0;  // Hs >= 0
  int64_t top_k = 1;       // 1..Hr
  bool binary = false;
};

template <typename scalar_t>
void head_gates_fwd_cpu(const HeadGatesParams& p, int64_t row_begin, int64_t row_end);
template <typename scalar_t>
void head_gates_bwd_cpu(const HeadGatesParams& p, int64_t row_begin, int64_t row_end);

#if defined(MHR_OPS_WITH_CUDA)
// One launch per direction, one thread per row. Returns a cudaError_t value (0 on success).
int head_gates_fwd_cuda(const HeadGatesParams& p, DType dtype, void* stream);
int head_gates_bwd_cuda(const HeadGatesParams& p, DType dtype, void* stream);
#endif

// ---- per-row math (host and device) ----

// A row of logits with a stride, read in the accumulation type.
template <typename scalar_t, typename acc_t>
struct LogitRow {
  const scalar_t* base;
  int64_t stride;
  int64_t size;
  MHR_HD acc_t operator[](int64_t i) const { return convert<acc_t>(ld_global(base + i * stride)); }
};

// Max (NaN-propagating) and sum of exp(l - max) over the row, optionally only over top-k kept.
template <typename Row, typename acc_t>
MHR_HD void softmax_stats(const Row& l, acc_t* mx, acc_t* sum) {
  acc_t m = l[0];
  for (int64_t i = 1; i < l.size; ++i) m = (m != m || m > l[i]) ? m : l[i];
  acc_t s = 0;
  for (int64_t i = 0; i < l.size; ++i) s += mhr_exp(l[i] - m);
  *mx = m;
  *sum = s;
}

// Whether routed head j is among the row's top_k (NaN first, ties to the lower index).
template <typename Row>
MHR_HD bool head_kept(const Row& l, int64_t j, int64_t top_k) {
  int64_t rank = 0;
  for (int64_t i = 0; i < l.size && rank < top_k; ++i) rank += ranks_before(l[i], i, l[j], j);
  return rank < top_k;
}

// Stage weights [a1, a2] = softmax(stage) * 2, or [1, 1] without stage logits.
template <typename Row, typename acc_t>
MHR_HD void stage_weights(const Row* stage, acc_t* a1, acc_t* a2) {
  if (stage == nullptr) {
    *a1 = *a2 = acc_t(1);
    return;
  }
  acc_t mx, sum;
  softmax_stats(*stage, &mx, &sum);
  *a1 = acc_t(2) * mhr_exp((*stage)[0] - mx) / sum;
  *a2 = acc_t(2) * mhr_exp((*stage)[1] - mx) / sum;
}

template <typename scalar_t, typename acc_t>
MHR_HD void head_gates_row_fwd(const HeadGatesParams& p, int64_t n, scalar_t* out) {
  using Row = LogitRow<scalar_t, acc_t>;
  const Row lr{static_cast<const scalar_t*>(p.routed) + n * p.routed_stride_n, p.routed_stride_h, p.num_routed};
  const int64_t Hs = p.num_shared;
  if (p.binary) {
    for (int64_t j = 0; j < Hs; ++j) st_global(out + j, convert<scalar_t>(acc_t(1)));
    for (int64_t j = 0; j < p.num_routed; ++j)
      st_global(out + Hs + j, convert<scalar_t>(acc_t(head_kept(lr, j, p.top_k) ? 1 : 0)));
    return;
  }
  const Row st{static_cast<const scalar_t*>(p.stage) + n * p.stage_stride_n, p.stage_stride_h, 2};
  acc_t a1, a2;
  stage_weights(p.stage ? &st : static_cast<const Row*>(nullptr), &a1, &a2);
  if (p.shared != nullptr && Hs > 1) {
    const Row ls{static_cast<const scalar_t*>(p.shared) + n * p.shared_stride_n, p.shared_stride_h, Hs};
    acc_t mx, sum;
    softmax_stats(ls, &mx, &sum);
    for (int64_t j = 0; j < Hs; ++j) st_global(out + j, convert<scalar_t>(a1 * acc_t(Hs) * mhr_exp(ls[j] - mx) / sum));
  } else {
    for (int64_t j = 0; j < Hs; ++j) st_global(out + j, convert<scalar_t>(a1));
  }
  acc_t mx, unused;
  softmax_stats(lr, &mx, &unused);
  // NaN propagates as through a softmax: a NaN logit (mx is then NaN) makes every routed gate
  // of the row NaN, kept or not, as torch.softmax and the reference do; so does a NaN stage weight.
  const bool nan_row = mx != mx;
  acc_t kept_sum = 0;
  for (int64_t j = 0; j < p.num_routed; ++j)
    if (nan_row || head_kept(lr, j, p.top_k)) kept_sum += mhr_exp(lr[j] - mx);
  const acc_t k = acc_t(p.top_k);
  for (int64_t j = 0; j < p.num_routed; ++j)
    st_global(out + Hs + j,
              convert<scalar_t>(nan_row || head_kept(lr, j, p.top_k) ? a2 * k * mhr_exp(lr[j] - mx) / kept_sum
                                                                     : a2 * acc_t(0)));  // NaN stage: NaN
}

template <typename scalar_t, typename acc_t>
MHR_HD void head_gates_row_bwd(const HeadGatesParams& p, int64_t n) {
  using Row = LogitRow<scalar_t, acc_t>;
  if (p.binary) return;  // constant gates: the caller zero-fills the gradients
  const Row lr{static_cast<const scalar_t*>(p.routed) + n * p.routed_stride_n, p.routed_stride_h, p.num_routed};
  const Row gy{static_cast<const scalar_t*>(p.grad_gates) + n * p.grad_stride_n, p.grad_stride_h,
               p.num_shared + p.num_routed};
  const Row st{static_cast<const scalar_t*>(p.stage) + n * p.stage_stride_n, p.stage_stride_h, 2};
  const int64_t Hs = p.num_shared, Hr = p.num_routed;
  acc_t a1, a2;
  stage_weights(p.stage ? &st : static_cast<const Row*>(nullptr), &a1, &a2);
  // routed: out_j = a2 * k * q_j over kept j, q = softmax over the kept heads
  acc_t mx, unused;
  softmax_stats(lr, &mx, &unused);
  const bool nan_row = mx != mx;  // every gate NaN (forward): every gradient NaN
  acc_t kept_sum = 0;
  for (int64_t j = 0; j < Hr; ++j)
    if (nan_row || head_kept(lr, j, p.top_k)) kept_sum += mhr_exp(lr[j] - mx);
  const acc_t k = acc_t(p.top_k);
  acc_t dq_dot_q = 0, da2 = 0;
  for (int64_t j = 0; j < Hr; ++j) {
    if (!nan_row && !head_kept(lr, j, p.top_k)) continue;
    const acc_t q = mhr_exp(lr[j] - mx) / kept_sum;
    dq_dot_q += a2 * k * gy[Hs + j] * q;
    da2 += gy[Hs + j] * k * q;
  }
  scalar_t* gr = static_cast<scalar_t*>(p.grad_routed) + n * Hr;
  for (int64_t j = 0; j < Hr; ++j) {
    acc_t v = 0;
    if (nan_row || head_kept(lr, j, p.top_k)) {
      const acc_t q = mhr_exp(lr[j] - mx) / kept_sum;
      v = q * (a2 * k * gy[Hs + j] - dq_dot_q);
    }
    st_global(gr + j, convert<scalar_t>(v));
  }
  // shared: out_j = a1 * Hs * p_j (softmax), or a1 when there are no shared logits / Hs <= 1
  acc_t da1 = 0;
  if (p.shared != nullptr) {
    const Row ls{static_cast<const scalar_t*>(p.shared) + n * p.shared_stride_n, p.shared_stride_h, Hs};
    scalar_t* gs = static_cast<scalar_t*>(p.grad_shared) + n * Hs;
    if (Hs > 1) {
      acc_t smx, ssum, dp_dot_p = 0;
      softmax_stats(ls, &smx, &ssum);
      for (int64_t j = 0; j < Hs; ++j) {
        const acc_t pj = mhr_exp(ls[j] - smx) / ssum;
        dp_dot_p += a1 * acc_t(Hs) * gy[j] * pj;
        da1 += gy[j] * acc_t(Hs) * pj;
      }
      for (int64_t j = 0; j < Hs; ++j) {
        const acc_t pj = mhr_exp(ls[j] - smx) / ssum;
        st_global(gs + j, convert<scalar_t>(pj * (a1 * acc_t(Hs) * gy[j] - dp_dot_p)));
      }
    } else {
      for (int64_t j = 0; j < Hs; ++j) {
        st_global(gs + j, convert<scalar_t>(acc_t(0)));
        da1 += gy[j];
      }
    }
  } else {
    for (int64_t j = 0; j < Hs; ++j) da1 += gy[j];
  }
  if (p.stage != nullptr) {
    // a_i = 2 sigma_i: d stage_i = sigma_i (2 da_i - sum_j 2 da_j sigma_j)
    const acc_t s1 = a1 / acc_t(2), s2 = a2 / acc_t(2);
    const acc_t dot = acc_t(2) * (da1 * s1 + da2 * s2);
    scalar_t* gst = static_cast<scalar_t*>(p.grad_stage) + n * 2;
    st_global(gst + 0, convert<scalar_t>(s1 * (acc_t(2) * da1 - dot)));
    st_global(gst + 1, convert<scalar_t>(s2 * (acc_t(2) * da2 - dot)));
  }
}

}  // namespace mhr_ops
