#include "routed_lora_args.h"

#include <ATen/MemoryOverlap.h>
#include <c10/util/Exception.h>

#include "tensor_utils.h"

namespace mhr_ops {

LoraDims check_routed_lora(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B, const at::Tensor& weights,
                           const at::Tensor& group_ids, int64_t rows_per_group_id) {
  TORCH_CHECK(x.dim() == 2, "x: expected a 2-D tensor [N, d_in], got shape ", x.sizes());
  TORCH_CHECK(A.dim() == 4, "A: expected a 4-D tensor [h, S, d_in/h, r], got shape ", A.sizes());
  TORCH_CHECK(B.dim() == 4, "B: expected a 4-D tensor [h, S, r, d_out/h], got shape ", B.sizes());
  TORCH_CHECK(weights.dim() == 3, "weights: expected a 3-D tensor [G, h, S], got shape ", weights.sizes());
  TORCH_CHECK(group_ids.dim() == 1, "group_ids: expected a 1-D tensor, got shape ", group_ids.sizes());
  const DType xd = kernel_dtype(x, "x");
  const DType ad = kernel_dtype(A, "A");
  kernel_dtype(B, "B");
  kernel_dtype(weights, "weights");
  kernel_index_type(group_ids, "group_ids");
  TORCH_CHECK(B.scalar_type() == A.scalar_type(), "B: expected dtype ", A.scalar_type(), " (A's dtype), got ",
              B.scalar_type());
  const bool half_x = xd == DType::kFloat16 || xd == DType::kBFloat16;
  TORCH_CHECK(A.scalar_type() == x.scalar_type() || (half_x && ad == DType::kFloat32), "A: expected dtype ",
              x.scalar_type(), (half_x ? " or float32" : ""), " for x of dtype ", x.scalar_type(), ", got ",
              A.scalar_type());
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{A, "A"}, {B, "B"}, {weights, "weights"},
                                {group_ids, "group_ids"}})
    check_same_device(t, name, x, "x");

  LoraDims d;
  d.rows = x.size(0);
  d.d_in = x.size(1);
  d.heads = A.size(0);
  d.skills = A.size(1);
  d.dk_in = A.size(2);
  d.rank = A.size(3);
  TORCH_CHECK(d.heads >= 1 && d.skills >= 1 && d.rank >= 1 && d.dk_in >= 1, "A: expected non-empty dims, got shape ",
              A.sizes());
  TORCH_CHECK(B.size(0) == d.heads && B.size(1) == d.skills && B.size(2) == d.rank,
              "B: expected shape [", d.heads, ", ", d.skills, ", ", d.rank, ", d_out/h] to match A ", A.sizes(),
              ", got ", B.sizes());
  d.dk_out = B.size(3);
  TORCH_CHECK(d.dk_out >= 1, "B: expected d_out/h >= 1, got shape ", B.sizes());
  d.d_out = d.heads * d.dk_out;
  TORCH_CHECK(d.d_in == d.heads * d.dk_in, "x: expected d_in = h * A.shape[2] = ", d.heads * d.dk_in, ", got ",
              d.d_in);
  TORCH_CHECK(weights.size(1) == d.heads && weights.size(2) == d.skills, "weights: expected shape [G, ", d.heads,
              ", ", d.skills, "], got ", weights.sizes());
  d.groups = weights.size(0);
  TORCH_CHECK(rows_per_group_id >= 1, "rows_per_group_id: expected >= 1, got ", rows_per_group_id);
  d.rows_per_id = rows_per_group_id;
  TORCH_CHECK(group_ids.size(0) * rows_per_group_id == d.rows, "group_ids: expected ", d.rows, " / ",
              rows_per_group_id, " ids for ", d.rows, " rows, got ", group_ids.size(0));
  return d;
}

void check_rows_output(const at::Tensor& t, const char* arg, const at::Tensor& x, const LoraDims& d) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == d.rows && t.size(1) == d.d_out, arg, ": expected shape [", d.rows, ", ",
              d.d_out, "], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), arg, ": expected dtype ", x.scalar_type(), " (x's dtype), got ",
              t.scalar_type());
  check_same_device(t, arg, x, "x");
}

void check_add_output(const at::Tensor& out, const at::Tensor& x, const LoraDims& d) {
  check_rows_output(out, "out", x, d);
  TORCH_CHECK(at::has_internal_overlap(out) != at::MemOverlap::Yes,
              "out: expected a tensor without internal overlap (each element written once), got strides ",
              out.strides());
}

void check_bottleneck(const at::Tensor& z, const at::Tensor& x, const LoraDims& d) {
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(z.dim() == 2 && z.size(0) == d.rows && z.size(1) == d.rank && z.scalar_type() == acc,
              "z: expected the forward's bottleneck [", d.rows, ", ", d.rank, "] of dtype ", acc, ", got ", z.sizes(),
              " ", z.scalar_type());
  check_same_device(z, "z", x, "x");
}

void check_mhr_linear_base(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const LoraDims& d) {
  TORCH_CHECK_VALUE(weight.dim() == 2, "weight: expected a 2-D tensor, got shape ", py_shape(weight.sizes()));
  TORCH_CHECK_VALUE(weight.size(0) == d.d_out && weight.size(1) == d.d_in, "weight: expected shape (", d.d_out, ", ",
                    d.d_in, ") [d_out, d_in], got ", py_shape(weight.sizes()));
  TORCH_CHECK_VALUE(weight.scalar_type() == x.scalar_type(), "weight: expected dtype ", py_dtype(x.scalar_type()),
                    " (x's dtype), got ", py_dtype(weight.scalar_type()));
  check_same_device(weight, "weight", x, "x");
  if (!bias.has_value() || !bias->defined()) return;
  TORCH_CHECK_VALUE(bias->dim() == 1, "bias: expected a 1-D tensor, got shape ", py_shape(bias->sizes()));
  TORCH_CHECK_VALUE(bias->size(0) == d.d_out && bias->scalar_type() == x.scalar_type(), "bias: expected shape (",
                    d.d_out, ",) and dtype ", py_dtype(x.scalar_type()), ", got ", py_shape(bias->sizes()), " ",
                    py_dtype(bias->scalar_type()));
  check_same_device(*bias, "bias", x, "x");
}

}  // namespace mhr_ops
