// CPU registration of routed_lora, routed_lora_add_ and routed_lora_backward. The arithmetic is
// ATen's GEMMs (the best BLAS this build of torch has), in fp32 (fp64 for fp64 x). Two
// strategies, chosen from the group ids, which are host-visible on the CPU:
//  - grouped: rows come in runs of one group (a training batch: one task per example). Each
//    group's adapter is mixed once ([d_in, r] and [r, d_out]) and every run is two thin GEMMs.
//  - project-then-mix: short runs (decode, many tasks). x @ [A_k,1 .. A_k,S] for all skills at
//    once (S times the shrink arithmetic, batched over heads), mixed per row afterwards; no
//    per-group loop and no per-row adapter.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <unordered_map>
#include <vector>

#include "routed_lora_args.h"

namespace mhr_ops {
namespace {

// Runs shorter than this on average use project-then-mix.
constexpr int64_t kMinAverageRun = 16;

struct Run {
  int64_t start, rows, group;
};

// Runs of consecutive rows that share a group; also checks every id (free on the CPU).
std::vector<Run> group_runs(const at::Tensor& group_ids, const LoraDims& d) {
  const at::Tensor ids = group_ids.to(at::kLong).contiguous();
  const int64_t* id = ids.data_ptr<int64_t>();
  std::vector<Run> runs;
  for (int64_t i = 0; i < ids.numel(); ++i) {
    TORCH_CHECK(id[i] >= 0 && id[i] < d.groups, "group_ids: expected ids in [0, ", d.groups, "), got ", id[i]);
    if (!runs.empty() && runs.back().group == id[i])
      runs.back().rows += d.rows_per_id;
    else
      runs.push_back({i * d.rows_per_id, d.rows_per_id, id[i]});
  }
  return runs;
}

bool use_grouped(const std::vector<Run>& runs, const LoraDims& d) {
  return !runs.empty() && d.rows >= kMinAverageRun * static_cast<int64_t>(runs.size());
}

at::ScalarType compute_type(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// The problem's tensors in the compute dtype, skill matrices reshaped for per-head GEMMs.
struct Operands {
  at::Tensor x;   // [N, d_in]
  at::Tensor w;   // [G, h, S]
  at::Tensor A;   // [h, S, dk_in * r]
  at::Tensor B;   // [h, S, r * dk_out]
};

Operands operands(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B, const at::Tensor& weights,
                  const LoraDims& d) {
  const auto ct = compute_type(x);
  return {x.to(ct), weights.to(ct), A.to(ct).contiguous().view({d.heads, d.skills, d.dk_in * d.rank}),
          B.to(ct).contiguous().view({d.heads, d.skills, d.rank * d.dk_out})};
}

// Mixed adapters of one group: A_g [d_in, r], B_g [r, d_out].
std::pair<at::Tensor, at::Tensor> mix_group(const Operands& o, int64_t g, const LoraDims& d) {
  const at::Tensor wg = o.w.select(0, g).unsqueeze(1);  // [h, 1, S]
  at::Tensor a = at::bmm(wg, o.A).view({d.d_in, d.rank});
  at::Tensor b = at::bmm(wg, o.B).view({d.heads, d.rank, d.dk_out}).permute({1, 0, 2}).reshape({d.rank, d.d_out});
  return {a, b};
}

// Per-row weights [h, N, S, 1] for project-then-mix.
at::Tensor row_weights(const Operands& o, const at::Tensor& group_ids, const LoraDims& d) {
  const at::Tensor rows = group_ids.to(at::kLong).repeat_interleave(d.rows_per_id);
  return o.w.index_select(0, rows).permute({1, 0, 2}).unsqueeze(-1);
}

// x [N, d_in] -> [h, N, dk_in]; A [h, S, dk_in*r] -> [h, dk_in, S*r]; B -> [h, S*r, dk_out].
at::Tensor heads_of(const at::Tensor& t, int64_t h) { return t.reshape({t.size(0), h, -1}).transpose(0, 1); }
at::Tensor a_cat(const Operands& o, const LoraDims& d) {
  return o.A.view({d.heads, d.skills, d.dk_in, d.rank}).permute({0, 2, 1, 3}).reshape({d.heads, d.dk_in, -1});
}
at::Tensor b_cat(const Operands& o, const LoraDims& d) { return o.B.view({d.heads, d.skills * d.rank, d.dk_out}); }

// [h, N, S, r] * per-row weights, summed over heads and skills -> [N, r].
at::Tensor mix_rows(const at::Tensor& proj, const at::Tensor& rows_w, const LoraDims& d) {
  return (proj.view({d.heads, d.rows, d.skills, d.rank}) * rows_w).sum(at::IntArrayRef{0, 2});
}
// w[n,k,s] * v[n,:] -> [h, N, S*r]
at::Tensor spread_rows(const at::Tensor& v, const at::Tensor& rows_w, const LoraDims& d) {
  return (rows_w * v.view({1, d.rows, 1, d.rank})).view({d.heads, d.rows, d.skills * d.rank});
}

// y [N, d_out] (x's dtype) = or += scale * routed update.
void forward_into(at::Tensor& y, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                  const at::Tensor& weights, const at::Tensor& group_ids, const LoraDims& d, double scale,
                  bool accumulate) {
  if (d.rows == 0) return;
  const auto runs = group_runs(group_ids, d);
  Operands o = operands(x, A, B, weights, d);
  const bool direct = y.scalar_type() == compute_type(x);
  if (use_grouped(runs, d)) {
    std::unordered_map<int64_t, std::pair<at::Tensor, at::Tensor>> mixed;
    for (const Run& run : runs) {
      auto it = mixed.find(run.group);
      if (it == mixed.end()) it = mixed.emplace(run.group, mix_group(o, run.group, d)).first;
      const at::Tensor z = at::mm(o.x.narrow(0, run.start, run.rows), it->second.first);
      at::Tensor ys = y.narrow(0, run.start, run.rows);
      if (direct) {
        ys.addmm_(z, it->second.second, accumulate ? 1.0 : 0.0, scale);
      } else {
        const at::Tensor upd = at::mm(z, it->second.second).mul_(scale);
        accumulate ? ys.add_(upd) : ys.copy_(upd);
      }
    }
    return;
  }
  const at::Tensor rows_w = row_weights(o, group_ids, d);
  const at::Tensor z = mix_rows(at::bmm(heads_of(o.x, d.heads), a_cat(o, d)), rows_w, d);
  const at::Tensor upd = at::bmm(spread_rows(z, rows_w, d), b_cat(o, d)).transpose(0, 1).reshape({d.rows, d.d_out});
  if (accumulate)
    y.add_(upd, scale);
  else
    y.copy_(upd.mul_(scale));
}

at::Tensor routed_lora_cpu(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B, const at::Tensor& weights,
                           const at::Tensor& group_ids, int64_t rows_per_id, double scale) {
  const LoraDims d = check_routed_lora(x, A, B, weights, group_ids, rows_per_id);
  at::Tensor y = at::empty({d.rows, d.d_out}, x.options());
  forward_into(y, x, A, B, weights, group_ids, d, scale, /*accumulate=*/false);
  return y;
}

void routed_lora_add_cpu(at::Tensor& out, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                         const at::Tensor& weights, const at::Tensor& group_ids, int64_t rows_per_id, double scale) {
  const LoraDims d = check_routed_lora(x, A, B, weights, group_ids, rows_per_id);
  check_rows_output(out, "out", x, d);
  forward_into(out, x, A, B, weights, group_ids, d, scale, /*accumulate=*/true);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> routed_lora_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& weights, const at::Tensor& group_ids, int64_t rows_per_id, double scale,
    std::array<bool, 4> mask) {
  const LoraDims d = check_routed_lora(x, A, B, weights, group_ids, rows_per_id);
  check_rows_output(grad_y, "grad_y", x, d);
  const auto ct = compute_type(x);
  const auto opts = x.options().dtype(ct);
  at::Tensor dx = mask[0] ? at::zeros({d.rows, d.d_in}, opts) : at::Tensor();
  at::Tensor dA = mask[1] ? at::zeros({d.heads, d.skills, d.dk_in * d.rank}, opts) : at::Tensor();
  at::Tensor dB = mask[2] ? at::zeros({d.heads, d.skills, d.rank * d.dk_out}, opts) : at::Tensor();
  at::Tensor dw = mask[3] ? at::zeros({d.groups, d.heads, d.skills}, opts) : at::Tensor();
  if (d.rows > 0) {
    const auto runs = group_runs(group_ids, d);
    Operands o = operands(x, A, B, weights, d);
    const at::Tensor gy = grad_y.to(ct);
    if (use_grouped(runs, d)) {
      std::unordered_map<int64_t, std::vector<Run>> by_group;
      for (const Run& run : runs) by_group[run.group].push_back(run);
      for (const auto& [g, group_runs_g] : by_group) {
        const auto [ag, bg] = mix_group(o, g, d);
        at::Tensor dag = at::zeros({d.d_in, d.rank}, opts), dbg = at::zeros({d.rank, d.d_out}, opts);
        for (const Run& run : group_runs_g) {
          const at::Tensor xs = o.x.narrow(0, run.start, run.rows), gys = gy.narrow(0, run.start, run.rows);
          const at::Tensor gz = at::mm(gys, bg.t()).mul_(scale);
          if (mask[0]) dx.narrow(0, run.start, run.rows).copy_(at::mm(gz, ag.t()));
          dag.addmm_(xs.t(), gz);
          dbg.addmm_(at::mm(xs, ag).t(), gys, 1.0, scale);
        }
        // Through the mixing: A_g[k] = sum_s w[g,k,s] A[k,s] (and B likewise).
        const at::Tensor wg = o.w.select(0, g).unsqueeze(-1);  // [h, S, 1]
        const at::Tensor dag_h = dag.view({d.heads, 1, d.dk_in * d.rank});
        const at::Tensor dbg_h = dbg.view({d.rank, d.heads, d.dk_out}).permute({1, 0, 2}).reshape({d.heads, 1, -1});
        if (mask[1]) dA.addcmul_(wg, dag_h);
        if (mask[2]) dB.addcmul_(wg, dbg_h);
        if (mask[3]) dw.select(0, g).add_((o.A * dag_h).sum(-1)).add_((o.B * dbg_h).sum(-1));
      }
    } else {
      const at::Tensor rows_w = row_weights(o, group_ids, d);
      const at::Tensor ac = a_cat(o, d), bc = b_cat(o, d);
      const at::Tensor x_h = heads_of(o.x, d.heads), gy_h = heads_of(gy, d.heads);
      const at::Tensor U = at::bmm(x_h, ac);                   // [h, N, S*r]
      const at::Tensor T = at::bmm(gy_h, bc.transpose(1, 2)).mul_(scale);
      const at::Tensor z = mix_rows(U, rows_w, d), gz = mix_rows(T, rows_w, d);
      const at::Tensor wgz = spread_rows(gz, rows_w, d);
      if (mask[0]) dx.copy_(at::bmm(wgz, ac.transpose(1, 2)).transpose(0, 1).reshape({d.rows, d.d_in}));
      if (mask[1])
        dA.copy_(at::bmm(x_h.transpose(1, 2), wgz)
                     .view({d.heads, d.dk_in, d.skills, d.rank})
                     .permute({0, 2, 1, 3})
                     .reshape(dA.sizes()));
      if (mask[2]) dB.copy_(at::bmm(spread_rows(z, rows_w, d).transpose(1, 2), gy_h).mul_(scale).view(dB.sizes()));
      if (mask[3]) {
        const auto hnsr = std::vector<int64_t>{d.heads, d.rows, d.skills, d.rank};
        const at::Tensor per_row = (U.view(hnsr) * gz.view({1, d.rows, 1, d.rank})).sum(-1) +
                                   (T.view(hnsr) * z.view({1, d.rows, 1, d.rank})).sum(-1);  // [h, N, S]
        dw.index_add_(0, group_ids.to(at::kLong).repeat_interleave(d.rows_per_id), per_row.transpose(0, 1));
      }
    }
  }
  auto cast = [](const at::Tensor& t, const at::Tensor& like) {
    return t.defined() ? t.to(like.scalar_type()).view(like.sizes()) : at::empty({0}, like.options());
  };
  return {cast(dx, x), cast(dA, A), cast(dB, B), cast(dw, weights)};
}

}  // namespace
}  // namespace mhr_ops

TORCH_LIBRARY_IMPL(mhr_ops, CPU, m) {
  m.impl("routed_lora", &mhr_ops::routed_lora_cpu);
  m.impl("routed_lora_add_", &mhr_ops::routed_lora_add_cpu);
  m.impl("routed_lora_backward", &mhr_ops::routed_lora_backward_cpu);
}
