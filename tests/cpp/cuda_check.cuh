// Host <-> device helpers for the standalone CUDA kernel tests.
#pragma once

#include <cuda_runtime.h>

#include <cstdio>
#include <vector>

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
