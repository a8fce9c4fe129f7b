// The CUDA routed_lora kernels (shrink, expand, wgrad) in every instantiation (fp32, fp16, bf16,
// fp16 / bf16 data with fp32 adapters, fp64), forward and backward, against a host computation in
// double on the same (rounded) inputs: y, and the backward's gz, dx, dA, dB, dw.
// Cases: odd sizes, N = 0 and 1, rows past a tile edge, unsorted per-row groups, every row in its
// own group, runs of one group, rank 1 and 128, h = 1 and 64, strided x / y / ids, int32 ids,
// `out=` accumulation, NaN inputs, and ids outside [0, G) with validation skipped (NaN rows,
// nothing read or written out of bounds, including the ids -2 and -3).
// Runs on a GPU, or on the host under the SIMT emulation (CMake MHR_OPS_CUDA_EMULATION=ON); exits
// 77 (ctest: skipped) on a real toolkit without a device.
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <type_traits>
#include <vector>

#include "check.h"
#include "cuda_check.cuh"
#include "cuda_primitives.cuh"
#include "routed_lora_cuda.h"

using namespace mhr_ops;

namespace {

const double kNaN = std::numeric_limits<double>::quiet_NaN();

struct Case {
  const char* name;
  int64_t N, h, S, dki, r, dko, G, rows_per_id;
  int order;            // 0 runs of one group, 1 unsorted, 2 every row its own group (G = N / rows_per_id)
  int64_t x_col = 1;    // column stride of x, gy, y, dx (2: every other column)
  int64_t row_pad = 0;  // extra elements per row of x, gy, y, dx
  bool int32_ids = false;
  int64_t ids_stride = 1;
  bool accumulate = false;  // y and dx start non-zero and are summed into
  bool nan_input = false;   // x[1, 2] is NaN
  bool bad_ids = false;     // ids outside [0, G), validation skipped
};

// The edge layouts and inputs, each on a base case (the SIMT and the tensor-core paths run them all).
Case strided(Case c) {  // every other column, padded rows, int32 ids every other element
  c.x_col = 2, c.row_pad = 3, c.int32_ids = true, c.ids_stride = 2;
  return c;
}
Case accumulating(Case c) {
  c.accumulate = true;
  return c;
}
Case nan_input(Case c) {
  c.nan_input = true;
  return c;
}
Case bad_ids(Case c) {
  c.bad_ids = true;
  return c;
}

// Inputs rounded to their storage types, held in double; reference results in double.
struct Problem {
  Case c;
  std::vector<double> x, gy, A, B, w, y0, dx0;  // x [N, h*dki] dense; y0 / dx0: start values (accumulate)
  std::vector<int64_t> ids;                     // per id slot
  int64_t group(int64_t n) const { return ids[n / c.rows_per_id]; }
  bool valid(int64_t g) const { return g >= 0 && g < c.G; }
};

template <typename xt, typename mt>
Problem make_problem(const Case& c) {
  using acc_t = typename AccType<xt>::type;
  Problem p{c, {}, {}, {}, {}, {}, {}, {}, {}};
  auto fill = [](std::vector<double>& v, size_t n, double a, double b, auto round) {
    v.resize(n);
    for (size_t i = 0; i < n; ++i) v[i] = round(std::sin(a * static_cast<double>(i) + b));
  };
  auto rx = [](double v) { return to_double(from_double<xt>(v)); };
  auto rm = [](double v) { return to_double(from_double<mt>(v)); };
  auto ra = [](double v) { return static_cast<double>(static_cast<acc_t>(v)); };
  fill(p.x, c.N * c.h * c.dki, 0.731, 0.1, rx);
  fill(p.gy, c.N * c.h * c.dko, 0.533, 0.4, rx);
  fill(p.A, c.h * c.S * c.dki * c.r, 1.37, 0.2, rm);
  fill(p.B, c.h * c.S * c.r * c.dko, 0.917, 0.3, rm);
  fill(p.y0, c.N * c.h * c.dko, 0.29, 0.7, rx);
  fill(p.dx0, c.N * c.h * c.dki, 0.41, 0.9, rx);
  p.w.resize(c.G * c.h * c.S);
  for (size_t i = 0; i < p.w.size(); ++i) p.w[i] = ra(0.1 + std::fabs(std::cos(0.77 * i)));
  if (c.nan_input && c.N > 1) p.x[1 * c.h * c.dki + 2] = kNaN;
  const int64_t slots = c.N / c.rows_per_id;
  p.ids.resize(slots);
  for (int64_t i = 0; i < slots; ++i)
    p.ids[i] = c.order == 0 ? (i * c.G) / slots : c.order == 1 ? (i * 7 + 3) % c.G : (i * 5 + 1) % slots;
  if (c.bad_ids) {
    const int64_t bad[] = {-2, -3, c.G, -1, c.G + 1000};
    for (int64_t i = 0; i < 5 && 3 * i + 1 < slots; ++i) p.ids[3 * i + 1] = bad[i];
  }
  return p;
}

struct Reference {
  std::vector<double> z, gz, y, dx, dA, dB, dw;
};

Reference reference(const Problem& p) {
  const Case& c = p.c;
  const int64_t N = c.N, h = c.h, S = c.S, dki = c.dki, r = c.r, dko = c.dko;
  auto amix = [&](int64_t g, int64_t k, int64_t col, int64_t j) {
    double v = 0;
    for (int64_t s = 0; s < S; ++s) v += p.w[(g * h + k) * S + s] * p.A[((k * S + s) * dki + col) * r + j];
    return v;
  };
  auto bmix = [&](int64_t g, int64_t k, int64_t j, int64_t col) {
    double v = 0;
    for (int64_t s = 0; s < S; ++s) v += p.w[(g * h + k) * S + s] * p.B[((k * S + s) * r + j) * dko + col];
    return v;
  };
  Reference R{std::vector<double>(N * r, 0),       std::vector<double>(N * r, 0),
              std::vector<double>(N * h * dko, 0), std::vector<double>(N * h * dki, 0),
              std::vector<double>(p.A.size(), 0),  std::vector<double>(p.B.size(), 0),
              std::vector<double>(p.w.size(), 0)};
  const double scale = 0.37;
  for (int64_t n = 0; n < N; ++n) {
    const int64_t g = p.group(n);
    if (!p.valid(g)) {  // NaN rows; the row gives the weight gradients nothing
      for (int64_t j = 0; j < r; ++j) R.z[n * r + j] = R.gz[n * r + j] = kNaN;
      for (int64_t i = 0; i < h * dko; ++i) R.y[n * h * dko + i] = kNaN;
      for (int64_t i = 0; i < h * dki; ++i) R.dx[n * h * dki + i] = kNaN;
      continue;
    }
    for (int64_t k = 0; k < h; ++k)
      for (int64_t j = 0; j < r; ++j) {
        for (int64_t col = 0; col < dki; ++col) R.z[n * r + j] += p.x[n * h * dki + k * dki + col] * amix(g, k, col, j);
        for (int64_t col = 0; col < dko; ++col)
          R.gz[n * r + j] += scale * p.gy[n * h * dko + k * dko + col] * bmix(g, k, j, col);
      }
    for (int64_t k = 0; k < h; ++k) {
      for (int64_t col = 0; col < dko; ++col) {
        double v = 0;
        for (int64_t j = 0; j < r; ++j) v += R.z[n * r + j] * bmix(g, k, j, col);
        R.y[n * h * dko + k * dko + col] = scale * v + (c.accumulate ? p.y0[n * h * dko + k * dko + col] : 0.0);
      }
      for (int64_t col = 0; col < dki; ++col) {
        double v = 0;
        for (int64_t j = 0; j < r; ++j) v += R.gz[n * r + j] * amix(g, k, col, j);
        R.dx[n * h * dki + k * dki + col] = v + (c.accumulate ? p.dx0[n * h * dki + k * dki + col] : 0.0);
      }
      for (int64_t s = 0; s < S; ++s) {
        const double ws = p.w[(g * h + k) * S + s];
        for (int64_t col = 0; col < dki; ++col)
          for (int64_t j = 0; j < r; ++j) {
            const double pa = p.x[n * h * dki + k * dki + col] * R.gz[n * r + j];
            R.dA[((k * S + s) * dki + col) * r + j] += ws * pa;
            R.dw[(g * h + k) * S + s] += pa * p.A[((k * S + s) * dki + col) * r + j];
          }
        for (int64_t j = 0; j < r; ++j)
          for (int64_t col = 0; col < dko; ++col) {
            const double pb = scale * R.z[n * r + j] * p.gy[n * h * dko + k * dko + col];
            R.dB[((k * S + s) * r + j) * dko + col] += ws * pb;
            R.dw[(g * h + k) * S + s] += pb * p.B[((k * S + s) * r + j) * dko + col];
          }
      }
    }
  }
  return R;
}

// Compares element by element: NaN exactly where the reference has NaN, else within
// tol * max |reference| (the sums' rounding scales with the largest terms).
void compare(const char* what, const Case& c, const std::vector<double>& got, const std::vector<double>& ref,
             double tol) {
  double mag = 0;
  for (double v : ref)
    if (!std::isnan(v)) mag = std::max(mag, std::fabs(v));
  int bad = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const bool ok = std::isnan(ref[i]) ? std::isnan(got[i]) : std::fabs(got[i] - ref[i]) <= tol * (mag + 1e-30);
    if (!ok && bad++ < 3)
      std::fprintf(stderr, "%s %s[%zu]: got %.9g, expected %.9g (tol %.3g x %.3g)\n", c.name, what, i, got[i], ref[i],
                   tol, mag);
  }
  if (bad) ++g_failures;
}

template <typename T>
T* device_copy(const std::vector<double>& v, size_t n_alloc, const std::vector<size_t>& where) {
  std::vector<T> h(n_alloc, from_double<T>(kNaN));
  for (size_t i = 0; i < v.size(); ++i) h[where[i]] = from_double<T>(v[i]);
  return to_device(h);
}

template <typename T>
std::vector<double> device_read(const T* d, size_t n_alloc, const std::vector<size_t>& where) {
  const std::vector<T> h = to_host(d, n_alloc);
  std::vector<double> out(where.size());
  for (size_t i = 0; i < where.size(); ++i) out[i] = to_double(h[where[i]]);
  return out;
}

template <typename xt, typename mt>
void run_case_impl(const Case& c);
template <typename xt, typename mt>
void run_case(const Case& c) {
  const auto t0 = std::chrono::steady_clock::now();
  run_case_impl<xt, mt>(c);
  if (std::getenv("MHR_TEST_TIMES"))
    std::fprintf(stderr, "%s<%d,%d>: %.2f s\n", c.name, (int)dtype_of<xt>(), (int)dtype_of<mt>(),
                 std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
}
template <typename xt, typename mt>
void run_case_impl(const Case& c) {
  using acc_t = typename AccType<xt>::type;
  if (c.N % c.rows_per_id != 0) {  // the op's contract: whole id slots
    std::fprintf(stderr, "%s: N must be a multiple of rows_per_id\n", c.name);
    ++g_failures;
    return;
  }
  const Problem p = make_problem<xt, mt>(c);
  const Reference R = reference(p);
  const int64_t N = c.N, h = c.h, S = c.S, dki = c.dki, r = c.r, dko = c.dko, G = c.G;
  const DType data = dtype_of<xt>(), matrix = dtype_of<mt>();
  const double scale = 0.37;

  // Row-major [N, width] views with a column stride and row padding.
  auto layout = [&](int64_t width, int64_t* stride_n, size_t* alloc) {
    *stride_n = width * c.x_col + c.row_pad;
    *alloc = static_cast<size_t>(std::max<int64_t>(1, N * *stride_n));
    std::vector<size_t> where(N * width);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t i = 0; i < width; ++i) where[n * width + i] = n * *stride_n + i * c.x_col;
    return where;
  };
  int64_t in_stride = 0, out_stride = 0;
  size_t in_alloc = 0, out_alloc = 0;
  const auto in_where = layout(h * dki, &in_stride, &in_alloc);
  const auto out_where = layout(h * dko, &out_stride, &out_alloc);
  auto dense = [](size_t n) {
    std::vector<size_t> w(n);
    for (size_t i = 0; i < n; ++i) w[i] = i;
    return w;
  };

  xt* x = device_copy<xt>(p.x, in_alloc, in_where);
  xt* gy = device_copy<xt>(p.gy, out_alloc, out_where);
  xt* y = device_copy<xt>(c.accumulate ? p.y0 : std::vector<double>(N * h * dko, 0.0), out_alloc, out_where);
  xt* dx = device_copy<xt>(c.accumulate ? p.dx0 : std::vector<double>(N * h * dki, 0.0), in_alloc, in_where);
  mt* A = device_copy<mt>(p.A, p.A.size(), dense(p.A.size()));
  mt* B = device_copy<mt>(p.B, p.B.size(), dense(p.B.size()));
  acc_t* w = device_copy<acc_t>(p.w, p.w.size(), dense(p.w.size()));
  const std::vector<double> zeros_r(N * r, 0.0), zeros_A(p.A.size(), 0.0), zeros_B(p.B.size(), 0.0),
      zeros_w(p.w.size(), 0.0);
  acc_t* z = device_copy<acc_t>(zeros_r, std::max<size_t>(1, N * r), dense(N * r));
  acc_t* gz = device_copy<acc_t>(zeros_r, std::max<size_t>(1, N * r), dense(N * r));
  acc_t* dA = device_copy<acc_t>(zeros_A, p.A.size(), dense(p.A.size()));
  acc_t* dB = device_copy<acc_t>(zeros_B, p.B.size(), dense(p.B.size()));
  acc_t* dw = device_copy<acc_t>(zeros_w, p.w.size(), dense(p.w.size()));
  const size_t id_alloc = std::max<size_t>(1, p.ids.size() * c.ids_stride);
  void* ids = nullptr;
  if (c.int32_ids) {
    std::vector<int32_t> v(id_alloc, 0);
    for (size_t i = 0; i < p.ids.size(); ++i) v[i * c.ids_stride] = static_cast<int32_t>(p.ids[i]);
    ids = to_device(v);
  } else {
    std::vector<int64_t> v(id_alloc, 0);
    for (size_t i = 0; i < p.ids.size(); ++i) v[i * c.ids_stride] = p.ids[i];
    ids = to_device(v);
  }

  RowRouting Rt;
  Rt.weights = w;
  Rt.w_stride_g = h * S;
  Rt.w_stride_k = S;
  Rt.w_stride_s = 1;
  Rt.group_ids = ids;
  Rt.index_type = c.int32_ids ? IndexType::kInt32 : IndexType::kInt64;
  Rt.ids_stride = c.ids_stride;
  Rt.rows_per_group_id = c.rows_per_id;
  Rt.num_groups = G;
  Rt.num_heads = h;
  Rt.num_skills = S;
  const SkillMatrices mA{A, S * dki * r, dki * r, r, 1}, mAt{A, S * dki * r, dki * r, 1, r};
  const SkillMatrices mB{B, S * r * dko, r * dko, dko, 1}, mBt{B, S * r * dko, r * dko, 1, dko};

  ShrinkParams sp;
  sp.x = x, sp.x_stride_n = in_stride, sp.x_stride_c = c.x_col, sp.m = mA, sp.routing = Rt, sp.z = z;
  sp.num_rows = N, sp.dk = dki, sp.rank = r;
  EXPECT_TRUE(routed_lora_shrink_cuda(sp, data, matrix, nullptr) == 0);
  ExpandParams ep;
  ep.z = z, ep.m = mB, ep.routing = Rt, ep.y = y, ep.y_stride_n = out_stride, ep.y_stride_c = c.x_col;
  ep.num_rows = N, ep.dk = dko, ep.rank = r, ep.y_scale = scale, ep.accumulate = c.accumulate;
  EXPECT_TRUE(routed_lora_expand_cuda(ep, data, matrix, nullptr) == 0);
  ShrinkParams gp = sp;
  gp.x = gy, gp.x_stride_n = out_stride, gp.m = mBt, gp.z = gz, gp.dk = dko, gp.z_scale = scale;
  EXPECT_TRUE(routed_lora_shrink_cuda(gp, data, matrix, nullptr) == 0);
  ExpandParams xp = ep;
  xp.z = gz, xp.m = mAt, xp.y = dx, xp.y_stride_n = in_stride, xp.dk = dki, xp.y_scale = 1.0;
  EXPECT_TRUE(routed_lora_expand_cuda(xp, data, matrix, nullptr) == 0);
  WgradParams wa;
  wa.x = x, wa.x_stride_n = in_stride, wa.x_stride_c = c.x_col, wa.q = gz, wa.m = mA, wa.routing = Rt, wa.dm = dA;
  wa.dw = dw, wa.num_rows = N, wa.dk = dki, wa.rank = r;
  EXPECT_TRUE(routed_lora_wgrad_cuda(wa, data, matrix, nullptr) == 0);
  WgradParams wb = wa;
  wb.x = gy, wb.x_stride_n = out_stride, wb.q = z, wb.q_scale = scale, wb.m = mBt, wb.dm = dB, wb.dk = dko;
  EXPECT_TRUE(routed_lora_wgrad_cuda(wb, data, matrix, nullptr) == 0);
  EXPECT_TRUE(cudaDeviceSynchronize() == cudaSuccess);

  // Tensor cores take fp32 adapters and the fp32 operands built from z / gz (w z, w gz) through
  // tf32: 2^-11 relative rounding per operand, whose errors in these smooth test inputs add up
  // over a sum's terms to about 1e-2 of the largest value (the kernels are exact given the rounded
  // operands: checked to 5e-7 against a reference that rounds them the same way). 16-bit operands
  // are exact in tf32, so z, gz and dw keep the fp32 tolerance with 16-bit adapters.
  const bool tc = routed_lora_uses_tensor_cores(data, matrix, N);
  const double acc_tol = std::is_same<acc_t, double>::value ? 1e-11 : 2e-5;
  const double tf32_tol = tc ? 2e-2 : 0.0;
  const double adapter_tol = acc_tol + (tc && std::is_same<mt, float>::value ? tf32_tol : 0.0);
  compare("z", c, device_read(z, N * r, dense(N * r)), R.z, adapter_tol);
  compare("gz", c, device_read(gz, N * r, dense(N * r)), R.gz, adapter_tol);
  compare("y", c, device_read(y, out_alloc, out_where), R.y, stored_tol<xt>() + acc_tol + tf32_tol);
  compare("dx", c, device_read(dx, in_alloc, in_where), R.dx, stored_tol<xt>() + acc_tol + tf32_tol);
  compare("dA", c, device_read(dA, p.A.size(), dense(p.A.size())), R.dA, acc_tol + tf32_tol);
  compare("dB", c, device_read(dB, p.B.size(), dense(p.B.size())), R.dB, acc_tol + tf32_tol);
  compare("dw", c, device_read(dw, p.w.size(), dense(p.w.size())), R.dw, adapter_tol);
  // Padding and skipped columns of y / dx are never written (they hold NaN from device_copy).
  if (c.x_col > 1 || c.row_pad > 0) {
    const std::vector<xt> yh = to_host(y, out_alloc);
    std::vector<bool> used(out_alloc, false);
    for (size_t i : out_where) used[i] = true;
    for (size_t i = 0; i < out_alloc; ++i)
      if (!used[i] && !std::isnan(to_double(yh[i]))) {
        std::fprintf(stderr, "%s: y[%zu] outside the view was written\n", c.name, i);
        ++g_failures;
        break;
      }
  }
  for (void* ptr : {(void*)x, (void*)gy, (void*)y, (void*)dx, (void*)A, (void*)B, (void*)w, (void*)z, (void*)gz,
                    (void*)dA, (void*)dB, (void*)dw, ids})
    cudaFree(ptr);
}

}  // namespace

int main() {
  if (const int skip = skip_without_device("test_routed_lora_cuda")) return skip;
  // name, N, h, S, dki, r, dko, G, rows_per_id, order, ...
  const Case mixed{"mixed", 36, 2, 2, 33, 5, 29, 3, 2, 1};  // past a tile edge, unsorted, odd sizes
  const Case runs{"runs", 40, 1, 3, 40, 48, 70, 4, 10, 0};  // runs of one group, rank > 32
  // Every instantiation, forward and backward.
  run_case<float, float>(mixed);
  run_case<double, double>(mixed);
  run_case<__half, __half>(mixed);
  run_case<__nv_bfloat16, __nv_bfloat16>(mixed);
  run_case<__half, float>(mixed);
  run_case<__nv_bfloat16, float>(mixed);
  run_case<__nv_bfloat16, float>(runs);
  run_case<double, double>(runs);
  // Shapes and layouts, fp32.
  run_case<float, float>(runs);
  run_case<float, float>(Case{"own-group", 33, 2, 2, 9, 3, 11, 33, 1, 2});
  run_case<float, float>(Case{"n0", 0, 2, 2, 8, 4, 8, 3, 1, 1});
  run_case<float, float>(Case{"n1", 1, 2, 3, 8, 4, 8, 3, 1, 1});
  run_case<float, float>(Case{"rank1", 5, 1, 2, 8, 1, 130, 5, 1, 1});
  run_case<float, float>(Case{"rank128", 9, 1, 2, 6, 128, 5, 2, 1, 1});
  run_case<float, float>(Case{"h64", 2, 64, 2, 2, 3, 1, 2, 1, 1});
  run_case<float, float>(strided({"strided", 35, 2, 2, 7, 4, 9, 5, 1, 1}));
  const Case accum = accumulating({"accumulate", 35, 2, 3, 7, 4, 9, 5, 5, 1});
  run_case<float, float>(accum);
  run_case<__half, float>(accum);
  run_case<float, float>(nan_input({"nan-input", 35, 2, 3, 7, 4, 9, 5, 1, 0}));
  run_case<float, float>(bad_ids({"bad-ids", 40, 2, 2, 7, 4, 9, 3, 1, 1}));
  // Tensor cores (16-bit data, more than kRoutedLoraTensorCoreMinRows rows), every instantiation:
  // S*r not a multiple of 8, exactly 128 (one n pass), and over 128 with r not dividing it.
  const Case tc_mixed{"tc-mixed", 150, 2, 3, 37, 5, 45, 4, 3, 1};
  const Case tc_train{"tc-train", 130, 1, 8, 40, 16, 24, 2, 65, 0};
  const Case tc_wide{"tc-wide", 66, 1, 12, 24, 24, 20, 3, 1, 1};
  run_case<__half, __half>(tc_mixed);
  run_case<__half, float>(tc_mixed);
  run_case<__nv_bfloat16, __nv_bfloat16>(tc_mixed);
  run_case<__nv_bfloat16, float>(tc_mixed);
  run_case<__nv_bfloat16, float>(tc_train);
  run_case<__nv_bfloat16, __nv_bfloat16>(tc_train);
  run_case<__half, __half>(tc_wide);
  run_case<__nv_bfloat16, __nv_bfloat16>(Case{"tc-deep", 70, 1, 2, 150, 4, 70, 3, 1, 1});  // several dk tiles
  run_case<__nv_bfloat16, float>(strided({"tc-strided", 99, 2, 2, 7, 4, 9, 5, 1, 1}));
  run_case<__half, float>(accumulating({"tc-accumulate", 100, 2, 3, 7, 4, 9, 5, 5, 1}));
  run_case<__nv_bfloat16, __nv_bfloat16>(nan_input({"tc-nan-input", 70, 2, 3, 7, 4, 9, 5, 1, 0}));
  run_case<__half, __half>(bad_ids({"tc-bad-ids", 80, 2, 2, 7, 4, 9, 3, 1, 1}));
  Case tc_own{"tc-own-group", 65, 1, 4, 16, 8, 16, 65, 1, 2};
  run_case<__nv_bfloat16, float>(tc_own);
  return finish("test_routed_lora_cuda");
}
