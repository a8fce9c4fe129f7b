// The Python module mhr_ops._emulated_cuda (test builds: setup.py with MHR_OPS_EMULATED_CUDA=1).
// Importing it loads the CUDA registrations compiled through the SIMT emulation, which register
// for the CPU dispatch key (csrc/torch/cuda/cuda_context.h): from then on, in this process, CPU tensors
// run the CUDA binding layer and kernels instead of the CPU kernels. Import mhr_ops first, so that
// these registrations come after (and win over) the CPU ones.
//
// It also exposes the emulation's counted traffic (traffic.h), for the traffic model
// (mhr_ops/benchmarking/traffic.py, `python -m mhr_ops bench --emulated`).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>

#include "simt.h"

namespace py = pybind11;

namespace {

// One launch record as a dict; per-kind counts under "load_*", "store_*", "atomic_*".
py::dict record_dict(const mhr_emu::LaunchTraffic& r) {
  py::dict d;
  d["kernel"] = r.kernel;
  d["grid"] = py::make_tuple(r.grid[0], r.grid[1], r.grid[2]);
  d["block"] = py::make_tuple(r.block[0], r.block[1], r.block[2]);
  const char* kinds[3] = {"load", "store", "atomic"};
  for (int k = 0; k < 3; ++k) {
    const std::string kind = kinds[k];
    d[py::str(kind + "_bytes")] = r.bytes[k];
    d[py::str(kind + "_accesses")] = r.accesses[k];
    d[py::str(kind + "_sectors")] = r.sectors[k];
    d[py::str(kind + "_requests")] = r.requests[k];
    d[py::str(kind + "_request_sectors")] = r.request_sectors[k];
  }
  d["read_sectors"] = r.read_sectors;
  d["written_sectors"] = r.written_sectors;
  d["union_sectors"] = r.union_sectors;
  d["dram_bytes"] = r.dram_bytes();
  d["sectors_per_request"] = r.sectors_per_request();
  d["tensor_core_flops"] = r.tensor_core_flops;
  return d;
}

}  // namespace

PYBIND11_MODULE(_emulated_cuda, m) {
  m.doc() = "mhr_ops CUDA kernels on the host (SIMT emulation), registered for CPU tensors; tests only";
  // The last emulation error ("" if none): a kernel fault also fails the op that launched it.
  m.def("last_error_message", []() { return std::string(mhr_emu::last_error_message()); });

  m.def("set_traffic_counting", &mhr_emu::set_traffic_counting, py::arg("on"),
        "Count every later launch's global-memory traffic and tensor-core flops (off by default; "
        "MHR_EMU_COUNT_TRAFFIC=1 turns it on at start).");
  m.def("traffic_counting", &mhr_emu::traffic_counting, "Whether launches are counted.");
  m.def("reset_launch_records", &mhr_emu::reset_launch_records, "Forget the launch records so far.");
  m.def(
      "launch_records",
      []() {
        py::list out;
        for (const mhr_emu::LaunchTraffic& r : mhr_emu::launch_records()) out.append(record_dict(r));
        return out;
      },
      "The counted launches since the last reset, in order, one dict each: kernel, grid, block; "
      "{load,store,atomic}_{bytes,accesses,sectors,requests,request_sectors}; read_sectors, "
      "written_sectors, union_sectors (distinct 32-byte sectors); dram_bytes (32 * (read + written "
      "sectors): what DRAM moves with a perfect L2); sectors_per_request (normalized to 128-byte "
      "requests); tensor_core_flops.");
  m.def(
      "set_sm_count",
      [](int n) {
        if (n < 1) throw py::value_error("n: expected a multiprocessor count >= 1, got " + std::to_string(n));
        return mhr_emu::set_multiprocessor_count(n);
      },
      py::arg("n"),
      "The multiprocessor count the emulated device reports (132, an H100's, by default); returns the "
      "previous one. Launchers size their grids by it.");
}
