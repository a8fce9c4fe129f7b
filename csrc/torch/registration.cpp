// Schemas of every mhr_ops op, declared once. Backends register their kernels in their own files
// (TORCH_LIBRARY_IMPL: cpu/, cuda/, composite/, one file per op and backend); fake kernels are registered from
// Python (mhr_ops/routing.py, mhr_ops/lora.py, mhr_ops/moe.py, mhr_ops/moh.py), and so is autograd, except for the
// ops every training step of an adapted layer calls (route, routed_lora, mhr_linear: autograd.cpp).
#include <torch/library.h>

TORCH_LIBRARY(mhr_ops, m) {
  // SPEC section 2. top_k = None keeps every skill; noise is the relaxed-Bernoulli uniforms [G, h, S].
  m.def(
      "route(Tensor logits, Tensor task_ids, Tensor? noise, int n_skills, str mode, float temperature, "
      "int? top_k, float eps) -> Tensor");
  // Gradient of route with respect to logits, [T, h*S] in the logits dtype.
  m.def(
      "route_backward(Tensor grad_weights, Tensor logits, Tensor task_ids, Tensor? noise, int n_skills, "
      "str mode, float temperature, int? top_k, float eps) -> Tensor");

  // SPEC section 3, on rows: x [N, d_in], row n uses group group_ids[n / rows_per_group_id].
  // Returns y [N, d_out] in x's dtype, and the rank bottleneck z = x @ A_g [N, r] in fp32 (fp64
  // for fp64 x), which the backward reuses instead of a second pass over x.
  m.def(
      "routed_lora(Tensor x, Tensor A, Tensor B, Tensor weights, Tensor group_ids, int rows_per_group_id, "
      "float scale) -> (Tensor, Tensor)");
  // out += routed_lora(...) in place; returns z. No autograd (the functional op carries gradients).
  m.def(
      "routed_lora_add_(Tensor(a!) out, Tensor x, Tensor A, Tensor B, Tensor weights, Tensor group_ids, "
      "int rows_per_group_id, float scale) -> Tensor");
  // Gradients (x, A, B, weights) of routed_lora, given the forward's z; output_mask skips the
  // gradients not needed (returned empty).
  m.def(
      "routed_lora_backward(Tensor grad_y, Tensor x, Tensor A, Tensor B, Tensor weights, Tensor group_ids, "
      "int rows_per_group_id, float scale, Tensor z, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
  // F.linear(x, weight, bias) + routed_lora(...), one output allocation; returns (y, z).
  m.def(
      "mhr_linear(Tensor x, Tensor weight, Tensor? bias, Tensor A, Tensor B, Tensor weights, Tensor group_ids, "
      "int rows_per_group_id, float scale) -> (Tensor, Tensor)");
  // Gradients (x, weight, bias, A, B, weights) of mhr_linear, given the forward's z; has_bias: the
  // forward had a bias. output_mask skips the gradients not needed (returned empty). Fused on the
  // CPU (cpu/routed_lora_backward_cpu.cpp), composite elsewhere (composite/mhr_linear.cpp).
  m.def(
      "mhr_linear_backward(Tensor grad_y, Tensor x, Tensor weight, bool has_bias, Tensor A, Tensor B, "
      "Tensor weights, Tensor group_ids, int rows_per_group_id, float scale, Tensor z, bool[6] output_mask) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");

  // The serving step of a routed layer whose tasks' adapters are already mixed (MHRLinear keeps
  // them: mhr_ops/nn.py): F.linear(x, weight, bias) + (x @ A[t]) @ B[t] for row n of x's rows
  // ([..., d_in], at least 2-D, as N rows) of task t = task_ids[n / rows_per_task_id]; A [T, d_in, r]
  // and B [T, r, d_out] (the scale folded in) in fp32 (fp64 for fp64 x). Returns [..., d_out] in x's
  // dtype. Ids outside [0, T) give NaN rows. No autograd: serving only.
  m.def(
      "task_lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor A, Tensor B, Tensor task_ids, "
      "int rows_per_task_id) -> Tensor");

  // SPEC section 4, on rows: x [N, d_in], A [E, d_in, r], B [E, r, d_out], topk_weights / topk_ids
  // [N, k]. Returns y [N, d_out] in x's dtype and the per-slot bottleneck z = x_n @ A_e [N, k, r]
  // in fp32 (fp64 for fp64 x), which the backward reuses. Ids outside [0, E) give NaN rows.
  // Fake kernels and autograd of the moe_lora ops: mhr_ops/moe.py.
  m.def(
      "moe_lora(Tensor x, Tensor A, Tensor B, Tensor topk_weights, Tensor topk_ids, float scale) -> "
      "(Tensor, Tensor)");
  // out += moe_lora(...) in place; returns z. No autograd (the functional op carries gradients).
  m.def(
      "moe_lora_add_(Tensor(a!) out, Tensor x, Tensor A, Tensor B, Tensor topk_weights, Tensor topk_ids, "
      "float scale) -> Tensor");
  // Gradients (x, A, B, topk_weights) of moe_lora, given the forward's z; output_mask skips the
  // gradients not needed (returned empty).
  m.def(
      "moe_lora_backward(Tensor grad_y, Tensor x, Tensor A, Tensor B, Tensor topk_weights, Tensor topk_ids, "
      "float scale, Tensor z, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
  // F.linear(x, weight, bias) + moe_lora(...), one output allocation; returns (y, z). On the CPU
  // (fp32 / fp64 x) the rows pass writes bias + update and the base GEMM accumulates into it.
  m.def(
      "moe_lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor A, Tensor B, Tensor topk_weights, "
      "Tensor topk_ids, float scale) -> (Tensor, Tensor)");
  // Gradients (x, weight, bias, A, B, topk_weights) of moe_lora_linear, given the forward's z;
  // has_bias: the forward had a bias. output_mask skips the gradients not needed (returned empty).
  m.def(
      "moe_lora_linear_backward(Tensor grad_y, Tensor x, Tensor weight, bool has_bias, Tensor A, Tensor B, "
      "Tensor topk_weights, Tensor topk_ids, float scale, Tensor z, bool[6] output_mask) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");

  // SPEC section 5. Hs = shared_logits' width, else n_shared. Returns gates [N, Hs + Hr].
  m.def(
      "head_gates(Tensor routed_logits, Tensor? shared_logits, Tensor? stage_logits, int top_k, int n_shared, "
      "bool binary) -> Tensor");
  // Gradients of head_gates for (routed, shared, stage) logits; empty for absent logits.
  m.def(
      "head_gates_backward(Tensor grad_gates, Tensor routed_logits, Tensor? shared_logits, Tensor? stage_logits, "
      "int top_k, int n_shared, bool binary) -> (Tensor, Tensor, Tensor)");
  // y [N, D] = sum_h gates[n,h] * o[n,h] @ weight[:, h*Dh:(h+1)*Dh]^T + bias; o [N, H, Dh].
  m.def("gated_head_proj(Tensor o, Tensor gates, Tensor weight, Tensor? bias) -> Tensor");
  // Gradients (o, gates, weight, bias) of gated_head_proj; output_mask skips some (empty).
  m.def(
      "gated_head_proj_backward(Tensor grad_y, Tensor o, Tensor gates, Tensor weight, bool has_bias, "
      "bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
}
