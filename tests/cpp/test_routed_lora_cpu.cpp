// Standalone tests of the torch-free grouped routed_lora CPU kernels (forward, and the fused
// backward with and without its dx pass), every variant this CPU has (AVX2, AVX-512) against plain double loops:
// ranks 4 / 8 / 16 / 32, a row count that leaves a partial tile, rows with padding (row stride
// > width), d_out not a multiple of 16, accumulation into existing values, and the problems a
// variant must refuse.
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "check.h"
#include "routed_lora_cpu.h"

using mhr_ops::CpuIsa;
using mhr_ops::LoraGroupForwardParams;
using mhr_ops::LoraGroupGradParams;

namespace {

struct Problem {
  int64_t rows, d_in, d_out, rank, x_stride, gy_stride;
  std::vector<float> x, gy, z, a,
      bt;  // x [rows, x_stride], gy [rows, gy_stride], z [rows, r], a [d_in, r], bt [d_out, r]
};

Problem make(int64_t rows, int64_t d_in, int64_t d_out, int64_t rank, unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> normal;
  Problem p{rows, d_in, d_out, rank, d_in + 3, d_out + 5, {}, {}, {}, {}, {}};
  auto fill = [&](std::vector<float>& v, size_t n) {
    v.resize(n);
    for (float& e : v) e = normal(gen);
  };
  fill(p.x, rows * p.x_stride);
  fill(p.gy, rows * p.gy_stride);
  fill(p.z, rows * rank);
  fill(p.a, d_in * rank);
  fill(p.bt, d_out * rank);
  return p;
}

double tol(int64_t terms) { return 2e-5 * std::sqrt(static_cast<double>(terms)) + 1e-5; }

// with_bias (write mode only): y = bias + update.
void check_forward(const Problem& pr, CpuIsa isa, bool accumulate, bool with_bias = false) {
  const int64_t r = pr.rank;
  std::vector<float> bias(pr.d_out);
  for (int64_t c = 0; c < pr.d_out; ++c) bias[c] = 0.1f * static_cast<float>(c) - 1.f;
  std::vector<float> z(pr.rows * r, -1.f), y(pr.rows * (pr.d_out + 2));
  const int64_t y_stride = pr.d_out + 2;
  for (size_t i = 0; i < y.size(); ++i) y[i] = 0.25f * static_cast<float>(i % 7);
  const std::vector<float> y0 = y;
  LoraGroupForwardParams p;
  p.x = pr.x.data();
  p.x_stride_n = pr.x_stride;
  p.y = y.data();
  p.y_stride_n = y_stride;
  p.a_mix = pr.a.data();
  p.bt_mix = pr.bt.data();
  p.z = z.data();
  p.row_begin = 1;  // row 0 must stay untouched
  p.row_end = pr.rows;
  p.d_in = pr.d_in;
  p.d_out = pr.d_out;
  p.rank = r;
  p.accumulate = accumulate;
  p.bias = with_bias ? bias.data() : nullptr;
  EXPECT_TRUE(mhr_ops::routed_lora_group_forward_cpu(p, isa));
  for (int64_t n = 0; n < pr.rows; ++n) {
    std::vector<double> zr(r, 0.0);
    for (int64_t j = 0; j < r; ++j) {
      for (int64_t c = 0; c < pr.d_in; ++c) zr[j] += double(pr.x[n * pr.x_stride + c]) * pr.a[c * r + j];
      if (n == 0)
        EXPECT_TRUE(z[j] == -1.f);
      else
        EXPECT_NEAR(z[n * r + j], zr[j], tol(pr.d_in));
    }
    for (int64_t c = 0; c < y_stride; ++c) {
      const double before = y0[n * y_stride + c];
      if (n == 0 || c >= pr.d_out) {  // outside the rows and columns the kernel owns
        EXPECT_TRUE(y[n * y_stride + c] == y0[n * y_stride + c]);
        continue;
      }
      double upd = 0.0;
      for (int64_t j = 0; j < r; ++j) upd += zr[j] * pr.bt[c * r + j];
      const double start = accumulate ? before : with_bias ? bias[c] : 0.0;
      EXPECT_NEAR(y[n * y_stride + c], start + upd, tol(pr.d_in * r));
    }
  }
}

// with_dx: also dx = (accumulate: +=) gz @ A_g^T into rows with padding.
void check_grads(const Problem& pr, CpuIsa isa, bool with_dx, bool dx_accumulate) {
  const int64_t r = pr.rank;
  const double scale = 0.375;
  const int64_t dx_stride = pr.d_in + 7;
  std::vector<float> dx(pr.rows * dx_stride);
  for (size_t i = 0; i < dx.size(); ++i) dx[i] = 0.125f * static_cast<float>(i % 5);
  const std::vector<float> dx0 = dx;
  std::vector<float> gz(pr.rows * r, -1.f), da(pr.d_in * r), dbt(pr.d_out * r);
  for (size_t i = 0; i < da.size(); ++i) da[i] = 0.5f;  // accumulated into, not overwritten
  for (size_t i = 0; i < dbt.size(); ++i) dbt[i] = -0.5f;
  LoraGroupGradParams p;
  p.x = pr.x.data();
  p.x_stride_n = pr.x_stride;
  p.x_stride_c = 1;
  p.grad_y = pr.gy.data();
  p.gy_stride_n = pr.gy_stride;
  p.gy_stride_c = 1;
  p.z = pr.z.data();
  p.bt_mix = pr.bt.data();
  p.gz = gz.data();
  p.da = da.data();
  p.dbt = dbt.data();
  p.row_begin = 1;
  p.row_end = pr.rows;
  p.d_in = pr.d_in;
  p.d_out = pr.d_out;
  p.rank = r;
  p.scale = scale;
  if (with_dx) {
    p.dx = dx.data();
    p.dx_stride_n = dx_stride;
    p.dx_accumulate = dx_accumulate;
    p.a_mix = pr.a.data();
  }
  EXPECT_TRUE(mhr_ops::routed_lora_group_grads_cpu(p, isa));
  std::vector<double> gz_ref(pr.rows * r, 0.0), da_ref(pr.d_in * r, 0.5), dbt_ref(pr.d_out * r, -0.5);
  for (int64_t n = 1; n < pr.rows; ++n)
    for (int64_t j = 0; j < r; ++j) {
      for (int64_t c = 0; c < pr.d_out; ++c) {
        const double g = pr.gy[n * pr.gy_stride + c];
        gz_ref[n * r + j] += g * pr.bt[c * r + j];
        dbt_ref[c * r + j] += g * scale * pr.z[n * r + j];
      }
    }
  for (int64_t n = 1; n < pr.rows; ++n)
    for (int64_t j = 0; j < r; ++j)
      for (int64_t c = 0; c < pr.d_in; ++c) da_ref[c * r + j] += double(pr.x[n * pr.x_stride + c]) * gz_ref[n * r + j];
  for (int64_t j = 0; j < r; ++j) EXPECT_TRUE(gz[j] == -1.f);  // row 0 untouched
  for (int64_t i = r; i < pr.rows * r; ++i) EXPECT_NEAR(gz[i], gz_ref[i], tol(pr.d_out));
  for (int64_t i = 0; i < pr.d_in * r; ++i) EXPECT_NEAR(da[i], da_ref[i], tol(pr.rows * pr.d_out) * 4);
  for (int64_t i = 0; i < pr.d_out * r; ++i) EXPECT_NEAR(dbt[i], dbt_ref[i], tol(pr.rows));
  for (int64_t n = 0; n < pr.rows; ++n)
    for (int64_t c = 0; c < dx_stride; ++c) {
      const float before = dx0[n * dx_stride + c];
      if (!with_dx || n == 0 || c >= pr.d_in) {  // untouched
        EXPECT_TRUE(dx[n * dx_stride + c] == before);
        continue;
      }
      double want = dx_accumulate ? before : 0.0;
      for (int64_t j = 0; j < r; ++j) want += gz_ref[n * r + j] * pr.a[c * r + j];
      EXPECT_NEAR(dx[n * dx_stride + c], want, tol(pr.d_out * r));
    }
}

}  // namespace

int main() {
  int variants_run = 0;
  for (CpuIsa isa : {CpuIsa::kAvx2, CpuIsa::kAvx512}) {
    const char* name = isa == CpuIsa::kAvx2 ? "avx2" : "avx512";
    for (int64_t rank : {4, 8, 16, 32}) {
      // d_in 36 and d_out 20: multiples of 4 (every rank's column group), not of 16.
      const Problem pr = make(/*rows=*/23, /*d_in=*/36, /*d_out=*/20, rank, static_cast<unsigned>(rank));
      if (mhr_ops::routed_lora_group_grads_isa(rank, pr.d_in, pr.d_out, 1, 1, isa) == isa) {
        check_grads(pr, isa, /*with_dx=*/false, false);
        check_grads(pr, isa, /*with_dx=*/true, /*dx_accumulate=*/false);
        check_grads(pr, isa, /*with_dx=*/true, /*dx_accumulate=*/true);
        ++variants_run;
        std::printf("%s backward rank %lld: checked\n", name, static_cast<long long>(rank));
      }
      if (mhr_ops::routed_lora_group_forward_isa(rank, pr.d_in, pr.d_out, isa) == isa) {
        check_forward(pr, isa, /*accumulate=*/false);
        check_forward(pr, isa, /*accumulate=*/true);
        check_forward(pr, isa, /*accumulate=*/false, /*with_bias=*/true);
        ++variants_run;
        std::printf("%s forward rank %lld: checked\n", name, static_cast<long long>(rank));
      }
    }
  }
  // What no variant takes: ranks outside the set, strided columns, widths that split a column
  // group (rank 8 packs two columns per AVX-512 vector), and kNone.
  EXPECT_TRUE(mhr_ops::routed_lora_group_grads_isa(12, 64, 64, 1, 1, CpuIsa::kAvx512) == CpuIsa::kNone);
  EXPECT_TRUE(mhr_ops::routed_lora_group_grads_isa(8, 64, 64, 2, 1, CpuIsa::kAvx512) == CpuIsa::kNone);
  EXPECT_TRUE(mhr_ops::routed_lora_group_grads_isa(4, 64, 64, 1, 1, CpuIsa::kAvx2) == CpuIsa::kNone);
  EXPECT_TRUE(mhr_ops::routed_lora_group_grads_isa(8, 64, 64, 1, 1, CpuIsa::kNone) == CpuIsa::kNone);
  EXPECT_TRUE(mhr_ops::routed_lora_group_forward_isa(8, 63, 64, CpuIsa::kAvx512) == CpuIsa::kNone);
  EXPECT_TRUE(mhr_ops::routed_lora_group_forward_isa(16, 64, 64, CpuIsa::kAvx2) == CpuIsa::kNone);
  const CpuIsa odd = mhr_ops::routed_lora_group_grads_isa(8, 63, 64, 1, 1, CpuIsa::kAvx512);
  EXPECT_TRUE(odd != CpuIsa::kAvx512);  // AVX2 (one column per vector) may still take it
  LoraGroupGradParams refused;
  refused.rank = 12;
  EXPECT_TRUE(!mhr_ops::routed_lora_group_grads_cpu(refused, CpuIsa::kAvx512));
  std::printf("variants checked: %d\n", variants_run);
  return finish("routed_lora_cpu");
}
