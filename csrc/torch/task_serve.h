// MHRLinear's serving hit path in one call from Python (task_serve.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <pybind11/pybind11.h>

#include <cstdint>

namespace mhr_ops {

// Notes ids as range-checked against n_tasks (MHRLinear._serve, after mhr_ops/_tasks.py checked them).
void note_checked_ids(const at::Tensor& ids, int64_t n_tasks);

// Adds TaskServe and note_checked_ids to the module mhr_ops._C.
void register_task_serve(pybind11::module_& m);

}  // namespace mhr_ops
