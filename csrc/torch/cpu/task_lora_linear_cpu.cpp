// CPU kernel of task_lora_linear (schema: registration.cpp): the gathered row-tile kernel
// (routed_lora_rows.h) on the tasks' mixed adapters writes y = bias + update, rows sorted by task,
// and the base GEMM accumulates into y (beta = 1). One pass over y besides the GEMM's, each task's
// adapter read once per row tile, and no thread team for a call of one piece. Half-precision x
// takes the composite (composite/task_lora_linear.cpp): the update then rounds once more, into
// the base output.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <numeric>
#include <vector>

#include "../../kernels/routed_lora_plan_cpu.h"
#include "../../kernels/routed_lora_rows.h"
#include "../args/routed_lora_args.h"
#include "../composite/task_lora_linear.h"
#include "../torch_to_kernel.h"
#include "routed_lora_cpu_operands.h"

namespace mhr_ops {
namespace {

at::Tensor task_lora_linear_cpu(const at::Tensor& x_in, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                const at::Tensor& A_in, const at::Tensor& B_in, const at::Tensor& task_ids,
                                int64_t rows_per_task_id) {
  const at::Tensor x = rows_layout(task_lora_rows(x_in));
  const LoraDims d = check_task_lora_linear(x, weight, bias, A_in, B_in, task_ids, rows_per_task_id);
  if (x.scalar_type() != accumulation_dtype(x.scalar_type()))
    return task_lora_linear_unfused(x_in, weight, bias, A_in, B_in, task_ids, rows_per_task_id);
  at::Tensor y = at::empty({d.rows, d.d_out}, x.options());
  if (d.rows == 0) return task_lora_output(y, x_in);
  const at::Tensor A = A_in.contiguous(), B = B_in.contiguous();
  const bool has_bias = is_present(bias);
  const at::Tensor b = has_bias ? bias->contiguous() : at::Tensor();
  // Rows by task, as routed_lora's gathered path lists them (an id outside [0, T) counts as task 0
  // there and is overwritten with NaN below), with every task its own slot: A and B are per task.
  const LoraRowGroups groups = routed_lora_row_groups(d, lora_group_ids(task_ids));
  std::vector<int64_t> tasks(d.groups), order;
  std::iota(tasks.begin(), tasks.end(), int64_t(0));
  const std::vector<LoraRun> pieces = gathered_pieces(groups, d, tasks, at::get_num_threads(), order);
  const at::Tensor z = at::empty({d.rows, d.rank}, x.options());  // the kernel's bottleneck, not returned
  LoraGatheredParams p;
  p.x = x.const_data_ptr(), p.x_stride_n = x.stride(0), p.y = y.data_ptr(), p.y_stride_n = y.stride(0);
  p.accumulate = false, p.bias = has_bias ? b.const_data_ptr() : nullptr, p.z = z.data_ptr();
  p.a_mix = A.const_data_ptr(), p.b_mix = B.const_data_ptr(), p.rows = order.data(), p.pieces = pieces.data();
  p.d_in = d.d_in, p.d_out = d.d_out, p.rank = d.rank;
  const bool dbl = x.scalar_type() == at::kDouble, avx2 = allowed_cpu_isa() >= CpuIsa::kAvx2;
  at::parallel_for(0, static_cast<int64_t>(pieces.size()), 1, [&](int64_t begin, int64_t end) {
    dbl ? routed_lora_gathered_forward_cpu<double>(p, begin, end, avx2)
        : routed_lora_gathered_forward_cpu<float>(p, begin, end, avx2);
  });
  fill_rows(y, groups.bad, std::numeric_limits<double>::quiet_NaN());
  y.addmm_(x, weight.t());
  return task_lora_output(y, x_in);
}

}  // namespace
}  // namespace mhr_ops

TORCH_LIBRARY_IMPL(mhr_ops, CPU, m) { m.impl("task_lora_linear", &mhr_ops::task_lora_linear_cpu); }
