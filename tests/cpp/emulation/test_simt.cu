// Tests of the SIMT emulation itself (csrc/emulation/simt.h): index variables, barriers and their
// reductions, warp collectives, atomics, shared memory, launch limits, and the errors it reports
// (divergent barrier, deadlock, masks naming exited lanes, too much shared memory). Built only
// with -DMHR_OPS_CUDA_EMULATION=ON.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "../check.h"
#include "../cuda_check.cuh"
#include "cuda_primitives.cuh"

namespace {

// --- kernels -----------------------------------------------------------------------------------

__global__ void index_kernel(int* out) {
  const unsigned t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const unsigned b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const unsigned threads = blockDim.x * blockDim.y * blockDim.z;
  out[b * threads + t] = static_cast<int>(b * 1000 + t);
}

// Threads with threadIdx.x >= live_threads return first; the barriers still complete.
__global__ void barrier_kernel(int* out, int live_threads) {
  MHR_SHARED(int, slots, [256]);
  const int t = threadIdx.x;
  if (t >= live_threads) return;
  slots[t] = t;
  __syncthreads();
  out[0 * 256 + t] = slots[(t + 1) % live_threads];  // written by another thread before the barrier
  out[1 * 256 + t] = __syncthreads_count(t % 3 == 0);
  out[2 * 256 + t] = __syncthreads_or(t == live_threads - 1);
  out[3 * 256 + t] = __syncthreads_and(t < live_threads);
  out[4 * 256 + t] = __syncthreads_and(t != 5);
  out[5 * 256 + t] = __syncthreads_or(0);
}

__global__ void shuffle_kernel(int* out, double* out64) {
  const int lane = threadIdx.x % 32;
  const unsigned full = 0xffffffffu;
  int* o = out + threadIdx.x * 8;
  o[0] = __shfl_sync(full, lane * 10, 7);            // broadcast lane 7
  o[1] = __shfl_sync(full, lane * 10, lane + 3, 8);  // within groups of 8
  o[2] = __shfl_up_sync(full, lane * 10, 3);         // lanes 0..2 keep their own
  o[3] = __shfl_down_sync(full, lane * 10, 5, 16);   // lanes 11..15, 27..31 keep their own
  o[4] = __shfl_xor_sync(full, lane * 10, 1);
  o[5] = static_cast<int>(__ballot_sync(full, lane % 4 == 0));
  o[6] = __any_sync(full, lane == 31) + 2 * __all_sync(full, lane < 31);
  // Two halves of the warp shuffle with their own masks at the same time.
  const unsigned half = lane < 16 ? 0x0000ffffu : 0xffff0000u;
  o[7] = __shfl_sync(half, lane * 10, 15 - lane % 16, 16);
  out64[threadIdx.x] = __shfl_xor_sync(full, 0.5 + lane, 16);  // 64-bit values
  __syncwarp();
}

__global__ void atomic_kernel(int* i32, long long* i64, float* f32, double* f64) {
  const int t = threadIdx.x + blockIdx.x * blockDim.x;
  atomicAdd(i32, 1);
  atomicAdd(i64, 1ll << 33);
  atomicAdd(f32, 0.5f);
  atomicAdd(f64, 0.25);
  atomicMax(i32 + 1, t);
  atomicMin(i32 + 2, -t);
  atomicMax(f64 + 1, static_cast<double>(t));
  atomicMin(f32 + 1, static_cast<float>(-t));
  atomicCAS(i64 + 1, 0ll, static_cast<long long>(t + 1));  // exactly one thread wins
}

__global__ void poison_kernel(float* f, int* i) {
  MHR_SHARED(float, never_written, [4]);
  MHR_SHARED(int, ints, [4]);
  if (threadIdx.x == 0) {
    f[0] = never_written[2];
    i[0] = ints[3];
  }
}

__global__ void dynamic_kernel(double* out, int n) {
  MHR_DYNAMIC_SHARED(double, buf);
  for (int i = threadIdx.x; i < n; i += blockDim.x) buf[i] = i;
  __syncthreads();
  if (threadIdx.x == 0) {
    double s = 0;
    for (int i = 0; i < n; ++i) s += buf[i];
    out[0] = s;
    out[1] = (reinterpret_cast<uintptr_t>(buf) % 16 == 0) ? 1.0 : 0.0;
  }
}

__global__ void divergent_kernel(int* out) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

__global__ void deadlock_kernel(int* out) {
  // Lane 0 waits for lane 1 in a shuffle; lane 1 waits at a barrier that needs lane 0.
  if (threadIdx.x == 0) out[0] = __shfl_sync(0x3u, 1, 1);
  if (threadIdx.x != 0) __syncthreads();
}

__global__ void exited_lane_kernel(int* out) {
  if (threadIdx.x >= 16) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1, 1);
}

__global__ void big_static_kernel(float* out) {
  MHR_SHARED(float, big, [13 * 1024]);  // 52 KiB of static shared memory
  big[threadIdx.x] = 1.0f;
  out[threadIdx.x] = big[threadIdx.x];
}

// --- checks ------------------------------------------------------------------------------------

void test_indices() {
  const dim3 grid(2, 3, 2), block(4, 2, 3);
  const int blocks = 12, threads = 24;
  int* d = nullptr;
  cudaMalloc(&d, sizeof(int) * blocks * threads);
  MHR_LAUNCH(index_kernel, grid, block, 0, nullptr, d);
  EXPECT_TRUE(cudaGetLastError() == cudaSuccess);
  const std::vector<int> h = to_host(d, blocks * threads);
  for (int b = 0; b < blocks; ++b)
    for (int t = 0; t < threads; ++t) EXPECT_TRUE(h[b * threads + t] == b * 1000 + t);
  cudaFree(d);
}

void test_barriers() {
  for (int live : {256, 200, 37}) {
    int* d = nullptr;
    cudaMalloc(&d, sizeof(int) * 6 * 256);
    MHR_LAUNCH(barrier_kernel, 1, 256, 0, nullptr, d, live);
    EXPECT_TRUE(cudaGetLastError() == cudaSuccess);
    const std::vector<int> h = to_host(d, 6 * 256);
    for (int t = 0; t < live; ++t) {
      EXPECT_TRUE(h[t] == (t + 1) % live);
      EXPECT_TRUE(h[256 + t] == (live + 2) / 3);
      EXPECT_TRUE(h[2 * 256 + t] == 1);
      EXPECT_TRUE(h[3 * 256 + t] == 1);
      EXPECT_TRUE(h[4 * 256 + t] == 0);
      EXPECT_TRUE(h[5 * 256 + t] == 0);
    }
    cudaFree(d);
  }
}

void test_shuffles() {
  int* d = nullptr;
  double* d64 = nullptr;
  cudaMalloc(&d, sizeof(int) * 64 * 8);
  cudaMalloc(&d64, sizeof(double) * 64);
  MHR_LAUNCH(shuffle_kernel, 1, 64, 0, nullptr, d, d64);
  EXPECT_TRUE(cudaGetLastError() == cudaSuccess);
  const std::vector<int> h = to_host(d, 64 * 8);
  const std::vector<double> h64 = to_host(d64, 64);
  for (int t = 0; t < 64; ++t) {
    const int lane = t % 32;
    const int* o = h.data() + t * 8;
    EXPECT_TRUE(o[0] == 70);
    EXPECT_TRUE(o[1] == ((lane & ~7) + (lane + 3) % 8) * 10);
    EXPECT_TRUE(o[2] == (lane >= 3 ? lane - 3 : lane) * 10);
    EXPECT_TRUE(o[3] == ((lane % 16) + 5 < 16 ? lane + 5 : lane) * 10);
    EXPECT_TRUE(o[4] == (lane ^ 1) * 10);
    EXPECT_TRUE(static_cast<unsigned>(o[5]) == 0x11111111u);
    EXPECT_TRUE(o[6] == 1);
    EXPECT_TRUE(o[7] == ((lane & ~15) + 15 - lane % 16) * 10);
    EXPECT_TRUE(h64[t] == 0.5 + (lane ^ 16));
  }
  cudaFree(d);
  cudaFree(d64);
}

void test_atomics() {
  int* i32 = nullptr;
  long long* i64 = nullptr;
  float* f32 = nullptr;
  double* f64 = nullptr;
  cudaMalloc(&i32, sizeof(int) * 3);
  cudaMalloc(&i64, sizeof(long long) * 2);
  cudaMalloc(&f32, sizeof(float) * 2);
  cudaMalloc(&f64, sizeof(double) * 2);
  cudaMemset(i32, 0, sizeof(int) * 3);
  cudaMemset(i64, 0, sizeof(long long) * 2);
  cudaMemset(f32, 0, sizeof(float) * 2);
  cudaMemset(f64, 0, sizeof(double) * 2);
  MHR_LAUNCH(atomic_kernel, 3, 96, 0, nullptr, i32, i64, f32, f64);
  EXPECT_TRUE(cudaGetLastError() == cudaSuccess);
  const auto hi = to_host(i32, 3);
  const auto hl = to_host(i64, 2);
  const auto hf = to_host(f32, 2);
  const auto hd = to_host(f64, 2);
  EXPECT_TRUE(hi[0] == 288 && hi[1] == 287 && hi[2] == -287);
  EXPECT_TRUE(hl[0] == 288ll << 33);
  EXPECT_TRUE(hl[1] >= 1 && hl[1] <= 288);
  EXPECT_TRUE(hf[0] == 144.0f && hf[1] == -287.0f);
  EXPECT_TRUE(hd[0] == 72.0 && hd[1] == 287.0);
  cudaFree(i32);
  cudaFree(i64);
  cudaFree(f32);
  cudaFree(f64);
}

void test_shared_memory() {
  float* f = nullptr;
  int* i = nullptr;
  cudaMalloc(&f, sizeof(float));
  cudaMalloc(&i, sizeof(int));
  MHR_LAUNCH(poison_kernel, 1, 32, 0, nullptr, f, i);
  EXPECT_TRUE(cudaGetLastError() == cudaSuccess);
  EXPECT_TRUE(std::isnan(to_host(f, 1)[0]));  // uninitialised shared memory reads as NaN
  EXPECT_TRUE(to_host(i, 1)[0] == -1);
  cudaFree(f);
  cudaFree(i);

  double* out = nullptr;
  cudaMalloc(&out, 2 * sizeof(double));
  const int n = 1000;  // 8000 bytes of dynamic shared memory
  MHR_LAUNCH(dynamic_kernel, 2, 128, n * sizeof(double), nullptr, out, n);
  EXPECT_TRUE(cudaGetLastError() == cudaSuccess);
  auto h = to_host(out, 2);
  EXPECT_TRUE(h[0] == 0.5 * n * (n - 1) && h[1] == 1.0);

  // 64 KiB needs the opt-in attribute; the error is not sticky.
  const int big = 8192;
  MHR_LAUNCH(dynamic_kernel, 1, 128, big * sizeof(double), nullptr, out, big);
  EXPECT_TRUE(cudaGetLastError() == cudaErrorInvalidValue);
  EXPECT_TRUE(cudaGetLastError() == cudaSuccess);
  EXPECT_TRUE(cudaFuncSetAttribute(dynamic_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 228 * 1024) ==
              cudaErrorInvalidValue);
  EXPECT_TRUE(cudaFuncSetAttribute(dynamic_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 64 * 1024) ==
              cudaSuccess);
  MHR_LAUNCH(dynamic_kernel, 1, 128, big * sizeof(double), nullptr, out, big);
  EXPECT_TRUE(cudaGetLastError() == cudaSuccess);
  h = to_host(out, 2);
  EXPECT_TRUE(h[0] == 0.5 * big * (big - 1));
  cudaFree(out);
}

void test_launch_limits() {
  int* d = nullptr;
  cudaMalloc(&d, sizeof(int) * 2048);
  MHR_LAUNCH(index_kernel, 1, 1025, 0, nullptr, d);
  EXPECT_TRUE(cudaGetLastError() == cudaErrorInvalidConfiguration);
  MHR_LAUNCH(index_kernel, dim3(1, 65536), 1, 0, nullptr, d);
  EXPECT_TRUE(cudaGetLastError() == cudaErrorInvalidConfiguration);
  MHR_LAUNCH(index_kernel, 1, dim3(1, 1, 65), 0, nullptr, d);
  EXPECT_TRUE(cudaGetLastError() == cudaErrorInvalidConfiguration);
  MHR_LAUNCH(index_kernel, 2, 1024, 0, nullptr, d);  // limits are not sticky
  EXPECT_TRUE(cudaGetLastError() == cudaSuccess);
  int v = 0;
  EXPECT_TRUE(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, 0) == cudaSuccess && v == 132);
  EXPECT_TRUE(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, 0) == cudaSuccess && v == 227 * 1024);
  cudaFree(d);
}

// A fault inside a kernel is sticky (as on a device) until cudaDeviceReset.
void expect_fault(const char* what, const char* kernel) {
  EXPECT_TRUE(cudaGetLastError() == cudaErrorLaunchFailure);
  const char* msg = mhr_emu::last_error_message();
  if (std::strstr(msg, what) == nullptr || std::strstr(msg, kernel) == nullptr) {
    std::fprintf(stderr, "expected a message with '%s' and '%s', got '%s'\n", what, kernel, msg);
    ++g_failures;
  }
  int* d = nullptr;
  cudaMalloc(&d, sizeof(int) * 64);
  MHR_LAUNCH(index_kernel, 1, 32, 0, nullptr, d);  // refused while the fault stands
  EXPECT_TRUE(cudaGetLastError() == cudaErrorLaunchFailure);
  EXPECT_TRUE(cudaDeviceReset() == cudaSuccess);
  MHR_LAUNCH(index_kernel, 1, 32, 0, nullptr, d);
  EXPECT_TRUE(cudaGetLastError() == cudaSuccess);
  cudaFree(d);
}

void test_faults() {
  int* d = nullptr;
  float* f = nullptr;
  cudaMalloc(&d, sizeof(int) * 64);
  cudaMalloc(&f, sizeof(float) * 64);
  MHR_LAUNCH(divergent_kernel, 2, 64, 0, nullptr, d);
  expect_fault("divergent barrier", "divergent_kernel");
  MHR_LAUNCH(deadlock_kernel, 1, 64, 0, nullptr, d);
  expect_fault("deadlock", "deadlock_kernel");
  MHR_LAUNCH(exited_lane_kernel, 1, 32, 0, nullptr, d);
  expect_fault("exited", "exited_lane_kernel");
  MHR_LAUNCH(big_static_kernel, 1, 32, 0, nullptr, f);
  expect_fault("exceeds the limit", "big_static_kernel");
  cudaFree(d);
  cudaFree(f);
}

}  // namespace

int main() {
  setenv("MHR_EMU_DEADLOCK_SECONDS", "0.5", 1);
  test_indices();
  test_barriers();
  test_shuffles();
  test_atomics();
  test_shared_memory();
  test_launch_limits();
  test_faults();
  return finish("test_simt");
}
