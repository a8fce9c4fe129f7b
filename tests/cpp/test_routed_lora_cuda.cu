// Standalone test of the CUDA routed_lora kernels (shrink, expand, wgrad) against a naive host
// computation in double, fp32 data: forward y, and the backward's gz, dx, dA, dB, dw, with rows
// whose groups are unsorted, runs of one group, an odd row count and rank > 32.
// Exits 77 (ctest: skipped) without a CUDA device.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "check.h"
#include "cuda_check.cuh"
#include "routed_lora.h"

using namespace mhr_ops;

namespace {

float* zeros_on_device(size_t n) {
  float* d = nullptr;
  cudaMalloc(&d, n * sizeof(float));
  cudaMemset(d, 0, n * sizeof(float));
  return d;
}

struct Problem {
  int64_t N, h, S, dki, r, dko, G, rows_per_id;
  std::vector<float> x, A, B, w, gy;  // x [N, h*dki], A [h,S,dki,r], B [h,S,r,dko], w [G,h,S], gy [N, h*dko]
  std::vector<int64_t> ids;           // [N / rows_per_id]
  double scale;
  int64_t group(int64_t n) const { return ids[n / rows_per_id]; }
  double amix(int64_t g, int64_t k, int64_t c, int64_t j) const {
    double v = 0;
    for (int64_t s = 0; s < S; ++s) v += w[(g * h + k) * S + s] * A[((k * S + s) * dki + c) * r + j];
    return v;
  }
  double bmix(int64_t g, int64_t k, int64_t j, int64_t c) const {
    double v = 0;
    for (int64_t s = 0; s < S; ++s) v += w[(g * h + k) * S + s] * B[((k * S + s) * r + j) * dko + c];
    return v;
  }
};

Problem make_problem(int64_t N, int64_t h, int64_t S, int64_t dki, int64_t r, int64_t dko, int64_t G,
                     int64_t rows_per_id, bool shuffled) {
  Problem p{N, h, S, dki, r, dko, G, rows_per_id, {}, {}, {}, {}, {}, {}, 0.37};
  auto fill = [](std::vector<float>& v, size_t n, float a, float b) {
    v.resize(n);
    for (size_t i = 0; i < n; ++i) v[i] = std::sin(a * i + b);
  };
  fill(p.x, N * h * dki, 0.731f, 0.1f);
  fill(p.A, h * S * dki * r, 1.37f, 0.2f);
  fill(p.B, h * S * r * dko, 0.917f, 0.3f);
  fill(p.gy, N * h * dko, 0.533f, 0.4f);
  p.w.resize(G * h * S);
  for (size_t i = 0; i < p.w.size(); ++i) p.w[i] = 0.1f + std::fabs(std::cos(0.77f * i));
  p.ids.resize(N / rows_per_id);
  for (size_t i = 0; i < p.ids.size(); ++i) p.ids[i] = shuffled ? (i * 7 + 3) % G : (i * G) / p.ids.size();
  return p;
}

void run_case(const Problem& p) {
  const int64_t N = p.N, h = p.h, S = p.S, dki = p.dki, r = p.r, dko = p.dko, G = p.G;
  float *x = to_device(p.x), *A = to_device(p.A), *B = to_device(p.B), *w = to_device(p.w), *gy = to_device(p.gy);
  int64_t* ids = to_device(p.ids);
  float *z = zeros_on_device(N * r), *gz = zeros_on_device(N * r), *y = zeros_on_device(N * h * dko),
        *dx = zeros_on_device(N * h * dki), *dA = zeros_on_device(p.A.size()), *dB = zeros_on_device(p.B.size()),
        *dw = zeros_on_device(p.w.size());

  RowRouting R;
  R.weights = w;
  R.w_stride_g = h * S;
  R.w_stride_k = S;
  R.w_stride_s = 1;
  R.group_ids = ids;
  R.rows_per_group_id = p.rows_per_id;
  R.num_groups = G;
  R.num_heads = h;
  R.num_skills = S;
  const SkillMatrices mA{A, S * dki * r, dki * r, r, 1}, mAt{A, S * dki * r, dki * r, 1, r};
  const SkillMatrices mB{B, S * r * dko, r * dko, dko, 1}, mBt{B, S * r * dko, r * dko, 1, dko};

  ShrinkParams sp;
  sp.x = x, sp.x_stride_n = h * dki, sp.x_stride_c = 1, sp.m = mA, sp.routing = R, sp.z = z;
  sp.num_rows = N, sp.dk = dki, sp.rank = r;
  EXPECT_TRUE(routed_lora_shrink_cuda(sp, DType::kFloat32, DType::kFloat32, nullptr) == 0);
  ExpandParams ep;
  ep.z = z, ep.m = mB, ep.routing = R, ep.y = y, ep.y_stride_n = h * dko, ep.y_stride_c = 1;
  ep.num_rows = N, ep.dk = dko, ep.rank = r, ep.y_scale = p.scale;
  EXPECT_TRUE(routed_lora_expand_cuda(ep, DType::kFloat32, DType::kFloat32, nullptr) == 0);
  // backward: gz = scale * gy @ Bmix^T; dx = gz @ Amix^T; dA, dw from (x, gz); dB, dw from (gy, z)
  ShrinkParams gp = sp;
  gp.x = gy, gp.x_stride_n = h * dko, gp.m = mBt, gp.z = gz, gp.dk = dko, gp.z_scale = p.scale;
  EXPECT_TRUE(routed_lora_shrink_cuda(gp, DType::kFloat32, DType::kFloat32, nullptr) == 0);
  ExpandParams xp = ep;
  xp.z = gz, xp.m = mAt, xp.y = dx, xp.y_stride_n = h * dki, xp.dk = dki, xp.y_scale = 1.0;
  EXPECT_TRUE(routed_lora_expand_cuda(xp, DType::kFloat32, DType::kFloat32, nullptr) == 0);
  WgradParams wa;
  wa.x = x, wa.x_stride_n = h * dki, wa.x_stride_c = 1, wa.q = gz, wa.m = mA, wa.routing = R, wa.dm = dA, wa.dw = dw;
  wa.num_rows = N, wa.dk = dki, wa.rank = r;
  EXPECT_TRUE(routed_lora_wgrad_cuda(wa, DType::kFloat32, DType::kFloat32, nullptr) == 0);
  WgradParams wb = wa;
  wb.x = gy, wb.x_stride_n = h * dko, wb.q = z, wb.q_scale = p.scale, wb.m = mBt, wb.dm = dB, wb.dk = dko;
  EXPECT_TRUE(routed_lora_wgrad_cuda(wb, DType::kFloat32, DType::kFloat32, nullptr) == 0);
  EXPECT_TRUE(cudaDeviceSynchronize() == cudaSuccess);

  // Host reference in double.
  std::vector<double> zr(N * r, 0), gzr(N * r, 0), dAr(p.A.size(), 0), dBr(p.B.size(), 0), dwr(p.w.size(), 0);
  for (int64_t n = 0; n < N; ++n) {
    const int64_t g = p.group(n);
    for (int64_t k = 0; k < h; ++k)
      for (int64_t c = 0; c < dki; ++c)
        for (int64_t j = 0; j < r; ++j) zr[n * r + j] += p.x[n * h * dki + k * dki + c] * p.amix(g, k, c, j);
    for (int64_t k = 0; k < h; ++k)
      for (int64_t c = 0; c < dko; ++c)
        for (int64_t j = 0; j < r; ++j)
          gzr[n * r + j] += p.scale * p.gy[n * h * dko + k * dko + c] * p.bmix(g, k, j, c);
  }
  const auto y_gpu = to_host(y, N * h * dko), dx_gpu = to_host(dx, N * h * dki);
  for (int64_t n = 0; n < N; ++n) {
    const int64_t g = p.group(n);
    for (int64_t k = 0; k < h; ++k) {
      for (int64_t c = 0; c < dko; ++c) {
        double v = 0;
        for (int64_t j = 0; j < r; ++j) v += zr[n * r + j] * p.bmix(g, k, j, c);
        EXPECT_NEAR(y_gpu[n * h * dko + k * dko + c], p.scale * v, 1e-3 * (1 + std::fabs(p.scale * v)));
      }
      for (int64_t c = 0; c < dki; ++c) {
        double v = 0;
        for (int64_t j = 0; j < r; ++j) v += gzr[n * r + j] * p.amix(g, k, c, j);
        EXPECT_NEAR(dx_gpu[n * h * dki + k * dki + c], v, 1e-3 * (1 + std::fabs(v)));
      }
      for (int64_t s = 0; s < S; ++s) {
        const double ws = p.w[(g * h + k) * S + s];
        for (int64_t c = 0; c < dki; ++c)
          for (int64_t j = 0; j < r; ++j) {
            const double pa = p.x[n * h * dki + k * dki + c] * gzr[n * r + j];
            dAr[((k * S + s) * dki + c) * r + j] += ws * pa;
            dwr[(g * h + k) * S + s] += pa * p.A[((k * S + s) * dki + c) * r + j];
          }
        for (int64_t j = 0; j < r; ++j)
          for (int64_t c = 0; c < dko; ++c) {
            const double pb = p.scale * zr[n * r + j] * p.gy[n * h * dko + k * dko + c];
            dBr[((k * S + s) * r + j) * dko + c] += ws * pb;
            dwr[(g * h + k) * S + s] += pb * p.B[((k * S + s) * r + j) * dko + c];
          }
      }
    }
  }
  const auto dA_gpu = to_host(dA, p.A.size()), dB_gpu = to_host(dB, p.B.size()), dw_gpu = to_host(dw, p.w.size());
  for (size_t i = 0; i < dAr.size(); ++i) EXPECT_NEAR(dA_gpu[i], dAr[i], 1e-3 * (1 + std::fabs(dAr[i])));
  for (size_t i = 0; i < dBr.size(); ++i) EXPECT_NEAR(dB_gpu[i], dBr[i], 1e-3 * (1 + std::fabs(dBr[i])));
  for (size_t i = 0; i < dwr.size(); ++i) EXPECT_NEAR(dw_gpu[i], dwr[i], 1e-3 * (1 + std::fabs(dwr[i])));
  for (void* ptr : {(void*)x, (void*)A, (void*)B, (void*)w, (void*)gy, (void*)ids, (void*)z, (void*)gz, (void*)y,
                    (void*)dx, (void*)dA, (void*)dB, (void*)dw})
    cudaFree(ptr);
}

}  // namespace

int main() {
  if (const int skip = skip_without_device("test_routed_lora_cuda")) return skip;
  run_case(make_problem(/*N=*/77, /*h=*/3, /*S=*/4, /*dki=*/37, /*r=*/5, /*dko=*/29, /*G=*/6, 1, true));
  run_case(make_problem(/*N=*/96, /*h=*/2, /*S=*/3, /*dki=*/40, /*r=*/48, /*dko=*/70, /*G=*/4, 24, false));
  run_case(make_problem(/*N=*/5, /*h=*/1, /*S=*/2, /*dki=*/8, /*r=*/1, /*dko=*/130, /*G=*/5, 1, true));
  return finish("test_routed_lora_cuda");
}
