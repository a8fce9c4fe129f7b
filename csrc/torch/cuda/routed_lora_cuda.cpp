// CUDA registration of routed_lora, routed_lora_add_ and routed_lora_backward: checks, then the
// shrink / expand / wgrad kernels (csrc/kernels/routed_lora_cuda.cu) on the current stream.
// No host synchronization: group segments are found by the kernels themselves.
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include "../../kernels/routed_lora_cuda.h"
#include "../args/routed_lora_args.h"
#include "../torch_to_kernel.h"
#include "cuda_context.h"

namespace mhr_ops {
namespace {

// The problem's operands as the kernels take them: skill matrices contiguous (so a gradient
// buffer shares their strides), weights in the accumulation type.
struct CudaOperands {
  LoraDims d;
  at::Tensor A, B, w;
  DType data, matrix;
  RowRouting routing;
};

CudaOperands prepare(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B, const at::Tensor& weights,
                     const at::Tensor& group_ids, int64_t rows_per_id) {
  CudaOperands o;
  o.d = check_routed_lora(x, A, B, weights, group_ids, rows_per_id);
  TORCH_CHECK(o.d.rank <= kRoutedLoraMaxRank, "A: the CUDA kernels take ranks 1..", kRoutedLoraMaxRank,
              ", got r=", o.d.rank);
  TORCH_CHECK(o.d.heads <= 65535, "A: the CUDA kernels take at most 65535 heads, got ", o.d.heads);
  o.A = A.contiguous();
  o.B = B.contiguous();
  o.w = weights.to(accumulation_dtype(x.scalar_type()));
  o.data = kernel_dtype(x, "x");
  o.matrix = kernel_dtype(A, "A");
  RowRouting& r = o.routing;
  r.weights = o.w.data_ptr();
  r.w_stride_g = o.w.stride(0);
  r.w_stride_k = o.w.stride(1);
  r.w_stride_s = o.w.stride(2);
  r.group_ids = group_ids.data_ptr();
  r.index_type = kernel_index_type(group_ids, "group_ids");
  r.ids_stride = group_ids.stride(0);
  r.rows_per_group_id = rows_per_id;
  r.num_groups = o.d.groups;
  r.num_heads = o.d.heads;
  r.num_skills = o.d.skills;
  return o;
}

// A[k,s] as [dk_in, r] (transposed: [r, dk_in]); B[k,s] as [r, dk_out] (transposed: [dk_out, r]).
SkillMatrices skill_matrices(const at::Tensor& M, bool transposed) {
  SkillMatrices m;
  m.data = M.data_ptr();
  m.stride_k = M.stride(0);
  m.stride_s = M.stride(1);
  m.stride_row = transposed ? M.stride(3) : M.stride(2);
  m.stride_col = transposed ? M.stride(2) : M.stride(3);
  return m;
}

// Z [N, r] = z_scale * X @ Mmix (per row's group). `op` names the op in the non-determinism
// alert, raised when the kernel splits the reduction (atomics).
at::Tensor shrink(const CudaOperands& o, const at::Tensor& X, const SkillMatrices& m, int64_t dk, double z_scale,
                  const char* op) {
  if (routed_lora_shrink_splits_cuda(o.data, o.matrix, o.d.rows, o.d.heads, dk)) alert_not_deterministic(op);
  at::Tensor z = at::empty({o.d.rows, o.d.rank}, X.options().dtype(accumulation_dtype(X.scalar_type())));
  ShrinkParams p;
  p.x = X.data_ptr();
  p.x_stride_n = X.stride(0);
  p.x_stride_c = X.stride(1);
  p.m = m;
  p.routing = o.routing;
  p.z = z.data_ptr();
  p.num_rows = o.d.rows;
  p.dk = dk;
  p.rank = o.d.rank;
  p.z_scale = z_scale;
  check_launch(routed_lora_shrink_cuda(p, o.data, o.matrix, current_stream()), "routed_lora shrink");
  return z;
}

// Y (+)= y_scale * Z @ Mmix.
void expand(const CudaOperands& o, const at::Tensor& z, const SkillMatrices& m, at::Tensor& Y, int64_t dk,
            double y_scale, bool accumulate) {
  ExpandParams p;
  p.z = z.data_ptr();
  p.m = m;
  p.routing = o.routing;
  p.y = Y.data_ptr();
  p.y_stride_n = Y.stride(0);
  p.y_stride_c = Y.stride(1);
  p.accumulate = accumulate;
  p.num_rows = o.d.rows;
  p.dk = dk;
  p.rank = o.d.rank;
  p.y_scale = y_scale;
  check_launch(routed_lora_expand_cuda(p, o.data, o.matrix, current_stream()), "routed_lora expand");
}

void wgrad(const CudaOperands& o, const at::Tensor& X, const at::Tensor& q, double q_scale, const SkillMatrices& m,
           int64_t dk, const at::Tensor& dm, const at::Tensor& dw) {
  WgradParams p;
  p.x = X.data_ptr();
  p.x_stride_n = X.stride(0);
  p.x_stride_c = X.stride(1);
  p.q = q.data_ptr();
  p.q_scale = q_scale;
  p.m = m;
  p.routing = o.routing;
  p.dm = data_or_null(dm);
  p.dw = data_or_null(dw);
  p.num_rows = o.d.rows;
  p.dk = dk;
  p.rank = o.d.rank;
  check_launch(routed_lora_wgrad_cuda(p, o.data, o.matrix, current_stream()), "routed_lora wgrad");
}

// Returns z = x @ A_g [N, r] (fp32, fp64 for fp64 x).
at::Tensor forward_into(at::Tensor& y, const at::Tensor& x, const CudaOperands& o, double scale, bool accumulate,
                        const char* op) {
  const at::Tensor z = shrink(o, x, skill_matrices(o.A, false), o.d.dk_in, 1.0, op);
  expand(o, z, skill_matrices(o.B, false), y, o.d.dk_out, scale, accumulate);
  return z;
}

std::tuple<at::Tensor, at::Tensor> routed_lora_cuda(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                                                    const at::Tensor& weights, const at::Tensor& group_ids,
                                                    int64_t rows_per_id, double scale) {
  const CudaDeviceGuard guard(x.device());
  const CudaOperands o = prepare(x, A, B, weights, group_ids, rows_per_id);
  at::Tensor y = at::empty({o.d.rows, o.d.d_out}, x.options());
  at::Tensor z = forward_into(y, x, o, scale, /*accumulate=*/false, "routed_lora (CUDA)");
  return {y, z};
}

at::Tensor routed_lora_add_cuda(at::Tensor& out, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                                const at::Tensor& weights, const at::Tensor& group_ids, int64_t rows_per_id,
                                double scale) {
  const CudaDeviceGuard guard(x.device());
  const CudaOperands o = prepare(x, A, B, weights, group_ids, rows_per_id);
  check_add_output(out, x, o.d);
  return forward_into(out, x, o, scale, /*accumulate=*/true, "routed_lora_add_ (CUDA)");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> routed_lora_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B, const at::Tensor& weights,
    const at::Tensor& group_ids, int64_t rows_per_id, double scale, const at::Tensor& z, std::array<bool, 4> mask) {
  const CudaDeviceGuard guard(x.device());
  const CudaOperands o = prepare(x, A, B, weights, group_ids, rows_per_id);
  check_rows_output(grad_y, "grad_y", x, o.d);
  const auto acc = x.options().dtype(accumulation_dtype(x.scalar_type()));
  check_bottleneck(z, x, o.d);
  const at::Tensor zc = z.contiguous();  // the wgrad kernel reads it as [N, r] contiguous
  at::Tensor dx = mask[0] ? at::empty({o.d.rows, o.d.d_in}, x.options()) : at::empty({0}, x.options());
  // fp32 (fp64) accumulators in the skill matrices' own (contiguous) layout.
  at::Tensor dA = mask[1] ? at::zeros(o.A.sizes(), acc) : at::Tensor();
  at::Tensor dB = mask[2] ? at::zeros(o.B.sizes(), acc) : at::Tensor();
  at::Tensor dw = mask[3] ? at::zeros({o.d.groups, o.d.heads, o.d.skills}, acc) : at::Tensor();
  if (o.d.rows > 0) {
    const char* op = "routed_lora_backward (CUDA)";
    const at::Tensor gz = shrink(o, grad_y, skill_matrices(o.B, true), o.d.dk_out, scale, op);
    // The wgrad sums dw with atomics, and dA / dB too on the SIMT path.
    const bool tensor_cores = routed_lora_uses_tensor_cores(o.data, o.matrix, o.d.rows);
    if (mask[3] || ((mask[1] || mask[2]) && !tensor_cores)) alert_not_deterministic(op);
    if (mask[0]) expand(o, gz, skill_matrices(o.A, true), dx, o.d.dk_in, 1.0, /*accumulate=*/false);
    if (mask[1] || mask[3]) wgrad(o, x, gz, 1.0, skill_matrices(o.A, false), o.d.dk_in, dA, dw);
    if (mask[2] || mask[3]) wgrad(o, grad_y, zc, scale, skill_matrices(o.B, true), o.d.dk_out, dB, dw);
  }
  return {dx, grad_or_empty(dA, A), grad_or_empty(dB, B), grad_or_empty(dw, weights)};
}

}  // namespace
}  // namespace mhr_ops

MHR_OPS_CUDA_KERNELS(m) {
  m.impl("routed_lora", &mhr_ops::routed_lora_cuda);
  m.impl("routed_lora_add_", &mhr_ops::routed_lora_add_cuda);
  m.impl("routed_lora_backward", &mhr_ops::routed_lora_backward_cuda);
}
