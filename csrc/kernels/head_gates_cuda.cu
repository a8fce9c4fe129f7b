// CUDA kernels for head_gates (see head_gates.h): one thread per row, the shared per-row math.
#include "cuda_primitives.cuh"
#include "head_gates.h"

namespace mhr_ops {
namespace {

constexpr int kThreads = 128;

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) head_gates_fwd_kernel(const HeadGatesParams p) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (n >= p.num_rows) return;
  using acc_t = typename AccType<scalar_t>::type;
  head_gates_row_fwd<scalar_t, acc_t>(p, n, static_cast<scalar_t*>(p.gates) + n * (p.num_shared + p.num_routed));
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) head_gates_bwd_kernel(const HeadGatesParams p) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (n >= p.num_rows) return;
  using acc_t = typename AccType<scalar_t>::type;
  head_gates_row_bwd<scalar_t, acc_t>(p, n);
}

template <typename scalar_t, bool kForward>
int launch(const HeadGatesParams& p, cudaStream_t stream) {
  if (p.num_rows == 0) return 0;
  const unsigned blocks = static_cast<unsigned>((p.num_rows + kThreads - 1) / kThreads);
  if (kForward)
    MHR_LAUNCH(head_gates_fwd_kernel<scalar_t>, blocks, kThreads, 0, stream, p);
  else
    MHR_LAUNCH(head_gates_bwd_kernel<scalar_t>, blocks, kThreads, 0, stream, p);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int head_gates_fwd_cuda(const HeadGatesParams& p, DType dtype, void* stream) {
  MHR_DISPATCH_CUDA_FLOAT(dtype, return launch<scalar_t, true>(p, static_cast<cudaStream_t>(stream)));
  return 0;
}

int head_gates_bwd_cuda(const HeadGatesParams& p, DType dtype, void* stream) {
  if (p.binary) return 0;
  MHR_DISPATCH_CUDA_FLOAT(dtype, return launch<scalar_t, false>(p, static_cast<cudaStream_t>(stream)));
  return 0;
}

}  // namespace mhr_ops
