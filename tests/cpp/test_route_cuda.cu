// The CUDA route kernels (forward and backward) in every dtype (fp16, bf16, fp32, fp64) against
// the CPU kernel run in double on the same rounded inputs: every mode, with and without top-k,
// top-k ties, NaN logits, strided logits and ids, int32 ids, and out-of-range ids (NaN rows in the
// forward, nothing in the backward). Runs on a GPU or under the SIMT emulation; exits 77
// (ctest: skipped) on a real toolkit without a device.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <type_traits>
#include <vector>

#include "check.h"
#include "cuda_check.cuh"
#include "cuda_primitives.cuh"
#include "route.h"

using mhr_ops::DType;
using mhr_ops::RouteMode;
using mhr_ops::RouteParams;

namespace {

struct Dt {
  DType dtype;
  double eps, tiny, tol;  // torch.finfo(dtype).eps / .tiny; comparison tolerance
};
template <typename T>
Dt dt() {
  if (std::is_same<T, __half>::value) return {DType::kFloat16, 0.0009765625, 6.103515625e-05, 4e-3};
  if (std::is_same<T, __nv_bfloat16>::value) return {DType::kBFloat16, 0.0078125, 1.1754943508222875e-38, 2e-2};
  if (std::is_same<T, float>::value) return {DType::kFloat32, 1.1920928955078125e-07, 1.1754943508222875e-38, 2e-5};
  return {DType::kFloat64, 2.220446049250313e-16, 2.2250738585072014e-308, 1e-12};
}

template <typename T>
void compare(RouteMode mode, int64_t top_k, bool ties, bool strided, bool int32_ids) {
  const Dt d = dt<T>();
  const int64_t T_ = 5, h = 3, S = 37, G = 11;  // S > 32: several skills per lane
  const int64_t col = strided ? 2 : 1;          // logits column stride, ids stride
  std::vector<double> logits(T_ * h * S), noise(G * h * S), grad_w(G * h * S);
  for (size_t i = 0; i < logits.size(); ++i)
    logits[i] = to_double(from_double<T>(ties ? std::floor(std::sin(1.3 * i) * 2.0) : std::sin(1.3 * i) * 3.0));
  if (!ties) logits[2 * h * S + S + 4] = NAN;  // task 2, head 1: a NaN logit
  for (size_t i = 0; i < noise.size(); ++i) noise[i] = to_double(from_double<T>(std::fabs(std::cos(0.7 * i)) * 0.999));
  for (size_t i = 0; i < grad_w.size(); ++i) grad_w[i] = to_double(from_double<T>(std::cos(0.37 * i)));
  const std::vector<int64_t> ids = {4, 0, 0, 2, 9, 1, 3, 3, -1, 2, 0};  // 9 and -1 are out of range

  RouteParams P;
  P.logits_stride_t = h * S * col;
  P.logits_stride_c = col;
  P.task_ids_stride = col;
  P.index_type = int32_ids ? mhr_ops::IndexType::kInt32 : mhr_ops::IndexType::kInt64;
  P.noise_stride_g = P.grad_stride_g = h * S;
  P.noise_stride_h = P.grad_stride_h = S;
  P.noise_stride_s = P.grad_stride_s = 1;
  P.num_groups = G;
  P.num_heads = h;
  P.num_skills = S;
  P.num_tasks = T_;
  P.mode = mode;
  P.temperature = 0.9;
  P.top_k = top_k;
  P.clamp_eps = d.eps;
  P.clamp_tiny = d.tiny;

  // Host reference: the CPU kernel in double, dense logits.
  std::vector<double> w_ref(G * h * S), gl_ref(T_ * h * S, 0.0);
  RouteParams C = P;
  C.logits_stride_t = h * S;
  C.logits_stride_c = 1;
  C.task_ids_stride = 1;
  C.index_type = mhr_ops::IndexType::kInt64;
  C.logits = logits.data();
  C.task_ids = ids.data();
  C.noise = mode == RouteMode::kRelaxedBernoulli ? noise.data() : nullptr;
  C.weights = w_ref.data();
  C.grad_weights = grad_w.data();
  C.grad_logits = gl_ref.data();
  mhr_ops::route_fwd_cpu<double>(C, 0, G * h);
  mhr_ops::route_bwd_cpu<double>(C, 0, T_);

  // Device inputs in T (logits strided when asked), ids strided.
  std::vector<T> lg(T_ * h * S * col, from_double<T>(NAN)), nz(noise.size()), gw(grad_w.size());
  for (size_t i = 0; i < logits.size(); ++i) lg[i * col] = from_double<T>(logits[i]);
  for (size_t i = 0; i < noise.size(); ++i) nz[i] = from_double<T>(noise[i]);
  for (size_t i = 0; i < grad_w.size(); ++i) gw[i] = from_double<T>(grad_w[i]);
  T *d_logits = to_device(lg), *d_noise = to_device(nz), *d_grad_w = to_device(gw);
  void* d_ids = nullptr;
  if (int32_ids) {
    std::vector<int32_t> v(ids.size() * col, 0);
    for (size_t i = 0; i < ids.size(); ++i) v[i * col] = static_cast<int32_t>(ids[i]);
    d_ids = to_device(v);
  } else {
    std::vector<int64_t> v(ids.size() * col, 0);
    for (size_t i = 0; i < ids.size(); ++i) v[i * col] = ids[i];
    d_ids = to_device(v);
  }
  using acc_t = typename mhr_ops::AccType<T>::type;
  T* d_w = nullptr;
  acc_t* d_gl = nullptr;
  cudaMalloc(&d_w, w_ref.size() * sizeof(T));
  cudaMalloc(&d_gl, gl_ref.size() * sizeof(acc_t));
  cudaMemset(d_gl, 0xff, gl_ref.size() * sizeof(acc_t));  // garbage: the launcher must zero it
  RouteParams D = P;
  D.logits = d_logits;
  D.task_ids = d_ids;
  D.noise = mode == RouteMode::kRelaxedBernoulli ? d_noise : nullptr;
  D.weights = d_w;
  D.grad_weights = d_grad_w;
  D.grad_logits = d_gl;
  EXPECT_TRUE(mhr_ops::route_fwd_cuda(D, d.dtype, nullptr) == 0);
  EXPECT_TRUE(mhr_ops::route_bwd_cuda(D, d.dtype, nullptr) == 0);
  EXPECT_TRUE(cudaDeviceSynchronize() == cudaSuccess);
  const auto w_dev = to_host(d_w, w_ref.size());
  const auto gl_dev = to_host(d_gl, gl_ref.size());
  int bad = 0;
  auto check = [&](const char* what, size_t i, double got, double ref, double tol) {
    const bool ok = std::isnan(ref) ? std::isnan(got) : std::fabs(got - ref) <= tol;
    if (!ok && bad++ < 3)
      std::fprintf(stderr, "dtype %d mode %d top_k %ld ties %d strided %d: %s[%zu] = %.9g, expected %.9g\n",
                   static_cast<int>(d.dtype), static_cast<int>(mode), static_cast<long>(top_k), ties, strided, what, i,
                   got, ref);
  };
  for (size_t i = 0; i < w_ref.size(); ++i) check("weights", i, to_double(w_dev[i]), w_ref[i], d.tol);
  for (size_t i = 0; i < gl_ref.size(); ++i)
    check("grad_logits", i, static_cast<double>(gl_dev[i]), gl_ref[i], d.tol * 10 * (1 + std::fabs(gl_ref[i])));
  if (bad) ++g_failures;
  for (void* p : {(void*)d_logits, (void*)d_noise, (void*)d_grad_w, d_ids, (void*)d_w, (void*)d_gl}) cudaFree(p);
}

template <typename T>
void all_modes(bool full) {
  for (RouteMode mode : {RouteMode::kSigmoid, RouteMode::kRelaxedBernoulli, RouteMode::kSoftmax, RouteMode::kAverage})
    for (int64_t top_k : {0, 1, 5}) {
      compare<T>(mode, top_k, /*ties=*/false, /*strided=*/false, /*int32_ids=*/false);
      if (full || top_k == 5) compare<T>(mode, top_k, /*ties=*/true, /*strided=*/true, /*int32_ids=*/true);
    }
}

}  // namespace

int main() {
  if (const int skip = skip_without_device("test_route_cuda")) return skip;
  all_modes<float>(true);
  all_modes<double>(true);
  all_modes<__half>(false);
  all_modes<__nv_bfloat16>(false);
  return finish("test_route_cuda");
}
