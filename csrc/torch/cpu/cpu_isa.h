// The instruction sets the CPU kernels may use: those ATen itself is allowed (ATEN_CPU_CAPABILITY
// caps it, e.g. "avx2" or "default"), so that the fused CPU kernels follow the same switch.
#pragma once

#include <ATen/Version.h>

#include <string>

#include "../../kernels/common.h"

namespace mhr_ops {

inline CpuIsa allowed_cpu_isa() {
  static const CpuIsa isa = [] {
    const std::string cap = at::get_cpu_capability();
    return cap == "AVX512" ? CpuIsa::kAvx512 : cap == "AVX2" ? CpuIsa::kAvx2 : CpuIsa::kNone;
  }();
  return isa;
}

}  // namespace mhr_ops
