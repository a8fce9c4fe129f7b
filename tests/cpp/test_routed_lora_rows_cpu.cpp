// The row-tile routed_lora kernels (routed_lora_rows.h) and the counting sort by group, against
// double loops: every compile-time rank and a run-time one, fp32 and fp64, portable and AVX2
// builds, full and partial tiles, padded rows, y written and accumulated, a bias, an out-of-range
// group (NaN row, nothing outside the tensors touched); the project-then-mix forward and its
// backward with their step items split over several calls give the same bits as one call.
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "check.h"
#include "routed_lora_rows.h"

using mhr_ops::LoraGatheredParams;
using mhr_ops::LoraRowsParams;

namespace {

struct Problem {
  int64_t N, H, S, R, G, dk_in, dk_out, x_stride, y_stride;
  std::vector<double> x, A, B, W, y0, bias;
  std::vector<int64_t> group;
};

Problem make(int64_t N, int64_t H, int64_t S, int64_t R, int64_t G, int64_t dk_in, int64_t dk_out, unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> nd;
  std::uniform_int_distribution<int64_t> gd(0, G - 1);
  Problem p{N, H, S, R, G, dk_in, dk_out, H * dk_in + 3, H * dk_out + 2, {}, {}, {}, {}, {}, {}, {}};
  auto fill = [&](std::vector<double>& v, size_t n) {
    v.resize(n);
    for (auto& e : v) e = nd(gen);
  };
  fill(p.x, N * p.x_stride);
  fill(p.A, H * S * dk_in * R);
  fill(p.B, H * S * R * dk_out);
  fill(p.W, G * H * S);
  fill(p.y0, N * p.y_stride);
  fill(p.bias, H * dk_out);
  p.group.resize(N);
  for (auto& g : p.group) g = gd(gen);
  return p;
}

// Double-loop reference: z [N, R] and the update u [N, d_out] (scale included).
void reference(const Problem& p, double scale, std::vector<double>& z, std::vector<double>& u) {
  const int64_t d_out = p.H * p.dk_out;
  z.assign(p.N * p.R, 0.0);
  u.assign(p.N * d_out, 0.0);
  for (int64_t n = 0; n < p.N; ++n) {
    const int64_t g = p.group[n];
    for (int64_t k = 0; k < p.H; ++k)
      for (int64_t s = 0; s < p.S; ++s) {
        const double w = p.W[(g * p.H + k) * p.S + s];
        for (int64_t c = 0; c < p.dk_in; ++c)
          for (int64_t j = 0; j < p.R; ++j)
            z[n * p.R + j] += w * p.x[n * p.x_stride + k * p.dk_in + c] * p.A[((k * p.S + s) * p.dk_in + c) * p.R + j];
      }
    for (int64_t k = 0; k < p.H; ++k)
      for (int64_t s = 0; s < p.S; ++s) {
        const double w = p.W[(g * p.H + k) * p.S + s];
        for (int64_t j = 0; j < p.R; ++j)
          for (int64_t c = 0; c < p.dk_out; ++c)
            u[n * d_out + k * p.dk_out + c] +=
                scale * w * z[n * p.R + j] * p.B[((k * p.S + s) * p.R + j) * p.dk_out + c];
      }
  }
}

template <typename T>
std::vector<T> as(const std::vector<double>& v) {
  return std::vector<T>(v.begin(), v.end());
}

template <typename T>
void check_rows(const Problem& p, bool accumulate, bool avx2, double tol) {
  const double scale = 0.5;
  std::vector<double> z_ref, u_ref;
  reference(p, scale, z_ref, u_ref);
  const auto x = as<T>(p.x), A = as<T>(p.A), B = as<T>(p.B), W = as<T>(p.W);
  auto y = as<T>(p.y0);
  std::vector<T> z(p.N * p.R, T(-7)), zh(p.N * p.H * p.R, T(-5));
  LoraRowsParams q;
  q.x = x.data(), q.x_stride_n = p.x_stride, q.A = A.data(), q.B = B.data(), q.weights = W.data();
  q.row_group = p.group.data(), q.rows = p.N, q.y = y.data(), q.y_stride_n = p.y_stride, q.accumulate = accumulate;
  q.z = z.data(), q.zh = zh.data(), q.d_in = p.H * p.dk_in, q.d_out = p.H * p.dk_out, q.heads = p.H;
  q.skills = p.S, q.rank = p.R, q.groups = p.G, q.scale = scale;
  mhr_ops::routed_lora_rows_forward_cpu<T>(q, avx2);
  // The same steps with their items split over three calls each (as threads would take them):
  // the same bits.
  auto y2 = as<T>(p.y0);
  std::vector<T> z2(p.N * p.R, T(-7));
  LoraRowsParams q2 = q;
  q2.y = y2.data(), q2.z = z2.data();
  for (auto step :
       {mhr_ops::LoraRowsStep::kProject, mhr_ops::LoraRowsStep::kSumHeads, mhr_ops::LoraRowsStep::kExpand}) {
    const int64_t items = mhr_ops::lora_rows_step_items(q2, step), c1 = items / 3, c2 = 2 * items / 3;
    mhr_ops::routed_lora_rows_forward_step_cpu<T>(q2, step, c1, c2, avx2);  // any order: items are independent
    mhr_ops::routed_lora_rows_forward_step_cpu<T>(q2, step, 0, c1, avx2);
    mhr_ops::routed_lora_rows_forward_step_cpu<T>(q2, step, c2, items, avx2);
  }
  for (size_t i = 0; i < y.size(); ++i) EXPECT_TRUE(y[i] == y2[i] || (std::isnan(y[i]) && std::isnan(y2[i])));
  for (size_t i = 0; i < z.size(); ++i) EXPECT_TRUE(z[i] == z2[i]);
  const int64_t d_out = p.H * p.dk_out;
  for (int64_t n = 0; n < p.N; ++n) {
    for (int64_t j = 0; j < p.R; ++j)
      EXPECT_NEAR(z[n * p.R + j], z_ref[n * p.R + j], tol * (1 + std::fabs(z_ref[n * p.R + j])));
    for (int64_t c = 0; c < p.y_stride; ++c) {
      const double want = c < d_out
                              ? (accumulate ? p.y0[n * p.y_stride + c] : 0.0) + u_ref[n * d_out + c]
                              : static_cast<double>(static_cast<T>(p.y0[n * p.y_stride + c]));  // padding untouched
      EXPECT_NEAR(y[n * p.y_stride + c], want, tol * (1 + std::fabs(want)) * 10);
    }
  }
}

// The gathered kernel: rows sorted by group, adapters mixed here in double.
template <typename T>
void check_gathered(const Problem& p, bool accumulate, bool with_bias, bool avx2, double tol) {
  const double scale = 0.25;
  std::vector<double> z_ref, u_ref;
  reference(p, scale, z_ref, u_ref);
  const int64_t d_in = p.H * p.dk_in, d_out = p.H * p.dk_out;
  std::vector<double> a_mix(p.G * d_in * p.R, 0.0), b_mix(p.G * p.R * d_out, 0.0);
  for (int64_t g = 0; g < p.G; ++g)
    for (int64_t k = 0; k < p.H; ++k)
      for (int64_t s = 0; s < p.S; ++s) {
        const double w = p.W[(g * p.H + k) * p.S + s];
        for (int64_t c = 0; c < p.dk_in; ++c)
          for (int64_t j = 0; j < p.R; ++j)
            a_mix[(g * d_in + k * p.dk_in + c) * p.R + j] += w * p.A[((k * p.S + s) * p.dk_in + c) * p.R + j];
        for (int64_t j = 0; j < p.R; ++j)
          for (int64_t c = 0; c < p.dk_out; ++c)
            b_mix[(g * p.R + j) * d_out + k * p.dk_out + c] +=
                scale * w * p.B[((k * p.S + s) * p.R + j) * p.dk_out + c];
      }
  std::vector<int64_t> order(p.N), start(p.G + 1);
  EXPECT_TRUE(mhr_ops::sort_rows_by_group(p.group.data(), p.N, p.G, order.data(), start.data()) == 0);
  for (int64_t i = 0; i + 1 < p.N; ++i) {  // grouped, and stable within a group
    const int64_t ga = p.group[order[i]], gb = p.group[order[i + 1]];
    EXPECT_TRUE(ga < gb || (ga == gb && order[i] < order[i + 1]));
  }
  // pieces of at most 5 rows (partial tiles, several pieces per group), every group a slot
  std::vector<mhr_ops::LoraRun> pieces;
  for (int64_t g = 0; g < p.G; ++g)
    for (int64_t o = start[g]; o < start[g + 1]; o += 5)
      pieces.push_back({o, std::min<int64_t>(5, start[g + 1] - o), g, g});
  const auto x = as<T>(p.x), am = as<T>(a_mix), bm = as<T>(b_mix), bias = as<T>(p.bias);
  auto y = as<T>(p.y0);
  std::vector<T> z(p.N * p.R, T(-7));
  LoraGatheredParams q;
  q.x = x.data(), q.x_stride_n = p.x_stride, q.y = y.data(), q.y_stride_n = p.y_stride, q.accumulate = accumulate;
  q.bias = with_bias ? bias.data() : nullptr, q.z = z.data(), q.a_mix = am.data(), q.b_mix = bm.data();
  q.rows = order.data(), q.pieces = pieces.data();
  q.d_in = d_in, q.d_out = d_out, q.rank = p.R;
  mhr_ops::routed_lora_gathered_forward_cpu<T>(q, 0, static_cast<int64_t>(pieces.size()), avx2);
  for (int64_t n = 0; n < p.N; ++n) {
    for (int64_t j = 0; j < p.R; ++j)
      EXPECT_NEAR(z[n * p.R + j], z_ref[n * p.R + j], tol * (1 + std::fabs(z_ref[n * p.R + j])));
    for (int64_t c = 0; c < d_out; ++c) {
      const double base = accumulate ? p.y0[n * p.y_stride + c] : (with_bias ? p.bias[c] : 0.0);
      const double want = base + u_ref[n * d_out + c];
      EXPECT_NEAR(y[n * p.y_stride + c], want, tol * (1 + std::fabs(want)) * 10);
    }
  }
}

void check_invalid_group_is_nan() {
  Problem p = make(3, 2, 2, 4, 3, 5, 3, 9);
  p.group[1] = 3;  // outside [0, G): never dereferenced, the row comes out NaN
  std::vector<float> x(p.x.begin(), p.x.end()), A(p.A.begin(), p.A.end()), B(p.B.begin(), p.B.end());
  std::vector<float> W(p.W.begin(), p.W.end()), y(p.N * p.y_stride, 0.f), z(p.N * p.R, 0.f);
  std::vector<float> zh(p.N * p.H * p.R);
  LoraRowsParams q;
  q.x = x.data(), q.x_stride_n = p.x_stride, q.A = A.data(), q.B = B.data(), q.weights = W.data();
  q.row_group = p.group.data(), q.rows = p.N, q.y = y.data(), q.y_stride_n = p.y_stride, q.z = z.data();
  q.zh = zh.data(), q.d_in = p.H * p.dk_in, q.d_out = p.H * p.dk_out, q.heads = p.H, q.skills = p.S, q.rank = p.R;
  q.groups = p.G;
  mhr_ops::routed_lora_rows_forward_cpu<float>(q, true);
  EXPECT_TRUE(std::isnan(y[1 * p.y_stride]) && std::isnan(z[1 * p.R]));
  EXPECT_TRUE(!std::isnan(y[0]) && !std::isnan(y[2 * p.y_stride]));
  std::vector<int64_t> order(p.N), start(p.G + 1);
  EXPECT_TRUE(mhr_ops::sort_rows_by_group(p.group.data(), p.N, p.G, order.data(), start.data()) == 1);
  EXPECT_TRUE(start[p.G] == 2);
}

// The rows backward against double loops over the formulas of routed_lora_rows.h (dx written and
// accumulated, any subset of dA / dB / dw / dx), and with every step's items split over calls.
template <typename T>
void check_rows_backward(const Problem& p, bool dx_accumulate, bool avx2, double tol) {
  const double scale = 0.5;
  const int64_t N = p.N, H = p.H, S = p.S, R = p.R, dk_in = p.dk_in, dk_out = p.dk_out;
  const int64_t d_in = H * dk_in, d_out = H * dk_out;
  std::mt19937 gen(static_cast<unsigned>(N * 7 + R));
  std::normal_distribution<double> nd;
  std::vector<double> gy(N * p.y_stride), z(N * R), dx0(N * d_in);
  for (auto* v : {&gy, &z, &dx0})
    for (auto& e : *v) e = nd(gen);
  // reference
  std::vector<double> gz(N * R, 0.0), dA(H * S * dk_in * R, 0.0), dB(H * S * R * dk_out, 0.0), dw(p.G * H * S, 0.0);
  std::vector<double> dx(N * d_in, 0.0);
  for (int64_t n = 0; n < N; ++n) {
    const int64_t g = p.group[n];
    for (int64_t k = 0; k < H; ++k)
      for (int64_t s = 0; s < S; ++s) {
        const double w = p.W[(g * H + k) * S + s];
        for (int64_t j = 0; j < R; ++j)
          for (int64_t c = 0; c < dk_out; ++c)
            gz[n * R + j] += scale * w * gy[n * p.y_stride + k * dk_out + c] * p.B[((k * S + s) * R + j) * dk_out + c];
      }
    for (int64_t k = 0; k < H; ++k)
      for (int64_t s = 0; s < S; ++s) {
        const int64_t ks = k * S + s;
        const double w = p.W[(g * H + k) * S + s];
        double dwv = 0;
        for (int64_t c = 0; c < dk_in; ++c)
          for (int64_t j = 0; j < R; ++j) {
            const double xa = p.x[n * p.x_stride + k * dk_in + c];
            dA[(ks * dk_in + c) * R + j] += w * xa * gz[n * R + j];
            dwv += xa * p.A[(ks * dk_in + c) * R + j] * gz[n * R + j];
            dx[n * d_in + k * dk_in + c] += w * gz[n * R + j] * p.A[(ks * dk_in + c) * R + j];
          }
        for (int64_t j = 0; j < R; ++j)
          for (int64_t c = 0; c < dk_out; ++c) {
            const double gv = gy[n * p.y_stride + k * dk_out + c];
            dB[(ks * R + j) * dk_out + c] += scale * w * z[n * R + j] * gv;
            dwv += scale * z[n * R + j] * gv * p.B[(ks * R + j) * dk_out + c];
          }
        dw[g * H * S + ks] += dwv;
      }
  }
  const auto x = as<T>(p.x), A = as<T>(p.A), B = as<T>(p.B), W = as<T>(p.W), gyt = as<T>(gy), zt = as<T>(z);
  struct Out {
    std::vector<T> gz, pgy, gzh, dA, dB, dw, dx;
  };
  const auto run = [&](bool split, bool want_dA, bool want_dB, bool want_dw, bool want_dx) {
    Out o{std::vector<T>(N * R),
          std::vector<T>(N * H * S * R),
          std::vector<T>(N * H * R),
          std::vector<T>(dA.size(), T(-3)),
          std::vector<T>(dB.size(), T(-3)),
          std::vector<T>(dw.size(), T(0)),
          as<T>(dx0)};
    mhr_ops::LoraRowsGradParams q;
    q.x = x.data(), q.x_stride_n = p.x_stride, q.grad_y = gyt.data(), q.gy_stride_n = p.y_stride, q.z = zt.data();
    q.A = A.data(), q.B = B.data(), q.weights = W.data(), q.row_group = p.group.data(), q.rows = N;
    q.gz = o.gz.data(), q.pgy = o.pgy.data(), q.gzh = o.gzh.data();
    q.dA = want_dA ? o.dA.data() : nullptr, q.dB = want_dB ? o.dB.data() : nullptr;
    q.dw = want_dw ? o.dw.data() : nullptr, q.dx = want_dx ? o.dx.data() : nullptr;
    q.dx_stride_n = d_in, q.dx_accumulate = dx_accumulate;
    q.d_in = d_in, q.d_out = d_out, q.heads = H, q.skills = S, q.rank = R, q.scale = scale;
    if (!split) {
      mhr_ops::routed_lora_rows_backward_cpu<T>(q, avx2);
      return o;
    }
    using Step = mhr_ops::LoraRowsGradStep;
    for (Step step : {Step::kProject, Step::kSumHeads, Step::kWeights, Step::kDx}) {
      const int64_t items = mhr_ops::lora_rows_grad_step_items(q, step), cut = items / 2;
      mhr_ops::routed_lora_rows_backward_step_cpu<T>(q, step, cut, items, avx2);
      mhr_ops::routed_lora_rows_backward_step_cpu<T>(q, step, 0, cut, avx2);
    }
    return o;
  };
  const Out all = run(false, true, true, true, true), split = run(true, true, true, true, true);
  const auto near = [&](const std::vector<T>& got, const std::vector<double>& want, double base) {
    for (size_t i = 0; i < want.size(); ++i) EXPECT_NEAR(got[i], want[i] + base, tol * (1 + std::fabs(want[i])) * 10);
  };
  near(all.gz, gz, 0.0);
  near(all.dA, dA, 0.0);
  near(all.dB, dB, 0.0);
  near(all.dw, dw, 0.0);
  for (size_t i = 0; i < dx.size(); ++i) {
    const double want = dx[i] + (dx_accumulate ? static_cast<double>(static_cast<T>(dx0[i])) : 0.0);
    EXPECT_NEAR(all.dx[i], want, tol * (1 + std::fabs(want)) * 10);
  }
  for (const auto& [a, b] : {std::pair{&all.dA, &split.dA},
                             {&all.dB, &split.dB},
                             {&all.dw, &split.dw},
                             {&all.dx, &split.dx},
                             {&all.gz, &split.gz}})
    for (size_t i = 0; i < a->size(); ++i) EXPECT_TRUE((*a)[i] == (*b)[i]);
  // Only dB (no dA, dw, dx): the same dB, and nothing else written.
  const Out only_db = run(false, false, true, false, false);
  for (size_t i = 0; i < dB.size(); ++i) EXPECT_TRUE(only_db.dB[i] == all.dB[i]);
  for (size_t i = 0; i < dA.size(); ++i) EXPECT_TRUE(only_db.dA[i] == T(-3));
  for (size_t i = 0; i < dw.size(); ++i) EXPECT_TRUE(only_db.dw[i] == T(0));
  for (size_t i = 0; i < dx.size(); ++i) EXPECT_TRUE(only_db.dx[i] == static_cast<T>(dx0[i]));
}

}  // namespace

int main() {
  for (int64_t R : {1, 2, 4, 8, 16, 32, 5})
    for (int64_t N : {1, 7, 8, 21})
      for (bool avx2 : {false, true}) {
        const Problem p = make(N, 3, 2, R, 4, 5, 3, static_cast<unsigned>(R * 100 + N));
        for (bool acc : {false, true}) {
          check_rows<float>(p, acc, avx2, 2e-5);
          check_rows<double>(p, acc, avx2, 1e-12);
          check_gathered<float>(p, acc, !acc, avx2, 2e-5);
          check_gathered<double>(p, acc, false, avx2, 1e-12);
          check_rows_backward<float>(p, acc, avx2, 2e-5);
          check_rows_backward<double>(p, acc, avx2, 1e-12);
        }
      }
  // Head blocks wider than the backward's 32-column blocks of dB (a full block and a remainder).
  for (int64_t R : {8, 3})
    for (bool avx2 : {false, true}) {
      const Problem p = make(11, 2, 3, R, 3, 40, 37, static_cast<unsigned>(R + 5));
      check_rows<float>(p, true, avx2, 2e-5);
      check_rows_backward<float>(p, false, avx2, 2e-5);
      check_rows_backward<double>(p, true, avx2, 1e-12);
    }
  check_invalid_group_is_nan();
  return finish("routed_lora_rows_cpu");
}
