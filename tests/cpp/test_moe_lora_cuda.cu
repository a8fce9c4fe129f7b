// The CUDA moe_lora kernels in every data dtype (fp16, bf16, fp32, fp64) against the CPU kernels
// run in double on the same (rounded) inputs: the forward rows pass (z, y, plain and accumulating),
// the backward rows pass (gz, dw, dx), the device slot plan (against moe_plan_slots) and the weight
// gradients (dA, dB). Cases: rows past a 64-row block, rank over a 32-value chunk, E 1 and 64,
// k 1 to 3, repeated experts within a row, int32 and strided ids, ids outside [0, E) (NaN rows,
// nothing added to dA / dB), N = 0. Runs on a GPU or under the SIMT emulation; exits 77 (ctest:
// skipped) on a real toolkit without a device.
// fp16 / bf16 cases of more than 64 rows run the tensor-core rows pass, and every fp16 / bf16 case
// the tensor-core weight gradients (moe_lora_tc_cuda.cu, tf32 with fp32 operands split into two
// terms), under every tolerance of the SIMT kernels, except y and dx of bf16 through the rows pass,
// which also carry the tf32 rounding (one term) of v and of the expand's matrices.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <type_traits>
#include <vector>

#include "check.h"
#include "cuda_check.cuh"
#include "cuda_primitives.cuh"
#include "mma.cuh"
#include "moe_lora.h"

using namespace mhr_ops;

namespace {

template <typename T>
double acc_tol() {
  return std::is_same<T, double>::value ? 1e-12 : 2e-5;
}

template <typename T>
std::vector<double> host_of(const T* d, size_t n) {
  std::vector<double> out(n);
  const std::vector<T> h = to_host(d, n);
  for (size_t i = 0; i < n; ++i) out[i] = to_double(h[i]);
  return out;
}

double magnitude(const std::vector<double>& v) {
  double m = 1;
  for (double x : v)
    if (std::isfinite(x)) m = std::max(m, std::fabs(x));
  return m;
}

void expect_all(const char* what, const char* name, const std::vector<double>& got, const std::vector<double>& ref,
                double rel) {
  const double tolerance = rel * magnitude(ref);
  for (size_t i = 0; i < ref.size(); ++i) expect_close(what, name, i, got[i], ref[i], tolerance);
}

struct MoeCase {
  const char* name;
  int64_t N, d_in, d_out, E, k, r;
  bool int32_ids;
  int64_t ids_stride;  // element stride of the ids' last dim
  bool bad_ids;
  bool accumulate;
  bool inf_in_B = false;  // B[1][0][2] = inf, x[7][3] = -inf: non-finite values reach what they reach on the CPU
};

template <typename T>
void run(const MoeCase& c) {
  using acc_t = typename AccType<T>::type;
  const int64_t N = c.N, d_in = c.d_in, d_out = c.d_out, E = c.E, k = c.k, r = c.r, slots = N * k;
  const double scale = 0.75;
  std::vector<double> x = rounded<T>(N * d_in, 0.61, 0.1, 1.0);
  if (c.inf_in_B) x[7 * d_in + 3] = -INFINITY;  // and row 7 of x: its own rows of y and dA only
  const std::vector<double> gy = rounded<T>(N * d_out, 0.37, 0.4, 1.0);
  const std::vector<double> y0 = rounded<T>(N * d_out, 0.83, 0.2, 1.0);
  const std::vector<double> A = rounded<acc_t>(E * d_in * r, 0.47, 0.9, 0.5);
  std::vector<double> B = rounded<acc_t>(E * r * d_out, 0.29, 0.6, 0.5);
  if (c.inf_in_B) B[(1 * r + 0) * d_out + 2] = INFINITY;
  const std::vector<double> w = rounded<acc_t>(slots, 0.71, 0.3, 1.0);
  std::vector<int64_t> ids(slots);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t j = 0; j < k; ++j) ids[n * k + j] = (n * 7 + j * 3) % E;
  for (int64_t n = 0; n < N && k > 1; n += 5) ids[n * k + 1] = ids[n * k];  // an expert twice in a row
  if (c.bad_ids && N > 6) ids[3 * k] = E, ids[6 * k + k - 1] = -1;

  // Host reference: the CPU kernels in double. Bt [E, d_out, r] and At [E, r, d_in] for the backward.
  std::vector<double> Bt(E * d_out * r), At(E * r * d_in);
  for (int64_t e = 0; e < E; ++e)
    for (int64_t u = 0; u < r; ++u) {
      for (int64_t o = 0; o < d_out; ++o) Bt[(e * d_out + o) * r + u] = B[(e * r + u) * d_out + o];
      for (int64_t i = 0; i < d_in; ++i) At[(e * r + u) * d_in + i] = A[(e * d_in + i) * r + u];
    }
  MoeRouting R;
  R.ids = ids.data(), R.index_type = IndexType::kInt64, R.ids_stride_n = k, R.ids_stride_j = 1;
  R.rows = N, R.top_k = k, R.experts = E;
  std::vector<double> z_ref(slots * r), y_ref = c.accumulate ? y0 : std::vector<double>(N * d_out);
  std::vector<double> gz_ref(slots * r), dw_ref(slots), dx_ref(N * d_in), dA_ref(E * d_in * r), dB_ref(E * r * d_out);
  const bool tc = moe_lora_uses_tensor_cores(dtype_of<T>(), N, k, E);
  const bool one_tf32_term = tc && dtype_of<T>() == DType::kBFloat16;
  MoeRowsParams F;
  F.routing = R, F.rank = r, F.weights = w.data(), F.w_stride_n = k, F.w_stride_j = 1;
  F.v = z_ref.data(), F.src = x.data(), F.src_stride_n = d_in, F.shrink_mats = A.data(), F.d_src = d_in;
  F.expand_mats = B.data(), F.d_dst = d_out, F.expand_scale = scale, F.expand_weighted = true;
  F.y = y_ref.data(), F.y_stride_n = d_out, F.accumulate = c.accumulate;
  moe_lora_rows_cpu<double>(F, 0, N, false);
  MoeRowsParams G = F;
  G.v = gz_ref.data(), G.src = gy.data(), G.src_stride_n = d_out, G.shrink_mats = Bt.data(), G.d_src = d_out;
  G.shrink_scale = scale, G.z = z_ref.data(), G.dw = dw_ref.data();
  G.expand_mats = At.data(), G.d_dst = d_in, G.expand_scale = 1.0, G.expand_weighted = false;
  G.y = dx_ref.data(), G.y_stride_n = d_in, G.accumulate = false;
  moe_lora_rows_cpu<double>(G, 0, N, false);
  const MoeSlotPlan plan = moe_plan_slots(R);
  MoeWgradParams W;
  W.x = x.data(), W.x_stride_n = d_in, W.grad_y = gy.data(), W.gy_stride_n = d_out, W.z = z_ref.data();
  W.gz = gz_ref.data(), W.weights = w.data(), W.w_stride_n = k, W.w_stride_j = 1, W.scale = scale;
  W.dA = dA_ref.data(), W.dB = dB_ref.data(), W.experts = E, W.d_in = d_in, W.d_out = d_out, W.rank = r;
  W.top_k = k;
  moe_lora_wgrad_cpu<double>(W, plan, 0, moe_lora_wgrad_cpu_tasks(E, d_in, d_out), false);

  // Device: the same passes; ids int32 or int64, every `ids_stride`-th element.
  const int64_t st = c.ids_stride;
  void* d_ids = nullptr;
  if (c.int32_ids) {
    std::vector<int32_t> h(std::max<int64_t>(1, slots * st), 12345);
    for (int64_t s = 0; s < slots; ++s) h[s * st] = static_cast<int32_t>(ids[s]);
    d_ids = to_device(h);
  } else {
    std::vector<int64_t> h(std::max<int64_t>(1, slots * st), 12345);
    for (int64_t s = 0; s < slots; ++s) h[s * st] = ids[s];
    d_ids = to_device(h);
  }
  T *d_x = device_strided<T>(x), *d_gy = device_strided<T>(gy),
    *d_y = device_strided<T>(c.accumulate ? y0 : std::vector<double>(N * d_out));
  T* d_dx = device_strided<T>(std::vector<double>(N * d_in));
  acc_t *d_A = device_strided<acc_t>(A), *d_B = device_strided<acc_t>(B), *d_At = device_strided<acc_t>(At),
        *d_Bt = device_strided<acc_t>(Bt);
  acc_t *d_w = device_strided<acc_t>(w), *d_z = device_strided<acc_t>(std::vector<double>(slots * r));
  acc_t *d_gz = device_strided<acc_t>(std::vector<double>(slots * r)),
        *d_dw = device_strided<acc_t>(std::vector<double>(slots));
  acc_t *d_dA = device_strided<acc_t>(std::vector<double>(E * d_in * r)),
        *d_dB = device_strided<acc_t>(std::vector<double>(E * r * d_out));
  int64_t *d_counts = to_device(std::vector<int64_t>(E, -1)), *d_start = to_device(std::vector<int64_t>(E + 1, -1));
  int64_t* d_order = to_device(std::vector<int64_t>(std::max<int64_t>(1, slots), -1));

  MoeRouting DR = R;
  DR.ids = d_ids, DR.index_type = c.int32_ids ? IndexType::kInt32 : IndexType::kInt64;
  DR.ids_stride_n = k * st, DR.ids_stride_j = st;
  MoeRowsParams DF = F;
  DF.routing = DR, DF.weights = d_w, DF.v = d_z, DF.src = d_x, DF.shrink_mats = d_A, DF.expand_mats = d_B, DF.y = d_y;
#if defined(MHR_OPS_CUDA_EMULATION)
  const unsigned long long flops_before = emulated_tensor_core_flops();
#endif
  EXPECT_TRUE(moe_lora_rows_cuda(DF, dtype_of<T>(), nullptr) == 0);
#if defined(MHR_OPS_CUDA_EMULATION)  // the tensor-core kernel ran where it was chosen, and only there
  EXPECT_TRUE((emulated_tensor_core_flops() > flops_before) == tc);
#endif
  MoeRowsParams DG = G;
  DG.routing = DR, DG.weights = d_w, DG.v = d_gz, DG.src = d_gy, DG.shrink_mats = d_Bt, DG.z = d_z, DG.dw = d_dw;
  DG.expand_mats = d_At, DG.y = d_dx;
  EXPECT_TRUE(moe_lora_rows_cuda(DG, dtype_of<T>(), nullptr) == 0);
  EXPECT_TRUE(moe_lora_plan_cuda(DR, d_counts, d_start, d_order, nullptr) == 0);
  MoeWgradParams DW = W;
  DW.x = d_x, DW.grad_y = d_gy, DW.z = d_z, DW.gz = d_gz, DW.weights = d_w, DW.dA = d_dA, DW.dB = d_dB;
#if defined(MHR_OPS_CUDA_EMULATION)
  const unsigned long long wgrad_flops_before = emulated_tensor_core_flops();
#endif
  EXPECT_TRUE(moe_lora_wgrad_cuda(DW, d_order, d_start, dtype_of<T>(), nullptr) == 0);
#if defined(MHR_OPS_CUDA_EMULATION)  // fp16 / bf16: the tensor-core wgrad, which has work where a slot is valid
  EXPECT_TRUE((emulated_tensor_core_flops() > wgrad_flops_before) ==
              (moe_lora_wgrad_uses_tensor_cores(dtype_of<T>()) && !plan.order.empty()));
#endif
  EXPECT_TRUE(cudaDeviceSynchronize() == cudaSuccess);

  // tensor cores: v and the expand's matrices enter as tf32 (2^-11 relative each), on top of y's
  // rounding to T
  const double dt = stored_tol<T>() + (one_tf32_term ? 4e-3 : 0.0), at = acc_tol<T>();
  // z from rounded x in the accumulation type; y and dx rounded to T at the end.
  expect_all("z", c.name, host_of(d_z, slots * r), z_ref, at);
  expect_all("y", c.name, host_of(d_y, N * d_out), y_ref, dt);
  expect_all("gz", c.name, host_of(d_gz, slots * r), gz_ref, at);
  expect_all("dw", c.name, host_of(d_dw, slots), dw_ref, at);
  expect_all("dx", c.name, host_of(d_dx, N * d_in), dx_ref, dt);
  expect_all("dA", c.name, host_of(d_dA, E * d_in * r), dA_ref, at);
  expect_all("dB", c.name, host_of(d_dB, E * r * d_out), dB_ref, at);
  const std::vector<int64_t> start = to_host(d_start, E + 1), order = to_host(d_order, plan.order.size());
  for (int64_t e = 0; e <= E; ++e) EXPECT_TRUE(start[e] == plan.start[e]);
  for (size_t q = 0; q < plan.order.size(); ++q) EXPECT_TRUE(order[q] == plan.order[q]);
  if (c.inf_in_B) {  // a row without expert 1 (but row 7) is finite; the comparisons above match inf and NaN exactly
    const std::vector<double> y = host_of(d_y, N * d_out);
    int64_t finite_rows = 0, inf_rows = 0;
    for (int64_t n = 0; n < N; ++n) {
      bool uses = false, finite = true;
      for (int64_t j = 0; j < k; ++j) uses |= ids[n * k + j] == 1 || n == 7;
      for (int64_t o = 0; o < d_out; ++o) finite &= std::isfinite(y[n * d_out + o]);
      EXPECT_TRUE(uses || finite);
      finite_rows += !uses, inf_rows += uses && !finite;
    }
    EXPECT_TRUE(finite_rows > 0 && inf_rows > 0);
  }
  if (c.bad_ids && N > 6) {  // the NaN rows really are NaN (not a vacuous comparison)
    const std::vector<double> y = host_of(d_y, N * d_out);
    EXPECT_TRUE(std::isnan(y[3 * d_out]) && std::isnan(y[6 * d_out + d_out - 1]) && !std::isnan(y[4 * d_out]));
  }
  for (void* p : {(void*)d_ids, (void*)d_x, (void*)d_gy, (void*)d_y, (void*)d_dx, (void*)d_A, (void*)d_B, (void*)d_At,
                  (void*)d_Bt, (void*)d_w, (void*)d_z, (void*)d_gz, (void*)d_dw, (void*)d_dA, (void*)d_dB,
                  (void*)d_counts, (void*)d_start, (void*)d_order})
    cudaFree(p);
}

template <typename T>
void all_cases() {
  const MoeCase cases[] = {
      {"rows-past-block", 70, 33, 40, 5, 2, 3, false, 1, false, false},
      {"rank-over-32", 9, 17, 12, 3, 2, 40, true, 2, false, true},
      {"bad-ids", 20, 8, 9, 4, 3, 4, false, 1, true, false},
      {"k1-e1", 5, 6, 7, 1, 1, 1, false, 1, false, false},
      {"e64", 130, 16, 24, 64, 2, 8, true, 1, false, true},
      {"n0", 0, 4, 4, 2, 1, 2, false, 1, false, false},
      // past 64 rows: the tensor-core kernel for fp16 / bf16 (two rank passes, bad ids, k 3)
      {"tc-rank-40-bad-ids", 100, 70, 90, 6, 3, 40, false, 1, true, true},
      {"tc-k1", 66, 24, 17, 3, 1, 16, true, 3, false, false},
      {"tc-many-tiles", 130, 20, 33, 2, 5, 8, false, 1, false, true},  // 20+ tiles a block: two passes
      {"tc-inf-in-B", 100, 40, 70, 4, 2, 8, false, 1, false, true, true},
  };
  for (const MoeCase& c : cases) run<T>(c);
}

}  // namespace

int main() {
  if (const int skip = skip_without_device("test_moe_lora_cuda")) return skip;
  all_cases<float>();
  all_cases<double>();
  all_cases<__half>();
  all_cases<__nv_bfloat16>();
  return finish("test_moe_lora_cuda");
}
