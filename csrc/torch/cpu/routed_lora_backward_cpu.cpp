// CPU registration of routed_lora_backward and mhr_linear_backward: argument mapping and dispatch
// over one plan per call (csrc/kernels/routed_lora_plan_cpu.h). mhr_linear's backward is fused
// here: in the runs paths the adapter writes its part of dx first and the base layer's
// grad_y @ weight accumulates into it inside the GEMM (beta = 1), which saves a read-modify-write
// pass over dx.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <atomic>
#include <limits>
#include <vector>

#include "../../kernels/routed_lora_rows.h"
#include "../args/routed_lora_args.h"
#include "../torch_to_kernel.h"
#include "routed_lora_cpu_operands.h"

namespace mhr_ops {
namespace {

// The gradients being computed, in the compute dtype: dx [N, d_in] (may already hold the base
// layer's part: dx_written), dA [h, S, dk_in * r], dB [h, S, r * dk_out], dw [G, h, S]; an
// undefined tensor is not needed.
struct LoraGrads {
  at::Tensor dx, dA, dB, dw;
  bool dx_written = false;
};

// The row kernel in steps over heads, (head, skill) pairs and rows (routed_lora_rows.h): dA and
// dB are written whole, dw (zeroed) accumulated, each by the one item that owns it.
void rows_backward(LoraGrads& g, const LoraOperands& o, const at::Tensor& gy, const at::Tensor& z,
                   const LoraBackwardPlan& plan, const LoraDims& d, double scale) {
  const at::Tensor w = o.w.contiguous();
  const at::Tensor gz = at::empty({d.rows, d.rank}, z.options());
  const at::Tensor pgy = at::empty({d.rows, d.heads * d.skills * d.rank}, z.options());
  const at::Tensor gzh = at::empty({d.rows, d.heads * d.rank}, z.options());
  const auto ptr = [](const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; };
  LoraRowsGradParams p;
  p.x = o.x.const_data_ptr(), p.x_stride_n = o.x.stride(0), p.grad_y = gy.const_data_ptr();
  p.gy_stride_n = gy.stride(0), p.z = z.const_data_ptr(), p.A = o.A.const_data_ptr(), p.B = o.B.const_data_ptr();
  p.weights = w.const_data_ptr(), p.row_group = plan.groups.row_group.data(), p.rows = d.rows;
  p.gz = gz.data_ptr(), p.pgy = pgy.data_ptr(), p.gzh = gzh.data_ptr();
  p.dA = ptr(g.dA), p.dB = ptr(g.dB), p.dw = ptr(g.dw);
  if (g.dx.defined()) p.dx = g.dx.data_ptr(), p.dx_stride_n = g.dx.stride(0), p.dx_accumulate = g.dx_written;
  p.d_in = d.d_in, p.d_out = d.d_out, p.heads = d.heads, p.skills = d.skills, p.rank = d.rank, p.scale = scale;
  const bool avx2 = allowed_cpu_isa() >= CpuIsa::kAvx2;
  const bool weights_step = p.dA || p.dB || p.dw;
  AT_DISPATCH_FLOATING_TYPES(o.x.scalar_type(), "routed_lora_rows_backward", [&] {
    const auto run = [&](LoraRowsGradStep step, int64_t b, int64_t e) {
      routed_lora_rows_backward_step_cpu<scalar_t>(p, step, b, e, avx2);
    };
    const int64_t head_rows = lora_rows_grad_step_items(p, LoraRowsGradStep::kProject);
    at::parallel_for(0, head_rows, 1, [&](int64_t b, int64_t e) { run(LoraRowsGradStep::kProject, b, e); });
    run(LoraRowsGradStep::kSumHeads, 0, d.rows);  // a few adds per row
    // The weight-gradient items, then the dx items, in one parallel region (they are independent).
    const int64_t n_weights = weights_step ? lora_rows_grad_step_items(p, LoraRowsGradStep::kWeights) : 0;
    const int64_t n_dx = p.dx ? head_rows : 0;
    at::parallel_for(0, n_weights + n_dx, 1, [&](int64_t b, int64_t e) {
      if (b < n_weights) run(LoraRowsGradStep::kWeights, b, std::min(e, n_weights));
      if (e > n_weights) run(LoraRowsGradStep::kDx, std::max(b, n_weights) - n_weights, e - n_weights);
    });
  });
}

// Runs of one group, cut into pieces, the pieces in parallel: they write disjoint dx rows and
// each its own slot of the partials dA_g [d_in, r] and dB_g^T [d_out, r]. All slots pass back
// through the mixing in three batched GEMMs afterwards. `base_weight` (may be null) is folded
// into dx by the GEMM.
void runs_backward(LoraGrads& g, const LoraOperands& o, const at::Tensor& gy, const at::Tensor& z,
                   const LoraBackwardPlan& plan, const LoraDims& d, double scale, const at::Tensor* base_weight) {
  const int64_t n_pieces = static_cast<int64_t>(plan.pieces.size());
  const auto opts = z.options();
  const auto [a_mix, bt_mix] = mix_groups(o, plan.slot_groups, d, scale);  // A_g, scale * B_g^T
  const at::Tensor dag_all = at::zeros({n_pieces, d.d_in, d.rank}, opts);
  const at::Tensor dbgt_all = at::zeros({n_pieces, d.d_out, d.rank}, opts);
  if (plan.path == LoraBackwardPath::kFusedRuns) {  // raw pointers only in the loop
    TORCH_INTERNAL_ASSERT(o.x.stride(1) == 1 && gy.stride(1) == 1);
    const at::Tensor gz_rows = at::empty({d.rows, d.rank}, opts);
    LoraGroupGradParams base;
    base.x = o.x.data_ptr(), base.x_stride_n = o.x.stride(0), base.x_stride_c = o.x.stride(1);
    base.grad_y = gy.data_ptr(), base.gy_stride_n = gy.stride(0), base.gy_stride_c = gy.stride(1);
    base.z = z.data_ptr(), base.gz = gz_rows.data_ptr(), base.d_in = d.d_in, base.d_out = d.d_out;
    base.rank = d.rank, base.scale = scale;
    if (g.dx.defined())  // dx rows in the same kernel (a thin BLAS GEMM with K = r is slow)
      base.dx = g.dx.data_ptr(), base.dx_stride_n = g.dx.stride(0), base.dx_accumulate = g.dx_written;
    base.a_mix = a_mix.const_data_ptr(), base.bt_mix = bt_mix.const_data_ptr();
    base.da = dag_all.data_ptr(), base.dbt = dbgt_all.data_ptr();
    std::atomic<bool> refused{false};
    at::parallel_for(0, n_pieces, 1, [&](int64_t b, int64_t e) {
      if (!routed_lora_runs_grads_cpu(base, plan.pieces.data(), b, e, plan.isa)) refused = true;
    });
    TORCH_CHECK(!refused, "routed_lora backward: CPU kernel refused its problem");
  } else {
    const double dx_beta = g.dx_written ? 1.0 : 0.0;
    const at::ThreadLocalState tls;  // the caller's dispatch state for the workers' ATen calls
    at::parallel_for(0, n_pieces, 1, [&](int64_t b, int64_t e) {
      const at::ThreadLocalStateGuard tls_guard(tls);
      for (int64_t i = b; i < e; ++i) {
        const LoraRun& piece = plan.pieces[i];
        at::Tensor dag = dag_all.select(0, i), dbgt = dbgt_all.select(0, i);
        const at::Tensor gys = gy.narrow(0, piece.start, piece.rows);
        const at::Tensor gz = at::mm(gys, bt_mix.select(0, piece.slot));
        dag.addmm_(o.x.narrow(0, piece.start, piece.rows).t(), gz);
        dbgt.addmm_(gys.t(), z.narrow(0, piece.start, piece.rows), 1.0, scale);
        if (g.dx.defined())
          g.dx.narrow(0, piece.start, piece.rows).addmm_(gz, a_mix.select(0, piece.slot).t(), dx_beta);
      }
    });
  }
  if (base_weight) g.dx.addmm_(gy, *base_weight);
  // Through the mixing, A_g[k] = sum_s w[g,k,s] A[k,s] (B likewise), batched over heads:
  //   dA[k] = W_k^T dA_g[k],  dw[g,k,s] = A[k,s] . dA_g[k] + B[k,s] . dB_g[k]
  // with W_k [pieces, S] each piece's group weights and dA_g[k] [pieces, dk_in * r].
  const at::Tensor piece_ids = at::tensor(plan.piece_groups(), at::kLong);
  const at::Tensor w_used = o.w.index_select(0, piece_ids).permute({1, 0, 2});                   // [h, n, S]
  const at::Tensor dag_h = dag_all.view({n_pieces, d.heads, d.dk_in * d.rank}).transpose(0, 1);  // [h, n, .]
  const at::Tensor dbg_h = swap_pairs(dbgt_all.view({n_pieces, d.heads, d.dk_out, d.rank}), 1.0)
                               .view({d.heads, n_pieces, d.rank * d.dk_out});  // [h, n, .]
  if (g.dA.defined()) at::bmm_out(g.dA, w_used.transpose(1, 2), dag_h);
  if (g.dB.defined()) at::bmm_out(g.dB, w_used.transpose(1, 2), dbg_h);
  if (g.dw.defined()) {
    const at::Tensor dw_used = at::bmm(o.A, dag_h.transpose(1, 2)).baddbmm_(o.B, dbg_h.transpose(1, 2));
    g.dw.index_add_(0, piece_ids, dw_used.permute({2, 0, 1}));  // [h, S, n] -> [n, h, S]; a group's pieces sum
  }
}

// BLAS over all skills at once, mixed per row.
void project_then_mix_backward(LoraGrads& g, const LoraOperands& o, const at::Tensor& gy, const at::Tensor& z,
                               const LoraBackwardPlan& plan, const LoraDims& d, double scale) {
  const at::Tensor rows_w = row_weights(o, plan.groups.row_group);
  const at::Tensor ac = a_cat(o, d), bc = b_cat(o, d);
  const at::Tensor x_h = heads_of(o.x, d.heads), gy_h = heads_of(gy, d.heads);
  const at::Tensor U = at::bmm(x_h, ac);  // [h, N, S*r]
  const at::Tensor T = at::bmm(gy_h, bc.transpose(1, 2)).mul_(scale);
  const at::Tensor gz = mix_rows(T, rows_w, d);
  const at::Tensor wgz = spread_rows(gz, rows_w, d);
  if (g.dx.defined()) {
    const at::Tensor lora_dx = at::bmm(wgz, ac.transpose(1, 2)).transpose(0, 1).reshape({d.rows, d.d_in});
    g.dx_written ? g.dx.add_(lora_dx) : g.dx.copy_(lora_dx);
  }
  if (g.dA.defined())
    g.dA.copy_(at::bmm(x_h.transpose(1, 2), wgz)
                   .view({d.heads, d.dk_in, d.skills, d.rank})
                   .permute({0, 2, 1, 3})
                   .reshape(g.dA.sizes()));
  if (g.dB.defined())
    g.dB.copy_(at::bmm(spread_rows(z, rows_w, d).transpose(1, 2), gy_h).mul_(scale).view(g.dB.sizes()));
  if (g.dw.defined())
    g.dw.index_add_(0, at::tensor(plan.groups.row_group, at::kLong), row_weight_grads(U, gz, T, z, d));
}

// Gradients (x, A, B, weights) of routed_lora (grad_y checked by the caller); with `base_weight` [d_out, d_in]
// (mhr_linear) dx also holds grad_y @ base_weight. Rows of out-of-range group ids add nothing to dA, dB, dw and get NaN
// in dx.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B, const at::Tensor& weights,
    const at::Tensor& group_ids, const LoraDims& d, double scale, const at::Tensor& z, const at::Tensor* base_weight,
    std::array<bool, 4> mask) {
  check_bottleneck(z, x, d);
  const auto ct = accumulation_dtype(x.scalar_type());
  const auto opts = x.options().dtype(ct);
  const LoraBackwardPlan plan = plan_routed_lora_backward(d, lora_group_ids(group_ids), kernel_dtype(x, "x"),
                                                          allowed_cpu_isa(), at::get_num_threads());
  const bool computed = plan.path != LoraBackwardPath::kNone;
  // dA and dB are written whole by every path; with nothing computed they stay zero.
  const auto grad_buffer = [&](bool needed, at::IntArrayRef sizes) {
    return !needed ? at::Tensor() : computed ? at::empty(sizes, opts) : at::zeros(sizes, opts);
  };
  LoraGrads g;
  g.dA = grad_buffer(mask[1], {d.heads, d.skills, d.dk_in * d.rank});
  g.dB = grad_buffer(mask[2], {d.heads, d.skills, d.rank * d.dk_out});
  g.dw = mask[3] ? at::zeros({d.groups, d.heads, d.skills}, opts) : at::Tensor();
  const bool runs = plan.path == LoraBackwardPath::kFusedRuns || plan.path == LoraBackwardPath::kBlasRuns;
  // The base GEMM adds into an fp32/fp64 dx directly; fp16/bf16 x keeps it in x's dtype (as
  // F.linear's backward would) and adds it to the adapter's part afterwards.
  const bool fold_base = mask[0] && base_weight && runs && x.scalar_type() == ct;
  at::Tensor gy = d.rows > 0 ? rows_layout(grad_y.to(ct)) : grad_y.to(ct);
  at::Tensor zc = z.contiguous();
  if (!plan.groups.bad.empty()) {  // rows of out-of-range ids: zero grad_y and z, so they add nothing
    gy = gy.clone(), zc = zc.clone();
    fill_rows(gy, plan.groups.bad, 0.0);
    fill_rows(zc, plan.groups.bad, 0.0);
  }
  if (mask[0]) {
    if (base_weight && !fold_base) {
      g.dx = at::mm(grad_y.scalar_type() == ct ? gy : rows_layout(grad_y), *base_weight).to(ct);
      g.dx_written = true;
    } else {
      g.dx = at::empty({d.rows, d.d_in}, opts);
    }
  }
  if (computed) {
    const LoraOperands o = lora_operands(x, A, B, weights, d);
    if (plan.path == LoraBackwardPath::kRows)
      rows_backward(g, o, gy, zc, plan, d, scale);
    else if (runs)
      runs_backward(g, o, gy, zc, plan, d, scale, fold_base ? base_weight : nullptr);
    else
      project_then_mix_backward(g, o, gy, zc, plan, d, scale);
  }
  if (g.dx.defined()) fill_rows(g.dx, plan.groups.bad, std::numeric_limits<double>::quiet_NaN());
  return {grad_or_empty(g.dx, x), grad_or_empty(g.dA, A), grad_or_empty(g.dB, B), grad_or_empty(g.dw, weights)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> routed_lora_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B, const at::Tensor& weights,
    const at::Tensor& group_ids, int64_t rows_per_id, double scale, const at::Tensor& z, std::array<bool, 4> mask) {
  const LoraDims d = check_routed_lora(x, A, B, weights, group_ids, rows_per_id);
  check_rows_output(grad_y, "grad_y", x, d);
  return lora_backward(grad_y, x, A, B, weights, group_ids, d, scale, z, nullptr, mask);
}

// mask: x, weight, bias, A, B, weights. d_weight = grad_y^T x and d_bias = sum_n grad_y in x's dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mhr_linear_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, bool has_bias, const at::Tensor& A,
    const at::Tensor& B, const at::Tensor& weights, const at::Tensor& group_ids, int64_t rows_per_id, double scale,
    const at::Tensor& z, std::array<bool, 6> mask) {
  const LoraDims d = check_routed_lora(x, A, B, weights, group_ids, rows_per_id);
  check_mhr_linear_base(x, weight, std::nullopt, d);
  check_rows_output(grad_y, "grad_y", x, d);
  // One layout for grad_y (autograd passes `y.sum()`'s gradient expanded, AOT dispatch a
  // contiguous one): the GEMMs below then sum in the same order, bit for bit.
  const at::Tensor gy = rows_layout(grad_y);
  at::Tensor dx, dA, dB, dw;
  const std::array<bool, 4> lora_mask{mask[0], mask[3], mask[4], mask[5]};
  if (mask[0] || mask[3] || mask[4] || mask[5])
    std::tie(dx, dA, dB, dw) = lora_backward(gy, x, A, B, weights, group_ids, d, scale, z, &weight, lora_mask);
  const at::Tensor d_weight = mask[1] ? at::mm(gy.t(), x) : at::Tensor();
  const at::Tensor d_bias = mask[2] && has_bias ? gy.sum(0) : at::Tensor();
  // A gradient not asked for comes back empty (a tensor of its own: outputs must not alias).
  const auto or_empty = [](const at::Tensor& t, const at::Tensor& like) {
    return t.defined() ? t : at::empty({0}, like.options());
  };
  return {or_empty(dx, x), or_empty(d_weight, x), or_empty(d_bias, x),
          or_empty(dA, A), or_empty(dB, B),       or_empty(dw, weights)};
}

}  // namespace
}  // namespace mhr_ops

TORCH_LIBRARY_IMPL(mhr_ops, CPU, m) {
  m.impl("routed_lora_backward", &mhr_ops::routed_lora_backward_cpu);
  m.impl("mhr_linear_backward", &mhr_ops::mhr_linear_backward_cpu);
}
