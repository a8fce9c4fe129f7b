// route: per-task routing weights over a skill inventory (SPEC section 2). Torch-free.
//
// For each routing group g and head k, with l = logits[task_ids[g], k*S : (k+1)*S]:
//   p       = mode(l)                       (sigmoid, relaxed Bernoulli, softmax or average)
//   p       = keep the top_k largest p, ties to the lower skill index, zero the rest
//   weights = p / (sum_s p + eps)
#pragma once

#include <cstdint>

#include "common.h"

namespace mhr_ops {

enum class RouteMode : int { kSigmoid = 0, kRelaxedBernoulli = 1, kSoftmax = 2, kAverage = 3 };

struct RouteParams {
  // logits: [num_tasks, num_heads * num_skills], element type scalar_t. Strides in elements.
  const void* logits = nullptr;
  int64_t logits_stride_t = 0;
  int64_t logits_stride_c = 0;

  // task_ids: [num_groups] integers of index_type, stride in elements. An id outside
  // [0, num_tasks) is never dereferenced: its forward row is NaN, its backward row adds nothing.
  const void* task_ids = nullptr;
  IndexType index_type = IndexType::kInt64;
  int64_t task_ids_stride = 0;

  // noise: [num_groups, num_heads, num_skills] uniforms in [0, 1), scalar_t; only read in
  // kRelaxedBernoulli mode (null otherwise). Strides in elements.
  const void* noise = nullptr;
  int64_t noise_stride_g = 0;
  int64_t noise_stride_h = 0;
  int64_t noise_stride_s = 0;

  // weights (forward output): [num_groups, num_heads, num_skills], contiguous, scalar_t.
  void* weights = nullptr;

  // grad_weights (backward input): [num_groups, num_heads, num_skills], scalar_t. Strides in elements.
  const void* grad_weights = nullptr;
  int64_t grad_stride_g = 0;
  int64_t grad_stride_h = 0;
  int64_t grad_stride_s = 0;

  // grad_logits (backward output): [num_tasks, num_heads * num_skills], contiguous, in the
  // accumulation type (float, or double when scalar_t is double). Rows of groups that share a
  // task are summed into it: the CPU kernel expects it zeroed, the CUDA launcher zeroes it
  // itself (an async memset on the same stream, then the one kernel).
  void* grad_logits = nullptr;

  int64_t num_groups = 0;  // G
  int64_t num_heads = 0;   // h
  int64_t num_skills = 0;  // S
  int64_t num_tasks = 0;   // T

  RouteMode mode = RouteMode::kSigmoid;
  double temperature = 1.0;  // > 0; divides the relaxed-Bernoulli and softmax logits
  int64_t top_k = 0;         // 0: keep every skill; else 1..num_skills
  double eps = 1e-12;        // normalization epsilon
  double clamp_eps = 0.0;    // torch.finfo(logits dtype).eps: RelaxedBernoulli's probability clamp
  double clamp_tiny = 0.0;   // torch.finfo(logits dtype).tiny: RelaxedBernoulli's output clip
};

// CPU kernels (route_cpu.cpp); scalar_t is float or double. Each call covers a slice, so callers
// can split the work across threads with no two writing the same element:
//   forward:  rows [row_begin, row_end) of the G*h (group, head) rows;
//   backward: the rows whose task is in [task_begin, task_end), each task's gradient summed in
//             group order (deterministic).
template <typename scalar_t>
void route_fwd_cpu(const RouteParams& params, int64_t row_begin, int64_t row_end);
template <typename scalar_t>
void route_bwd_cpu(const RouteParams& params, int64_t task_begin, int64_t task_end);

#if defined(MHR_OPS_WITH_CUDA)
// CUDA kernels (route_cuda.cu); scalar_t is float, double, __half or __nv_bfloat16, passed as
// DType. One launch per direction on `stream` (a cudaStream_t), no host synchronization.
// Returns a cudaError_t value (0 on success).
int route_fwd_cuda(const RouteParams& params, DType dtype, void* stream);
int route_bwd_cuda(const RouteParams& params, DType dtype, void* stream);
// Largest num_skills the CUDA kernels take (the per-row probabilities live in shared memory).
int64_t route_cuda_max_skills();
#endif

// ---- Per-element math shared by the CPU and CUDA kernels. ----

// Routing probability of one skill before top-k and normalization (not used for softmax, which
// needs the row max and sum), and its derivative d p / d l in `grad`: the same chain autograd
// takes through PEFT's ops, clamps included (a clamped value passes no gradient). `u` is the
// uniform noise (relaxed Bernoulli only). One formula for both, so the backward pays the
// transcendentals once; route_prob / route_prob_grad take one half (the other is dead code).
template <typename acc_t>
MHR_HD acc_t route_prob_with_grad(RouteMode mode, acc_t l, acc_t u, acc_t inv_temp, acc_t ceps, acc_t tiny,
                                  acc_t inv_skills, acc_t* grad) {
  switch (mode) {
    case RouteMode::kSigmoid: {
      const acc_t pr = mhr_sigmoid(l);
      *grad = pr * (acc_t(1) - pr);
      return pr;
    }
    case RouteMode::kRelaxedBernoulli: {
      // torch.distributions.RelaxedBernoulli(temperature, logits=l).rsample(), term order kept.
      const acc_t pr = mhr_sigmoid(l);
      const acc_t pc = mhr_clamp(pr, ceps, acc_t(1) - ceps);
      const acc_t uc = mhr_clamp(u, ceps, acc_t(1) - ceps);
      const acc_t z = (mhr_log(uc) - mhr_log1p(-uc) + mhr_log(pc) - mhr_log1p(-pc)) * inv_temp;
      const acc_t q = mhr_sigmoid(z);
      // where pr passes its clamp, pc == pr: the logit term is the unclamped one
      const bool passes = pr >= ceps && pr <= acc_t(1) - ceps && q >= tiny && q <= acc_t(1) - ceps;
      const acc_t dz = (acc_t(1) / pr + acc_t(1) / (acc_t(1) - pr)) * inv_temp;
      *grad = passes ? q * (acc_t(1) - q) * dz * (pr * (acc_t(1) - pr)) : acc_t(0);
      return mhr_clamp(q, tiny, acc_t(1) - ceps);
    }
    case RouteMode::kAverage:
      *grad = acc_t(0);
      return inv_skills;
    default:
      *grad = acc_t(0);
      return l;  // softmax is handled per row by the caller
  }
}

template <typename acc_t>
MHR_HD acc_t route_prob(RouteMode mode, acc_t l, acc_t u, acc_t inv_temp, acc_t ceps, acc_t tiny, acc_t inv_skills) {
  acc_t unused;
  return route_prob_with_grad(mode, l, u, inv_temp, ceps, tiny, inv_skills, &unused);
}

template <typename acc_t>
MHR_HD acc_t route_prob_grad(RouteMode mode, acc_t l, acc_t u, acc_t inv_temp, acc_t ceps, acc_t tiny) {
  acc_t grad;
  route_prob_with_grad(mode, l, u, inv_temp, ceps, tiny, acc_t(0), &grad);
  return grad;
}

}  // namespace mhr_ops
