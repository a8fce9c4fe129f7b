// The CPU planner of routed_lora (routed_lora_plan_cpu.h) and its mixing loops
// (routed_lora_mix_cpu.h): row groups from int32 / int64 ids with a stride and rows_per_id,
// out-of-range ids, the path each cost regime takes, pieces that cover every row once with the
// right slots, the runs drivers against direct kernel calls, and the loops
// against double loops over any split of the rows.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "check.h"
#include "routed_lora_mix_cpu.h"
#include "routed_lora_plan_cpu.h"

using mhr_ops::CpuIsa;
using mhr_ops::DType;
using mhr_ops::IndexType;
using mhr_ops::LoraBackwardPath;
using mhr_ops::LoraDims;
using mhr_ops::LoraForwardPath;
using mhr_ops::LoraGroupIds;
using mhr_ops::LoraRun;

namespace {

LoraDims dims(int64_t rows, int64_t d, int64_t h, int64_t S, int64_t r, int64_t G, int64_t rows_per_id) {
  LoraDims out;
  out.rows = rows, out.d_in = d, out.d_out = d, out.heads = h, out.skills = S, out.rank = r, out.groups = G;
  out.dk_in = d / h, out.dk_out = d / h, out.rows_per_id = rows_per_id;
  return out;
}

LoraGroupIds ids_of(const std::vector<int64_t>& v) { return {v.data(), IndexType::kInt64, 1}; }

template <typename T>
std::vector<T> normal_vector(size_t n, std::mt19937& gen) {
  std::normal_distribution<double> nd;
  std::vector<T> v(n);
  for (T& e : v) e = static_cast<T>(nd(gen));
  return v;
}

// Every row in exactly one piece (runs paths: piece rows are rows; gathered: order positions).
void check_cover(const std::vector<LoraRun>& pieces, const std::vector<int64_t>& slot_groups, int64_t rows,
                 const std::vector<int64_t>& row_group, const std::vector<int64_t>* order) {
  std::vector<int> seen(rows, 0);
  for (const LoraRun& p : pieces) {
    EXPECT_TRUE(p.rows >= 1 && p.slot >= 0 && p.slot < static_cast<int64_t>(slot_groups.size()));
    EXPECT_TRUE(slot_groups[p.slot] == p.group);
    for (int64_t i = p.start; i < p.start + p.rows; ++i) {
      const int64_t row = order ? (*order)[i] : i;
      ++seen[row];
      EXPECT_TRUE(row_group[row] == p.group);
    }
  }
  for (int64_t n = 0; n < rows; ++n) EXPECT_TRUE(seen[n] == 1);
}

void check_row_groups() {
  // int32 ids with stride 2, 3 rows per id; ids 5 and -1 are outside [0, 4)
  const std::vector<int32_t> raw = {1, 9, 1, 9, 5, 9, -1, 9, 2, 9, 2, 9};
  const LoraDims d = dims(18, 8, 2, 2, 2, 4, 3);
  const auto g = mhr_ops::routed_lora_row_groups(d, {raw.data(), IndexType::kInt32, 2});
  const std::vector<int64_t> want = {1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2};
  EXPECT_TRUE(g.row_group == want);
  EXPECT_TRUE(g.runs.size() == 3 && g.runs[0].start == 0 && g.runs[0].rows == 6 && g.runs[1].group == 0 &&
              g.runs[1].rows == 6 && g.runs[2].start == 12 && g.runs[2].group == 2);
  EXPECT_TRUE(g.bad.size() == 1 && g.bad[0].start == 6 && g.bad[0].rows == 6);
  // no groups at all: every row bad, nothing to compute
  const std::vector<int64_t> zeros = {0, 0};
  const LoraDims none = dims(2, 8, 2, 2, 2, 0, 1);
  const auto plan =
      mhr_ops::plan_routed_lora_forward(none, ids_of(zeros), DType::kFloat32, DType::kFloat32, CpuIsa::kNone, 2);
  EXPECT_TRUE(plan.path == LoraForwardPath::kNone && plan.groups.bad.size() == 1 && plan.groups.bad[0].rows == 2);
  const auto empty =
      mhr_ops::plan_routed_lora_backward(dims(0, 8, 2, 2, 2, 3, 1), ids_of({}), DType::kFloat32, CpuIsa::kAvx512, 2);
  EXPECT_TRUE(empty.path == LoraBackwardPath::kNone);
}

void check_forward_paths() {
  // a training batch: 8 examples of 256 rows, one task each -> runs (BLAS without AVX-512)
  {
    const LoraDims d = dims(2048, 1024, 8, 8, 8, 8, 256);
    std::vector<int64_t> ids = {3, 1, 4, 1, 5, 0, 2, 6};
    const auto p =
        mhr_ops::plan_routed_lora_forward(d, ids_of(ids), DType::kFloat32, DType::kFloat32, CpuIsa::kNone, 2);
    EXPECT_TRUE(p.path == LoraForwardPath::kBlasRuns);
    EXPECT_TRUE(p.slot_groups == (std::vector<int64_t>{3, 1, 4, 5, 0, 2, 6}));
    check_cover(p.pieces, p.slot_groups, d.rows, p.groups.row_group, nullptr);
    for (const LoraRun& piece : p.pieces) EXPECT_TRUE(piece.rows <= 512);  // a fair share of 2048 rows on 2 threads
  }
  // decode: one row per task -> row tiles, project-then-mix in registers
  {
    const LoraDims d = dims(4, 1024, 8, 8, 8, 16, 1);
    std::vector<int64_t> ids = {7, 2, 2, 9};
    const auto p =
        mhr_ops::plan_routed_lora_forward(d, ids_of(ids), DType::kFloat32, DType::kFloat32, CpuIsa::kAvx512, 2);
    EXPECT_TRUE(p.path == LoraForwardPath::kTileRows && p.pieces.empty());
  }
  // serving many examples of few tasks, interleaved -> gathered row tiles
  {
    const LoraDims d = dims(4096, 1024, 8, 8, 8, 16, 1);
    std::vector<int64_t> ids(4096);
    for (int64_t n = 0; n < 4096; ++n) ids[n] = (n * 7) % 16;
    const auto p =
        mhr_ops::plan_routed_lora_forward(d, ids_of(ids), DType::kFloat32, DType::kFloat32, CpuIsa::kNone, 4);
    EXPECT_TRUE(p.path == LoraForwardPath::kTileGathered && p.takes_bias());
    EXPECT_TRUE(static_cast<int64_t>(p.order.size()) == d.rows && p.slot_groups.size() == 16);
    check_cover(p.pieces, p.slot_groups, d.rows, p.groups.row_group, &p.order);
  }
  // half-precision y with short runs: project-then-mix (no row-tile kernel writes fp16)
  {
    const LoraDims d = dims(64, 256, 4, 8, 8, 16, 1);
    std::vector<int64_t> ids(64);
    for (int64_t n = 0; n < 64; ++n) ids[n] = n % 16;
    const auto p =
        mhr_ops::plan_routed_lora_forward(d, ids_of(ids), DType::kFloat16, DType::kFloat16, CpuIsa::kNone, 2);
    EXPECT_TRUE(p.path == LoraForwardPath::kProjectThenMix && p.pieces.empty() && !p.takes_bias());
  }
  // one skill: project-then-mix costs nothing extra, so never runs
  {
    const LoraDims d = dims(512, 64, 1, 1, 4, 2, 256);
    std::vector<int64_t> ids = {0, 1};
    const auto p =
        mhr_ops::plan_routed_lora_forward(d, ids_of(ids), DType::kFloat16, DType::kFloat16, CpuIsa::kNone, 2);
    EXPECT_TRUE(p.path == LoraForwardPath::kProjectThenMix);
  }
}

void check_backward_paths() {
  std::vector<int64_t> few = {1, 0, 1};
  const auto rows =
      mhr_ops::plan_routed_lora_backward(dims(3, 64, 2, 4, 8, 2, 1), ids_of(few), DType::kFloat32, CpuIsa::kNone, 8);
  EXPECT_TRUE(rows.path == LoraBackwardPath::kRows);
  const auto half =
      mhr_ops::plan_routed_lora_backward(dims(3, 64, 2, 4, 8, 2, 1), ids_of(few), DType::kBFloat16, CpuIsa::kNone, 8);
  EXPECT_TRUE(half.path == LoraBackwardPath::kProjectThenMix);
  std::vector<int64_t> batch = {0, 1, 2, 3};
  const LoraDims d = dims(1024, 512, 8, 8, 8, 4, 256);
  const auto runs = mhr_ops::plan_routed_lora_backward(d, ids_of(batch), DType::kFloat32, CpuIsa::kNone, 2);
  EXPECT_TRUE(runs.path == LoraBackwardPath::kBlasRuns);
  check_cover(runs.pieces, runs.slot_groups, d.rows, runs.groups.row_group, nullptr);
  const auto fused = mhr_ops::plan_routed_lora_backward(d, ids_of(batch), DType::kFloat32, CpuIsa::kAvx2, 2);
  const bool avx2 = mhr_ops::routed_lora_group_grads_isa(8, 512, 512, 1, 1, CpuIsa::kAvx2) == CpuIsa::kAvx2;
  EXPECT_TRUE(fused.path == (avx2 ? LoraBackwardPath::kFusedRuns : LoraBackwardPath::kBlasRuns));
}

// The runs driver writes what one kernel call per piece writes, at the piece's own slots.
void check_grads_driver() {
  const int64_t rows = 40, d_in = 32, d_out = 24, r = 8;
  if (mhr_ops::routed_lora_group_grads_isa(r, d_in, d_out, 1, 1, CpuIsa::kAvx512) == CpuIsa::kNone) {
    std::printf("routed_lora_plan_cpu: no fused gradient kernel on this CPU, driver test skipped\n");
    return;
  }
  const CpuIsa isa = mhr_ops::routed_lora_group_grads_isa(r, d_in, d_out, 1, 1, CpuIsa::kAvx512);
  std::mt19937 gen(3);
  auto filled = [&](size_t n) { return normal_vector<float>(n, gen); };
  const auto x = filled(rows * d_in), gy = filled(rows * d_out), z = filled(rows * r);
  const auto a = filled(2 * d_in * r), bt = filled(2 * d_out * r);
  const std::vector<LoraRun> pieces = {{0, 16, 5, 1}, {16, 8, 2, 0}, {24, 16, 5, 1}};
  mhr_ops::LoraGroupGradParams base;
  base.x = x.data(), base.x_stride_n = d_in, base.x_stride_c = 1, base.grad_y = gy.data();
  base.gy_stride_n = d_out, base.gy_stride_c = 1, base.z = z.data(), base.d_in = d_in, base.d_out = d_out;
  base.rank = r, base.scale = 0.5, base.a_mix = a.data(), base.bt_mix = bt.data();
  std::vector<float> gz(rows * r), da(3 * d_in * r, 0.f), dbt(3 * d_out * r, 0.f), dx(rows * d_in);
  base.gz = gz.data(), base.da = da.data(), base.dbt = dbt.data(), base.dx = dx.data(), base.dx_stride_n = d_in;
  EXPECT_TRUE(mhr_ops::routed_lora_runs_grads_cpu(base, pieces.data(), 0, 3, isa));
  for (size_t i = 0; i < pieces.size(); ++i) {
    std::vector<float> gz1(rows * r), da1(d_in * r, 0.f), dbt1(d_out * r, 0.f), dx1(rows * d_in);
    mhr_ops::LoraGroupGradParams p = base;
    p.a_mix = a.data() + pieces[i].slot * d_in * r, p.bt_mix = bt.data() + pieces[i].slot * d_out * r;
    p.gz = gz1.data(), p.da = da1.data(), p.dbt = dbt1.data(), p.dx = dx1.data();
    p.row_begin = pieces[i].start, p.row_end = pieces[i].start + pieces[i].rows;
    EXPECT_TRUE(mhr_ops::routed_lora_group_grads_cpu(p, isa));
    for (int64_t e = 0; e < d_in * r; ++e) EXPECT_TRUE(da[i * d_in * r + e] == da1[e]);
    for (int64_t e = 0; e < d_out * r; ++e) EXPECT_TRUE(dbt[i * d_out * r + e] == dbt1[e]);
    for (int64_t n = p.row_begin; n < p.row_end; ++n)
      for (int64_t c = 0; c < d_in; ++c) EXPECT_TRUE(dx[n * d_in + c] == dx1[n * d_in + c]);
  }
}

template <typename T>
void check_mix_loops(double tol) {
  const mhr_ops::LoraMixDims d{7, 3, 4, 5};
  const int64_t N = d.rows, H = d.heads, S = d.skills, R = d.rank;
  std::mt19937 gen(11);
  auto filled = [&](size_t n) { return normal_vector<T>(n, gen); };
  const auto w = filled(N * H * S), proj = filled(H * N * S * R), v = filled(N * R), U = filled(H * N * S * R);
  std::vector<T> z(N * R, T(9)), spread(H * N * S * R), dw(N * H * S);
  for (int64_t cut : {int64_t(0), int64_t(3), N}) {  // any split of the rows gives the same
    mhr_ops::lora_mix_rows_cpu<T>(d, w.data(), proj.data(), z.data(), 0, cut);
    mhr_ops::lora_mix_rows_cpu<T>(d, w.data(), proj.data(), z.data(), cut, N);
    mhr_ops::lora_spread_rows_cpu<T>(d, w.data(), v.data(), spread.data(), 0, cut);
    mhr_ops::lora_spread_rows_cpu<T>(d, w.data(), v.data(), spread.data(), cut, N);
    mhr_ops::lora_row_weight_grads_cpu<T>(d, U.data(), v.data(), proj.data(), z.data(), dw.data(), 0, cut);
    mhr_ops::lora_row_weight_grads_cpu<T>(d, U.data(), v.data(), proj.data(), z.data(), dw.data(), cut, N);
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t j = 0; j < R; ++j) {
        double want = 0;
        for (int64_t k = 0; k < H; ++k)
          for (int64_t s = 0; s < S; ++s) want += double(w[(n * H + k) * S + s]) * proj[((k * N + n) * S + s) * R + j];
        EXPECT_NEAR(z[n * R + j], want, tol);
      }
      for (int64_t k = 0; k < H; ++k)
        for (int64_t s = 0; s < S; ++s) {
          double want = 0;
          for (int64_t j = 0; j < R; ++j) {
            const int64_t pi = ((k * N + n) * S + s) * R + j;
            EXPECT_NEAR(spread[pi], double(w[(n * H + k) * S + s]) * v[n * R + j], tol);
            want += double(U[pi]) * v[n * R + j] + double(proj[pi]) * z[n * R + j];
          }
          EXPECT_NEAR(dw[(n * H + k) * S + s], want, tol * 10);
        }
    }
  }
  // swap_pairs: [a, b, c, e] -> scale * [b, a, e, c]
  const int64_t a = 2, b = 3, c = 4, e = 5;
  const auto src = filled(a * b * c * e);
  std::vector<T> dst(src.size());
  mhr_ops::lora_swap_pairs_cpu<T>(src.data(), dst.data(), a, b, c, e, T(0.5));
  for (int64_t i = 0; i < a; ++i)
    for (int64_t j = 0; j < b; ++j)
      for (int64_t ci = 0; ci < c; ++ci)
        for (int64_t ei = 0; ei < e; ++ei)
          EXPECT_TRUE(dst[((j * a + i) * e + ei) * c + ci] == T(0.5) * src[((i * b + j) * c + ci) * e + ei]);
}

}  // namespace

int main() {
  check_row_groups();
  check_forward_paths();
  check_backward_paths();
  check_grads_driver();
  check_mix_loops<float>(1e-4);
  check_mix_loops<double>(1e-12);
  return finish("routed_lora_plan_cpu");
}
