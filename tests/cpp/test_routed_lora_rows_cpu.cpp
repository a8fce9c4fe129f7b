// The row-tile routed_lora forward kernels (routed_lora_rows.h) and the counting sort by group,
// against double loops: every compile-time rank and a run-time one, fp32 and fp64, portable and
// AVX2 builds, full and partial tiles, padded rows, y written and accumulated, a bias, and an
// out-of-range group (NaN row, nothing outside the tensors touched).
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
  std::vector<T> z(p.N * p.R, T(-7));
  LoraRowsParams q;
  q.x = x.data(), q.x_stride_n = p.x_stride, q.A = A.data(), q.B = B.data(), q.weights = W.data();
  q.row_group = p.group.data(), q.y = y.data(), q.y_stride_n = p.y_stride, q.accumulate = accumulate;
  q.z = z.data(), q.d_in = p.H * p.dk_in, q.d_out = p.H * p.dk_out, q.heads = p.H, q.skills = p.S, q.rank = p.R;
  q.groups = p.G, q.scale = scale;
  mhr_ops::routed_lora_rows_forward_cpu<T>(q, 0, p.N, avx2);
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
  LoraRowsParams q;
  q.x = x.data(), q.x_stride_n = p.x_stride, q.A = A.data(), q.B = B.data(), q.weights = W.data();
  q.row_group = p.group.data(), q.y = y.data(), q.y_stride_n = p.y_stride, q.z = z.data();
  q.d_in = p.H * p.dk_in, q.d_out = p.H * p.dk_out, q.heads = p.H, q.skills = p.S, q.rank = p.R, q.groups = p.G;
  mhr_ops::routed_lora_rows_forward_cpu<float>(q, 0, p.N, true);
  EXPECT_TRUE(std::isnan(y[1 * p.y_stride]) && std::isnan(z[1 * p.R]));
  EXPECT_TRUE(!std::isnan(y[0]) && !std::isnan(y[2 * p.y_stride]));
  std::vector<int64_t> order(p.N), start(p.G + 1);
  EXPECT_TRUE(mhr_ops::sort_rows_by_group(p.group.data(), p.N, p.G, order.data(), start.data()) == 1);
  EXPECT_TRUE(start[p.G] == 2);
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
        }
      }
  check_invalid_group_is_nan();
  return finish("routed_lora_rows_cpu");
}
