// The moe_lora CPU kernels (moe_lora.h) against double loops: the counting sort (stable, invalid
// ids left out), forward (shrink + expand, y written and accumulated) and backward (dx, dA, dB,
// dw) for every compile-time rank and a run-time one, fp32 and fp64, portable and AVX2 builds,
// repeated experts within a row, int32 and strided ids, padded rows; an out-of-range id gives a
// NaN row and touches nothing outside the buffers; results do not depend on the piece size.
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
void run_case(const Problem& p, double scale, bool avx2, int64_t piece, double tol) {
  const int64_t S = p.N * p.K, R = p.R;
  const MoeRouting rt = routing(p);
  const MoeSlotPlan plan = moe_plan_slots(rt, piece);
  const auto x = cast<T>(p.x), A = cast<T>(p.A), B = cast<T>(p.B), W = cast<T>(p.W), gy = cast<T>(p.gy);
  // B^T [E, d_out, R] and A^T [E, R, d_in], as the binding lays them out.
  std::vector<T> Bt(p.E * p.d_out * R), At(p.E * R * p.d_in);
  for (int64_t e = 0; e < p.E; ++e)
    for (int64_t j = 0; j < R; ++j) {
      for (int64_t c = 0; c < p.d_out; ++c) Bt[(e * p.d_out + c) * R + j] = B[(e * R + j) * p.d_out + c];
      for (int64_t c = 0; c < p.d_in; ++c) At[(e * R + j) * p.d_in + c] = A[(e * p.d_in + c) * R + j];
    }
  std::vector<T> z(S * R), y = cast<T>(p.y0);
  MoeShrinkParams sp;
  sp.src = x.data(), sp.src_stride_n = p.x_stride, sp.mats = A.data(), sp.d = p.d_in, sp.rank = R;
  sp.top_k = p.K, sp.out = z.data();
  moe_lora_shrink_cpu<T>(sp, plan, 0, static_cast<int64_t>(plan.piece_begin.size()), avx2);
  MoeExpandParams ep;
  ep.v = z.data(), ep.weights = W.data(), ep.w_stride_n = p.K, ep.w_stride_j = 1, ep.scale = scale;
  ep.mats = B.data(), ep.routing = rt, ep.y = y.data(), ep.y_stride_n = p.y_stride, ep.accumulate = true;
  ep.d = p.d_out, ep.rank = R;
  moe_lora_expand_cpu<T>(ep, 0, p.N, avx2);
  // backward
  std::vector<T> gz(S * R), dw(S), dx(p.N * p.x_stride, T(5)), dA(p.E * p.d_in * R, T(9)), dB(p.E * R * p.d_out, T(9));
  MoeShrinkParams bp = sp;
  bp.src = gy.data(), bp.src_stride_n = p.y_stride, bp.mats = Bt.data(), bp.d = p.d_out, bp.scale = scale;
  bp.out = gz.data(), bp.weights = W.data(), bp.w_stride_n = p.K, bp.w_stride_j = 1, bp.z = z.data(), bp.dw = dw.data();
  moe_lora_shrink_cpu<T>(bp, plan, 0, static_cast<int64_t>(plan.piece_begin.size()), avx2);
  moe_lora_fill_invalid_cpu<T>(plan, gz.data(), R, dw.data());
  MoeExpandParams dp;
  dp.v = gz.data(), dp.mats = At.data(), dp.routing = rt, dp.y = dx.data(), dp.y_stride_n = p.x_stride;
  dp.d = p.d_in, dp.rank = R;
  moe_lora_expand_cpu<T>(dp, 0, p.N, avx2);
  MoeWgradParams wp;
  wp.x = x.data(), wp.x_stride_n = p.x_stride, wp.grad_y = gy.data(), wp.gy_stride_n = p.y_stride;
  wp.z = z.data(), wp.gz = gz.data(), wp.weights = W.data(), wp.w_stride_n = p.K, wp.w_stride_j = 1;
  wp.scale = scale, wp.dA = dA.data(), wp.dB = dB.data(), wp.experts = p.E, wp.d_in = p.d_in, wp.d_out = p.d_out;
  wp.rank = R, wp.top_k = p.K;
  moe_lora_wgrad_cpu<T>(wp, plan, 0, moe_lora_wgrad_tasks(p.E, p.d_in, p.d_out), avx2);

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
      if (bad)
        EXPECT_TRUE(std::isnan(y[n * p.y_stride + c]));
      else
        EXPECT_NEAR(y[n * p.y_stride + c], p.y0[n * p.y_stride + c] + yr[c], tol * (1 + std::fabs(yr[c])));
    }
    for (int64_t c = p.d_out; c < p.y_stride; ++c) EXPECT_TRUE(y[n * p.y_stride + c] == T(p.y0[n * p.y_stride + c]));
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

  // Bitwise the same with another piece size (the thread split) and row ranges cut elsewhere.
  const MoeSlotPlan plan1 = moe_plan_slots(rt, 3 * kMoeSlotTile);
  std::vector<T> z1(S * R), y1 = cast<T>(p.y0);
  sp.out = z1.data();
  for (int64_t i = 0; i < static_cast<int64_t>(plan1.piece_begin.size()); ++i)
    moe_lora_shrink_cpu<T>(sp, plan1, i, i + 1, avx2);
  ep.v = z1.data(), ep.y = y1.data();
  for (int64_t n = 0; n < p.N; n += 3 * kMoeRowBlock) moe_lora_expand_cpu<T>(ep, n, std::min(p.N, n + 3 * kMoeRowBlock), avx2);
  for (int64_t i = 0; i < S * R; ++i) EXPECT_TRUE(z1[i] == z[i] || (std::isnan(z1[i]) && std::isnan(z[i])));
  for (size_t i = 0; i < y.size(); ++i) EXPECT_TRUE(y1[i] == y[i] || (std::isnan(y1[i]) && std::isnan(y[i])));
}

void test_sort() {
  // 4 rows, k = 2, E = 3; ids with a repeat, an out-of-range and a negative id.
  const int64_t ids[8] = {2, 0, 1, 1, 3, 0, 2, -1};
  MoeRouting r;
  r.ids = ids, r.index_type = IndexType::kInt64, r.ids_stride_n = 2, r.ids_stride_j = 1;
  r.rows = 4, r.top_k = 2, r.experts = 3;
  const MoeSlotPlan plan = moe_plan_slots(r, 2);
  const std::vector<int64_t> order = {1, 5, 2, 3, 0, 6}, start = {0, 2, 4, 6}, invalid = {4, 7};
  EXPECT_TRUE(plan.order == order);
  EXPECT_TRUE(plan.start == start);
  EXPECT_TRUE(plan.invalid == invalid);
  EXPECT_TRUE(plan.piece_begin.size() == 3 && plan.piece_expert[2] == 2);
  EXPECT_TRUE(moe_expert_of(r, 4) == -1 && moe_expert_of(r, 3) == 1);
  EXPECT_TRUE(moe_lora_wgrad_tasks(3, 17, 32) == 3 * (2 + 2));
  // 20 slots of one expert: pieces of 8 (a requested 5 rounds up to the tile), aligned to the tile
  std::vector<int64_t> same(20, 1);
  r.ids = same.data(), r.rows = 10;
  const MoeSlotPlan tiled = moe_plan_slots(r, 5);
  EXPECT_TRUE(tiled.piece_begin == (std::vector<int64_t>{0, 8, 16}) && tiled.piece_end[2] == 20);
}

}  // namespace

int main() {
  test_sort();
  for (bool avx2 : {false, true})
    for (int64_t R : {1, 2, 4, 8, 16, 32, 5}) {
      Problem p = make(37, 3, 5, R, 21, 70, static_cast<unsigned>(R));
      p.ids[6 * 2 * p.K + 1] = 5;    // out of range
      p.ids[11 * 2 * p.K + 2] = -1;  // negative
      run_case<double>(p, 0.7, avx2, 4, 1e-12);
      run_case<float>(p, 0.7, avx2, 4, 2e-4);
    }
  Problem big = make(200, 2, 64, 8, 64, 96, 3);  // many experts, some unused: their gradients are zero
  run_case<float>(big, 0.5, true, 16, 2e-4);
  Problem one = make(33, 1, 1, 3, 17, 18, 4);
  run_case<double>(one, 1.0, true, 5, 1e-12);
  return finish("moe_lora_cpu");
}
