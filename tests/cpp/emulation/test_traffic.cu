// Tests of the emulation's counted traffic (csrc/emulation/traffic.h): kernels whose bytes,
// distinct sectors, warp requests and tensor-core flops are known exactly. Built only with
// -DMHR_OPS_CUDA_EMULATION=ON. With --counting-from-env it checks instead that
// MHR_EMU_COUNT_TRAFFIC=1 (set by ctest) switches counting on from the start.
#include <cinttypes>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../check.h"
#include "../cuda_check.cuh"
#include "cuda_primitives.cuh"
#include "mma.cuh"

#define EXPECT_EQ_U64(a, b)                                                                                        \
  do {                                                                                                             \
    const uint64_t a_ = (a), b_ = (b);                                                                             \
    if (a_ != b_) {                                                                                                \
      std::fprintf(stderr, "%s:%d: %s = %" PRIu64 ", expected %s = %" PRIu64 "\n", __FILE__, __LINE__, #a, a_, #b, \
                   b_);                                                                                            \
      ++g_failures;                                                                                                \
    }                                                                                                              \
  } while (0)

namespace {

using mhr_emu::GlobalAccess;
using mhr_emu::LaunchTraffic;
constexpr int kLoad = static_cast<int>(GlobalAccess::kLoad);
constexpr int kStore = static_cast<int>(GlobalAccess::kStore);
constexpr int kAtomic = static_cast<int>(GlobalAccess::kAtomic);

// --- kernels -----------------------------------------------------------------------------------

// out[i] = in[i * stride], i the global thread index.
template <typename T>
__global__ void copy_kernel(const T* in, T* out, int stride) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  mhr_ops::st_global(out + i, mhr_ops::ld_global(in + static_cast<int64_t>(i) * stride));
}

// Every block reads in[0..blockDim) three times and in[0] once (a broadcast).
__global__ void reread_kernel(const float* in, float* out) {
  const int t = threadIdx.x;
  float v = 0;
  for (int rep = 0; rep < 3; ++rep) v += mhr_ops::ld_global(in + t);
  v += mhr_ops::ld_global(in);
  mhr_ops::st_global(out + blockIdx.x * blockDim.x + t, v);
}

__global__ void atomic_kernel(int* counters) { mhr_ops::atomic_add_global(counters + threadIdx.x % 8, 1); }

// One warp: each lane copies 16 bytes with cp.async (lanes of odd `zfill_odd`: only odd lanes
// read, even lanes zero-fill), then the block writes the 128 floats out coalesced.
__global__ void cp_async_kernel(const float* src, float* out, int zfill_odd) {
  MHR_SHARED(float4, s4, [32]);  // 16-byte aligned, as cp.async needs
  float* s = &s4[0].x;
  const int lane = threadIdx.x;
  if (zfill_odd)
    mhr_ops::cp_async_cg_zfill(s + 4 * lane, src + 4 * lane, lane % 2 ? 16 : 0);
  else
    mhr_ops::cp_async_cg(s + 4 * lane, src + 4 * lane);
  mhr_ops::cp_async_wait_all();
  __syncthreads();
  for (int j = 0; j < 4; ++j) mhr_ops::st_global(out + 32 * j + lane, s[32 * j + lane]);
}

// Per warp: two bf16 m16n8k16 and one tf32 m16n8k8 mma, all operands zero; lane results stored.
__global__ void mma_kernel(float* out) {
  const uint32_t a[4] = {0, 0, 0, 0}, b[2] = {0, 0};
  const float c[4] = {1, 2, 3, 4};
  float d[4], e[4], f[4];
  mhr_ops::mma_m16n8k16_bf16(d, a, b, c);
  mhr_ops::mma_m16n8k16_bf16(e, a, b, d);
  mhr_ops::mma_m16n8k8_tf32(f, a, b, e);
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  mhr_ops::st_global(out + i, f[0] + f[1] + f[2] + f[3]);
}

// --- helpers -----------------------------------------------------------------------------------

// The one record the last launch left (after a reset), or an empty one and a failure.
LaunchTraffic only_record(const char* what) {
  const std::vector<LaunchTraffic> r = mhr_emu::launch_records();
  if (r.size() != 1) {
    std::fprintf(stderr, "%s: %zu launch records, expected 1\n", what, r.size());
    ++g_failures;
    return LaunchTraffic{};
  }
  return r[0];
}

template <typename T>
LaunchTraffic run_copy(int grid, int block, int stride) {
  std::vector<T> host(static_cast<size_t>(grid) * block * stride);
  for (size_t i = 0; i < host.size(); ++i) host[i] = from_double<T>(static_cast<double>(i % 100));
  T* in = to_device(host);
  T* out = nullptr;
  cudaMalloc(&out, sizeof(T) * grid * block);
  mhr_emu::reset_launch_records();
  MHR_LAUNCH(copy_kernel<T>, grid, block, 0, nullptr, in, out, stride);
  EXPECT_TRUE(cudaDeviceSynchronize() == cudaSuccess);
  const std::vector<T> got = to_host(out, static_cast<size_t>(grid) * block);
  for (size_t i = 0; i < got.size(); ++i) EXPECT_TRUE(to_double(got[i]) == to_double(host[i * stride]));
  cudaFree(in);
  cudaFree(out);
  return only_record("copy_kernel");
}

// --- tests -------------------------------------------------------------------------------------

void test_coalesced_4_byte() {
  const LaunchTraffic r = run_copy<float>(2, 64, 1);
  EXPECT_TRUE(std::strcmp(r.kernel.c_str(), "copy_kernel<T>") == 0);
  EXPECT_EQ_U64(r.grid[0], 2);
  EXPECT_EQ_U64(r.block[0], 64);
  EXPECT_EQ_U64(r.bytes[kLoad], 128 * 4);
  EXPECT_EQ_U64(r.bytes[kStore], 128 * 4);
  EXPECT_EQ_U64(r.bytes[kAtomic], 0);
  EXPECT_EQ_U64(r.accesses[kLoad], 128);
  EXPECT_EQ_U64(r.requests[kLoad], 4);  // 2 blocks x 2 warps
  EXPECT_EQ_U64(r.request_sectors[kLoad], 4 * 4);
  EXPECT_EQ_U64(r.sectors[kLoad], 512 / 32);
  EXPECT_EQ_U64(r.sectors[kStore], 512 / 32);
  EXPECT_EQ_U64(r.read_sectors, 16);
  EXPECT_EQ_U64(r.written_sectors, 16);
  EXPECT_EQ_U64(r.union_sectors, 32);
  EXPECT_EQ_U64(r.dram_bytes(), 1024);
  EXPECT_NEAR(r.sectors_per_request(GlobalAccess::kLoad), 4.0, 0);
  EXPECT_NEAR(r.sectors_per_request(), 4.0, 0);
  EXPECT_EQ_U64(r.tensor_core_flops, 0);
}

void test_coalesced_2_byte() {
  const LaunchTraffic r = run_copy<__half>(2, 64, 1);
  EXPECT_EQ_U64(r.bytes[kLoad], 128 * 2);
  EXPECT_EQ_U64(r.requests[kLoad], 4);
  EXPECT_EQ_U64(r.request_sectors[kLoad], 4 * 2);  // 64 bytes a warp: 2 sectors
  EXPECT_EQ_U64(r.sectors[kLoad], 256 / 32);
  EXPECT_NEAR(r.sectors_per_request(GlobalAccess::kLoad), 4.0, 0);  // normalized to 128-byte requests
  EXPECT_NEAR(r.sectors_per_request(GlobalAccess::kStore), 4.0, 0);
}

void test_strided_128_byte() {
  const LaunchTraffic r = run_copy<float>(1, 64, 32);  // lane i reads in[32 i]: a sector each
  EXPECT_EQ_U64(r.bytes[kLoad], 64 * 4);
  EXPECT_EQ_U64(r.requests[kLoad], 2);
  EXPECT_EQ_U64(r.request_sectors[kLoad], 2 * 32);
  EXPECT_EQ_U64(r.sectors[kLoad], 64);
  EXPECT_NEAR(r.sectors_per_request(GlobalAccess::kLoad), 32.0, 0);
  EXPECT_NEAR(r.sectors_per_request(GlobalAccess::kStore), 4.0, 0);  // the output stays coalesced
  EXPECT_NEAR(r.sectors_per_request(), (64.0 + 8.0) * 128.0 / 512.0, 1e-12);
  EXPECT_EQ_U64(r.dram_bytes(), 32 * (64 + 8));
}

void test_rereads() {
  std::vector<float> host(64);
  for (int i = 0; i < 64; ++i) host[i] = static_cast<float>(i);
  float* in = to_device(host);
  float* out = nullptr;
  cudaMalloc(&out, sizeof(float) * 128);
  mhr_emu::reset_launch_records();
  MHR_LAUNCH(reread_kernel, 2, 64, 0, nullptr, in, out);
  EXPECT_TRUE(cudaDeviceSynchronize() == cudaSuccess);
  const std::vector<float> got = to_host(out, 128);
  for (int i = 0; i < 128; ++i) EXPECT_TRUE(got[i] == 3.0f * static_cast<float>(i % 64));
  const LaunchTraffic r = only_record("reread_kernel");
  EXPECT_EQ_U64(r.bytes[kLoad], 2 * 64 * 4 * 4);
  EXPECT_EQ_U64(r.requests[kLoad], 4 * 4);                   // 4 warps, 4 loads each
  EXPECT_EQ_U64(r.request_sectors[kLoad], 4 * (3 * 4 + 1));  // the broadcast is one sector
  EXPECT_EQ_U64(r.sectors[kLoad], 64 * 4 / 32);              // every re-read, in any block, counted once
  EXPECT_EQ_U64(r.sectors[kStore], 128 * 4 / 32);
  EXPECT_NEAR(r.sectors_per_request(GlobalAccess::kLoad), 52.0 * 128.0 / 2048.0, 1e-12);
  cudaFree(in);
  cudaFree(out);
}

void test_atomics() {
  int* counters = nullptr;
  cudaMalloc(&counters, sizeof(int) * 8);
  cudaMemset(counters, 0, sizeof(int) * 8);
  mhr_emu::reset_launch_records();
  MHR_LAUNCH(atomic_kernel, 3, 64, 0, nullptr, counters);
  EXPECT_TRUE(cudaDeviceSynchronize() == cudaSuccess);
  for (int v : to_host(counters, 8)) EXPECT_TRUE(v == 3 * 64 / 8);
  const LaunchTraffic r = only_record("atomic_kernel");
  EXPECT_EQ_U64(r.bytes[kAtomic], 3 * 64 * 4);
  EXPECT_EQ_U64(r.bytes[kLoad] + r.bytes[kStore], 0);
  EXPECT_EQ_U64(r.requests[kAtomic], 3 * 2);
  EXPECT_EQ_U64(r.request_sectors[kAtomic], 3 * 2);  // 8 ints: one sector
  EXPECT_EQ_U64(r.sectors[kAtomic], 1);
  EXPECT_EQ_U64(r.read_sectors, 1);  // an atomic reads and writes its sector
  EXPECT_EQ_U64(r.written_sectors, 1);
  EXPECT_EQ_U64(r.union_sectors, 1);
  EXPECT_EQ_U64(r.dram_bytes(), 64);
  cudaFree(counters);
}

void test_cp_async() {
  std::vector<float> host(128);
  for (int i = 0; i < 128; ++i) host[i] = static_cast<float>(i + 1);
  float* src = to_device(host);
  float* out = nullptr;
  cudaMalloc(&out, sizeof(float) * 128);
  for (int zfill_odd : {0, 1}) {
    mhr_emu::reset_launch_records();
    MHR_LAUNCH(cp_async_kernel, 1, 32, 0, nullptr, src, out, zfill_odd);
    EXPECT_TRUE(cudaDeviceSynchronize() == cudaSuccess);
    const std::vector<float> got = to_host(out, 128);
    for (int i = 0; i < 128; ++i) EXPECT_TRUE(got[i] == (zfill_odd && (i / 4) % 2 == 0 ? 0.0f : host[i]));
    const LaunchTraffic r = only_record("cp_async_kernel");
    EXPECT_EQ_U64(r.accesses[kLoad], 32);
    EXPECT_EQ_U64(r.requests[kLoad], 1);
    EXPECT_EQ_U64(r.bytes[kStore], 128 * 4);
    EXPECT_EQ_U64(r.requests[kStore], 4);
    EXPECT_NEAR(r.sectors_per_request(GlobalAccess::kStore), 4.0, 0);
    if (!zfill_odd) {
      EXPECT_EQ_U64(r.bytes[kLoad], 32 * 16);
      EXPECT_EQ_U64(r.sectors[kLoad], 512 / 32);
      EXPECT_NEAR(r.sectors_per_request(GlobalAccess::kLoad), 4.0, 0);
    } else {  // odd lanes read 16 bytes each, one in each of the 16 sectors: half the bytes, every sector
      EXPECT_EQ_U64(r.bytes[kLoad], 16 * 16);
      EXPECT_EQ_U64(r.sectors[kLoad], 16);
      EXPECT_NEAR(r.sectors_per_request(GlobalAccess::kLoad), 8.0, 0);
    }
  }
  cudaFree(src);
  cudaFree(out);
}

void test_tensor_core_flops() {
  float* out = nullptr;
  cudaMalloc(&out, sizeof(float) * 3 * 64);
  const unsigned long long total_before = mhr_ops::emulated_tensor_core_flops();
  mhr_emu::reset_launch_records();
  MHR_LAUNCH(mma_kernel, 3, 64, 0, nullptr, out);  // 6 warps
  MHR_LAUNCH(mma_kernel, 1, 32, 0, nullptr, out);  // 1 warp: a record of its own
  EXPECT_TRUE(cudaDeviceSynchronize() == cudaSuccess);
  for (float v : to_host(out, 32)) EXPECT_TRUE(v == 10.0f);  // zero operands: d = c
  const uint64_t per_warp = 2 * (2ull * 16 * 8 * 16) + 2ull * 16 * 8 * 8;
  const std::vector<LaunchTraffic> r = mhr_emu::launch_records();
  EXPECT_EQ_U64(r.size(), 2);
  if (r.size() == 2) {
    EXPECT_EQ_U64(r[0].tensor_core_flops, 6 * per_warp);
    EXPECT_EQ_U64(r[1].tensor_core_flops, per_warp);
    EXPECT_EQ_U64(r[0].bytes[kStore], 3 * 64 * 4);
  }
  EXPECT_EQ_U64(mhr_ops::emulated_tensor_core_flops() - total_before, 7 * per_warp);
  cudaFree(out);
}

void test_memset() {
  char* p = nullptr;
  cudaMalloc(&p, 1000);
  mhr_emu::reset_launch_records();
  cudaMemsetAsync(p, 0, 1000, nullptr);
  const LaunchTraffic r = only_record("cudaMemset");
  EXPECT_TRUE(r.kernel == "cudaMemset");
  EXPECT_EQ_U64(r.bytes[kStore], 1000);
  EXPECT_EQ_U64(r.written_sectors, 32);  // 1000 bytes from a 256-byte aligned address
  EXPECT_EQ_U64(r.read_sectors, 0);
  cudaFree(p);
}

void test_counting_off() {
  mhr_emu::set_traffic_counting(false);
  EXPECT_TRUE(!mhr_emu::traffic_counting());
  mhr_emu::reset_launch_records();
  std::vector<float> host(64, 1.0f);
  float* in = to_device(host);
  float* out = nullptr;
  cudaMalloc(&out, sizeof(float) * 64);
  MHR_LAUNCH(copy_kernel<float>, 1, 64, 0, nullptr, in, out, 1);
  cudaMemset(out, 0, sizeof(float) * 64);
  mhr_emu::count_global(in, 4, GlobalAccess::kLoad);  // host code: never counted
  EXPECT_TRUE(cudaDeviceSynchronize() == cudaSuccess);
  EXPECT_EQ_U64(mhr_emu::launch_records().size(), 0);
  // On again: host accesses outside a launch still leave nothing.
  mhr_emu::set_traffic_counting(true);
  mhr_emu::count_global(in, 4, GlobalAccess::kLoad);
  EXPECT_EQ_U64(mhr_emu::launch_records().size(), 0);
  cudaFree(in);
  cudaFree(out);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1 && std::strcmp(argv[1], "--counting-from-env") == 0) {
    EXPECT_TRUE(mhr_emu::traffic_counting());
    const LaunchTraffic r = run_copy<float>(1, 32, 1);
    EXPECT_EQ_U64(r.bytes[kLoad], 128);
    return finish("traffic (MHR_EMU_COUNT_TRAFFIC=1)");
  }
  EXPECT_TRUE(!mhr_emu::traffic_counting());  // off by default
  mhr_emu::set_traffic_counting(true);
  test_coalesced_4_byte();
  test_coalesced_2_byte();
  test_strided_128_byte();
  test_rereads();
  test_atomics();
  test_cp_async();
  test_tensor_core_flops();
  test_memset();
  test_counting_off();
  return finish("traffic");
}
