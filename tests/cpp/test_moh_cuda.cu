// The CUDA Mixture-of-Head kernels in every dtype (fp16, bf16, fp32, fp64): head_gates forward
// and backward against the CPU kernel run in double, and gated_head_proj against a host sum in
// double (16-bit types on tensor cores, the others SIMT). Cases: N = 0, 1 and past a block, H = 1
// and 64, strided inputs, top-k ties, NaN logits, binary gates; closed heads (gate exactly 0)
// skipped even where o holds NaN or Inf (SPEC section 5), a NaN gate counting as open, bias or
// none. Runs on a GPU or under the SIMT emulation; exits 77 (ctest: skipped) on a real toolkit
// without a device.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <type_traits>
#include <vector>

#include "check.h"
#include "cuda_check.cuh"
#include "cuda_primitives.cuh"
#include "gated_head_proj.h"
#include "head_gates.h"

using namespace mhr_ops;

namespace {

// ---- head_gates -------------------------------------------------------------------------------

struct GateCase {
  const char* name;
  int64_t N, Hr, Hs, top_k;
  bool shared, stage, binary, ties, nan_row;
  int64_t stride;  // column stride of every logits tensor and of grad_gates
};

template <typename T>
void run_gates(const GateCase& c) {
  const int64_t N = c.N, H = c.Hs + c.Hr, st = c.stride;
  std::vector<double> routed = rounded<T>(N * c.Hr, 1.31, 0.2, c.ties ? 0.0 : 2.0);
  if (c.ties)
    for (size_t i = 0; i < routed.size(); ++i) routed[i] = static_cast<double>((i * 7) % 3);  // many equal logits
  if (c.nan_row && N > 2) routed[2 * c.Hr + 1] = NAN;
  const std::vector<double> shared = c.shared ? rounded<T>(N * c.Hs, 0.77, 0.5, 1.5) : std::vector<double>();
  const std::vector<double> stage = c.stage ? rounded<T>(N * 2, 0.53, 0.1, 1.0) : std::vector<double>();
  const std::vector<double> grad = rounded<T>(N * H, 0.91, 0.3, 1.0);

  HeadGatesParams P;
  P.num_rows = N, P.num_routed = c.Hr, P.num_shared = c.Hs, P.top_k = c.top_k, P.binary = c.binary;
  // Host reference: the CPU kernel in double, dense.
  std::vector<double> gates_ref(N * H), gr_ref(N * c.Hr), gs_ref(N * c.Hs), gst_ref(N * 2);
  HeadGatesParams C = P;
  C.routed = routed.data(), C.routed_stride_n = c.Hr, C.routed_stride_h = 1;
  C.shared = c.shared ? shared.data() : nullptr, C.shared_stride_n = c.Hs, C.shared_stride_h = 1;
  C.stage = c.stage ? stage.data() : nullptr, C.stage_stride_n = 2, C.stage_stride_h = 1;
  C.gates = gates_ref.data();
  C.grad_gates = grad.data(), C.grad_stride_n = H, C.grad_stride_h = 1;
  C.grad_routed = gr_ref.data(), C.grad_shared = c.shared ? gs_ref.data() : nullptr;
  C.grad_stage = c.stage ? gst_ref.data() : nullptr;
  head_gates_fwd_cpu<double>(C, 0, N);
  if (!c.binary) head_gates_bwd_cpu<double>(C, 0, N);

  T *d_routed = device_strided<T>(routed, st), *d_shared = device_strided<T>(shared, st),
    *d_stage = device_strided<T>(stage, st), *d_grad = device_strided<T>(grad, st);
  T *d_gates = nullptr, *d_gr = nullptr, *d_gs = nullptr, *d_gst = nullptr;
  cudaMalloc(&d_gates, sizeof(T) * std::max<int64_t>(1, N * H));
  cudaMalloc(&d_gr, sizeof(T) * std::max<int64_t>(1, N * c.Hr));
  cudaMalloc(&d_gs, sizeof(T) * std::max<int64_t>(1, N * c.Hs));
  cudaMalloc(&d_gst, sizeof(T) * std::max<int64_t>(1, N * 2));
  HeadGatesParams D = P;
  D.routed = d_routed, D.routed_stride_n = c.Hr * st, D.routed_stride_h = st;
  D.shared = c.shared ? d_shared : nullptr, D.shared_stride_n = c.Hs * st, D.shared_stride_h = st;
  D.stage = c.stage ? d_stage : nullptr, D.stage_stride_n = 2 * st, D.stage_stride_h = st;
  D.gates = d_gates;
  D.grad_gates = d_grad, D.grad_stride_n = H * st, D.grad_stride_h = st;
  D.grad_routed = d_gr, D.grad_shared = c.shared ? d_gs : nullptr, D.grad_stage = c.stage ? d_gst : nullptr;
  EXPECT_TRUE(head_gates_fwd_cuda(D, dtype_of<T>(), nullptr) == 0);
  EXPECT_TRUE(head_gates_bwd_cuda(D, dtype_of<T>(), nullptr) == 0);
  EXPECT_TRUE(cudaDeviceSynchronize() == cudaSuccess);
  const double t = stored_tol<T>();
  const auto gates = to_host(d_gates, N * H);
  for (size_t i = 0; i < gates_ref.size(); ++i)
    expect_close("gates", c.name, i, to_double(gates[i]), gates_ref[i], t * (1 + std::fabs(gates_ref[i])));
  if (!c.binary) {
    const auto gr = to_host(d_gr, N * c.Hr);
    for (size_t i = 0; i < gr_ref.size(); ++i)
      expect_close("grad_routed", c.name, i, to_double(gr[i]), gr_ref[i], 4 * t * (1 + std::fabs(gr_ref[i])));
    if (c.shared) {
      const auto gs = to_host(d_gs, N * c.Hs);
      for (size_t i = 0; i < gs_ref.size(); ++i)
        expect_close("grad_shared", c.name, i, to_double(gs[i]), gs_ref[i], 4 * t * (1 + std::fabs(gs_ref[i])));
    }
    if (c.stage) {
      const auto gst = to_host(d_gst, N * 2);
      for (size_t i = 0; i < gst_ref.size(); ++i)
        expect_close("grad_stage", c.name, i, to_double(gst[i]), gst_ref[i], 4 * t * (1 + std::fabs(gst_ref[i])));
    }
  }
  for (void* p : {(void*)d_routed, (void*)d_shared, (void*)d_stage, (void*)d_grad, (void*)d_gates, (void*)d_gr,
                  (void*)d_gs, (void*)d_gst})
    cudaFree(p);
}

// ---- gated_head_proj --------------------------------------------------------------------------

struct ProjCase {
  const char* name;
  int64_t N, H, Dh, D;
  bool bias;
  int64_t o_stride_c;  // column stride of o (2: every other element)
};

template <typename T>
void run_proj(const ProjCase& c) {
  const int64_t N = c.N, H = c.H, Dh = c.Dh, D = c.D;
  std::vector<double> o = rounded<T>(N * H * Dh, 0.61, 0.1, 1.0);
  std::vector<double> gates = rounded<T>(N * H, 0.83, 0.4, 1.0);
  const std::vector<double> W = rounded<T>(D * H * Dh, 0.47, 0.9, 1.0 / std::sqrt(static_cast<double>(H * Dh)));
  const std::vector<double> b = rounded<T>(D, 0.29, 0.6, 1.0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t h = 0; h < H; ++h) {
      // Head 2 (of H > 3) is open in every row: a full 64-row block on tensor cores. Head 1 is
      // closed for rows 64..127: a whole tensor-core block skips it.
      const bool closed = ((n * 3 + h) % 4 == 0 && h != 2) || (h == H - 1 && H > 1) || (n >= 32 && n < 64 && h == 0) ||
                          (n >= 64 && n < 128 && h == 1);
      if (closed) {
        gates[n * H + h] = 0.0;
        o[(n * H + h) * Dh] = (n + h) % 2 ? NAN : INFINITY;  // closed heads ignore what o holds
      }
    }
  if (N > 5 && H > 2) gates[5 * H + 1] = NAN;  // an open NaN gate: row 5 is NaN
  std::vector<double> y_ref(N * D);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t d = 0; d < D; ++d) {
      double v = c.bias ? b[d] : 0.0;
      for (int64_t h = 0; h < H; ++h) {
        const double g = gates[n * H + h];
        if (g == 0.0) continue;
        for (int64_t k = 0; k < Dh; ++k) v += g * o[(n * H + h) * Dh + k] * W[d * H * Dh + h * Dh + k];
      }
      y_ref[n * D + d] = v;
    }

  T *d_o = device_strided<T>(o, c.o_stride_c), *d_g = device_strided<T>(gates, 1), *d_W = device_strided<T>(W, 1),
    *d_b = device_strided<T>(b, 1), *d_y = nullptr;
  cudaMalloc(&d_y, sizeof(T) * std::max<int64_t>(1, N * D));
  GatedHeadProjParams p;
  p.o = d_o, p.o_stride_n = H * Dh * c.o_stride_c, p.o_stride_h = Dh * c.o_stride_c, p.o_stride_c = c.o_stride_c;
  p.gates = d_g, p.g_stride_n = H, p.g_stride_h = 1;
  p.weight = d_W, p.w_stride_d = H * Dh, p.w_stride_k = 1;
  p.bias = c.bias ? d_b : nullptr;
  p.y = d_y;
  p.num_rows = N, p.num_heads = H, p.head_dim = Dh, p.out_features = D;
  EXPECT_TRUE(gated_head_proj_fwd_cuda(p, dtype_of<T>(), nullptr) == 0);
  EXPECT_TRUE(cudaDeviceSynchronize() == cudaSuccess);
  const auto y = to_host(d_y, N * D);
  double mag = 1;
  for (double v : y_ref)
    if (std::isfinite(v)) mag = std::max(mag, std::fabs(v));
  for (size_t i = 0; i < y_ref.size(); ++i) {
    EXPECT_TRUE(!std::isinf(to_double(y[i])));  // no Inf of a closed head leaks through
    expect_close("y", c.name, i, to_double(y[i]), y_ref[i], stored_tol<T>() * mag);
  }
  for (void* q : {(void*)d_o, (void*)d_g, (void*)d_W, (void*)d_b, (void*)d_y}) cudaFree(q);
}

template <typename T>
void all_cases(bool full) {
  const GateCase gate_cases[] = {
      {"gates-full", 130, 6, 3, 2, true, true, false, false, true, 1},
      {"gates-strided-ties", 9, 7, 2, 3, true, false, false, true, false, 2},
      {"gates-binary", 5, 5, 1, 2, false, true, true, false, false, 1},
      {"gates-h64", 3, 64, 0, 8, false, false, false, false, false, 1},
      {"gates-n1", 1, 4, 1, 4, true, true, false, false, false, 3},
      {"gates-n0", 0, 4, 2, 1, true, true, false, false, false, 1},
  };
  const ProjCase proj_cases[] = {
      {"proj-tiles", 70, 5, 33, 65, true, 1},  // rows past a tile, columns past a tile, a closed tile
      {"proj-strided", 9, 3, 4, 7, false, 2},
      {"proj-h64", 4, 64, 2, 3, true, 1},
      {"proj-h1", 3, 1, 5, 4, true, 1},
      {"proj-n1", 1, 4, 3, 5, false, 1},
      {"proj-n0", 0, 2, 3, 5, true, 1},
      // Tensor cores (16-bit): three 64-row blocks, the last partial; head_dim 80 = a 64-column
      // chunk and a 16-column one; two 64-output blocks, the last partial.
      {"proj-tc-chunks", 150, 5, 80, 70, true, 1},
      // head_dim 33: three k16 steps, zero-filled past 33; strided o.
      {"proj-tc-odd", 67, 4, 33, 9, false, 2},
  };
  for (const GateCase& c : gate_cases)
    if (full || c.N > 1) run_gates<T>(c);
  for (const ProjCase& c : proj_cases)
    run_proj<T>(c);  // every case in every dtype: 16-bit types take the tensor-core kernel
}

}  // namespace

int main() {
  if (const int skip = skip_without_device("test_moh_cuda")) return skip;
  all_cases<float>(true);
  all_cases<double>(true);
  all_cases<__half>(false);
  all_cases<__nv_bfloat16>(false);
  return finish("test_moh_cuda");
}
