// Shared, torch-free helpers for the mhr_ops kernel layer (CPU and CUDA).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define MHR_HD __host__ __device__ __forceinline__
#else
#define MHR_HD inline
#endif

#if defined(MHR_OPS_CUDA_EMULATION)
#include "traffic.h"  // count_global: the emulation's counted traffic (csrc/emulation)
#endif

namespace mhr_ops {

// Element type of a tensor, as seen by the torch-free layer.
enum class DType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2, kFloat64 = 3 };

// Integer type of an index tensor (task ids, group ids, expert ids).
enum class IndexType : int { kInt32 = 0, kInt64 = 1 };

// x86 instruction sets the CPU kernels have variants for, in increasing order.
enum class CpuIsa : int { kNone = 0, kAvx2 = 1, kAvx512 = 2 };

// The accumulation rule of every kernel: fp32 for fp16 / bf16 / fp32 data, fp64 for fp64. As a
// type (AccType<T>::type) and as a DType; the binding's side: csrc/torch/torch_to_kernel.h.
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
inline DType accumulation_dtype(DType data) { return data == DType::kFloat64 ? DType::kFloat64 : DType::kFloat32; }

// Float math overloaded on the accumulation type (float or double), callable on host and device.
MHR_HD float mhr_exp(float x) { return expf(x); }
MHR_HD double mhr_exp(double x) { return exp(x); }
MHR_HD float mhr_log(float x) { return logf(x); }
MHR_HD double mhr_log(double x) { return log(x); }
MHR_HD float mhr_log1p(float x) { return log1pf(x); }
MHR_HD double mhr_log1p(double x) { return log1p(x); }

template <typename acc_t>
MHR_HD acc_t mhr_sigmoid(acc_t x) {
  return acc_t(1) / (acc_t(1) + mhr_exp(-x));
}

// clamp that lets NaN through (std::min/max would turn NaN into a bound).
template <typename acc_t>
MHR_HD acc_t mhr_clamp(acc_t x, acc_t lo, acc_t hi) {
  return x < lo ? lo : (x > hi ? hi : x);
}

// Element conversion usable in code shared by host and device. The CUDA layer specializes it for
// __half / __nv_bfloat16 (cuda_primitives.cuh), whose implicit conversions torch builds switch off.
template <typename To, typename From>
struct Convert {
  MHR_HD static To apply(From v) { return static_cast<To>(v); }
};
template <typename To, typename From>
MHR_HD To convert(From v) {
  return Convert<To, From>::apply(v);
}

// Top-k order shared by every selection in the package: true when value a (index ia) ranks
// before b (index ib). Larger first, NaN before any number (as torch.topk), ties to the lower index.
template <typename acc_t>
MHR_HD bool ranks_before(acc_t a, int64_t ia, acc_t b, int64_t ib) {
  const bool na = a != a, nb = b != b;
  if (na || nb) return na && (!nb || ia < ib);
  return a > b || (a == b && ia < ib);
}

// Global-memory loads and stores of kernel code (CUDA kernels, and the per-row code that CPU and
// CUDA kernels share): plain accesses, reported first to the emulation's traffic counters
// (traffic.h) in emulation builds, where host code outside a counted launch is ignored.
// Atomics: atomic_add_global (cuda_primitives.cuh).
template <typename T>
MHR_HD T ld_global(const T* p) {
#if defined(MHR_OPS_CUDA_EMULATION)
  ::mhr_emu::count_global(p, sizeof(T), ::mhr_emu::GlobalAccess::kLoad);
#endif
  return *p;
}
template <typename T>
MHR_HD void st_global(T* p, T v) {
#if defined(MHR_OPS_CUDA_EMULATION)
  ::mhr_emu::count_global(p, sizeof(T), ::mhr_emu::GlobalAccess::kStore);
#endif
  *p = v;
}

// Reads an index from an int32 or int64 tensor with an element stride.
MHR_HD int64_t load_index(const void* ids, IndexType type, int64_t stride, int64_t i) {
  return type == IndexType::kInt32 ? static_cast<int64_t>(ld_global(static_cast<const int32_t*>(ids) + i * stride))
                                   : ld_global(static_cast<const int64_t*>(ids) + i * stride);
}

}  // namespace mhr_ops
