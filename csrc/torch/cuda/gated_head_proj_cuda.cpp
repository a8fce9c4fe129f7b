// CUDA registration of gated_head_proj: checks, then the head-skipping kernels of
// csrc/kernels/gated_head_proj_cuda.cu (tensor cores for 16-bit types, SIMT otherwise). Host code
// only.
#include <ATen/ops/empty.h>

#include "../../kernels/gated_head_proj.h"
#include "../args/moh_args.h"
#include "../torch_to_kernel.h"
#include "cuda_context.h"

namespace mhr_ops {
namespace {

at::Tensor gated_head_proj_cuda(const at::Tensor& o, const at::Tensor& gates, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias) {
  const CudaDeviceGuard guard(o.device());
  GatedHeadProjParams p = check_gated_head_proj(o, gates, weight, bias);
  const at::Tensor b = is_present(bias) ? bias->contiguous() : at::Tensor();
  at::Tensor y = at::empty({p.num_rows, p.out_features}, o.options());
  p.o = o.data_ptr();
  p.o_stride_n = o.stride(0);
  p.o_stride_h = o.stride(1);
  p.o_stride_c = o.stride(2);
  p.gates = gates.data_ptr();
  p.g_stride_n = gates.stride(0);
  p.g_stride_h = gates.stride(1);
  p.weight = weight.data_ptr();
  p.w_stride_d = weight.stride(0);
  p.w_stride_k = weight.stride(1);
  p.bias = b.defined() ? b.data_ptr() : nullptr;
  p.y = y.data_ptr();
  check_launch(gated_head_proj_fwd_cuda(p, kernel_dtype(o, "o"), current_stream()), "gated_head_proj");
  return y;
}

}  // namespace
}  // namespace mhr_ops

MHR_OPS_CUDA_KERNELS(m) { m.impl("gated_head_proj", &mhr_ops::gated_head_proj_cuda); }
