// MHRLinear's serving hit (mhr_ops/nn.py) in one call from Python: the checks of MHRLinear._serve
// that depend on the call (x, the ids, grad mode, the adapters' versions), then task_lora_linear
// through the dispatcher on the kept mixed adapters. At one row the Python checks and the
// torch.ops call cost as much as the adapter's arithmetic (issue 11): each bytecode after a base
// GEMM runs on cold caches. The module's options (mode, routing options, scale, merged task,
// base) are not checked here: MHRLinear drops its TaskServe whenever one of its attributes is set.
#include <ATen/ATen.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <c10/util/intrusive_ptr.h>
#include <pybind11/pybind11.h>
#include <torch/csrc/autograd/python_variable.h>

#include <array>
#include <cstdint>
#include <optional>

#include "task_serve.h"

namespace mhr_ops {
namespace py = pybind11;
namespace {

using WeakImpl = c10::weak_intrusive_ptr<c10::TensorImpl>;

// A tensor the kept adapters were computed from: the same tensor object (its TensorImpl; the
// weak reference keeps the address from being reused, not the tensor alive) and storage, and with
// versioned, the same version (an optimizer step or load_state_dict bumps it).
struct Watched {
  WeakImpl impl;
  const void* data;
  bool versioned;
  int64_t version;

  Watched(const at::Tensor& t, bool versioned)
      : impl(t.getIntrusivePtr()),
        data(t.const_data_ptr()),
        versioned(versioned),
        version(versioned ? t._version() : 0) {}

  bool holds(const at::Tensor& t) const {
    const c10::TensorImpl* p = t.unsafeGetTensorImpl();
    return p == impl._unsafe_get_target() && t.const_data_ptr() == data &&
           (!versioned || (!t.is_inference() && t._version() == version));
  }
};

// Ids tensors MHRLinear._serve found range-checked (note_checked_ids), shared by every layer as
// mhr_ops/_tasks.py's registry is: the last kCheckedSlots, oldest overwritten. Used under the GIL.
constexpr size_t kCheckedSlots = 32;
struct CheckedIds {
  WeakImpl impl{c10::weak_intrusive_ptr<c10::TensorImpl>(c10::intrusive_ptr<c10::TensorImpl>())};
  int64_t n_tasks = 0;
};
std::array<CheckedIds, kCheckedSlots> checked_ids;
size_t next_checked = 0;

bool ids_checked(const at::Tensor& ids, int64_t n_tasks) {
  const c10::TensorImpl* p = ids.unsafeGetTensorImpl();
  for (const CheckedIds& c : checked_ids)  // any check against n_tasks or fewer tasks
    if (c.impl._unsafe_get_target() == p && c.n_tasks <= n_tasks && !c.impl.expired()) return true;
  return false;
}

// A tensor argument from Python: nullopt for None, anything that is not a tensor, and a tensor
// subclass (a wrapper may hold no storage to watch; the general flow serves those).
std::optional<at::Tensor> tensor_of(const py::handle& h) {
  if (!THPVariable_CheckExact(h.ptr())) return std::nullopt;
  return THPVariable_Unpack(h.ptr());
}

class TaskServe {
 public:
  TaskServe(const at::Tensor& A, const at::Tensor& B, const at::Tensor& logits, const at::Tensor& weight,
            const at::Tensor& mixed_a, const at::Tensor& mixed_b, double mixed_cache_fraction, int64_t max_rows)
      : A_(A, true),
        B_(B, true),
        logits_(logits, true),
        weight_(weight, false),
        mixed_a_(mixed_a),
        mixed_b_(mixed_b),
        x_dtype_(weight.scalar_type()),
        n_tasks_(logits.size(0)),
        fraction_(mixed_cache_fraction),
        max_rows_(max_rows) {}

  // y, or None for MHRLinear._serve to decide (it takes every call this declines).
  py::object call(const py::handle& x_h, const py::handle& ids_h, const py::handle& A_h, const py::handle& B_h,
                  const py::handle& logits_h, const py::handle& weight_h, const py::handle& bias_h,
                  double mixed_cache_fraction) const {
    if (!THPVariable_CheckExact(x_h.ptr()) || !THPVariable_CheckExact(ids_h.ptr()) ||
        mixed_cache_fraction != fraction_ || c10::impl::TorchDispatchModeTLS::any_modes_set() ||
        at::impl::torch_function_mode_enabled())
      return py::none();
    const auto A = tensor_of(A_h), B = tensor_of(B_h), logits = tensor_of(logits_h), weight = tensor_of(weight_h);
    const auto bias = tensor_of(bias_h);
    if (!A || !B || !logits || !weight || (!bias && !bias_h.is_none())) return py::none();
    const at::Tensor& x = THPVariable_Unpack(x_h.ptr());
    const at::Tensor& ids = THPVariable_Unpack(ids_h.ptr());
    if (!A_.holds(*A) || !B_.holds(*B) || !logits_.holds(*logits) || !weight_.holds(*weight)) return py::none();
    if (x.dim() < 2 || ids.dim() != 1 || x.scalar_type() != x_dtype_ || weight->scalar_type() != x_dtype_ ||
        x.device() != ids.device())
      return py::none();
    if (x.size(-1) == 0) return py::none();
    const int64_t n = x.size(0), n_ids = ids.size(0), rows = x.numel() / x.size(-1);
    if (rows == 0 || rows > max_rows_ || n_ids == 0 || n % n_ids != 0) return py::none();
    // routes_per_task (mhr_ops/_adapted.py); the mode has no per-example noise, or no TaskServe
    if (n_tasks_ > std::max<int64_t>(256, n) || !ids_checked(ids, n_tasks_)) return py::none();
    if (at::GradMode::is_enabled() &&
        (x.requires_grad() || A->requires_grad() || B->requires_grad() || logits->requires_grad() ||
         weight->requires_grad() || (bias && bias->requires_grad())))
      return py::none();
    static const auto op = c10::Dispatcher::singleton()
                               .findSchemaOrThrow("mhr_ops::task_lora_linear", "")
                               .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                                 const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t)>();
    at::Tensor y;
    {
      py::gil_scoped_release no_gil;
      y = op.call(x, *weight, bias, mixed_a_, mixed_b_, ids, rows / n_ids);
    }
    return py::reinterpret_steal<py::object>(THPVariable_Wrap(std::move(y)));
  }

 private:
  Watched A_, B_, logits_, weight_;
  at::Tensor mixed_a_, mixed_b_;
  at::ScalarType x_dtype_;
  int64_t n_tasks_;
  double fraction_;
  int64_t max_rows_;
};

}  // namespace

void note_checked_ids(const at::Tensor& ids, int64_t n_tasks) {
  checked_ids[next_checked] = CheckedIds{WeakImpl(ids.getIntrusivePtr()), n_tasks};
  next_checked = (next_checked + 1) % kCheckedSlots;
}

void register_task_serve(py::module_& m) {
  py::class_<TaskServe>(m, "TaskServe",
                        "MHRLinear's serving hit in one call (mhr_ops/nn.py MHRLinear.forward): "
                        "TaskServe(A, B, logits, weight, mixed_a, mixed_b, mixed_cache_fraction, max_rows)")
      .def(py::init<const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                    const at::Tensor&, double, int64_t>())
      .def("__call__", &TaskServe::call);
  m.def("note_checked_ids", &note_checked_ids, "Notes ids as range-checked against n_tasks (MHRLinear._serve)");
}

}  // namespace mhr_ops
