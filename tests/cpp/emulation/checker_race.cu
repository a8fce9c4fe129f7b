// Checks the checker: with MHR_CHECKER_BUG the barrier between a shared-memory write and another
// thread's read is missing, and the TSan build must report the race (ctest WILL_FAIL); without it
// the same kernel must run clean.
#include <vector>

#include "../check.h"
#include "../cuda_check.cuh"
#include "cuda_primitives.cuh"

__global__ void neighbour_kernel(float* out) {
  MHR_SHARED(float, buf, [128]);
  const int t = threadIdx.x;
  buf[t] = static_cast<float>(t);
#if !MHR_CHECKER_BUG
  __syncthreads();
#endif
  out[t] = buf[(t + 1) % 128];
}

int main() {
  float* d = nullptr;
  cudaMalloc(&d, 128 * sizeof(float));
  MHR_LAUNCH(neighbour_kernel, 4, 128, 0, nullptr, d);
  EXPECT_TRUE(cudaGetLastError() == cudaSuccess);
  const std::vector<float> h = to_host(d, 128);
#if !MHR_CHECKER_BUG
  for (int t = 0; t < 128; ++t) EXPECT_TRUE(h[t] == static_cast<float>((t + 1) % 128));
#endif
  cudaFree(d);
  return finish("checker_race");
}
