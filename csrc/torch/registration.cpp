// Schemas of every mhr_ops op, declared once. Backends register their kernels in their own files
// (TORCH_LIBRARY_IMPL); fake kernels and autograd are registered from Python (mhr_ops/_ops.py).
#include <torch/library.h>

TORCH_LIBRARY(mhr_ops, m) {
  // SPEC section 2. top_k = 0 keeps every skill; noise is the relaxed-Bernoulli uniforms [G, h, S].
  m.def(
      "route(Tensor logits, Tensor task_ids, Tensor? noise, int n_skills, str mode, float temperature, "
      "int top_k, float eps) -> Tensor");
  // Gradient of route with respect to logits, [T, h*S] in the logits dtype.
  m.def(
      "route_backward(Tensor grad_weights, Tensor logits, Tensor task_ids, Tensor? noise, int n_skills, "
      "str mode, float temperature, int top_k, float eps) -> Tensor");

  // SPEC section 3, on rows: x [N, d_in], row n uses group group_ids[n / rows_per_group_id].
  // Returns y [N, d_out] in x's dtype.
  m.def(
      "routed_lora(Tensor x, Tensor A, Tensor B, Tensor weights, Tensor group_ids, int rows_per_group_id, "
      "float scale) -> Tensor");
  // out += routed_lora(...), in place (no autograd: the functional op carries gradients).
  m.def(
      "routed_lora_add_(Tensor(a!) out, Tensor x, Tensor A, Tensor B, Tensor weights, Tensor group_ids, "
      "int rows_per_group_id, float scale) -> ()");
  // Gradients (x, A, B, weights) of routed_lora; output_mask skips the ones not needed (returned empty).
  m.def(
      "routed_lora_backward(Tensor grad_y, Tensor x, Tensor A, Tensor B, Tensor weights, Tensor group_ids, "
      "int rows_per_group_id, float scale, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
  // F.linear(x, weight, bias) + routed_lora(...), one output allocation.
  m.def(
      "mhr_linear(Tensor x, Tensor weight, Tensor? bias, Tensor A, Tensor B, Tensor weights, Tensor group_ids, "
      "int rows_per_group_id, float scale) -> Tensor");
}
