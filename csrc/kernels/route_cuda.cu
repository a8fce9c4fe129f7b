// CUDA kernels for route (see route.h): one warp per (group, head) row, the row's probabilities
// in shared memory, one launch per direction.
#include <limits>

#include "cuda_primitives.cuh"
#include "route.h"

namespace mhr_ops {
namespace {

constexpr int kWarpsPerBlock = 4;
// Each warp keeps its row's probabilities in shared memory; staying under the 48 KiB default
// needs no opt-in attribute on any architecture.
constexpr int64_t kMaxSkills = 48 * 1024 / (kWarpsPerBlock * sizeof(double));

// Per-row state shared by the forward and backward kernels.
template <typename scalar_t, typename acc_t>
struct RowContext {
  const RouteParams& P;
  int64_t g, k, task;
  acc_t inv_temp, ceps, tiny;

  __device__ bool valid() const { return task >= 0 && task < P.num_tasks; }
  __device__ acc_t logit(int64_t s) const {
    const scalar_t* logits = static_cast<const scalar_t*>(P.logits);
    return to_acc<acc_t>(ld_global(logits + task * P.logits_stride_t + (k * P.num_skills + s) * P.logits_stride_c));
  }
  __device__ acc_t uniform(int64_t s) const {
    if (P.noise == nullptr) return acc_t(0);
    const scalar_t* noise = static_cast<const scalar_t*>(P.noise);
    return to_acc<acc_t>(ld_global(noise + g * P.noise_stride_g + k * P.noise_stride_h + s * P.noise_stride_s));
  }
};

// Writes the row's pre-top-k probabilities into p[0..S) (shared memory, one warp).
template <typename scalar_t, typename acc_t>
__device__ void warp_row_probs(const RowContext<scalar_t, acc_t>& ctx, acc_t* p, int lane) {
  const int64_t S = ctx.P.num_skills;
  if (ctx.P.mode == RouteMode::kSoftmax) {
    acc_t mx = -std::numeric_limits<acc_t>::infinity();
    for (int64_t s = lane; s < S; s += 32) mx = nan_max(mx, ctx.logit(s) * ctx.inv_temp);
    mx = warp_max(mx);
    acc_t sum = 0;
    for (int64_t s = lane; s < S; s += 32) sum += (p[s] = mhr_exp(ctx.logit(s) * ctx.inv_temp - mx));
    sum = warp_sum(sum);
    for (int64_t s = lane; s < S; s += 32) p[s] /= sum;
  } else {
    const acc_t inv_skills = acc_t(1) / acc_t(S);
    for (int64_t s = lane; s < S; s += 32)
      p[s] = route_prob(ctx.P.mode, ctx.logit(s), ctx.uniform(s), ctx.inv_temp, ctx.ceps, ctx.tiny, inv_skills);
  }
  __syncwarp();
}

// Whether skill s survives top-k (the row's probabilities are in shared memory).
template <typename acc_t>
__device__ bool warp_kept(const RouteParams& P, const acc_t* p, int64_t s) {
  if (P.top_k == 0) return true;
  int64_t rank = 0;
  for (int64_t j = 0; j < P.num_skills && rank < P.top_k; ++j) rank += ranks_before(p[j], j, p[s], s);
  return rank < P.top_k;
}

template <typename scalar_t, typename acc_t>
__device__ RowContext<scalar_t, acc_t> make_row(const RouteParams& P, int64_t row) {
  const int64_t g = row / P.num_heads;
  const int64_t task = load_index(P.task_ids, P.index_type, P.task_ids_stride, g);
  return RowContext<scalar_t, acc_t>{
      P, g, row % P.num_heads, task, acc_t(1) / acc_t(P.temperature), acc_t(P.clamp_eps), acc_t(P.clamp_tiny)};
}

template <typename scalar_t>
__global__ void route_fwd_kernel(const RouteParams P) {
  using acc_t = typename AccType<scalar_t>::type;
  MHR_DYNAMIC_SHARED(acc_t, probs);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  if (row >= P.num_groups * P.num_heads) return;  // uniform across the warp
  const int64_t S = P.num_skills;
  acc_t* p = probs + warp * S;
  scalar_t* w = static_cast<scalar_t*>(P.weights) + row * S;

  const auto ctx = make_row<scalar_t, acc_t>(P, row);
  if (!ctx.valid()) {
    const scalar_t nan = from_acc<scalar_t>(std::numeric_limits<acc_t>::quiet_NaN());
    for (int64_t s = lane; s < S; s += 32) st_global(w + s, nan);
    return;
  }
  warp_row_probs(ctx, p, lane);
  acc_t sum = 0;
  for (int64_t s = lane; s < S; s += 32)
    if (warp_kept(P, p, s)) sum += p[s];
  const acc_t denom = warp_sum(sum) + acc_t(P.eps);
  for (int64_t s = lane; s < S; s += 32)
    st_global(w + s, from_acc<scalar_t>(warp_kept(P, p, s) ? p[s] / denom : acc_t(0)));
}

template <typename scalar_t>
__global__ void route_bwd_kernel(const RouteParams P) {
  using acc_t = typename AccType<scalar_t>::type;
  MHR_DYNAMIC_SHARED(acc_t, probs);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  if (row >= P.num_groups * P.num_heads) return;
  const int64_t S = P.num_skills;
  acc_t* p = probs + warp * S;

  const auto ctx = make_row<scalar_t, acc_t>(P, row);
  if (!ctx.valid()) return;
  warp_row_probs(ctx, p, lane);
  const scalar_t* grad_w = static_cast<const scalar_t*>(P.grad_weights);
  auto grad_at = [&](int64_t s) {
    return to_acc<acc_t>(ld_global(grad_w + ctx.g * P.grad_stride_g + ctx.k * P.grad_stride_h + s * P.grad_stride_s));
  };
  acc_t sum = 0, gw_p = 0;
  for (int64_t s = lane; s < S; s += 32) {
    if (!warp_kept(P, p, s)) continue;
    sum += p[s];
    gw_p += grad_at(s) * p[s];
  }
  const acc_t denom = warp_sum(sum) + acc_t(P.eps);
  const acc_t dot = warp_sum(gw_p) / denom;  // sum_j gw_j w_j
  acc_t* out = static_cast<acc_t*>(P.grad_logits) + ctx.task * P.num_heads * S + ctx.k * S;
  if (P.mode == RouteMode::kSoftmax) {
    // dl_s = p_s (gp_s - sum_j gp_j p_j) / T, gp_s = kept ? (gw_s - dot) / denom : 0.
    acc_t gpp = 0;
    for (int64_t s = lane; s < S; s += 32)
      if (warp_kept(P, p, s)) gpp += (grad_at(s) - dot) / denom * p[s];
    gpp = warp_sum(gpp);
    for (int64_t s = lane; s < S; s += 32) {
      const acc_t gp = warp_kept(P, p, s) ? (grad_at(s) - dot) / denom : acc_t(0);
      atomic_add_global(out + s, p[s] * (gp - gpp) * ctx.inv_temp);
    }
  } else {
    for (int64_t s = lane; s < S; s += 32) {
      if (!warp_kept(P, p, s)) continue;
      const acc_t gp = (grad_at(s) - dot) / denom;
      const acc_t dp = route_prob_grad(P.mode, ctx.logit(s), ctx.uniform(s), ctx.inv_temp, ctx.ceps, ctx.tiny);
      atomic_add_global(out + s, gp * dp);
    }
  }
}

template <typename scalar_t, bool kForward>
int launch(const RouteParams& P, cudaStream_t stream) {
  using acc_t = typename AccType<scalar_t>::type;
  if (!kForward) {  // the backward sums rows into grad_logits: zero it on the same stream
    const size_t bytes = sizeof(acc_t) * P.num_tasks * P.num_heads * P.num_skills;
    const cudaError_t err = bytes ? cudaMemsetAsync(P.grad_logits, 0, bytes, stream) : cudaSuccess;
    if (err != cudaSuccess || P.mode == RouteMode::kAverage) return static_cast<int>(err);
  }
  const int64_t rows = P.num_groups * P.num_heads;
  if (rows == 0 || P.num_skills == 0) return 0;
  if (P.num_skills > kMaxSkills) return static_cast<int>(cudaErrorInvalidValue);
  const int64_t blocks = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  const size_t smem = static_cast<size_t>(kWarpsPerBlock) * P.num_skills * sizeof(acc_t);
  if (kForward)
    MHR_LAUNCH(route_fwd_kernel<scalar_t>, static_cast<unsigned>(blocks), kWarpsPerBlock * 32, smem, stream, P);
  else
    MHR_LAUNCH(route_bwd_kernel<scalar_t>, static_cast<unsigned>(blocks), kWarpsPerBlock * 32, smem, stream, P);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int route_fwd_cuda(const RouteParams& params, DType dtype, void* stream) {
  MHR_DISPATCH_CUDA_FLOAT(dtype, return launch<scalar_t, true>(params, static_cast<cudaStream_t>(stream)));
  return 0;
}

int route_bwd_cuda(const RouteParams& params, DType dtype, void* stream) {
  MHR_DISPATCH_CUDA_FLOAT(dtype, return launch<scalar_t, false>(params, static_cast<cudaStream_t>(stream)));
  return 0;
}

int64_t route_cuda_max_skills() { return kMaxSkills; }

}  // namespace mhr_ops
