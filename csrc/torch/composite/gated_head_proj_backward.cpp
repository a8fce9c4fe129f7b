// gated_head_proj_backward, composite over the backends (ATen GEMMs):
//   go = grad_y @ W  [N, H, Dh];  d_o = gates * go;  d_gates = sum_c o * go;
//   d_weight = grad_y^T @ (gates * o);  d_bias = sum_n grad_y.
// A closed head (gate exactly 0; NaN counts as open) receives and gives no gradient, whatever its
// o holds: its terms are zeroed, not multiplied by 0 (SPEC section 5), as the CUDA forward skips it.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../args/moh_args.h"

namespace mhr_ops {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_head_proj_backward(
    const at::Tensor& grad_y, const at::Tensor& o, const at::Tensor& gates, const at::Tensor& weight, bool has_bias,
    std::array<bool, 4> mask) {
  const GatedHeadProjParams p = check_gated_head_proj(o, gates, weight, std::nullopt);
  TORCH_CHECK(grad_y.dim() == 2 && grad_y.size(0) == p.num_rows && grad_y.size(1) == p.out_features,
              "grad_y: expected shape [", p.num_rows, ", ", p.out_features, "], got ", grad_y.sizes());
  const at::Tensor empty = at::empty({0}, o.options());
  at::Tensor d_o = empty, d_gates = empty, d_weight = empty, d_bias = empty;
  const at::Tensor g = gates.unsqueeze(-1);
  const at::Tensor closed = g == 0;
  if (mask[0] || mask[1]) {
    const at::Tensor go = at::mm(grad_y, weight).view({p.num_rows, p.num_heads, p.head_dim});
    if (mask[0]) d_o = (go * g).masked_fill_(closed, 0);
    if (mask[1]) d_gates = (o * go).masked_fill_(closed, 0).sum(-1);
  }
  if (mask[2])
    d_weight = at::mm(grad_y.t(), (o * g).masked_fill_(closed, 0).reshape({p.num_rows, p.num_heads * p.head_dim}));
  if (mask[3] && has_bias) d_bias = grad_y.sum(0);
  return {d_o, d_gates, d_weight, d_bias};
}

}  // namespace
}  // namespace mhr_ops

TORCH_LIBRARY_IMPL(mhr_ops, CompositeExplicitAutograd, m) {
  m.impl("gated_head_proj_backward", &mhr_ops::gated_head_proj_backward);
}
