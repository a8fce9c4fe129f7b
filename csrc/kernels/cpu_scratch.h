// Per-thread scratch for the CPU kernels. Torch-free.
#pragma once

#include <cstddef>
#include <vector>

namespace mhr_ops {

// At least n elements of T for the calling thread, kept between calls (one kernel call at a time
// per thread uses it; the contents are not preserved across calls).
template <typename T>
T* thread_scratch(size_t n) {
  thread_local std::vector<T> buf;
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

}  // namespace mhr_ops
