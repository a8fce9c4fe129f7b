#include "moe_lora_args.h"

#include <c10/util/Exception.h>

#include <utility>

#include "../torch_to_kernel.h"
#include "adapter_dtypes.h"

namespace mhr_ops {
namespace {

bool is_float(const at::Tensor& t) {
  const auto s = t.scalar_type();
  return s == at::kHalf || s == at::kBFloat16 || s == at::kFloat || s == at::kDouble;
}

void check_float(const at::Tensor& t, const char* arg) {
  TORCH_CHECK_VALUE(is_float(t), arg, ": expected a float16, bfloat16, float32 or float64 tensor, got ",
                    t.scalar_type());
}

void check_dim(const at::Tensor& t, const char* arg, int64_t dim, const char* layout) {
  TORCH_CHECK_VALUE(t.dim() == dim, arg, ": expected a ", dim, "-D tensor ", layout, ", got shape ", t.sizes());
}

}  // namespace

MoeDims check_moe_lora(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B, const at::Tensor& topk_weights,
                       const at::Tensor& topk_ids) {
  check_dim(x, "x", 2, "[N, d_in]");
  check_dim(A, "A", 3, "[E, d_in, r]");
  check_dim(B, "B", 3, "[E, r, d_out]");
  check_dim(topk_weights, "topk_weights", 2, "[N, k]");
  check_dim(topk_ids, "topk_ids", 2, "[N, k]");
  check_float(x, "x");
  check_float(A, "A");
  check_float(B, "B");
  check_float(topk_weights, "topk_weights");
  TORCH_CHECK_TYPE(topk_ids.scalar_type() == at::kLong || topk_ids.scalar_type() == at::kInt,
                   "topk_ids: expected an int64 or int32 tensor, got ", topk_ids.scalar_type());
  check_adapter_dtypes(x, A, B);
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{A, "A"},
                                {B, "B"},
                                {topk_weights, "topk_weights"},
                                {topk_ids, "topk_ids"}})
    TORCH_CHECK_VALUE(t.device() == x.device(), name, ": expected a tensor on ", x.device(),
                      " (the device of x), got one on ", t.device());
  MoeDims d;
  d.rows = x.size(0);
  d.d_in = x.size(1);
  d.experts = A.size(0);
  d.rank = A.size(2);
  TORCH_CHECK_VALUE(d.experts >= 1 && d.rank >= 1 && A.size(1) >= 1, "A: expected non-empty dims [E, d_in, r], got ",
                    A.sizes());
  TORCH_CHECK_VALUE(B.size(0) == d.experts, "B: expected E = ", d.experts, " experts (A's), got shape ", B.sizes());
  TORCH_CHECK_VALUE(B.size(1) == d.rank, "B: expected rank r = ", d.rank, " (A's) in dim 1, got shape ", B.sizes());
  d.d_out = B.size(2);
  TORCH_CHECK_VALUE(d.d_out >= 1, "B: expected d_out >= 1, got shape ", B.sizes());
  TORCH_CHECK_VALUE(d.d_in == A.size(1), "x: expected d_in = A.shape[1] = ", A.size(1), ", got ", d.d_in);
  d.top_k = topk_ids.size(1);
  TORCH_CHECK_VALUE(d.top_k >= 1, "topk_ids: expected k >= 1, got shape ", topk_ids.sizes());
  TORCH_CHECK_VALUE(topk_ids.size(0) == d.rows, "topk_ids: expected ", d.rows, " rows (x's N), got shape ",
                    topk_ids.sizes());
  TORCH_CHECK_VALUE(topk_weights.sizes() == topk_ids.sizes(), "topk_weights: expected shape ", topk_ids.sizes(),
                    " (topk_ids' [N, k]), got ", topk_weights.sizes());
  return d;
}

void check_moe_rows(const at::Tensor& t, const char* arg, const at::Tensor& x, const MoeDims& d, bool dtype_of_x) {
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == d.rows && t.size(1) == d.d_out, arg, ": expected shape [", d.rows,
                    ", ", d.d_out, "], got ", t.sizes());
  check_float(t, arg);
  TORCH_CHECK_VALUE(!dtype_of_x || t.scalar_type() == x.scalar_type(), arg, ": expected dtype ", x.scalar_type(),
                    " (x's dtype), got ", t.scalar_type());
  check_same_device(t, arg, x, "x");
}

void check_moe_add_output(const at::Tensor& out, const at::Tensor& x, const MoeDims& d) {
  check_moe_rows(out, "out", x, d, /*dtype_of_x=*/true);
  check_no_internal_overlap(out, "out");
}

MoeDims check_moe_lora_backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                                const at::Tensor& topk_weights, const at::Tensor& topk_ids, const at::Tensor& z) {
  const MoeDims d = check_moe_lora(x, A, B, topk_weights, topk_ids);
  check_moe_rows(grad_y, "grad_y", x, d, /*dtype_of_x=*/false);
  const auto ct = accumulation_dtype(x.scalar_type());
  TORCH_CHECK_VALUE(
      z.dim() == 3 && z.size(0) == d.rows && z.size(1) == d.top_k && z.size(2) == d.rank && z.scalar_type() == ct,
      "z: expected the forward's bottleneck [", d.rows, ", ", d.top_k, ", ", d.rank, "] of dtype ", ct, ", got ",
      z.sizes(), " ", z.scalar_type());
  check_same_device(z, "z", x, "x");
  return d;
}

}  // namespace mhr_ops
