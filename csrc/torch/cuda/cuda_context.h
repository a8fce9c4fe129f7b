// What the CUDA registrations (cuda/*_cuda.cpp) need from CUDA beyond the kernels: the current stream,
// a device guard, one launch check, the non-determinism alert and the registration itself.
//
// Two builds use it:
//  - the real CUDA extension (mhr_ops._C built with nvcc): c10::cuda's stream and guard, the
//    kernels registered for the CUDA dispatch key;
//  - the emulated test build (mhr_ops._emulated_cuda, setup.py with MHR_OPS_EMULATED_CUDA=1,
//    -DMHR_OPS_CUDA_EMULATION): the kernels' .cu sources run on the host through the SIMT
//    emulation (csrc/emulation/simt.h) on host memory, streams are synchronous, and the same
//    registrations are made for the CPU dispatch key, so importing that module makes CPU tensors
//    run the CUDA binding and kernels (it overrides the CPU kernels for the whole process).
#pragma once

#include <ATen/Context.h>
#include <c10/core/Device.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#if !defined(MHR_OPS_CUDA_EMULATION)
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace mhr_ops {

#if defined(MHR_OPS_CUDA_EMULATION)
// Host memory, one emulated device: nothing to switch.
struct CudaDeviceGuard {
  explicit CudaDeviceGuard(c10::Device) {}
};
inline cudaStream_t current_stream() { return nullptr; }  // the emulation runs every stream synchronously
#else
using CudaDeviceGuard = c10::cuda::CUDAGuard;
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }
#endif

// `err` is the cudaError_t value a launcher returned; `what` names the op and, where it has
// several, the kernel ("routed_lora shrink").
inline void check_launch(int err, const char* what) {
  const auto e = static_cast<cudaError_t>(err);
  TORCH_CHECK(e == cudaSuccess, what, ": CUDA kernel failed: ", cudaGetErrorName(e), " (", cudaGetErrorString(e), ")");
}

// Called exactly where a kernel path that sums with floating-point atomics is about to run
// (SPEC section 8): with torch.use_deterministic_algorithms(True) it raises, naming the op as
// "<op> (CUDA)"; in warn-only mode it warns.
inline void alert_not_deterministic(const char* op_and_backend) {
  at::globalContext().alertNotDeterministic(op_and_backend);
}

}  // namespace mhr_ops

// Registers the CUDA kernels of an op file: `MHR_OPS_CUDA_KERNELS(m) { m.impl(...); }`.
#if defined(MHR_OPS_CUDA_EMULATION)
#define MHR_OPS_CUDA_KERNELS(m) TORCH_LIBRARY_IMPL(mhr_ops, CPU, m)
#else
#define MHR_OPS_CUDA_KERNELS(m) TORCH_LIBRARY_IMPL(mhr_ops, CUDA, m)
#endif
