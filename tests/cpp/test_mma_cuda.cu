// The mma.cuh wrappers against a double-precision host matmul: mma.sync m16n8k16 (bf16, f16) and
// m16n8k8 (tf32) on random inputs, several tiles per warp, two warps and three problems; fragments
// loaded per lane from global memory and through every ldmatrix form (x1/x2/x4, .trans) from shared
// memory filled by cp.async (ca 4/8/16 bytes, cg). Then cp.async's zero fill and group semantics,
// and float_to_tf32. Exits 77 (ctest: skipped) without a CUDA device; under the emulation it runs.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <type_traits>
#include <vector>

#include "check.h"
#include "cuda_check.cuh"
#include "cuda_primitives.cuh"
#include "mma.cuh"

using mhr_ops::FragCoord;

namespace {

constexpr int M = 32, N = 16, K = 32;  // per problem: 2 warps x one 16-row tile, 2 n-tiles, 2-4 k-steps
constexpr int kWarps = 2, kProblems = 3;
constexpr int PA = K + 8;   // padded smem rows (b16 elements) of A [M][K] and Bt [N][K]: 80 bytes
constexpr int PAt = M + 8;  // of At [K][M]
constexpr int PB = N + 8;   // of B [K][N]: 48 bytes
constexpr int PF = K + 4;   // fp32 rows of A and Bt for tf32: 144 bytes

enum class Load : int { kPlain, kX4X2, kX1, kTrans4, kTrans2x1 };
const char* load_name(Load l) {
  switch (l) {
    case Load::kPlain:
      return "per-lane loads";
    case Load::kX4X2:
      return "ldmatrix x4 (A) / x2 (B)";
    case Load::kX1:
      return "ldmatrix x1";
    case Load::kTrans4:
      return "ldmatrix x4.trans";
    case Load::kTrans2x1:
      return "ldmatrix x2.trans (A) / x1.trans (B)";
  }
  return "?";
}

// Where accumulator i of n-tile nt of this lane sits in this block's [M][N] C and D (each warp
// owns 16 rows, two m16n8 tiles).
__device__ int c_index(int warp, int lane, int nt, int i) {
  const FragCoord q = mhr_ops::mma_m16n8_c_coord(lane, i);
  return blockIdx.x * M * N + (16 * warp + q.row) * N + 8 * nt + q.col;
}

// One problem per block: D = C + A B with A [M][K], B [K][N]; the same matrices also given as
// At [K][M] and Bt [N][K] (b16 bit patterns), so each ldmatrix form reads a layout it suits.
struct B16Args {
  const uint16_t *a, *at, *b, *bt;
  const float* c;
  float* d;
  Load load;
};

template <bool kBF16>
__global__ void mma_b16_kernel(B16Args p) {
  MHR_SHARED(uint4, smem_a, [M * PA * 2 / 16]);
  MHR_SHARED(uint4, smem_at, [K * PAt * 2 / 16]);
  MHR_SHARED(uint4, smem_b, [K * PB * 2 / 16]);
  MHR_SHARED(uint4, smem_bt, [N * PA * 2 / 16]);
  uint16_t* sa = reinterpret_cast<uint16_t*>(smem_a);
  uint16_t* sat = reinterpret_cast<uint16_t*>(smem_at);
  uint16_t* sb = reinterpret_cast<uint16_t*>(smem_b);
  uint16_t* sbt = reinterpret_cast<uint16_t*>(smem_bt);
  const uint16_t* A = p.a + blockIdx.x * M * K;
  const uint16_t* At = p.at + blockIdx.x * M * K;
  const uint16_t* B = p.b + blockIdx.x * K * N;
  const uint16_t* Bt = p.bt + blockIdx.x * K * N;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;

  if (p.load != Load::kPlain) {                        // global -> shared with every cp.async size
    for (int i = tid; i < M * K / 8; i += blockDim.x)  // 16-byte chunks, L1 bypassed
      mhr_ops::cp_async_cg(sa + (i / (K / 8)) * PA + (i % (K / 8)) * 8, A + i * 8);
    for (int i = tid; i < N * K / 8; i += blockDim.x)
      mhr_ops::cp_async_ca<16>(sbt + (i / (K / 8)) * PA + (i % (K / 8)) * 8, Bt + i * 8);
    mhr_ops::cp_async_commit_group();
    for (int i = tid; i < K * M / 4; i += blockDim.x)  // 8-byte chunks
      mhr_ops::cp_async_ca<8>(sat + (i / (M / 4)) * PAt + (i % (M / 4)) * 4, At + i * 4);
    mhr_ops::cp_async_commit_group();
    for (int i = tid; i < K * N / 2; i += blockDim.x)  // 4-byte chunks
      mhr_ops::cp_async_ca<4>(sb + (i / (N / 2)) * PB + (i % (N / 2)) * 2, B + i * 2);
    mhr_ops::cp_async_commit_group();
    mhr_ops::cp_async_wait_group<0>();
    __syncthreads();
  }

  float acc[2][4];
  for (int nt = 0; nt < 2; ++nt)
    for (int i = 0; i < 4; ++i) acc[nt][i] = p.c[c_index(warp, lane, nt, i)];
  const int r = lane % 8, j = lane / 8, j2 = (lane % 16) / 8;  // row within a matrix, matrix index
  for (int ks = 0; ks < K / 16; ++ks) {
    const int m0 = 16 * warp, k0 = 16 * ks;
    uint32_t a[4], b[2][2];
    switch (p.load) {
      case Load::kPlain:
        for (int i = 0; i < 4; ++i) a[i] = 0;
        for (int i = 0; i < 8; ++i) {
          const FragCoord q = mhr_ops::mma_m16n8k16_a_coord(lane, i);
          a[i / 2] |= uint32_t{A[(m0 + q.row) * K + k0 + q.col]} << (16 * (i % 2));
        }
        for (int nt = 0; nt < 2; ++nt) {
          b[nt][0] = b[nt][1] = 0;
          for (int i = 0; i < 4; ++i) {
            const FragCoord q = mhr_ops::mma_m16n8k16_b_coord(lane, i);
            b[nt][i / 2] |= uint32_t{B[(k0 + q.row) * N + 8 * nt + q.col]} << (16 * (i % 2));
          }
        }
        break;
      case Load::kX4X2:  // A matrices (m 0-7, k 0-7), (m 8-15, k 0-7), (m 0-7, k 8-15), (m 8-15, k 8-15)
        mhr_ops::ldmatrix_x4(a, sa + (m0 + r + 8 * (j % 2)) * PA + k0 + 8 * (j / 2));
        for (int nt = 0; nt < 2; ++nt) mhr_ops::ldmatrix_x2(b[nt], sbt + (8 * nt + r) * PA + k0 + 8 * j2);
        break;
      case Load::kX1:
        for (int q = 0; q < 4; ++q) {
          uint32_t one[1];
          mhr_ops::ldmatrix_x1(one, sa + (m0 + r + 8 * (q % 2)) * PA + k0 + 8 * (q / 2));
          a[q] = one[0];
        }
        for (int nt = 0; nt < 2; ++nt)
          for (int q = 0; q < 2; ++q) {
            uint32_t one[1];
            mhr_ops::ldmatrix_x1(one, sbt + (8 * nt + r) * PA + k0 + 8 * q);
            b[nt][q] = one[0];
          }
        break;
      case Load::kTrans4: {  // from At [K][M] and B [K][N]: rows are k, .trans hands out columns
        mhr_ops::ldmatrix_x4_trans(a, sat + (k0 + 8 * (j / 2) + r) * PAt + m0 + 8 * (j % 2));
        uint32_t both[4];  // matrices (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15)
        mhr_ops::ldmatrix_x4_trans(both, sb + (k0 + 8 * (j % 2) + r) * PB + 8 * (j / 2));
        b[0][0] = both[0], b[0][1] = both[1], b[1][0] = both[2], b[1][1] = both[3];
        break;
      }
      case Load::kTrans2x1:
        for (int h = 0; h < 2; ++h) {
          uint32_t two[2];
          mhr_ops::ldmatrix_x2_trans(two, sat + (k0 + 8 * h + r) * PAt + m0 + 8 * j2);
          a[2 * h] = two[0], a[2 * h + 1] = two[1];
        }
        for (int nt = 0; nt < 2; ++nt)
          for (int q = 0; q < 2; ++q) {
            uint32_t one[1];
            mhr_ops::ldmatrix_x1_trans(one, sb + (k0 + 8 * q + r) * PB + 8 * nt);
            b[nt][q] = one[0];
          }
        break;
    }
    for (int nt = 0; nt < 2; ++nt) {
      if constexpr (kBF16)
        mhr_ops::mma_m16n8k16_bf16(acc[nt], a, b[nt], acc[nt]);
      else
        mhr_ops::mma_m16n8k16_f16(acc[nt], a, b[nt], acc[nt]);
    }
  }
  for (int nt = 0; nt < 2; ++nt)
    for (int i = 0; i < 4; ++i) p.d[c_index(warp, lane, nt, i)] = acc[nt][i];
}

// tf32: raw fp32 A [M][K] and Bt [N][K], rounded in the kernel with float_to_tf32; fragments per
// lane from global memory, or with ldmatrix on 32-bit data (a b16 pair per element).
struct TF32Args {
  const float *a, *bt, *c;
  float* d;
  bool use_ldmatrix;
};

__global__ void mma_tf32_kernel(TF32Args p) {
  MHR_SHARED(uint4, smem_a, [M * PF * 4 / 16]);
  MHR_SHARED(uint4, smem_bt, [N * PF * 4 / 16]);
  float* sa = reinterpret_cast<float*>(smem_a);
  float* sbt = reinterpret_cast<float*>(smem_bt);
  const float* A = p.a + blockIdx.x * M * K;
  const float* Bt = p.bt + blockIdx.x * K * N;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  if (p.use_ldmatrix) {
    for (int i = tid; i < M * K / 4; i += blockDim.x)
      mhr_ops::cp_async_ca<16>(sa + (i / (K / 4)) * PF + (i % (K / 4)) * 4, A + i * 4);
    for (int i = tid; i < N * K / 2; i += blockDim.x)
      mhr_ops::cp_async_ca<8>(sbt + (i / (K / 2)) * PF + (i % (K / 2)) * 2, Bt + i * 2);
    mhr_ops::cp_async_wait_all();  // commits the open group itself
    __syncthreads();
  }
  float acc[2][4];
  for (int nt = 0; nt < 2; ++nt)
    for (int i = 0; i < 4; ++i) acc[nt][i] = p.c[c_index(warp, lane, nt, i)];
  const int r = lane % 8, j = lane / 8, j2 = (lane % 16) / 8;
  for (int ks = 0; ks < K / 8; ++ks) {
    const int m0 = 16 * warp, k0 = 8 * ks;
    uint32_t a[4], b[2][2];
    if (p.use_ldmatrix) {  // an 8-b16 row is 4 floats: lane l gets (row l/4, float l%4), the tf32 layout
      mhr_ops::ldmatrix_x4(a, sa + (m0 + r + 8 * (j % 2)) * PF + k0 + 4 * (j / 2));
      for (int nt = 0; nt < 2; ++nt) mhr_ops::ldmatrix_x2(b[nt], sbt + (8 * nt + r) * PF + k0 + 4 * j2);
      for (int i = 0; i < 4; ++i) a[i] = mhr_ops::float_to_tf32(__int_as_float(static_cast<int>(a[i])));
      for (int nt = 0; nt < 2; ++nt)
        for (int i = 0; i < 2; ++i) b[nt][i] = mhr_ops::float_to_tf32(__int_as_float(static_cast<int>(b[nt][i])));
    } else {
      for (int i = 0; i < 4; ++i) {
        const FragCoord q = mhr_ops::mma_m16n8k8_tf32_a_coord(lane, i);
        a[i] = mhr_ops::float_to_tf32(A[(m0 + q.row) * K + k0 + q.col]);
      }
      for (int nt = 0; nt < 2; ++nt)
        for (int i = 0; i < 2; ++i) {
          const FragCoord q = mhr_ops::mma_m16n8k8_tf32_b_coord(lane, i);
          b[nt][i] = mhr_ops::float_to_tf32(Bt[(8 * nt + q.col) * K + k0 + q.row]);
        }
    }
    for (int nt = 0; nt < 2; ++nt) mhr_ops::mma_m16n8k8_tf32(acc[nt], a, b[nt], acc[nt]);
  }
  for (int nt = 0; nt < 2; ++nt)
    for (int i = 0; i < 4; ++i) p.d[c_index(warp, lane, nt, i)] = acc[nt][i];
}

// ---------------------------------------------------------------------------------------------
// Host side.

template <bool kBF16>
uint16_t to_b16(float v) {
  if constexpr (kBF16) {
    const __nv_bfloat16_raw raw = __float2bfloat16_rn(v);
    return raw.x;
  } else {
    const __half_raw raw = __float2half_rn(v);
    return raw.x;
  }
}
template <bool kBF16>
double from_b16(uint16_t bits) {
  if constexpr (kBF16) {
    __nv_bfloat16_raw raw;
    raw.x = bits;
    return __bfloat162float(__nv_bfloat16(raw));
  } else {
    __half_raw raw;
    raw.x = bits;
    return __half2float(__half(raw));
  }
}

// cvt.rna.tf32.f32 for finite normal values: 11 significant bits, ties away from zero.
double round_tf32(float v) {
  if (v == 0.0f || !std::isfinite(v)) return v;
  int e = 0;
  const double m = std::frexp(static_cast<double>(v), &e);  // |m| in [0.5, 1)
  return std::ldexp(std::round(std::ldexp(m, 11)), e - 11);
}

// D = C + A B in double for every problem; a tolerance per element from the sizes of the terms.
void check_result(const char* what, const std::vector<double>& a, const std::vector<double>& b,
                  const std::vector<float>& c, const std::vector<float>& d) {
  double worst = 0;
  int bad = 0;
  for (int p = 0; p < kProblems; ++p)
    for (int m = 0; m < M; ++m)
      for (int n = 0; n < N; ++n) {
        double ref = c[p * M * N + m * N + n], mag = std::fabs(ref);
        for (int k = 0; k < K; ++k) {
          const double t = a[p * M * K + m * K + k] * b[p * K * N + k * N + n];
          ref += t;
          mag += std::fabs(t);
        }
        const double err = std::fabs(d[p * M * N + m * N + n] - ref);
        worst = std::isnan(err) || err / mag > worst ? err / mag : worst;  // NaN sticks
        if (!(err <= 1e-5 * mag)) {
          if (bad++ < 5)
            std::fprintf(stderr, "%s: problem %d D[%d][%d] = %.9g, reference %.9g\n", what, p, m, n,
                         d[p * M * N + m * N + n], ref);
          ++g_failures;
        }
      }
  std::printf("  %-52s max |err| / sum|terms| = %.2e\n", what, worst);
}

template <bool kBF16>
void test_b16(std::mt19937& gen) {
  std::uniform_real_distribution<float> dist(-2.0f, 2.0f);
  std::vector<uint16_t> a(kProblems * M * K), at(a.size()), b(kProblems * K * N), bt(b.size());
  std::vector<double> a_val(a.size()), b_val(b.size());
  std::vector<float> c(kProblems * M * N);
  for (int p = 0; p < kProblems; ++p) {
    for (int m = 0; m < M; ++m)
      for (int k = 0; k < K; ++k) {
        const uint16_t v = to_b16<kBF16>(dist(gen));
        a[p * M * K + m * K + k] = at[p * M * K + k * M + m] = v;
        a_val[p * M * K + m * K + k] = from_b16<kBF16>(v);
      }
    for (int k = 0; k < K; ++k)
      for (int n = 0; n < N; ++n) {
        const uint16_t v = to_b16<kBF16>(dist(gen));
        b[p * K * N + k * N + n] = bt[p * K * N + n * K + k] = v;
        b_val[p * K * N + k * N + n] = from_b16<kBF16>(v);
      }
  }
  for (float& v : c) v = dist(gen);
  B16Args args{to_device(a), to_device(at), to_device(b), to_device(bt), to_device(c), nullptr, Load::kPlain};
  cudaMalloc(&args.d, c.size() * sizeof(float));
  for (Load load : {Load::kPlain, Load::kX4X2, Load::kX1, Load::kTrans4, Load::kTrans2x1}) {
    args.load = load;
    cudaMemset(args.d, 0xff, c.size() * sizeof(float));
#if defined(MHR_OPS_CUDA_EMULATION)
    const unsigned long long flops_before = mhr_ops::emulated_tensor_core_flops();
#endif
    MHR_LAUNCH(mma_b16_kernel<kBF16>, dim3(kProblems), dim3(32 * kWarps), 0, nullptr, args);
    EXPECT_TRUE(cudaDeviceSynchronize() == cudaSuccess);
#if defined(MHR_OPS_CUDA_EMULATION)  // one mma per (problem, warp, k-step, n-tile), counted once per warp
    EXPECT_TRUE(mhr_ops::emulated_tensor_core_flops() - flops_before ==
                2ull * 16 * 8 * 16 * kProblems * kWarps * (K / 16) * 2);
#endif
    char what[96];
    std::snprintf(what, sizeof what, "%s, %s", kBF16 ? "bf16 m16n8k16" : "f16 m16n8k16", load_name(load));
    check_result(what, a_val, b_val, c, to_host(args.d, c.size()));
  }
  cudaFree(const_cast<uint16_t*>(args.a));
  cudaFree(const_cast<uint16_t*>(args.at));
  cudaFree(const_cast<uint16_t*>(args.b));
  cudaFree(const_cast<uint16_t*>(args.bt));
  cudaFree(const_cast<float*>(args.c));
  cudaFree(args.d);
}

void test_tf32(std::mt19937& gen) {
  std::uniform_real_distribution<float> dist(-2.0f, 2.0f);
  std::vector<float> a(kProblems * M * K), bt(kProblems * K * N), c(kProblems * M * N);
  std::vector<double> a_val(a.size()), b_val(bt.size());
  for (int p = 0; p < kProblems; ++p) {
    for (int i = 0; i < M * K; ++i) {
      a[p * M * K + i] = dist(gen);  // full fp32: the kernel rounds to tf32
      a_val[p * M * K + i] = round_tf32(a[p * M * K + i]);
    }
    for (int k = 0; k < K; ++k)
      for (int n = 0; n < N; ++n) {
        const float v = dist(gen);
        bt[p * K * N + n * K + k] = v;
        b_val[p * K * N + k * N + n] = round_tf32(v);
      }
  }
  for (float& v : c) v = dist(gen);
  TF32Args args{to_device(a), to_device(bt), to_device(c), nullptr, false};
  cudaMalloc(&args.d, c.size() * sizeof(float));
  for (bool use_ldmatrix : {false, true}) {
    args.use_ldmatrix = use_ldmatrix;
    cudaMemset(args.d, 0xff, c.size() * sizeof(float));
    MHR_LAUNCH(mma_tf32_kernel, dim3(kProblems), dim3(32 * kWarps), 0, nullptr, args);
    EXPECT_TRUE(cudaDeviceSynchronize() == cudaSuccess);
    check_result(use_ldmatrix ? "tf32 m16n8k8, ldmatrix x4 / x2 on fp32" : "tf32 m16n8k8, per-lane loads", a_val, b_val,
                 c, to_host(args.d, c.size()));
  }
  cudaFree(const_cast<float*>(args.a));
  cudaFree(const_cast<float*>(args.bt));
  cudaFree(const_cast<float*>(args.c));
  cudaFree(args.d);
}

// ---------------------------------------------------------------------------------------------
// cp.async: zero fill, groups, wait_group N, visibility to other threads after the barrier.
// out[0..127]: the first buffer (lanes 0-15 full copies, 16-31 zero-filled after (lane%4)*4 bytes)
// as read by the neighbouring lane; out[128..255]: the second buffer; pending[lane]: 1 if the
// second group's destination still held its old contents after wait_group<1> (the emulation
// defers copies to the wait, so there it must; on a GPU it may or may not).
__global__ void cp_async_groups_kernel(const float* src, float* out, int* pending) {
  MHR_SHARED(uint4, first, [32]);
  MHR_SHARED(uint4, second, [32]);
  const int lane = threadIdx.x;
  float* f = reinterpret_cast<float*>(first);
  float* s = reinterpret_cast<float*>(second);
  s[4 * lane] = -1.0f;  // old contents, seen only by this lane before its wait
  if (lane < 16)
    mhr_ops::cp_async_ca_zfill<16>(f + 4 * lane, src + 4 * lane, 16);
  else
    mhr_ops::cp_async_cg_zfill(f + 4 * lane, src + 4 * (lane - 16), (lane % 4) * 4);
  mhr_ops::cp_async_commit_group();
  mhr_ops::cp_async_cg(s + 4 * lane, src + 64 + 4 * lane);
  mhr_ops::cp_async_commit_group();
  mhr_ops::cp_async_wait_group<1>();  // the first group is done, the second may not be
  pending[lane] = s[4 * lane] == -1.0f;
  mhr_ops::cp_async_wait_group<0>();
  __syncthreads();
  const int next = (lane + 1) % 32;
  for (int i = 0; i < 4; ++i) {
    out[4 * next + i] = f[4 * next + i];
    out[128 + 4 * next + i] = s[4 * next + i];
  }
}

void test_cp_async_groups() {
  std::vector<float> src(192);
  for (size_t i = 0; i < src.size(); ++i) src[i] = 1.0f + i;
  float* d_src = to_device(src);
  float* d_out = nullptr;
  int* d_pending = nullptr;
  cudaMalloc(&d_out, 256 * sizeof(float));
  cudaMalloc(&d_pending, 32 * sizeof(int));
  MHR_LAUNCH(cp_async_groups_kernel, dim3(1), dim3(32), 0, nullptr, d_src, d_out, d_pending);
  EXPECT_TRUE(cudaDeviceSynchronize() == cudaSuccess);
  const auto out = to_host(d_out, 256);
  const auto pending = to_host(d_pending, 32);
  for (int lane = 0; lane < 32; ++lane)
    for (int i = 0; i < 4; ++i) {
      const float want = lane < 16 ? src[4 * lane + i] : (i < lane % 4 ? src[4 * (lane - 16) + i] : 0.0f);
      EXPECT_NEAR(out[4 * lane + i], want, 0.0);
      EXPECT_NEAR(out[128 + 4 * lane + i], src[64 + 4 * lane + i], 0.0);
    }
#if defined(MHR_OPS_CUDA_EMULATION)
  for (int lane = 0; lane < 32; ++lane) EXPECT_TRUE(pending[lane] == 1);
#endif
  std::printf("  cp.async zero fill, groups, wait_group 1 / 0: checked\n");
  cudaFree(d_src);
  cudaFree(d_out);
  cudaFree(d_pending);
}

__global__ void float_to_tf32_kernel(const float* in, uint32_t* out, int n) {
  const int i = threadIdx.x;
  if (i < n) out[i] = mhr_ops::float_to_tf32(in[i]);
}

void test_float_to_tf32() {
  const float tie = 1.0f + std::ldexp(1.0f, -11);  // halfway between two tf32 values
  const std::vector<float> in = {0.0f,        -0.0f,         1.0f,   tie,    -tie,     std::nextafter(tie, 0.0f),
                                 3.14159265f, -2.718281828f, 1e-30f, 6.5e4f, INFINITY, -INFINITY};
  float* d_in = to_device(in);
  uint32_t* d_out = nullptr;
  cudaMalloc(&d_out, in.size() * sizeof(uint32_t));
  MHR_LAUNCH(float_to_tf32_kernel, dim3(1), dim3(32), 0, nullptr, d_in, d_out, static_cast<int>(in.size()));
  EXPECT_TRUE(cudaDeviceSynchronize() == cudaSuccess);
  const auto out = to_host(d_out, in.size());
  for (size_t i = 0; i < in.size(); ++i) {
    float got;
    std::memcpy(&got, &out[i], 4);
    EXPECT_TRUE((out[i] & 0x1fffu) == 0);
    if (std::isinf(in[i]))
      EXPECT_TRUE(got == in[i]);
    else
      EXPECT_NEAR(got, round_tf32(in[i]), 0.0);
  }
  const float nan_in = NAN;
  float* d_nan = to_device(std::vector<float>{nan_in});
  MHR_LAUNCH(float_to_tf32_kernel, dim3(1), dim3(32), 0, nullptr, d_nan, d_out, 1);
  EXPECT_TRUE(cudaDeviceSynchronize() == cudaSuccess);
  float nan_out;
  const uint32_t nan_bits = to_host(d_out, 1)[0];
  std::memcpy(&nan_out, &nan_bits, 4);
  EXPECT_TRUE(std::isnan(nan_out));
  std::printf("  float_to_tf32 (cvt.rna): ties away from zero, inf, NaN: checked\n");
  cudaFree(d_in);
  cudaFree(d_nan);
  cudaFree(d_out);
}

}  // namespace

int main() {
  if (const int skip = skip_without_device("test_mma_cuda")) return skip;
  std::mt19937 gen(20261130);
  test_b16<true>(gen);
  test_b16<false>(gen);
  test_tf32(gen);
  test_cp_async_groups();
  test_float_to_tf32();
  return finish("test_mma_cuda");
}
