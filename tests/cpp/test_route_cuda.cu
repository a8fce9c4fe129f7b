// Standalone test of the CUDA route kernels against the CPU kernels (fp32), every mode, with and
// without top-k, including an out-of-range id. Exits 77 (ctest: skipped) without a CUDA device.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "check.h"
#include "cuda_check.cuh"
#include "route.h"

using mhr_ops::RouteMode;
using mhr_ops::RouteParams;

namespace {

void compare(RouteMode mode, int64_t top_k) {
  const int64_t T = 5, h = 3, S = 37, G = 11;  // S > 32: several skills per lane
  std::vector<float> logits(T * h * S), noise(G * h * S), grad_w(G * h * S);
  for (size_t i = 0; i < logits.size(); ++i) logits[i] = std::sin(1.3f * i) * 3.0f;
  for (size_t i = 0; i < noise.size(); ++i) noise[i] = std::fabs(std::cos(0.7f * i));
  for (size_t i = 0; i < grad_w.size(); ++i) grad_w[i] = std::cos(0.37f * i);
  const std::vector<int64_t> ids = {4, 0, 0, 2, 9, 1, 3, 3, 3, 2, 0};  // 9 is out of range

  RouteParams P;
  P.logits_stride_t = h * S;
  P.logits_stride_c = 1;
  P.task_ids_stride = 1;
  P.noise_stride_g = P.grad_stride_g = h * S;
  P.noise_stride_h = P.grad_stride_h = S;
  P.noise_stride_s = P.grad_stride_s = 1;
  P.num_groups = G;
  P.num_heads = h;
  P.num_skills = S;
  P.num_tasks = T;
  P.mode = mode;
  P.temperature = 0.9;
  P.top_k = top_k;
  P.clamp_eps = 1.1920928955078125e-07;
  P.clamp_tiny = 1.1754943508222875e-38;

  // CPU
  std::vector<float> w_cpu(G * h * S), gl_cpu(T * h * S, 0.0f);
  RouteParams C = P;
  C.logits = logits.data();
  C.task_ids = ids.data();
  C.noise = mode == RouteMode::kRelaxedBernoulli ? noise.data() : nullptr;
  C.weights = w_cpu.data();
  C.grad_weights = grad_w.data();
  C.grad_logits = gl_cpu.data();
  mhr_ops::route_fwd_cpu<float>(C, 0, G * h);
  mhr_ops::route_bwd_cpu<float>(C, 0, T);

  // CUDA
  RouteParams D = P;
  float *d_logits = to_device(logits), *d_noise = to_device(noise), *d_grad_w = to_device(grad_w);
  int64_t* d_ids = to_device(ids);
  float *d_w = nullptr, *d_gl = nullptr;
  cudaMalloc(&d_w, w_cpu.size() * sizeof(float));
  cudaMalloc(&d_gl, gl_cpu.size() * sizeof(float));
  cudaMemset(d_gl, 0xff, gl_cpu.size() * sizeof(float));  // garbage: the launcher must zero it
  D.logits = d_logits;
  D.task_ids = d_ids;
  D.noise = mode == RouteMode::kRelaxedBernoulli ? d_noise : nullptr;
  D.weights = d_w;
  D.grad_weights = d_grad_w;
  D.grad_logits = d_gl;
  EXPECT_TRUE(mhr_ops::route_fwd_cuda(D, mhr_ops::DType::kFloat32, nullptr) == 0);
  EXPECT_TRUE(mhr_ops::route_bwd_cuda(D, mhr_ops::DType::kFloat32, nullptr) == 0);
  EXPECT_TRUE(cudaDeviceSynchronize() == cudaSuccess);
  const auto w_gpu = to_host(d_w, w_cpu.size());
  const auto gl_gpu = to_host(d_gl, gl_cpu.size());
  for (size_t i = 0; i < w_cpu.size(); ++i) {
    if (std::isnan(w_cpu[i]))
      EXPECT_TRUE(std::isnan(w_gpu[i]));
    else
      EXPECT_NEAR(w_gpu[i], w_cpu[i], 2e-6);
  }
  for (size_t i = 0; i < gl_cpu.size(); ++i) EXPECT_NEAR(gl_gpu[i], gl_cpu[i], 2e-5);
  for (void* p : {(void*)d_logits, (void*)d_noise, (void*)d_grad_w, (void*)d_ids, (void*)d_w, (void*)d_gl}) cudaFree(p);
}

}  // namespace

int main() {
  if (const int skip = skip_without_device("test_route_cuda")) return skip;
  for (RouteMode mode : {RouteMode::kSigmoid, RouteMode::kRelaxedBernoulli, RouteMode::kSoftmax, RouteMode::kAverage})
    for (int64_t top_k : {0, 1, 5}) compare(mode, top_k);
  return finish("test_route_cuda");
}
