// Host <-> device helpers for the standalone CUDA kernel tests.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <type_traits>
#include <vector>

#include "check.h"
#include "cuda_primitives.cuh"

template <typename T>
T* to_device(const std::vector<T>& v) {
  T* d = nullptr;
  cudaMalloc(&d, v.size() * sizeof(T));
  cudaMemcpy(d, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice);
  return d;
}

template <typename T>
std::vector<T> to_host(const T* d, size_t n) {
  std::vector<T> v(n);
  cudaMemcpy(v.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost);
  return v;
}

// ctest's skip code (SKIP_RETURN_CODE 77) when no CUDA device is visible, else 0.
inline int skip_without_device(const char* name) {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    std::printf("%s: no CUDA device, skipped\n", name);
    return 77;
  }
  return 0;
}

// Host-side values of any kernel element type (half, bfloat16, float, double) to and from double:
// tests hold inputs and references in double, rounded through the kernel's storage type.
template <typename T>
T from_double(double v) {
  if constexpr (std::is_same<T, float>::value || std::is_same<T, double>::value)
    return static_cast<T>(v);
  else
    return mhr_ops::convert<T>(static_cast<float>(v));
}
template <typename T>
double to_double(T v) {
  if constexpr (std::is_same<T, float>::value || std::is_same<T, double>::value)
    return static_cast<double>(v);
  else
    return static_cast<double>(mhr_ops::convert<float>(v));
}
template <typename T>
constexpr mhr_ops::DType dtype_of() {
  return std::is_same<T, __half>::value          ? mhr_ops::DType::kFloat16
         : std::is_same<T, __nv_bfloat16>::value ? mhr_ops::DType::kBFloat16
         : std::is_same<T, float>::value         ? mhr_ops::DType::kFloat32
                                                 : mhr_ops::DType::kFloat64;
}

// Tolerance, relative to the values' scale, of a result stored in T.
template <typename T>
double stored_tol() {
  return std::is_same<T, __half>::value          ? 3e-3
         : std::is_same<T, __nv_bfloat16>::value ? 2e-2
         : std::is_same<T, float>::value         ? 2e-5
                                                 : 1e-12;
}

// Device copy of `v` (values in double) in T, element i at i * stride, the gaps NaN; at least one
// element, so that an empty input still has an address.
template <typename T>
T* device_strided(const std::vector<double>& v, int64_t stride = 1) {
  std::vector<T> h(std::max<size_t>(1, v.size() * stride), from_double<T>(NAN));
  for (size_t i = 0; i < v.size(); ++i) h[i * stride] = from_double<T>(v[i]);
  return to_device(h);
}

// n values amp * sin(a i + b), rounded through T: test inputs a kernel in T reads exactly.
template <typename T>
std::vector<double> rounded(size_t n, double a, double b, double amp) {
  std::vector<double> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = to_double(from_double<T>(amp * std::sin(a * static_cast<double>(i) + b)));
  return v;
}

// One compared element: NaN where the reference is NaN, else within `tolerance`; the first 8
// mismatches of a test are printed.
inline void expect_close(const char* what, const char* name, size_t i, double got, double ref, double tolerance) {
  static int reported = 0;
  const bool ok = std::isnan(ref) ? std::isnan(got) : std::isinf(ref) ? got == ref : std::fabs(got - ref) <= tolerance;
  if (!ok) {
    if (reported++ < 8) std::fprintf(stderr, "%s %s[%zu]: got %.9g, expected %.9g\n", name, what, i, got, ref);
    ++g_failures;
  }
}
