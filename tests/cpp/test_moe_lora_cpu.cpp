// The moe_lora CPU kernels (moe_lora.h) against double loops: the counting sort (stable, invalid
// ids left out), forward (shrink + expand, y written and accumulated) and backward (dx, dA, dB,
// dw) through the row-block pass and the weight-gradient tasks, for every compile-time rank and a run-time one, fp32
// and fp64, portable and AVX2 builds, repeated experts within a row, int32 and strided ids, padded rows; an
// out-of-range id gives a NaN row and touches nothing outside the buffers; results do not depend on how rows are split
// (blocks, 7 rows, one row: X_e packed per call, per block, or read in place).
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "check.h"
#include "moe_lora.h"

using namespace mhr_ops;

namespace {

struct Problem {
  int64_t N, K, E, R, d_in, d_out, x_stride, y_stride;
  std::vector<double> x, A, B, W, gy, y0;
  std::vector<int32_t> ids;  // [N, K] stored with row stride 2K (strided ids)
};

Problem make(int64_t N, int64_t K, int64_t E, int64_t R, int64_t d_in, int64_t d_out, unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> nd;
  std::uniform_int_distribution<int32_t> ed(0, static_cast<int32_t>(E - 1));
  Problem p{N, K, E, R, d_in, d_out, d_in + 3, d_out + 2, {}, {}, {}, {}, {}, {}, {}};
  auto fill = [&](std::vector<double>& v, int64_t n) {
    v.resize(n);
    for (auto& e : v) e = nd(gen);
  };
  fill(p.x, N * p.x_stride);
  fill(p.A, E * d_in * R);
  fill(p.B, E * R * d_out);
  fill(p.W, N * K);
  fill(p.gy, N * p.y_stride);
  fill(p.y0, N * p.y_stride);
  p.ids.assign(N * 2 * K, -7);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t j = 0; j < K; ++j) p.ids[n * 2 * K + j] = (n % 5 == 1 && j > 0) ? p.ids[n * 2 * K] : ed(gen);
  return p;
}

MoeRouting routing(const Problem& p) {
  MoeRouting r;
  r.ids = p.ids.data();
  r.index_type = IndexType::kInt32;
  r.ids_stride_n = 2 * p.K;
  r.ids_stride_j = 1;
  r.rows = p.N;
  r.top_k = p.K;
  r.experts = p.E;
  return r;
}

template <typename T>
std::vector<T> cast(const std::vector<double>& v) {
  return std::vector<T>(v.begin(), v.end());
}

template <typename T>
void run_case(const Problem& p, double scale, bool avx2, double tol) {
  const int64_t S = p.N * p.K, R = p.R;
  const MoeRouting rt = routing(p);
  const MoeSlotPlan plan = moe_plan_slots(rt);
  const auto x = cast<T>(p.x), A = cast<T>(p.A), B = cast<T>(p.B), W = cast<T>(p.W), gy = cast<T>(p.gy);
  // B^T [E, d_out, R] and A^T [E, R, d_in], as the binding lays them out.
  std::vector<T> Bt(p.E * p.d_out * R), At(p.E * R * p.d_in);
  for (int64_t e = 0; e < p.E; ++e)
    for (int64_t j = 0; j < R; ++j) {
      for (int64_t c = 0; c < p.d_out; ++c) Bt[(e * p.d_out + c) * R + j] = B[(e * R + j) * p.d_out + c];
      for (int64_t c = 0; c < p.d_in; ++c) At[(e * R + j) * p.d_in + c] = A[(e * p.d_in + c) * R + j];
    }
  std::vector<T> z(S * R), y = cast<T>(p.y0);
  MoeRowsParams fp;  // forward: z = x @ A_e, y += scale * w * z @ B_e
  fp.routing = rt, fp.rank = R, fp.weights = W.data(), fp.w_stride_n = p.K, fp.w_stride_j = 1, fp.v = z.data();
  fp.src = x.data(), fp.src_stride_n = p.x_stride, fp.shrink_mats = A.data(), fp.d_src = p.d_in;
  fp.expand_mats = B.data(), fp.d_dst = p.d_out, fp.expand_scale = scale, fp.expand_weighted = true;
  fp.y = y.data(), fp.y_stride_n = p.y_stride, fp.accumulate = true;
  for (int64_t n = 0; n < p.N; n += kMoeRowBlock) moe_lora_rows_cpu<T>(fp, n, std::min(p.N, n + kMoeRowBlock), avx2);
  // written with a bias (moe_lora_linear's CPU forward): y2 = bias + update; padding untouched
  const std::vector<T> bias = cast<T>(std::vector<double>(p.gy.begin(), p.gy.begin() + p.d_out));
  std::vector<T> z2(S * R), y2(p.N * p.y_stride, T(7));
  MoeRowsParams fb = fp;
  fb.v = z2.data(), fb.y = y2.data(), fb.accumulate = false, fb.bias = bias.data();
  moe_lora_rows_cpu<T>(fb, 0, p.N, avx2);
  // backward: gz = w * scale * gy @ B_e^T, dw = z . (scale gy @ B_e^T), dx = gz @ A_e^T
  std::vector<T> gz(S * R), dw(S), dx(p.N * p.x_stride, T(5)), dA(p.E * p.d_in * R, T(9)), dB(p.E * R * p.d_out, T(9));
  MoeRowsParams bp;
  bp.routing = rt, bp.rank = R, bp.weights = W.data(), bp.w_stride_n = p.K, bp.w_stride_j = 1, bp.v = gz.data();
  bp.src = gy.data(), bp.src_stride_n = p.y_stride, bp.shrink_mats = Bt.data(), bp.d_src = p.d_out;
  bp.shrink_scale = scale, bp.z = z.data(), bp.dw = dw.data();
  bp.expand_mats = At.data(), bp.d_dst = p.d_in, bp.y = dx.data(), bp.y_stride_n = p.x_stride;
  moe_lora_rows_cpu<T>(bp, 0, p.N, avx2);
  MoeWgradParams wp;
  wp.x = x.data(), wp.x_stride_n = p.x_stride, wp.grad_y = gy.data(), wp.gy_stride_n = p.y_stride;
  wp.z = z.data(), wp.gz = gz.data(), wp.weights = W.data(), wp.w_stride_n = p.K, wp.w_stride_j = 1;
  wp.scale = scale, wp.dA = dA.data(), wp.dB = dB.data(), wp.experts = p.E, wp.d_in = p.d_in, wp.d_out = p.d_out;
  wp.rank = R, wp.top_k = p.K;
  moe_lora_wgrad_cpu<T>(wp, plan, 0, moe_lora_wgrad_cpu_tasks(p.E, p.d_in, p.d_out), avx2);

  // double reference
  std::vector<double> rdA(p.E * p.d_in * R, 0.0), rdB(p.E * R * p.d_out, 0.0);
  for (int64_t n = 0; n < p.N; ++n) {
    std::vector<double> yr(p.d_out, 0.0), dxr(p.d_in, 0.0);
    bool bad = false;
    for (int64_t j = 0; j < p.K; ++j) {
      const int64_t s = n * p.K + j, e = p.ids[n * 2 * p.K + j];
      if (e < 0 || e >= p.E) {
        bad = true;
        EXPECT_TRUE(std::isnan(dw[s]));
        continue;
      }
      std::vector<double> zr(R, 0.0), g(R, 0.0);
      for (int64_t i = 0; i < R; ++i) {
        for (int64_t c = 0; c < p.d_in; ++c) zr[i] += p.x[n * p.x_stride + c] * p.A[(e * p.d_in + c) * R + i];
        for (int64_t c = 0; c < p.d_out; ++c) g[i] += scale * p.gy[n * p.y_stride + c] * p.B[(e * R + i) * p.d_out + c];
        EXPECT_NEAR(z[s * R + i], zr[i], tol * (1 + std::fabs(zr[i])));
      }
      double dwr = 0;
      for (int64_t i = 0; i < R; ++i) {
        dwr += zr[i] * g[i];
        for (int64_t c = 0; c < p.d_out; ++c) yr[c] += scale * p.W[s] * zr[i] * p.B[(e * R + i) * p.d_out + c];
        for (int64_t c = 0; c < p.d_in; ++c) {
          dxr[c] += p.W[s] * g[i] * p.A[(e * p.d_in + c) * R + i];
          rdA[(e * p.d_in + c) * R + i] += p.x[n * p.x_stride + c] * p.W[s] * g[i];
        }
        for (int64_t c = 0; c < p.d_out; ++c)
          rdB[(e * R + i) * p.d_out + c] += scale * p.W[s] * zr[i] * p.gy[n * p.y_stride + c];
      }
      EXPECT_NEAR(dw[s], dwr, tol * (1 + std::fabs(dwr)));
    }
    for (int64_t c = 0; c < p.d_out; ++c) {
      if (bad) {
        EXPECT_TRUE(std::isnan(y[n * p.y_stride + c]));
        EXPECT_TRUE(std::isnan(y2[n * p.y_stride + c]));
      } else {
        EXPECT_NEAR(y[n * p.y_stride + c], p.y0[n * p.y_stride + c] + yr[c], tol * (1 + std::fabs(yr[c])));
        EXPECT_NEAR(y2[n * p.y_stride + c], p.gy[c] + yr[c], tol * (1 + std::fabs(yr[c])));
      }
    }
    for (int64_t c = p.d_out; c < p.y_stride; ++c) {
      EXPECT_TRUE(y[n * p.y_stride + c] == T(p.y0[n * p.y_stride + c]));
      EXPECT_TRUE(y2[n * p.y_stride + c] == T(7));
    }
    for (int64_t c = 0; c < p.d_in; ++c) {
      if (bad)
        EXPECT_TRUE(std::isnan(dx[n * p.x_stride + c]));
      else
        EXPECT_NEAR(dx[n * p.x_stride + c], dxr[c], tol * (1 + std::fabs(dxr[c])));
    }
    for (int64_t c = p.d_in; c < p.x_stride; ++c) EXPECT_TRUE(dx[n * p.x_stride + c] == T(5));  // padding untouched
  }
  for (size_t i = 0; i < rdA.size(); ++i) EXPECT_NEAR(dA[i], rdA[i], tol * (1 + std::fabs(rdA[i])));
  for (size_t i = 0; i < rdB.size(); ++i) EXPECT_NEAR(dB[i], rdB[i], tol * (1 + std::fabs(rdB[i])));

  // Bitwise the same with the rows cut elsewhere (blocks hold other slots: tiles differ).
  std::vector<T> z1(S * R), y1 = cast<T>(p.y0);
  fp.v = z1.data(), fp.y = y1.data();
  for (int64_t n = 0; n < p.N; n += 7) moe_lora_rows_cpu<T>(fp, n, std::min(p.N, n + 7), avx2);
  for (int64_t i = 0; i < S * R; ++i) EXPECT_TRUE(z1[i] == z[i] || (std::isnan(z1[i]) && std::isnan(z[i])));
  for (size_t i = 0; i < y.size(); ++i) EXPECT_TRUE(y1[i] == y[i] || (std::isnan(y1[i]) && std::isnan(y[i])));
  // And one row at a time: the expand then reads X_e in place, where whole blocks (and the wide
  // cases' 64-row calls) copy X's chunks first; the same bits.
  std::vector<T> y3 = cast<T>(p.y0);
  fp.y = y3.data();
  for (int64_t n = 0; n < p.N; ++n) moe_lora_rows_cpu<T>(fp, n, n + 1, avx2);
  for (size_t i = 0; i < y.size(); ++i) EXPECT_TRUE(y3[i] == y[i] || (std::isnan(y3[i]) && std::isnan(y[i])));
}

void test_sort() {
  // 4 rows, k = 2, E = 3; ids with a repeat, an out-of-range and a negative id.
  const int64_t ids[8] = {2, 0, 1, 1, 3, 0, 2, -1};
  MoeRouting r;
  r.ids = ids, r.index_type = IndexType::kInt64, r.ids_stride_n = 2, r.ids_stride_j = 1;
  r.rows = 4, r.top_k = 2, r.experts = 3;
  const MoeSlotPlan plan = moe_plan_slots(r);
  const std::vector<int64_t> order = {1, 5, 2, 3, 0, 6}, start = {0, 2, 4, 6}, invalid = {4, 7};
  EXPECT_TRUE(plan.order == order);
  EXPECT_TRUE(plan.start == start);
  EXPECT_TRUE(plan.invalid == invalid);
  EXPECT_TRUE(moe_expert_of(r, 4) == -1 && moe_expert_of(r, 3) == 1);
  EXPECT_TRUE(moe_lora_wgrad_tasks(3, 17, 32) == 3 * (2 + 2));
  EXPECT_TRUE(moe_lora_wgrad_cpu_tasks(3, kMoeCpuColBlock + 2, kMoeCpuColBlock) == 3 * (2 + 1));
  EXPECT_TRUE(moe_lora_wgrad_cpu_a_tasks(3, kMoeCpuColBlock + 2) == 3 * 2);
}

}  // namespace

int main() {
  test_sort();
  for (bool avx2 : {false, true})
    for (int64_t R : {1, 2, 4, 8, 16, 32, 5}) {
      Problem p = make(37, 3, 5, R, 21, 70, static_cast<unsigned>(R));
      p.ids[6 * 2 * p.K + 1] = 5;    // out of range
      p.ids[11 * 2 * p.K + 2] = -1;  // negative
      run_case<double>(p, 0.7, avx2, 1e-12);
      run_case<float>(p, 0.7, avx2, 2e-4);
    }
  Problem big = make(200, 2, 64, 8, 64, 96, 3);  // many experts, some unused: their gradients are zero
  run_case<float>(big, 0.5, true, 2e-4);
  // Weight gradients over several column blocks (the last one partial) and several slot chunks per
  // expert (100 slots each), for a rank with a vector group tail and the run-time rank.
  for (int64_t R : {8, 16, 5}) {
    Problem wide = make(100, 2, 2, R, kMoeCpuColBlock + 150, 2 * kMoeCpuColBlock + 4, 5);
    run_case<float>(wide, 0.5, true, 1e-3);  // sums of ~1000 unit terms: fp32 rounding near 1e-3 of a result near 1
    run_case<double>(wide, 0.5, false, 1e-12);
  }
  Problem one = make(33, 1, 1, 3, 17, 18, 4);
  run_case<double>(one, 1.0, true, 1e-12);
  return finish("moe_lora_cpu");
}
