#include "moh_args.h"

#include <c10/util/Exception.h>

#include "../torch_to_kernel.h"

namespace mhr_ops {

HeadGatesParams check_head_gates(const at::Tensor& routed, const std::optional<at::Tensor>& shared,
                                 const std::optional<at::Tensor>& stage, int64_t top_k, int64_t n_shared) {
  TORCH_CHECK(routed.dim() == 2 && routed.size(1) >= 1, "routed_logits: expected a 2-D tensor [N, Hr], got shape ",
              routed.sizes());
  kernel_dtype(routed, "routed_logits");
  HeadGatesParams p;
  p.num_rows = routed.size(0);
  p.num_routed = routed.size(1);
  TORCH_CHECK_VALUE(top_k >= 1 && top_k <= p.num_routed, "top_k: expected in [1, ", p.num_routed, "] (1..Hr), got ",
                    top_k);
  p.top_k = top_k;
  TORCH_CHECK(n_shared >= 0, "n_shared: expected >= 0, got ", n_shared);
  p.num_shared = n_shared;
  if (is_present(shared)) {
    TORCH_CHECK(shared->dim() == 2 && shared->size(0) == p.num_rows, "shared_logits: expected shape [", p.num_rows,
                ", Hs], got ", shared->sizes());
    TORCH_CHECK(n_shared == 0 || n_shared == shared->size(1), "n_shared: expected 0 or ", shared->size(1),
                " (shared_logits' width), got ", n_shared);
    TORCH_CHECK(shared->scalar_type() == routed.scalar_type(), "shared_logits: expected dtype ", routed.scalar_type(),
                ", got ", shared->scalar_type());
    check_same_device(*shared, "shared_logits", routed, "routed_logits");
    p.num_shared = shared->size(1);
  }
  if (is_present(stage)) {
    TORCH_CHECK(stage->dim() == 2 && stage->size(0) == p.num_rows && stage->size(1) == 2,
                "stage_logits: expected shape [", p.num_rows, ", 2], got ", stage->sizes());
    TORCH_CHECK(stage->scalar_type() == routed.scalar_type(), "stage_logits: expected dtype ", routed.scalar_type(),
                ", got ", stage->scalar_type());
    check_same_device(*stage, "stage_logits", routed, "routed_logits");
  }
  return p;
}

void set_head_gates_inputs(HeadGatesParams& p, const at::Tensor& routed, const at::Tensor& shared,
                           const at::Tensor& stage) {
  p.routed = routed.data_ptr();
  p.routed_stride_n = routed.stride(0);
  p.routed_stride_h = routed.stride(1);
  if (shared.defined()) {
    p.shared = shared.data_ptr();
    p.shared_stride_n = shared.stride(0);
    p.shared_stride_h = shared.stride(1);
  }
  if (stage.defined()) {
    p.stage = stage.data_ptr();
    p.stage_stride_n = stage.stride(0);
    p.stage_stride_h = stage.stride(1);
  }
}

GatedHeadProjParams check_gated_head_proj(const at::Tensor& o, const at::Tensor& gates, const at::Tensor& weight,
                                          const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(o.dim() == 3, "o: expected a 3-D tensor [N, H, Dh], got shape ", o.sizes());
  kernel_dtype(o, "o");
  TORCH_CHECK(gates.dim() == 2 && gates.size(0) == o.size(0) && gates.size(1) == o.size(1), "gates: expected shape [",
              o.size(0), ", ", o.size(1), "], got ", gates.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == o.size(1) * o.size(2), "weight: expected shape [D, ",
              o.size(1) * o.size(2), "] (H * Dh), got ", weight.sizes());
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{gates, "gates"}, {weight, "weight"}}) {
    TORCH_CHECK(t.scalar_type() == o.scalar_type(), name, ": expected dtype ", o.scalar_type(), " (o's dtype), got ",
                t.scalar_type());
    check_same_device(t, name, o, "o");
  }
  if (is_present(bias)) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "bias: expected shape [", weight.size(0),
                "], got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == o.scalar_type(), "bias: expected dtype ", o.scalar_type(), ", got ",
                bias->scalar_type());
    check_same_device(*bias, "bias", o, "o");
  }
  GatedHeadProjParams p;
  p.num_rows = o.size(0);
  p.num_heads = o.size(1);
  p.head_dim = o.size(2);
  p.out_features = weight.size(0);
  return p;
}

}  // namespace mhr_ops
