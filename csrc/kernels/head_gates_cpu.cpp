// CPU kernels for head_gates (see head_gates.h): the shared per-row math, rows [begin, end).
#include "head_gates.h"

namespace mhr_ops {

template <typename scalar_t>
void head_gates_fwd_cpu(const HeadGatesParams& p, int64_t row_begin, int64_t row_end) {
  const int64_t H = p.num_shared + p.num_routed;
  for (int64_t n = row_begin; n < row_end; ++n)
    head_gates_row_fwd<scalar_t, scalar_t>(p, n, static_cast<scalar_t*>(p.gates) + n * H);
}

template <typename scalar_t>
void head_gates_bwd_cpu(const HeadGatesParams& p, int64_t row_begin, int64_t row_end) {
  for (int64_t n = row_begin; n < row_end; ++n) head_gates_row_bwd<scalar_t, scalar_t>(p, n);
}

template void head_gates_fwd_cpu<float>(const HeadGatesParams&, int64_t, int64_t);
template void head_gates_fwd_cpu<double>(const HeadGatesParams&, int64_t, int64_t);
template void head_gates_bwd_cpu<float>(const HeadGatesParams&, int64_t, int64_t);
template void head_gates_bwd_cpu<double>(const HeadGatesParams&, int64_t, int64_t);

}  // namespace mhr_ops
