#include "routed_lora_args.h"

#include <c10/util/Exception.h>

#include "../torch_to_kernel.h"
#include "adapter_dtypes.h"

namespace mhr_ops {
namespace {

// t has `dim` dims, else ValueError naming arg and the expected layout.
void dims(const at::Tensor& t, const char* arg, int64_t dim, const char* layout) {
  TORCH_CHECK_VALUE(t.dim() == dim, arg, ": expected a ", dim, "-D tensor ", layout, ", got shape ",
                    py_shape(t.sizes()));
}

}  // namespace

LoraDims check_routed_lora(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B, const at::Tensor& weights,
                           const at::Tensor& group_ids, int64_t rows_per_group_id) {
  dims(x, "x", 2, "[N, d_in]");
  kernel_dtype(x, "x");
  dims(A, "A", 4, "[h, S, d_in/h, r]");
  kernel_dtype(A, "A");
  dims(B, "B", 4, "[h, S, r, d_out/h]");
  kernel_dtype(B, "B");
  dims(weights, "weights", 3, "[G, h, S]");
  kernel_dtype(weights, "weights");
  dims(group_ids, "group_ids", 1, "[N / rows_per_group_id]");
  kernel_index_type(group_ids, "group_ids");

  LoraDims d;
  d.rows = x.size(0);
  d.d_in = x.size(1);
  d.heads = A.size(0);
  d.skills = A.size(1);
  d.dk_in = A.size(2);
  d.rank = A.size(3);
  TORCH_CHECK_VALUE(d.heads >= 1 && d.skills >= 1 && d.rank >= 1 && d.dk_in >= 1,
                    "A: expected a non-empty [h, S, d_in/h, r], got shape ", py_shape(A.sizes()));
  d.dk_out = B.size(3);
  TORCH_CHECK_VALUE(B.size(0) == d.heads && B.size(1) == d.skills && B.size(2) == d.rank && d.dk_out >= 1,
                    "B: expected shape (", d.heads, ", ", d.skills, ", ", d.rank, ", d_out/h) to match A ",
                    py_shape(A.sizes()), ", got ", py_shape(B.sizes()));
  d.d_out = d.heads * d.dk_out;
  TORCH_CHECK_VALUE(d.d_in == d.heads * d.dk_in, "x: expected last dim d_in = h * A.shape[2] = ", d.heads * d.dk_in,
                    " (d_in must split into h=", d.heads, " heads), got ", d.d_in);
  TORCH_CHECK_VALUE(weights.size(1) == d.heads && weights.size(2) == d.skills, "weights: expected shape (G, ", d.heads,
                    ", ", d.skills, ") [G, h, S], got ", py_shape(weights.sizes()));
  check_adapter_dtypes(x, A, B);
  for (const auto& [t, name] :
       {std::pair<const at::Tensor&, const char*>{A, "A"}, {B, "B"}, {weights, "weights"}, {group_ids, "group_ids"}})
    check_same_device(t, name, x, "x");
  d.groups = weights.size(0);
  TORCH_CHECK_VALUE(rows_per_group_id >= 1, "rows_per_group_id: expected >= 1, got ", rows_per_group_id);
  d.rows_per_id = rows_per_group_id;
  TORCH_CHECK_VALUE(group_ids.size(0) * rows_per_group_id == d.rows, "group_ids: expected ", d.rows, " / ",
                    rows_per_group_id, " ids for ", d.rows, " rows, got ", group_ids.size(0));
  return d;
}

void check_rows_output(const at::Tensor& t, const char* arg, const at::Tensor& x, const LoraDims& d) {
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == d.rows && t.size(1) == d.d_out, arg, ": expected shape (", d.rows,
                    ", ", d.d_out, "), got ", py_shape(t.sizes()));
  TORCH_CHECK_VALUE(t.scalar_type() == x.scalar_type(), arg, ": expected dtype ", py_dtype(x.scalar_type()),
                    " (x's dtype), got ", py_dtype(t.scalar_type()));
  check_same_device(t, arg, x, "x");
}

void check_add_output(const at::Tensor& out, const at::Tensor& x, const LoraDims& d) {
  check_rows_output(out, "out", x, d);
  check_no_internal_overlap(out, "out");
}

void check_bottleneck(const at::Tensor& z, const at::Tensor& x, const LoraDims& d) {
  const auto acc = accumulation_dtype(x.scalar_type());
  TORCH_CHECK_VALUE(z.dim() == 2 && z.size(0) == d.rows && z.size(1) == d.rank && z.scalar_type() == acc,
                    "z: expected the forward's bottleneck (", d.rows, ", ", d.rank, ") of dtype ", py_dtype(acc),
                    ", got ", py_shape(z.sizes()), " ", py_dtype(z.scalar_type()));
  check_same_device(z, "z", x, "x");
}

void check_mhr_linear_base(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const LoraDims& d) {
  check_linear_base(x, weight, bias, d.d_in, d.d_out);
}

void check_linear_base(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       int64_t d_in, int64_t d_out) {
  TORCH_CHECK_VALUE(weight.dim() == 2, "weight: expected a 2-D tensor, got shape ", py_shape(weight.sizes()));
  TORCH_CHECK_VALUE(weight.size(0) == d_out && weight.size(1) == d_in, "weight: expected shape (", d_out, ", ", d_in,
                    ") [d_out, d_in], got ", py_shape(weight.sizes()));
  TORCH_CHECK_VALUE(weight.scalar_type() == x.scalar_type(), "weight: expected dtype ", py_dtype(x.scalar_type()),
                    " (x's dtype), got ", py_dtype(weight.scalar_type()));
  check_same_device(weight, "weight", x, "x");
  if (!bias.has_value() || !bias->defined()) return;
  TORCH_CHECK_VALUE(bias->dim() == 1, "bias: expected a 1-D tensor, got shape ", py_shape(bias->sizes()));
  TORCH_CHECK_VALUE(bias->size(0) == d_out && bias->scalar_type() == x.scalar_type(), "bias: expected shape (", d_out,
                    ",) and dtype ", py_dtype(x.scalar_type()), ", got ", py_shape(bias->sizes()), " ",
                    py_dtype(bias->scalar_type()));
  check_same_device(*bias, "bias", x, "x");
}

LoraDims check_task_lora_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                const at::Tensor& A, const at::Tensor& B, const at::Tensor& task_ids,
                                int64_t rows_per_task_id) {
  dims(x, "x", 2, "[N, d_in]");
  kernel_dtype(x, "x");
  dims(A, "A", 3, "[T, d_in, r]");
  dims(B, "B", 3, "[T, r, d_out]");
  dims(task_ids, "task_ids", 1, "[N / rows_per_task_id]");
  kernel_index_type(task_ids, "task_ids");
  const auto ct = accumulation_dtype(x.scalar_type());
  TORCH_CHECK_VALUE(A.scalar_type() == ct, "A: expected dtype ", py_dtype(ct), " (the accumulation dtype of x, ",
                    py_dtype(x.scalar_type()), "), got ", py_dtype(A.scalar_type()));
  TORCH_CHECK_VALUE(B.scalar_type() == ct, "B: expected dtype ", py_dtype(ct), " (A's), got ",
                    py_dtype(B.scalar_type()));
  LoraDims d;
  d.rows = x.size(0);
  d.d_in = x.size(1);
  d.heads = 1;
  d.skills = 1;
  d.groups = A.size(0);
  d.rank = A.size(2);
  TORCH_CHECK_VALUE(d.groups >= 1 && d.rank >= 1 && A.size(1) == d.d_in, "A: expected shape (T, ", d.d_in,
                    ", r) [T, d_in, r] with T, r >= 1, got ", py_shape(A.sizes()));
  d.d_out = B.size(2);
  TORCH_CHECK_VALUE(B.size(0) == d.groups && B.size(1) == d.rank && d.d_out >= 1, "B: expected shape (", d.groups, ", ",
                    d.rank, ", d_out) to match A ", py_shape(A.sizes()), ", got ", py_shape(B.sizes()));
  d.dk_in = d.d_in, d.dk_out = d.d_out;
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{A, "A"}, {B, "B"}, {task_ids, "task_ids"}})
    check_same_device(t, name, x, "x");
  TORCH_CHECK_VALUE(rows_per_task_id >= 1, "rows_per_task_id: expected >= 1, got ", rows_per_task_id);
  d.rows_per_id = rows_per_task_id;
  TORCH_CHECK_VALUE(task_ids.size(0) * rows_per_task_id == d.rows, "task_ids: expected ", d.rows, " / ",
                    rows_per_task_id, " ids for ", d.rows, " rows, got ", task_ids.size(0));
  check_mhr_linear_base(x, weight, bias, d);
  return d;
}

}  // namespace mhr_ops
