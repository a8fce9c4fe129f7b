// How the binding layer's errors name things: shapes and dtypes as Python prints them, so that
// the op's errors read as the Python layer's did when it held the checks.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>

namespace mhr_ops {

// How Python prints a shape, (2, 3) or (6,), and a dtype, torch.float32 or float32.
inline std::string py_shape(c10::IntArrayRef sizes) {
  std::string s = "(";
  for (size_t i = 0; i < sizes.size(); ++i) s += (i ? ", " : "") + std::to_string(sizes[i]);
  return s + (sizes.size() == 1 ? ",)" : ")");
}
inline std::string dtype_name(at::ScalarType t) { return std::string(c10::getDtypeNames(t).first); }
inline std::string py_dtype(at::ScalarType t) { return "torch." + dtype_name(t); }

inline void check_same_device(const at::Tensor& t, const char* arg, const at::Tensor& ref, const char* ref_arg) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), arg, ": expected a tensor on ", ref.device(), " (the device of ",
                    ref_arg, "), got ", t.device());
}

// An output the kernels write through its strides, each element once: a broadcast or
// self-overlapping tensor would be written several times.
inline void check_no_internal_overlap(const at::Tensor& t, const char* arg) {
  TORCH_CHECK_VALUE(at::has_internal_overlap(t) != at::MemOverlap::Yes, arg,
                    ": expected a tensor without internal overlap (each element written once), got strides ",
                    t.strides());
}

}  // namespace mhr_ops
