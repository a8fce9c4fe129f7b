// Autograd of route, routed_lora and mhr_linear, in C++ (torch::autograd::Function registered for
// the Autograd key): the ops a training step calls in every adapted layer. The Python formulas that
// torch.library.register_autograd installs cost ~100-200 us a call on the CPU (a Python kernel at
// the Autograd key, its setup_context and backward in Python), more than the adapter's arithmetic
// at a few rows; this is the same formula at a few microseconds. Each forward saves what the
// backward op needs (routed_lora / mhr_linear: the rank bottleneck z, not differentiable), and each
// backward calls the registered backward op through the dispatcher (its own kernels, its fake
// kernel while tracing; differentiating through it raises, mhr_ops/_autograd.py).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <string>
#include <utility>

namespace mhr_ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::Variable;
using torch::autograd::variable_list;

// The op `name` below the Autograd key (the backend kernel, or the fake kernel while tracing).
template <typename Sig>
c10::TypedOperatorHandle<Sig> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// A backward op's call: below the Autograd key in a plain backward, where its autograd kernel (Python,
// mhr_ops/_autograd.py) would only decide there is nothing to record (~13 us a call, more on cold
// caches); through it while the backward is itself recorded (create_graph), so that differentiating
// the gradient raises there.
template <typename Sig, typename... Args>
auto call_backward_op(const c10::TypedOperatorHandle<Sig>& op, Args&&... args) {
  if (at::GradMode::is_enabled()) return op.call(std::forward<Args>(args)...);
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(std::forward<Args>(args)...);
}

// Which of a forward's tensor arguments get a gradient edge: `needs_input_grad` counts only the
// defined tensors among the arguments (an absent optional has none).
struct Edges {
  std::array<int64_t, 8> index{};
  void set(std::initializer_list<bool> defined) {
    int64_t next = 0, i = 0;
    for (bool d : defined) index[i++] = d ? next++ : -1;
  }
  bool needs(const AutogradContext* ctx, int64_t arg) const {
    return index[arg] >= 0 && ctx->needs_input_grad(index[arg]);
  }
};

// ---- route(logits, task_ids, noise?, n_skills, mode, temperature, top_k?, eps) -> weights ----

using RouteSig = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, int64_t,
                            c10::string_view, double, std::optional<int64_t>, double);
using RouteBackwardSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                    const std::optional<at::Tensor>&, int64_t, c10::string_view, double,
                                    std::optional<int64_t>, double);

struct RouteFunction : public torch::autograd::Function<RouteFunction> {
  static Variable forward(AutogradContext* ctx, const Variable& logits, const Variable& task_ids,
                          const std::optional<Variable>& noise, int64_t n_skills, c10::string_view mode,
                          double temperature, std::optional<int64_t> top_k, double eps) {
    ctx->save_for_backward({logits, task_ids, noise.value_or(Variable())});
    ctx->saved_data["n_skills"] = n_skills;
    ctx->saved_data["mode"] = std::string(mode);
    ctx->saved_data["temperature"] = temperature;
    ctx->saved_data["top_k"] = top_k.has_value() ? c10::IValue(*top_k) : c10::IValue();
    ctx->saved_data["eps"] = eps;
    at::AutoDispatchBelowADInplaceOrView guard;
    static const auto op = op_handle<RouteSig>("mhr_ops::route");
    return op.call(logits, task_ids, noise, n_skills, mode, temperature, top_k, eps);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(8);
    if (!ctx->needs_input_grad(0) || !grads[0].defined()) return out;
    const variable_list saved = ctx->get_saved_variables();
    const std::optional<at::Tensor> noise = saved[2].defined() ? std::optional<at::Tensor>(saved[2]) : std::nullopt;
    const c10::IValue& top_k = ctx->saved_data["top_k"];
    const std::string mode = ctx->saved_data["mode"].toStringRef();
    static const auto op = op_handle<RouteBackwardSig>("mhr_ops::route_backward");
    out[0] = call_backward_op(op, grads[0], saved[0], saved[1], noise, ctx->saved_data["n_skills"].toInt(), mode,
                              ctx->saved_data["temperature"].toDouble(),
                              top_k.isNone() ? std::nullopt : std::optional<int64_t>(top_k.toInt()),
                              ctx->saved_data["eps"].toDouble());
    return out;
  }
};

at::Tensor route_autograd(const at::Tensor& logits, const at::Tensor& task_ids, const std::optional<at::Tensor>& noise,
                          int64_t n_skills, c10::string_view mode, double temperature, std::optional<int64_t> top_k,
                          double eps) {
  return RouteFunction::apply(logits, task_ids, noise, n_skills, mode, temperature, top_k, eps);
}

// ---- routed_lora(x, A, B, weights, group_ids, rows_per_group_id, scale) -> (y, z) ----

using LoraSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                   const at::Tensor&, const at::Tensor&, int64_t, double);
using LoraGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using LoraBackwardSig = LoraGrads(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                  const at::Tensor&, const at::Tensor&, int64_t, double, const at::Tensor&,
                                  std::array<bool, 4>);

struct RoutedLoraFunction : public torch::autograd::Function<RoutedLoraFunction> {
  static variable_list forward(AutogradContext* ctx, const Variable& x, const Variable& A, const Variable& B,
                               const Variable& weights, const Variable& group_ids, int64_t rows_per_group_id,
                               double scale) {
    static const auto op = op_handle<LoraSig>("mhr_ops::routed_lora");
    at::Tensor y, z;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(y, z) = op.call(x, A, B, weights, group_ids, rows_per_group_id, scale);
    }
    ctx->mark_non_differentiable({z});
    ctx->save_for_backward({x, A, B, weights, group_ids, z});
    ctx->saved_data["rows_per_group_id"] = rows_per_group_id;
    ctx->saved_data["scale"] = scale;
    return {y, z};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(7);
    const std::array<bool, 4> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1), ctx->needs_input_grad(2),
                                   ctx->needs_input_grad(3)};
    if (!grads[0].defined() || !(mask[0] || mask[1] || mask[2] || mask[3])) return out;
    const variable_list s = ctx->get_saved_variables();
    static const auto op = op_handle<LoraBackwardSig>("mhr_ops::routed_lora_backward");
    const auto [dx, dA, dB, dw] =
        call_backward_op(op, grads[0], s[0], s[1], s[2], s[3], s[4], ctx->saved_data["rows_per_group_id"].toInt(),
                         ctx->saved_data["scale"].toDouble(), s[5], mask);
    const std::array<at::Tensor, 4> g{dx, dA, dB, dw};
    for (int i = 0; i < 4; ++i)
      if (mask[i]) out[i] = g[i];
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor> routed_lora_autograd(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                                                        const at::Tensor& weights, const at::Tensor& group_ids,
                                                        int64_t rows_per_group_id, double scale) {
  const variable_list out = RoutedLoraFunction::apply(x, A, B, weights, group_ids, rows_per_group_id, scale);
  return {out[0], out[1]};
}

// ---- mhr_linear(x, weight, bias?, A, B, weights, group_ids, rows_per_group_id, scale) -> (y, z) ----

using LinearSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                     const std::optional<at::Tensor>&, const at::Tensor&,
                                                     const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                                                     double);
using LinearGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using LinearBackwardSig = LinearGrads(const at::Tensor&, const at::Tensor&, const at::Tensor&, bool, const at::Tensor&,
                                      const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, double,
                                      const at::Tensor&, std::array<bool, 6>);

struct MhrLinearFunction : public torch::autograd::Function<MhrLinearFunction> {
  static variable_list forward(AutogradContext* ctx, const Variable& x, const Variable& weight,
                               const std::optional<Variable>& bias, const Variable& A, const Variable& B,
                               const Variable& weights, const Variable& group_ids, int64_t rows_per_group_id,
                               double scale) {
    static const auto op = op_handle<LinearSig>("mhr_ops::mhr_linear");
    at::Tensor y, z;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(y, z) = op.call(x, weight, bias, A, B, weights, group_ids, rows_per_group_id, scale);
    }
    const bool has_bias = bias.has_value() && bias->defined();
    ctx->mark_non_differentiable({z});
    ctx->save_for_backward({x, weight, A, B, weights, group_ids, z});
    ctx->saved_data["rows_per_group_id"] = rows_per_group_id;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["has_bias"] = has_bias;
    return {y, z};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(9);
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    Edges edges;  // x, weight, bias, A, B, weights
    edges.set({true, true, has_bias, true, true, true});
    std::array<bool, 6> mask{};
    bool any = false;
    for (int i = 0; i < 6; ++i) any = (mask[i] = edges.needs(ctx, i)) || any;
    if (!grads[0].defined() || !any) return out;
    const variable_list s = ctx->get_saved_variables();
    static const auto op = op_handle<LinearBackwardSig>("mhr_ops::mhr_linear_backward");
    const auto [dx, dW, db, dA, dB, dw] =
        call_backward_op(op, grads[0], s[0], s[1], has_bias, s[2], s[3], s[4], s[5],
                         ctx->saved_data["rows_per_group_id"].toInt(), ctx->saved_data["scale"].toDouble(), s[6], mask);
    const std::array<at::Tensor, 6> g{dx, dW, db, dA, dB, dw};
    for (int i = 0; i < 6; ++i)
      if (mask[i]) out[i] = g[i];
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor> mhr_linear_autograd(const at::Tensor& x, const at::Tensor& weight,
                                                       const std::optional<at::Tensor>& bias, const at::Tensor& A,
                                                       const at::Tensor& B, const at::Tensor& weights,
                                                       const at::Tensor& group_ids, int64_t rows_per_group_id,
                                                       double scale) {
  const variable_list out =
      MhrLinearFunction::apply(x, weight, bias, A, B, weights, group_ids, rows_per_group_id, scale);
  return {out[0], out[1]};
}

}  // namespace
}  // namespace mhr_ops

TORCH_LIBRARY_IMPL(mhr_ops, Autograd, m) {
  m.impl("route", &mhr_ops::route_autograd);
  m.impl("routed_lora", &mhr_ops::routed_lora_autograd);
  m.impl("mhr_linear", &mhr_ops::mhr_linear_autograd);
}
