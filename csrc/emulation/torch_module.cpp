// The Python module mhr_ops._emulated_cuda (test builds: setup.py with MHR_OPS_EMULATED_CUDA=1).
// Importing it loads the CUDA registrations compiled through the SIMT emulation, which register
// for the CPU dispatch key (csrc/torch/cuda_context.h): from then on, in this process, CPU tensors
// run the CUDA binding layer and kernels instead of the CPU kernels. Import mhr_ops first, so that
// these registrations come after (and win over) the CPU ones.
#include <pybind11/pybind11.h>

#include "simt.h"

PYBIND11_MODULE(_emulated_cuda, m) {
  m.doc() = "mhr_ops CUDA kernels on the host (SIMT emulation), registered for CPU tensors; tests only";
  // The last emulation error ("" if none): a kernel fault also fails the op that launched it.
  m.def("last_error_message", []() { return std::string(mhr_emu::last_error_message()); });
}
