// Checks the checker: with MHR_CHECKER_BUG the kernel reads one element past its input buffer,
// and the ASan build must report it (ctest WILL_FAIL); without it the kernel must run clean.
#include <vector>

#include "../check.h"
#include "../cuda_check.cuh"
#include "cuda_primitives.cuh"

__global__ void shift_kernel(const float* x, float* y, int n) {
  const int i = threadIdx.x + blockIdx.x * blockDim.x;
#if MHR_CHECKER_BUG
  if (i < n) y[i] = x[i + 1];  // reads x[n] in the last thread
#else
  if (i < n) y[i] = i + 1 < n ? x[i + 1] : 0.0f;
#endif
}

int main() {
  const int n = 100;
  std::vector<float> x(n);
  for (int i = 0; i < n; ++i) x[i] = static_cast<float>(i);
  float* dx = to_device(x);
  float* dy = nullptr;
  cudaMalloc(&dy, n * sizeof(float));
  MHR_LAUNCH(shift_kernel, 2, 64, 0, nullptr, dx, dy, n);
  EXPECT_TRUE(cudaGetLastError() == cudaSuccess);
  const std::vector<float> y = to_host(dy, n);
  for (int i = 0; i + 1 < n; ++i) EXPECT_TRUE(y[i] == static_cast<float>(i + 1));
  cudaFree(dx);
  cudaFree(dy);
  return finish("checker_overflow");
}
