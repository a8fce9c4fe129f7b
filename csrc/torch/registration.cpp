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
}
