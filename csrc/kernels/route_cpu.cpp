// CPU kernels for route (see route.h). One (group, head) row at a time.
#include <limits>
#include <memory>
#include <vector>

#include "route.h"

namespace mhr_ops {
namespace {

// Fills p[0..S) with the routing probabilities of one row (before top-k) and returns the row's
// task, or -1 when the task id is out of range. dp (elementwise modes only; may be null): also
// d p / d l, computed with p (the backward then pays the transcendentals once).
template <typename scalar_t>
int64_t row_probs(const RouteParams& P, int64_t g, int64_t k, scalar_t* p, scalar_t* l, scalar_t* dp = nullptr) {
  const int64_t S = P.num_skills;
  const int64_t task = load_index(P.task_ids, P.index_type, P.task_ids_stride, g);
  if (task < 0 || task >= P.num_tasks) return -1;
  const scalar_t* logits = static_cast<const scalar_t*>(P.logits);
  const scalar_t* noise = static_cast<const scalar_t*>(P.noise);
  const scalar_t inv_temp = scalar_t(1) / scalar_t(P.temperature);
  const scalar_t ceps = scalar_t(P.clamp_eps), tiny = scalar_t(P.clamp_tiny);
  const int64_t base = task * P.logits_stride_t + k * S * P.logits_stride_c;
  for (int64_t s = 0; s < S; ++s) l[s] = logits[base + s * P.logits_stride_c];
  if (P.mode == RouteMode::kSoftmax) {
    scalar_t mx = -std::numeric_limits<scalar_t>::infinity();
    for (int64_t s = 0; s < S; ++s) mx = (l[s] * inv_temp > mx || l[s] != l[s]) ? l[s] * inv_temp : mx;
    scalar_t sum = 0;
    for (int64_t s = 0; s < S; ++s) sum += (p[s] = mhr_exp(l[s] * inv_temp - mx));
    for (int64_t s = 0; s < S; ++s) p[s] /= sum;
  } else {
    for (int64_t s = 0; s < S; ++s) {
      const scalar_t u =
          noise ? noise[g * P.noise_stride_g + k * P.noise_stride_h + s * P.noise_stride_s] : scalar_t(0);
      const scalar_t inv_skills = scalar_t(1) / scalar_t(S);
      p[s] = dp ? route_prob_with_grad(P.mode, l[s], u, inv_temp, ceps, tiny, inv_skills, dp + s)
                : route_prob(P.mode, l[s], u, inv_temp, ceps, tiny, inv_skills);
    }
  }
  return task;
}

// kept[s] = p[s] is among the top_k of its row (all kept when top_k == 0). Returns sum of kept p.
template <typename scalar_t>
scalar_t select_top_k(const RouteParams& P, const scalar_t* p, bool* kept) {
  const int64_t S = P.num_skills;
  scalar_t sum = 0;
  for (int64_t s = 0; s < S; ++s) {
    int64_t rank = 0;
    if (P.top_k > 0)
      for (int64_t j = 0; j < S && rank < P.top_k; ++j) rank += ranks_before(p[j], j, p[s], s);
    kept[s] = P.top_k == 0 || rank < P.top_k;
    if (kept[s]) sum += p[s];
  }
  return sum;
}

}  // namespace

template <typename scalar_t>
void route_fwd_cpu(const RouteParams& P, int64_t row_begin, int64_t row_end) {
  const int64_t S = P.num_skills;
  std::vector<scalar_t> p(S), l(S);
  std::unique_ptr<bool[]> kept(new bool[S]);
  scalar_t* weights = static_cast<scalar_t*>(P.weights);
  for (int64_t row = row_begin; row < row_end; ++row) {
    scalar_t* w = weights + row * S;
    if (row_probs(P, row / P.num_heads, row % P.num_heads, p.data(), l.data()) < 0) {
      for (int64_t s = 0; s < S; ++s) w[s] = std::numeric_limits<scalar_t>::quiet_NaN();
      continue;
    }
    const scalar_t denom = select_top_k(P, p.data(), kept.get()) + scalar_t(P.eps);
    for (int64_t s = 0; s < S; ++s) w[s] = kept[s] ? p[s] / denom : scalar_t(0);
  }
}

template <typename scalar_t>
void route_bwd_cpu(const RouteParams& P, int64_t task_begin, int64_t task_end) {
  if (P.mode == RouteMode::kAverage) return;  // constant weights: zero gradient
  const int64_t S = P.num_skills;
  const scalar_t inv_temp = scalar_t(1) / scalar_t(P.temperature);
  std::vector<scalar_t> p(S), l(S), gp(S), dp(S);
  std::unique_ptr<bool[]> kept(new bool[S]);
  const scalar_t* grad_w = static_cast<const scalar_t*>(P.grad_weights);
  scalar_t* grad_l = static_cast<scalar_t*>(P.grad_logits);
  for (int64_t g = 0; g < P.num_groups; ++g) {
    const int64_t task_of_g = load_index(P.task_ids, P.index_type, P.task_ids_stride, g);
    if (task_of_g < task_begin || task_of_g >= task_end) continue;
    for (int64_t k = 0; k < P.num_heads; ++k) {
      const int64_t task = row_probs(P, g, k, p.data(), l.data(), dp.data());
      if (task < 0) continue;
      const scalar_t denom = select_top_k(P, p.data(), kept.get()) + scalar_t(P.eps);
      // w_s = p_s / denom over kept s  =>  dL/dp_s = (gw_s - sum_j gw_j w_j) / denom.
      scalar_t dot = 0;
      for (int64_t s = 0; s < S; ++s) {
        gp[s] = kept[s] ? grad_w[g * P.grad_stride_g + k * P.grad_stride_h + s * P.grad_stride_s] : scalar_t(0);
        dot += gp[s] * p[s] / denom;
      }
      for (int64_t s = 0; s < S; ++s) gp[s] = kept[s] ? (gp[s] - dot) / denom : scalar_t(0);
      scalar_t* out = grad_l + task * P.num_heads * S + k * S;
      if (P.mode == RouteMode::kSoftmax) {
        scalar_t gpp = 0;
        for (int64_t s = 0; s < S; ++s) gpp += gp[s] * p[s];
        for (int64_t s = 0; s < S; ++s) out[s] += p[s] * (gp[s] - gpp) * inv_temp;
      } else {
        for (int64_t s = 0; s < S; ++s)
          if (kept[s]) out[s] += gp[s] * dp[s];
      }
    }
  }
}

template void route_fwd_cpu<float>(const RouteParams&, int64_t, int64_t);
template void route_fwd_cpu<double>(const RouteParams&, int64_t, int64_t);
template void route_bwd_cpu<float>(const RouteParams&, int64_t, int64_t);
template void route_bwd_cpu<double>(const RouteParams&, int64_t, int64_t);

}  // namespace mhr_ops
