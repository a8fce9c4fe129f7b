// CPU registration of gated_head_proj: an ATen GEMM over the gated heads.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../args/moh_args.h"

namespace mhr_ops {
namespace {

at::Tensor gated_head_proj_cpu(const at::Tensor& o, const at::Tensor& gates, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias) {
  const GatedHeadProjParams p = check_gated_head_proj(o, gates, weight, bias);
  // The CPU path writes the gated heads once and runs one GEMM: BLAS beats skipping here. Closed
  // heads (gate exactly 0; NaN counts as open) are zeroed, not multiplied by 0 (SPEC section 5).
  const at::Tensor g = gates.unsqueeze(-1);
  const at::Tensor gated = (o * g).masked_fill_(g == 0, 0).reshape({p.num_rows, p.num_heads * p.head_dim});
  return at::linear(gated, weight, bias);
}

}  // namespace
}  // namespace mhr_ops

TORCH_LIBRARY_IMPL(mhr_ops, CPU, m) { m.impl("gated_head_proj", &mhr_ops::gated_head_proj_cpu); }
