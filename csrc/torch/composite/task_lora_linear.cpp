// task_lora_linear = F.linear(x, weight, bias), then moe_lora_add_ with one expert per task at
// weight 1 (through the dispatcher: each backend's kernel). The CPU has its own kernel, fused with
// the base GEMM (cpu/task_lora_linear_cpu.cpp), and takes this one for half-precision x.
#include "task_lora_linear.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/linear.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/repeat_interleave.h>
#include <torch/library.h>

#include <vector>

#include "../args/routed_lora_args.h"
#include "../torch_to_kernel.h"

namespace mhr_ops {

at::Tensor task_lora_rows(const at::Tensor& x) { return x.dim() > 2 ? x.reshape({-1, x.size(-1)}) : x; }

at::Tensor task_lora_output(const at::Tensor& y, const at::Tensor& x) {
  if (x.dim() <= 2) return y;
  std::vector<int64_t> sizes(x.sizes().begin(), x.sizes().end() - 1);
  sizes.push_back(y.size(1));
  return y.view(sizes);
}

at::Tensor task_lora_linear_unfused(const at::Tensor& x_in, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias, const at::Tensor& A, const at::Tensor& B,
                                    const at::Tensor& task_ids, int64_t rows_per_task_id) {
  const at::Tensor x = task_lora_rows(x_in);
  check_task_lora_linear(x, weight, bias, A, B, task_ids, rows_per_task_id);
  at::Tensor y = at::linear(x, weight, bias);
  static const auto add = c10::Dispatcher::singleton()
                              .findSchemaOrThrow("mhr_ops::moe_lora_add_", "")
                              .typed<at::Tensor(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                const at::Tensor&, const at::Tensor&, double)>();
  const at::Tensor ids = rows_per_task_id == 1 ? task_ids : at::repeat_interleave(task_ids, rows_per_task_id);
  const at::Tensor ones = at::ones({1, 1}, A.options()).expand({x.size(0), 1});
  add.call(y, x, A, B, ones, ids.unsqueeze(1), 1.0);
  return task_lora_output(y, x_in);
}

}  // namespace mhr_ops

#if defined(MHR_OPS_CUDA_EMULATION)
// The emulated test build stands the CUDA kernels in for the CPU ones (see mhr_linear.cpp).
TORCH_LIBRARY_IMPL(mhr_ops, CPU, m) { m.impl("task_lora_linear", &mhr_ops::task_lora_linear_unfused); }
#else
TORCH_LIBRARY_IMPL(mhr_ops, CompositeExplicitAutograd, m) {
  m.impl("task_lora_linear", &mhr_ops::task_lora_linear_unfused);
}
#endif
