// What CUDA kernel code uses instead of raw CUDA, torch-free: launch and shared-memory macros
// (which the SIMT emulation replaces), element conversions, global atomics, warp reductions and
// the element-type dispatch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "common.h"

// Launches and shared-memory declarations go through these macros, so that test builds can run
// the same source on the host (CMake -DMHR_OPS_CUDA_EMULATION=ON, csrc/emulation/simt.h).
// A kernel whose name holds template commas is parenthesized: MHR_LAUNCH((k<a, b>), ...).
#if defined(MHR_OPS_CUDA_EMULATION)
#include "simt.h"
#define MHR_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::mhr_emu::launch(#kernel, kernel, grid, block, smem, stream, __VA_ARGS__)
#define MHR_SHARED(type, name, dims) MHR_EMU_SHARED(type, name, dims)
#define MHR_DYNAMIC_SHARED(type, name) MHR_EMU_DYNAMIC_SHARED(type, name, 16)
#else
#define MHR_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#define MHR_SHARED(type, name, dims) __shared__ type name dims
// The dynamic buffer is one byte array for every kernel, 16-byte aligned (enough for double and
// 16-byte vector loads), viewed as `type`.
#define MHR_DYNAMIC_SHARED(type, name)                               \
  extern __shared__ __align__(16) unsigned char mhr_dynamic_smem_[]; \
  type* name = reinterpret_cast<type*>(mhr_dynamic_smem_)
#endif

namespace mhr_ops {

// Element conversions in and out of the accumulation type (see Convert below).
template <typename acc_t, typename T>
__device__ __forceinline__ acc_t to_acc(T v) {
  return convert<acc_t>(v);
}
template <typename T, typename acc_t>
__device__ __forceinline__ T from_acc(acc_t v) {
  return convert<T>(v);
}

template <>
struct Convert<float, __half> {
  MHR_HD static float apply(__half v) { return __half2float(v); }
};
template <>
struct Convert<__half, float> {
  MHR_HD static __half apply(float v) { return __float2half_rn(v); }
};
template <>
struct Convert<float, __nv_bfloat16> {
  MHR_HD static float apply(__nv_bfloat16 v) { return __bfloat162float(v); }
};
template <>
struct Convert<__nv_bfloat16, float> {
  MHR_HD static __nv_bfloat16 apply(float v) { return __float2bfloat16_rn(v); }
};

// Global-memory accesses of kernels go through these, so that the emulation counts them
// (traffic.h): ld_global / st_global (common.h: host and device, for the per-row code CPU and
// CUDA kernels share) and atomic_add_global, plain atomicAdd on the device.
template <typename T>
__device__ __forceinline__ T atomic_add_global(T* p, T v) {
#if defined(MHR_OPS_CUDA_EMULATION)
  ::mhr_emu::count_global(p, sizeof(T), ::mhr_emu::GlobalAccess::kAtomic);
#endif
  return atomicAdd(p, v);
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Max that propagates NaN, as torch.max does.
template <typename acc_t>
__device__ __forceinline__ acc_t nan_max(acc_t a, acc_t b) {
  return (a != a || a > b) ? a : b;
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_max(acc_t v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = nan_max(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

__device__ __forceinline__ int warp_sum_int(int v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Runs `body` with scalar_t bound to the CUDA element type of `dtype`.
#define MHR_DISPATCH_CUDA_FLOAT(dtype, ...)           \
  switch (dtype) {                                    \
    case ::mhr_ops::DType::kFloat16: {                \
      using scalar_t = __half;                        \
      __VA_ARGS__;                                    \
      break;                                          \
    }                                                 \
    case ::mhr_ops::DType::kBFloat16: {               \
      using scalar_t = __nv_bfloat16;                 \
      __VA_ARGS__;                                    \
      break;                                          \
    }                                                 \
    case ::mhr_ops::DType::kFloat32: {                \
      using scalar_t = float;                         \
      __VA_ARGS__;                                    \
      break;                                          \
    }                                                 \
    case ::mhr_ops::DType::kFloat64: {                \
      using scalar_t = double;                        \
      __VA_ARGS__;                                    \
      break;                                          \
    }                                                 \
    default:                                          \
      return static_cast<int>(cudaErrorInvalidValue); \
  }

}  // namespace mhr_ops
