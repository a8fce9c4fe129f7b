// CPU registration of routed_lora, routed_lora_add_ and mhr_linear: argument mapping and dispatch.
// One plan per call (csrc/kernels/routed_lora_plan_cpu.h) says which kernels compute the problem
// and how its rows are cut for the threads; this file maps the tensors onto them. The arithmetic is
// the torch-free kernels and ATen's GEMMs (the best BLAS this build of torch has), in fp32 (fp64
// for fp64 x). The backward: routed_lora_backward_cpu.cpp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <limits>

#include "../../kernels/routed_lora_rows.h"
#include "../args/routed_lora_args.h"
#include "../torch_to_kernel.h"
#include "routed_lora_cpu_operands.h"

namespace mhr_ops {
namespace {

// y_type: y's dtype (the row-tile and fused kernels write y in the compute dtype).
LoraForwardPlan plan_forward(const at::Tensor& x, const at::Tensor& y, const at::Tensor& group_ids, const LoraDims& d) {
  return plan_routed_lora_forward(d, lora_group_ids(group_ids), kernel_dtype(x, "x"), kernel_dtype(y, "y"),
                                  allowed_cpu_isa(), at::get_num_threads());
}

// The row-tile kernels (routed_lora_rows.h) for y in the compute dtype: project-then-mix in
// registers, or rows sorted by group with each used group's adapter mixed once (it also takes
// `bias`).
void row_tile_forward(at::Tensor& y, at::Tensor& z, const LoraOperands& o, const LoraForwardPlan& plan,
                      const LoraDims& d, double scale, bool accumulate, const void* bias) {
  const bool dbl = o.x.scalar_type() == at::kDouble;
  const bool avx2 = allowed_cpu_isa() >= CpuIsa::kAvx2;
  if (plan.path == LoraForwardPath::kTileRows) {
    LoraRowsParams p;
    p.x = o.x.const_data_ptr(), p.x_stride_n = o.x.stride(0);
    p.A = o.A.const_data_ptr(), p.B = o.B.const_data_ptr();
    const at::Tensor w = o.w.contiguous();
    const at::Tensor zh = at::empty({d.rows, d.heads, d.rank}, z.options());
    p.weights = w.const_data_ptr(), p.row_group = plan.groups.row_group.data(), p.rows = d.rows;
    p.y = y.data_ptr(), p.y_stride_n = y.stride(0), p.accumulate = accumulate, p.z = z.data_ptr();
    p.zh = zh.data_ptr(), p.d_in = d.d_in, p.d_out = d.d_out, p.heads = d.heads, p.skills = d.skills;
    p.rank = d.rank, p.groups = d.groups, p.scale = scale;
    // Items are (head, row tile) pairs: one row still keeps every thread busy.
    for (LoraRowsStep step : {LoraRowsStep::kProject, LoraRowsStep::kSumHeads, LoraRowsStep::kExpand}) {
      const int64_t items = lora_rows_step_items(p, step);
      const int64_t grain = step == LoraRowsStep::kSumHeads ? items : 1;  // a few adds per row
      at::parallel_for(0, items, grain, [&](int64_t b, int64_t e) {
        dbl ? routed_lora_rows_forward_step_cpu<double>(p, step, b, e, avx2)
            : routed_lora_rows_forward_step_cpu<float>(p, step, b, e, avx2);
      });
    }
    return;
  }
  const auto [a_mix, bt_mix] = mix_groups(o, plan.slot_groups, d, scale);  // [n, d_in, r], scale B_g^T [n, d_out, r]
  const at::Tensor b_mix = bt_mix.transpose(1, 2).contiguous();            // scale * B_g [n, r, d_out]
  LoraGatheredParams p;
  p.x = o.x.const_data_ptr(), p.x_stride_n = o.x.stride(0);
  p.y = y.data_ptr(), p.y_stride_n = y.stride(0), p.accumulate = accumulate, p.bias = bias, p.z = z.data_ptr();
  p.a_mix = a_mix.const_data_ptr(), p.b_mix = b_mix.const_data_ptr();
  p.rows = plan.order.data(), p.pieces = plan.pieces.data();
  p.d_in = d.d_in, p.d_out = d.d_out, p.rank = d.rank;
  at::parallel_for(0, static_cast<int64_t>(plan.pieces.size()), 1, [&](int64_t b, int64_t e) {
    dbl ? routed_lora_gathered_forward_cpu<double>(p, b, e, avx2)
        : routed_lora_gathered_forward_cpu<float>(p, b, e, avx2);
  });
}

// Runs of one group: each group's adapter mixed once, then the pieces in parallel (they write
// disjoint rows), through the fused kernel or two thin GEMMs each.
void runs_forward(at::Tensor& y, at::Tensor& z, const LoraOperands& o, const LoraForwardPlan& plan, const LoraDims& d,
                  double scale, bool accumulate, const void* bias) {
  const auto [a_mix, bt_mix] = mix_groups(o, plan.slot_groups, d, scale);
  const int64_t n_pieces = static_cast<int64_t>(plan.pieces.size());
  if (plan.path == LoraForwardPath::kFusedRuns) {  // raw pointers only in the loop: per-piece ATen views cost ~2 us
    LoraGroupForwardParams base;
    base.x = o.x.data_ptr(), base.x_stride_n = o.x.stride(0), base.y = y.data_ptr(), base.y_stride_n = y.stride(0);
    base.z = z.data_ptr(), base.d_in = d.d_in, base.d_out = d.d_out, base.rank = d.rank;
    base.accumulate = accumulate, base.bias = bias;
    base.a_mix = a_mix.const_data_ptr(), base.bt_mix = bt_mix.const_data_ptr();
    std::atomic<bool> refused{false};
    at::parallel_for(0, n_pieces, 1, [&](int64_t b, int64_t e) {
      if (!routed_lora_runs_forward_cpu(base, plan.pieces.data(), b, e, plan.isa)) refused = true;
    });
    TORCH_CHECK(!refused, "routed_lora: CPU kernel refused its problem");
    return;
  }
  const bool direct = y.scalar_type() == o.x.scalar_type();
  const at::ThreadLocalState tls;  // the caller's dispatch state (autograd excluded) for the workers
  at::parallel_for(0, n_pieces, 1, [&](int64_t b, int64_t e) {
    const at::ThreadLocalStateGuard tls_guard(tls);
    for (int64_t i = b; i < e; ++i) {
      const LoraRun& piece = plan.pieces[i];
      at::Tensor zs = z.narrow(0, piece.start, piece.rows);
      at::mm_out(zs, o.x.narrow(0, piece.start, piece.rows), a_mix.select(0, piece.slot));
      const at::Tensor bg = bt_mix.select(0, piece.slot).t();  // scale * B_g [r, d_out]
      at::Tensor ys = y.narrow(0, piece.start, piece.rows);
      if (direct) {
        ys.addmm_(zs, bg, accumulate ? 1.0 : 0.0);
      } else {
        const at::Tensor upd = at::mm(zs, bg);
        accumulate ? ys.add_(upd) : ys.copy_(upd);
      }
    }
  });
}

// y [N, d_out] (x's dtype) = or += scale * routed update, as `plan` says. Returns z = x @ A_g
// [N, r] (compute dtype). `bias` [d_out] (compute dtype, contiguous) is only taken where
// plan.takes_bias(), without accumulate: those kernels then write y = bias + update. Rows of
// out-of-range group ids come out NaN in y and z.
at::Tensor forward_into(at::Tensor& y, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                        const at::Tensor& weights, const LoraDims& d, double scale, bool accumulate,
                        const LoraForwardPlan& plan, const void* bias = nullptr) {
  at::Tensor z = at::empty({d.rows, d.rank}, x.options().dtype(accumulation_dtype(x.scalar_type())));
  TORCH_INTERNAL_ASSERT(bias == nullptr || (plan.takes_bias() && !accumulate));
  if (plan.path != LoraForwardPath::kNone) {
    const LoraOperands o = lora_operands(x, A, B, weights, d);
    switch (plan.path) {
      case LoraForwardPath::kTileRows:
      case LoraForwardPath::kTileGathered:
        row_tile_forward(y, z, o, plan, d, scale, accumulate, bias);
        break;
      case LoraForwardPath::kFusedRuns:
      case LoraForwardPath::kBlasRuns:
        runs_forward(y, z, o, plan, d, scale, accumulate, bias);
        break;
      default: {  // project-then-mix
        const at::Tensor rows_w = row_weights(o, plan.groups.row_group);
        z.copy_(mix_rows(at::bmm(heads_of(o.x, d.heads), a_cat(o, d)), rows_w, d));
        const at::Tensor upd =
            at::bmm(spread_rows(z, rows_w, d), b_cat(o, d)).transpose(0, 1).reshape({d.rows, d.d_out});
        accumulate ? y.add_(upd, scale) : y.copy_(upd.mul_(scale));
      }
    }
  }
  const double nan = std::numeric_limits<double>::quiet_NaN();
  fill_rows(y, plan.groups.bad, nan);
  fill_rows(z, plan.groups.bad, nan);
  return z;
}

std::tuple<at::Tensor, at::Tensor> routed_lora_cpu(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                                                   const at::Tensor& weights, const at::Tensor& group_ids,
                                                   int64_t rows_per_id, double scale) {
  const LoraDims d = check_routed_lora(x, A, B, weights, group_ids, rows_per_id);
  at::Tensor y = at::empty({d.rows, d.d_out}, x.options());
  const LoraForwardPlan plan = plan_forward(x, y, group_ids, d);
  at::Tensor z = forward_into(y, x, A, B, weights, d, scale, /*accumulate=*/false, plan);
  return {y, z};
}

at::Tensor routed_lora_add_cpu(at::Tensor& out, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                               const at::Tensor& weights, const at::Tensor& group_ids, int64_t rows_per_id,
                               double scale) {
  const LoraDims d = check_routed_lora(x, A, B, weights, group_ids, rows_per_id);
  check_add_output(out, x, d);
  const at::Tensor y = rows_layout(out);
  const LoraForwardPlan plan = plan_forward(x, out, group_ids, d);
  if (y.is_same(out)) return forward_into(out, x, A, B, weights, d, scale, /*accumulate=*/true, plan);
  at::Tensor tmp = y;  // a column-strided out: the same arithmetic as a row-major one, then copied back
  at::Tensor z = forward_into(tmp, x, A, B, weights, d, scale, /*accumulate=*/true, plan);
  out.copy_(tmp);
  return z;
}

// mhr_linear on the CPU: as the composite (F.linear, then routed_lora_add_), except where the
// plan's kernel takes a bias (fused runs, gathered row tiles): it writes y = bias + update first
// and the base GEMM accumulates into y (beta = 1), which saves a read-modify-write pass over y.
std::tuple<at::Tensor, at::Tensor> mhr_linear_cpu(const at::Tensor& x_in, const at::Tensor& weight,
                                                  const std::optional<at::Tensor>& bias, const at::Tensor& A,
                                                  const at::Tensor& B, const at::Tensor& weights,
                                                  const at::Tensor& group_ids, int64_t rows_per_id, double scale) {
  const at::Tensor x = rows_layout(x_in);  // the base GEMM and the kernel choice see one layout
  const LoraDims d = check_routed_lora(x, A, B, weights, group_ids, rows_per_id);
  check_mhr_linear_base(x, weight, bias, d);
  const bool has_bias = is_present(bias);
  at::Tensor y = at::empty({d.rows, d.d_out}, x.options());
  const LoraForwardPlan plan = plan_forward(x, y, group_ids, d);
  const auto ct = accumulation_dtype(x.scalar_type());
  if (plan.takes_bias() && x.scalar_type() == ct && (!has_bias || bias->scalar_type() == ct)) {
    const at::Tensor b = has_bias ? bias->contiguous() : at::Tensor();
    at::Tensor z = forward_into(y, x, A, B, weights, d, scale, /*accumulate=*/false, plan,
                                has_bias ? b.const_data_ptr() : nullptr);
    y.addmm_(x, weight.t());
    return {y, z};
  }
  y = at::linear(x, weight, bias);
  at::Tensor z = forward_into(y, x, A, B, weights, d, scale, /*accumulate=*/true, plan);
  return {y, z};
}

}  // namespace
}  // namespace mhr_ops

TORCH_LIBRARY_IMPL(mhr_ops, CPU, m) {
  m.impl("routed_lora", &mhr_ops::routed_lora_cpu);
  m.impl("routed_lora_add_", &mhr_ops::routed_lora_add_cpu);
  m.impl("mhr_linear", &mhr_ops::mhr_linear_cpu);
}
