// CPU registration of routed_lora, routed_lora_add_ and routed_lora_backward. The arithmetic is
// ATen's GEMMs (the best BLAS this build of torch has), in fp32 (fp64 for fp64 x). Two
// strategies, chosen from the group ids, which are host-visible on the CPU:
//  - grouped: rows come in runs of one group (a training batch: one task per example). Each
//    group's adapter is mixed once ([d_in, r] and [r, d_out]) and every run is two thin GEMMs.
//  - project-then-mix: short runs (decode, many tasks). x @ [A_k,1 .. A_k,S] for all skills at
//    once (S times the shrink arithmetic, batched over heads), mixed per row afterwards; no
//    per-group loop and no per-row adapter.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <string>
#include <unordered_map>
#include <vector>

#include "../kernels/routed_lora.h"
#include "../kernels/routed_lora_rows.h"
#include "routed_lora_args.h"
#include "tensor_utils.h"

namespace mhr_ops {
namespace {

// Cost model for the strategy choice, in FLOPs at ~10 GFLOP/s, measured on the 2-core dev VM.
// Project-then-mix pays (S - 1) extra shrink and expand FLOPs per row. The grouped strategy
// pays per run of rows: with the fused kernels ~2 us plus re-laying out the group's [d, r]
// matrices (~1 ns per element, 2 (d_in + d_out) r elements), with BLAS ~50 us (its GEMM calls).
constexpr double kRunOverheadFlopsBlas = 5e5;
constexpr double kRunOverheadFlopsFused = 2e4;
constexpr double kRelayoutFlopsPerElement = 20;

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

// The distinct groups of some runs in order of first appearance, and each one's index there.
struct GroupSlots {
  std::unordered_map<int64_t, int64_t> slot;
  std::vector<int64_t> ids;
};
GroupSlots group_slots(const std::vector<Run>& runs) {
  GroupSlots s;
  for (const Run& run : runs)
    if (s.slot.emplace(run.group, static_cast<int64_t>(s.ids.size())).second) s.ids.push_back(run.group);
  return s;
}

// Pieces of the runs for the threads: runs longer than an even share of the rows are cut
// (at multiples of 8 rows, the CPU kernels' tile), so that one long run still uses every core.
std::vector<Run> split_runs(const std::vector<Run>& runs, int64_t rows) {
  const int64_t share = (rows + 2 * at::get_num_threads() - 1) / (2 * at::get_num_threads());
  const int64_t max_rows = std::max<int64_t>(64, (share + 7) / 8 * 8);
  std::vector<Run> pieces;
  for (const Run& run : runs)
    for (int64_t start = 0; start < run.rows; start += max_rows)
      pieces.push_back({run.start + start, std::min(max_rows, run.rows - start), run.group});
  return pieces;
}

// The instruction sets ATen itself is allowed (ATEN_CPU_CAPABILITY caps it, e.g. "avx2" or
// "default"): the fused CPU kernels follow the same switch.
CpuIsa allowed_cpu_isa() {
  static const CpuIsa isa = [] {
    const std::string cap = at::get_cpu_capability();
    return cap == "AVX512" ? CpuIsa::kAvx512 : cap == "AVX2" ? CpuIsa::kAvx2 : CpuIsa::kNone;
  }();
  return isa;
}

bool use_grouped(const std::vector<Run>& runs, const LoraDims& d, bool fused) {
  const double extra_flops = 2.0 * d.rows * (d.d_in + d.d_out) * d.rank * (d.skills - 1);
  const double per_run = fused ? kRunOverheadFlopsFused + kRelayoutFlopsPerElement * (d.d_in + d.d_out) * d.rank
                               : kRunOverheadFlopsBlas;
  return !runs.empty() && per_run * static_cast<double>(runs.size()) < extra_flops;
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
  return {rows_layout(x.to(ct)), weights.to(ct), A.to(ct).contiguous().view({d.heads, d.skills, d.dk_in * d.rank}),
          B.to(ct).contiguous().view({d.heads, d.skills, d.rank * d.dk_out})};
}

// src [a, b, c, e] (contiguous) -> scale * src permuted to [b, a, e, c], contiguous, as a plain
// loop: ATen's permuted copy with a transposed last dimension costs several times more here.
at::Tensor swap_pairs(const at::Tensor& src_in, double scale) {
  const at::Tensor src = src_in.contiguous();
  const int64_t A0 = src.size(0), B0 = src.size(1), C0 = src.size(2), E0 = src.size(3);
  at::Tensor out = at::empty({B0, A0, E0, C0}, src.options());
  AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "swap_pairs", [&] {
    const scalar_t* in = src.const_data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const auto s = static_cast<scalar_t>(scale);
    for (int64_t a = 0; a < A0; ++a)
      for (int64_t b = 0; b < B0; ++b) {
        const scalar_t* blk = in + (a * B0 + b) * C0 * E0;  // [c, e]
        scalar_t* dst = o + (b * A0 + a) * E0 * C0;         // [e, c]
        for (int64_t c = 0; c < C0; ++c)
          for (int64_t e = 0; e < E0; ++e) dst[e * C0 + c] = s * blk[c * E0 + e];
      }
  });
  return out;
}

// Mixed adapters of the groups `ids` (one batched GEMM per matrix, over heads):
// A_g [n, d_in, r] and scale * B_g^T [n, d_out, r], both contiguous.
std::pair<at::Tensor, at::Tensor> mix_groups(const Operands& o, const std::vector<int64_t>& ids, const LoraDims& d,
                                             double scale) {
  const int64_t n = static_cast<int64_t>(ids.size());
  const at::Tensor w = o.w.index_select(0, at::tensor(ids, at::kLong)).permute({1, 0, 2});  // [h, n, S]
  const at::Tensor a = at::bmm(w, o.A)  // [h, n, dk_in * r]
                           .transpose(0, 1)
                           .reshape({n, d.d_in, d.rank});
  const at::Tensor b = at::bmm(w, o.B);  // [h, n, r * dk_out]
  const at::Tensor bt = swap_pairs(b.view({d.heads, n, d.rank, d.dk_out}), scale).view({n, d.d_out, d.rank});
  return {a, bt};
}

// Per-row weights [N, h, S] (contiguous) for project-then-mix.
at::Tensor row_weights(const Operands& o, const at::Tensor& group_ids, const LoraDims& d) {
  const at::Tensor rows = group_ids.to(at::kLong).repeat_interleave(d.rows_per_id);
  return o.w.index_select(0, rows);
}

// x [N, d_in] -> [h, N, dk_in]; A [h, S, dk_in*r] -> [h, dk_in, S*r]; B -> [h, S*r, dk_out].
at::Tensor heads_of(const at::Tensor& t, int64_t h) { return t.reshape({t.size(0), h, -1}).transpose(0, 1); }
at::Tensor a_cat(const Operands& o, const LoraDims& d) {
  return o.A.view({d.heads, d.skills, d.dk_in, d.rank}).permute({0, 2, 1, 3}).reshape({d.heads, d.dk_in, -1});
}
at::Tensor b_cat(const Operands& o, const LoraDims& d) { return o.B.view({d.heads, d.skills * d.rank, d.dk_out}); }

// The per-row mixing of project-then-mix, as plain loops over contiguous buffers (a few FLOPs
// per element: ATen's strided reductions cost more in dispatch than in arithmetic here).
// Calls fn(n, wi, pi) for every row n, head k and skill s, rows split across threads, with
// wi = (n*h + k)*S + s indexing the per-row weights [N, h, S] and pi = ((k*N + n)*S + s)*r the
// start of that (k, n, s) rank vector in a projection laid out [h, N, S, r].
template <typename Fn>
void for_row_head_skill(const LoraDims& d, Fn&& fn) {
  const int64_t H = d.heads, S = d.skills, R = d.rank, N = d.rows;
  at::parallel_for(0, N, 256, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n)
      for (int64_t k = 0; k < H; ++k)
        for (int64_t s = 0; s < S; ++s) fn(n, (n * H + k) * S + s, ((k * N + n) * S + s) * R);
  });
}

// proj [h, N, S*r] -> z[n, :] = sum_{k,s} w[n,k,s] proj[k, n, s, :]
at::Tensor mix_rows(const at::Tensor& proj_in, const at::Tensor& rows_w, const LoraDims& d) {
  const at::Tensor proj = proj_in.contiguous();
  at::Tensor z = at::zeros({d.rows, d.rank}, proj.options());
  AT_DISPATCH_FLOATING_TYPES(proj.scalar_type(), "mix_rows", [&] {
    const scalar_t *P = proj.data_ptr<scalar_t>(), *W = rows_w.data_ptr<scalar_t>();
    scalar_t* Z = z.data_ptr<scalar_t>();
    const int64_t R = d.rank;
    for_row_head_skill(d, [&](int64_t n, int64_t wi, int64_t pi) {
      for (int64_t j = 0; j < R; ++j) Z[n * R + j] += W[wi] * P[pi + j];
    });
  });
  return z;
}
// v [N, r] -> out[k, n, s, :] = w[n,k,s] * v[n, :], as [h, N, S*r]
at::Tensor spread_rows(const at::Tensor& v_in, const at::Tensor& rows_w, const LoraDims& d) {
  const at::Tensor v = v_in.contiguous();
  at::Tensor out = at::empty({d.heads, d.rows, d.skills * d.rank}, v.options());
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "spread_rows", [&] {
    const scalar_t *V = v.data_ptr<scalar_t>(), *W = rows_w.data_ptr<scalar_t>();
    scalar_t* O = out.data_ptr<scalar_t>();
    const int64_t R = d.rank;
    for_row_head_skill(d, [&](int64_t n, int64_t wi, int64_t pi) {
      for (int64_t j = 0; j < R; ++j) O[pi + j] = W[wi] * V[n * R + j];
    });
  });
  return out;
}
// Routing-weight gradient per row: out[n,k,s] = U[k,n,s,:] . gz[n,:] + T[k,n,s,:] . z[n,:]
at::Tensor row_weight_grads(const at::Tensor& U_in, const at::Tensor& gz_in, const at::Tensor& T_in,
                            const at::Tensor& z_in, const LoraDims& d) {
  const at::Tensor U = U_in.contiguous(), gz = gz_in.contiguous(), T = T_in.contiguous(), z = z_in.contiguous();
  at::Tensor out = at::empty({d.rows, d.heads, d.skills}, U.options());
  AT_DISPATCH_FLOATING_TYPES(U.scalar_type(), "row_weight_grads", [&] {
    const scalar_t *Up = U.data_ptr<scalar_t>(), *Tp = T.data_ptr<scalar_t>();
    const scalar_t *G = gz.data_ptr<scalar_t>(), *Z = z.data_ptr<scalar_t>();
    scalar_t* O = out.data_ptr<scalar_t>();
    const int64_t R = d.rank;
    for_row_head_skill(d, [&](int64_t n, int64_t wi, int64_t pi) {
      scalar_t acc = 0;
      for (int64_t j = 0; j < R; ++j) acc += Up[pi + j] * G[n * R + j] + Tp[pi + j] * Z[n * R + j];
      O[wi] = acc;
    });
  });
  return out;
}

// Whether BLAS over runs of rows beats the row-tile kernels: long runs (a training batch, one
// task per example), where each run is two thin GEMMs.
bool use_blas_runs(const std::vector<Run>& runs, const LoraDims& d) {
  return !runs.empty() && d.rows >= 64 * static_cast<int64_t>(runs.size());
}

// Group of every row [N], from the runs (which cover every row, ids already checked).
std::vector<int64_t> row_groups(const std::vector<Run>& runs, const LoraDims& d) {
  std::vector<int64_t> out(d.rows);
  for (const Run& run : runs) std::fill(out.begin() + run.start, out.begin() + run.start + run.rows, run.group);
  return out;
}

// The row-tile kernels (routed_lora_rows.h) for y in the compute dtype: project-then-mix in
// registers (few rows against the groups they use: each tile reads every skill once), or rows
// sorted by group with each used group's adapter mixed once (`gathered`; it also takes `bias`).
void row_tile_forward(at::Tensor& y, at::Tensor& z, const Operands& o, const std::vector<Run>& runs,
                      const GroupSlots& slots, const LoraDims& d, double scale, bool accumulate, bool gathered,
                      const void* bias) {
  const std::vector<int64_t> groups_of = row_groups(runs, d);
  const at::ScalarType ct = o.x.scalar_type();
  const bool avx2 = allowed_cpu_isa() >= CpuIsa::kAvx2;
  if (!gathered) {
    LoraRowsParams p;
    p.x = o.x.const_data_ptr();
    p.x_stride_n = o.x.stride(0);
    p.A = o.A.const_data_ptr();
    p.B = o.B.const_data_ptr();
    const at::Tensor w = o.w.contiguous();
    p.weights = w.const_data_ptr();
    p.row_group = groups_of.data();
    p.y = y.data_ptr();
    p.y_stride_n = y.stride(0);
    p.accumulate = accumulate;
    p.z = z.data_ptr();
    p.d_in = d.d_in, p.d_out = d.d_out, p.heads = d.heads, p.skills = d.skills, p.rank = d.rank;
    p.groups = d.groups;
    p.scale = scale;
    at::parallel_for(0, (d.rows + kLoraRowTile - 1) / kLoraRowTile, 1, [&](int64_t b, int64_t e) {
      const int64_t r0 = b * kLoraRowTile, r1 = std::min(d.rows, e * kLoraRowTile);
      ct == at::kDouble ? routed_lora_rows_forward_cpu<double>(p, r0, r1, avx2)
                        : routed_lora_rows_forward_cpu<float>(p, r0, r1, avx2);
    });
    return;
  }
  // Rows by group; each used group's rows cut into pieces of a fair share for the threads.
  std::vector<int64_t> order(d.rows), start(d.groups + 1);
  sort_rows_by_group(groups_of.data(), d.rows, d.groups, order.data(), start.data());
  const int64_t share = std::max<int64_t>(
      kLoraRowTile, (d.rows + 4 * at::get_num_threads() - 1) / (4 * at::get_num_threads()) / kLoraRowTile * kLoraRowTile);
  std::vector<int64_t> piece_start, piece_rows, piece_slot;
  for (size_t i = 0; i < slots.ids.size(); ++i) {
    const int64_t g = slots.ids[i];
    for (int64_t off = start[g]; off < start[g + 1]; off += share) {
      piece_start.push_back(off);
      piece_rows.push_back(std::min(share, start[g + 1] - off));
      piece_slot.push_back(static_cast<int64_t>(i));
    }
  }
  const auto [a_mix, bt_mix] = mix_groups(o, slots.ids, d, scale);  // [n, d_in, r], scale * B_g^T [n, d_out, r]
  const at::Tensor b_mix = bt_mix.transpose(1, 2).contiguous();    // scale * B_g [n, r, d_out]
  LoraGatheredParams p;
  p.x = o.x.const_data_ptr();
  p.x_stride_n = o.x.stride(0);
  p.y = y.data_ptr();
  p.y_stride_n = y.stride(0);
  p.accumulate = accumulate;
  p.bias = bias;
  p.z = z.data_ptr();
  p.a_mix = a_mix.const_data_ptr();
  p.b_mix = b_mix.const_data_ptr();
  p.rows = order.data();
  p.piece_start = piece_start.data();
  p.piece_rows = piece_rows.data();
  p.piece_slot = piece_slot.data();
  p.d_in = d.d_in, p.d_out = d.d_out, p.rank = d.rank;
  at::parallel_for(0, static_cast<int64_t>(piece_start.size()), 1, [&](int64_t b, int64_t e) {
    ct == at::kDouble ? routed_lora_gathered_forward_cpu<double>(p, b, e, avx2)
                      : routed_lora_gathered_forward_cpu<float>(p, b, e, avx2);
  });
}

// The fused forward kernel's variant for fp32 x and y (else kNone). Operands come in
// rows_layout (unit column strides), so the choice does not depend on the caller's layout.
CpuIsa forward_kernel_isa(at::ScalarType x_type, at::ScalarType y_type, const LoraDims& d) {
  return x_type == at::kFloat && y_type == at::kFloat
             ? routed_lora_group_forward_isa(d.rank, d.d_in, d.d_out, allowed_cpu_isa())
             : CpuIsa::kNone;
}

// How forward_into computes one problem, decided once from the ids, sizes and dtypes.
enum class ForwardPath {
  kFusedRuns,       // long runs of one group, the fused AVX-512 kernel (z and y in one pass each)
  kTileRows,        // row-tile kernel, project-then-mix in registers (few rows against their groups)
  kTileGathered,    // row-tile kernel, rows sorted by group, each used adapter mixed once
  kBlasRuns,        // runs of one group, two thin GEMMs each
  kProjectThenMix,  // BLAS over all skills at once, mixed per row (half-precision y)
};
struct ForwardPlan {
  ForwardPath path = ForwardPath::kProjectThenMix;
  std::vector<Run> runs;  // runs of consecutive rows of one group (ids checked)
  GroupSlots slots;       // the groups the runs use (row-tile paths only)
  CpuIsa isa = CpuIsa::kNone;
  // The paths whose kernel can write y = bias + update (mhr_linear then lets the GEMM add x W^T).
  bool takes_bias() const { return path == ForwardPath::kFusedRuns || path == ForwardPath::kTileGathered; }
};

// The row-tile kernels' choice, in units of one row's LoRA arithmetic 2 (d_in + d_out) r:
// rows-in-registers pays S per row; the gathered path S per used group (batched GEMMs) + 1 per
// row + ~30 us of set-up.
ForwardPath tile_path(const GroupSlots& slots, const LoraDims& d) {
  const double unit = 2.0 * static_cast<double>(d.d_in + d.d_out) * static_cast<double>(d.rank);
  const double used = static_cast<double>(slots.ids.size());
  const double rows_cost = static_cast<double>(d.rows * d.skills);
  const double gathered_cost = used * static_cast<double>(d.skills) + static_cast<double>(d.rows) + 3e5 / unit;
  return rows_cost <= gathered_cost ? ForwardPath::kTileRows : ForwardPath::kTileGathered;
}

// y_type: y's dtype; the row-tile kernels and the fused kernel write y in the compute dtype.
ForwardPlan plan_forward(at::ScalarType x_type, at::ScalarType y_type, const at::Tensor& group_ids,
                         const LoraDims& d) {
  ForwardPlan plan;
  if (d.rows == 0) return plan;
  plan.runs = group_runs(group_ids, d);
  plan.isa = forward_kernel_isa(x_type, y_type, d);
  const bool direct = y_type == (x_type == at::kDouble ? at::kDouble : at::kFloat);
  if (plan.isa != CpuIsa::kNone && use_grouped(plan.runs, d, /*fused=*/true))
    plan.path = ForwardPath::kFusedRuns;
  else if (direct && !use_blas_runs(plan.runs, d)) {
    plan.slots = group_slots(plan.runs);
    plan.path = tile_path(plan.slots, d);
  }
  else
    plan.path = use_grouped(plan.runs, d, /*fused=*/false) ? ForwardPath::kBlasRuns : ForwardPath::kProjectThenMix;
  return plan;
}

// y [N, d_out] (x's dtype) = or += scale * routed update, as `plan` says. Returns z = x @ A_g
// [N, r] (compute dtype). `bias` [d_out] (compute dtype, contiguous) is only taken where
// plan.takes_bias(), without accumulate: those kernels then write y = bias + update.
at::Tensor forward_into(at::Tensor& y, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                        const at::Tensor& weights, const at::Tensor& group_ids, const LoraDims& d, double scale,
                        bool accumulate, const ForwardPlan& plan, const void* bias = nullptr) {
  at::Tensor z = at::empty({d.rows, d.rank}, x.options().dtype(compute_type(x)));
  if (d.rows == 0) return z;
  const auto& runs = plan.runs;
  Operands o = operands(x, A, B, weights, d);
  const bool direct = y.scalar_type() == compute_type(x);
  TORCH_INTERNAL_ASSERT(bias == nullptr || (plan.takes_bias() && !accumulate));
  if (plan.path == ForwardPath::kTileRows || plan.path == ForwardPath::kTileGathered) {
    row_tile_forward(y, z, o, runs, plan.slots, d, scale, accumulate, plan.path == ForwardPath::kTileGathered, bias);
    return z;
  }
  const CpuIsa isa = plan.path == ForwardPath::kFusedRuns ? plan.isa : CpuIsa::kNone;
  const bool grouped = plan.path == ForwardPath::kFusedRuns || plan.path == ForwardPath::kBlasRuns;
  if (grouped) {
    // Mix each group's adapter once (small), then the runs in parallel: they write disjoint rows.
    const GroupSlots slots = group_slots(runs);
    const auto& slot = slots.slot;
    const auto [a_mix, bt_mix] = mix_groups(o, slots.ids, d, scale);
    const std::vector<Run> pieces = split_runs(runs, d.rows);
    if (isa != CpuIsa::kNone) {  // raw pointers only in the loop: per-piece ATen views cost ~2 us each
      LoraGroupForwardParams base;
      base.x = o.x.data_ptr();
      base.x_stride_n = o.x.stride(0);
      base.y = y.data_ptr();
      base.y_stride_n = y.stride(0);
      base.z = z.data_ptr();
      base.d_in = d.d_in;
      base.d_out = d.d_out;
      base.rank = d.rank;
      base.accumulate = accumulate;
      base.bias = static_cast<const float*>(bias);
      const float* a_base = a_mix.const_data_ptr<float>();
      const float* bt_base = bt_mix.const_data_ptr<float>();
      std::atomic<bool> refused{false};
      at::parallel_for(0, static_cast<int64_t>(pieces.size()), 1, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const int64_t g = slot.at(pieces[i].group);
          LoraGroupForwardParams p = base;
          p.a_mix = a_base + g * d.d_in * d.rank;
          p.bt_mix = bt_base + g * d.d_out * d.rank;
          p.row_begin = pieces[i].start;
          p.row_end = pieces[i].start + pieces[i].rows;
          if (!routed_lora_group_forward_cpu(p, isa)) refused = true;
        }
      });
      TORCH_CHECK(!refused, "routed_lora: CPU kernel refused its problem");
      return z;
    }
    const at::ThreadLocalState tls;  // the caller's dispatch state (autograd excluded) for the workers
    at::parallel_for(0, static_cast<int64_t>(pieces.size()), 1, [&](int64_t begin, int64_t end) {
      const at::ThreadLocalStateGuard tls_guard(tls);
      for (int64_t i = begin; i < end; ++i) {
        const Run& piece = pieces[i];
        const int64_t g = slot.at(piece.group);
        at::Tensor zs = z.narrow(0, piece.start, piece.rows);
        at::mm_out(zs, o.x.narrow(0, piece.start, piece.rows), a_mix.select(0, g));
        const at::Tensor bg = bt_mix.select(0, g).t();  // scale * B_g [r, d_out]
        at::Tensor ys = y.narrow(0, piece.start, piece.rows);
        if (direct) {
          ys.addmm_(zs, bg, accumulate ? 1.0 : 0.0);
        } else {
          const at::Tensor upd = at::mm(zs, bg);
          accumulate ? ys.add_(upd) : ys.copy_(upd);
        }
      }
    });
    return z;
  }
  const at::Tensor rows_w = row_weights(o, group_ids, d);
  z.copy_(mix_rows(at::bmm(heads_of(o.x, d.heads), a_cat(o, d)), rows_w, d));
  const at::Tensor upd = at::bmm(spread_rows(z, rows_w, d), b_cat(o, d)).transpose(0, 1).reshape({d.rows, d.d_out});
  if (accumulate)
    y.add_(upd, scale);
  else
    y.copy_(upd.mul_(scale));
  return z;
}

std::tuple<at::Tensor, at::Tensor> routed_lora_cpu(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                                                   const at::Tensor& weights, const at::Tensor& group_ids,
                                                   int64_t rows_per_id, double scale) {
  const LoraDims d = check_routed_lora(x, A, B, weights, group_ids, rows_per_id);
  at::Tensor y = at::empty({d.rows, d.d_out}, x.options());
  const ForwardPlan plan = plan_forward(x.scalar_type(), y.scalar_type(), group_ids, d);
  at::Tensor z = forward_into(y, x, A, B, weights, group_ids, d, scale, /*accumulate=*/false, plan);
  return {y, z};
}

at::Tensor routed_lora_add_cpu(at::Tensor& out, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                               const at::Tensor& weights, const at::Tensor& group_ids, int64_t rows_per_id,
                               double scale) {
  const LoraDims d = check_routed_lora(x, A, B, weights, group_ids, rows_per_id);
  check_add_output(out, x, d);
  const at::Tensor y = rows_layout(out);
  const ForwardPlan plan = plan_forward(x.scalar_type(), out.scalar_type(), group_ids, d);
  if (y.is_same(out)) return forward_into(out, x, A, B, weights, group_ids, d, scale, /*accumulate=*/true, plan);
  at::Tensor tmp = y;  // a column-strided out: the same arithmetic as a row-major one, then copied back
  at::Tensor z = forward_into(tmp, x, A, B, weights, group_ids, d, scale, /*accumulate=*/true, plan);
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
  check_mhr_linear_base(x, weight);
  const bool has_bias = bias.has_value() && bias->defined();
  const LoraDims d = check_routed_lora(x, A, B, weights, group_ids, rows_per_id);
  TORCH_CHECK(weight.size(0) == d.d_out, "weight: expected ", d.d_out, " rows (B's d_out), got ", weight.size(0));
  at::Tensor y = at::empty({d.rows, d.d_out}, x.options());
  const ForwardPlan plan = plan_forward(x.scalar_type(), y.scalar_type(), group_ids, d);
  const auto ct = compute_type(x);
  if (plan.takes_bias() && x.scalar_type() == ct && (!has_bias || bias->scalar_type() == ct)) {
    TORCH_CHECK(!has_bias || (bias->dim() == 1 && bias->size(0) == d.d_out), "bias: expected shape [", d.d_out,
                "], got ", bias->sizes());
    const at::Tensor b = has_bias ? bias->contiguous() : at::Tensor();
    at::Tensor z = forward_into(y, x, A, B, weights, group_ids, d, scale, /*accumulate=*/false, plan,
                                has_bias ? b.const_data_ptr() : nullptr);
    y.addmm_(x, weight.t());
    return {y, z};
  }
  y = at::linear(x, weight, bias);
  at::Tensor z = forward_into(y, x, A, B, weights, group_ids, d, scale, /*accumulate=*/true, plan);
  return {y, z};
}

// Few rows in short runs (a training step on a few short sequences, one task each): the row
// backward kernel re-projects each row onto every skill (~4 S times LoRA's arithmetic per row)
// but makes no ATen calls per skill matrix; more rows take project-then-mix's batched GEMMs.
bool use_rows_backward(const LoraDims& d, at::ScalarType ct, at::ScalarType x_type) {
  return x_type == ct && d.rows * d.skills <= 256;
}

// dx (+)= and dA, dB, dw = the gradients through the row kernel. Rows are cut into one fixed
// range per thread, each with its own accumulators, summed in order afterwards: the result
// depends on the thread count only, as the contract allows.
void rows_backward(at::Tensor& dx, at::Tensor& dA, at::Tensor& dB, at::Tensor& dw, const Operands& o,
                   const at::Tensor& gy, const at::Tensor& z, const std::vector<Run>& runs, const LoraDims& d,
                   double scale, bool dx_accumulate) {
  const std::vector<int64_t> groups_of = row_groups(runs, d);
  const at::Tensor w = o.w.contiguous(), zc = z.contiguous();
  const at::Tensor gz = at::empty({d.rows, d.rank}, zc.options());
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), d.rows));
  const auto part_buffer = [&](const at::Tensor& t) {
    return t.defined() ? at::zeros({parts, t.numel()}, t.options()) : at::Tensor();
  };
  const at::Tensor dA_parts = part_buffer(dA), dB_parts = part_buffer(dB), dw_parts = part_buffer(dw);
  LoraRowsGradParams p;
  p.x = o.x.const_data_ptr();
  p.x_stride_n = o.x.stride(0);
  p.grad_y = gy.const_data_ptr();
  p.gy_stride_n = gy.stride(0);
  p.z = zc.const_data_ptr();
  p.A = o.A.const_data_ptr();
  p.B = o.B.const_data_ptr();
  p.weights = w.const_data_ptr();
  p.row_group = groups_of.data();
  p.gz = gz.data_ptr();
  if (dx.defined()) {
    p.dx = dx.data_ptr();
    p.dx_stride_n = dx.stride(0);
    p.dx_accumulate = dx_accumulate;
  }
  p.d_in = d.d_in, p.d_out = d.d_out, p.heads = d.heads, p.skills = d.skills, p.rank = d.rank;
  p.scale = scale;
  const bool avx2 = allowed_cpu_isa() >= CpuIsa::kAvx2;
  AT_DISPATCH_FLOATING_TYPES(o.x.scalar_type(), "routed_lora_rows_backward", [&] {
    const auto part = [](const at::Tensor& t, int64_t i) {
      return t.defined() ? t.data_ptr<scalar_t>() + i * t.size(1) : nullptr;
    };
    at::parallel_for(0, parts, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i)
        routed_lora_rows_backward_cpu<scalar_t>(p, i * d.rows / parts, (i + 1) * d.rows / parts, part(dA_parts, i),
                                                part(dB_parts, i), part(dw_parts, i), avx2);
    });
  });
  const auto reduce = [&](at::Tensor& out, const at::Tensor& parts_t) {
    if (!out.defined()) return;
    at::Tensor flat = out.view({-1});
    flat.copy_(parts_t[0]);
    for (int64_t i = 1; i < parts; ++i) flat.add_(parts_t[i]);
  };
  reduce(dA, dA_parts);
  reduce(dB, dB_parts);
  reduce(dw, dw_parts);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> routed_lora_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& weights, const at::Tensor& group_ids, int64_t rows_per_id, double scale, const at::Tensor& z,
    const std::optional<at::Tensor>& base_weight, std::array<bool, 4> mask) {
  const LoraDims d = check_routed_lora(x, A, B, weights, group_ids, rows_per_id);
  check_rows_output(grad_y, "grad_y", x, d);
  const auto ct = compute_type(x);
  check_bottleneck(z, x, d);
  const auto opts = x.options().dtype(ct);
  // dx: in the grouped strategy the adapter writes its part first and the base layer's
  // grad_y @ base_weight accumulates into it inside the GEMM (beta = 1), which saves a
  // read-modify-write pass over dx. The other cases start from the base part (or nothing).
  const bool has_base = base_weight.has_value() && base_weight->defined();
  if (has_base)
    TORCH_CHECK(base_weight->dim() == 2 && base_weight->size(0) == d.d_out && base_weight->size(1) == d.d_in,
                "base_weight: expected shape [", d.d_out, ", ", d.d_in, "], got ", base_weight->sizes());
  // dA and dB are written whole by either strategy; only an empty x leaves them at zero.
  const auto grad_buffer = [&](bool needed, at::IntArrayRef sizes) {
    return !needed ? at::Tensor() : d.rows > 0 ? at::empty(sizes, opts) : at::zeros(sizes, opts);
  };
  at::Tensor dA = grad_buffer(mask[1], {d.heads, d.skills, d.dk_in * d.rank});
  at::Tensor dB = grad_buffer(mask[2], {d.heads, d.skills, d.rank * d.dk_out});
  at::Tensor dw = mask[3] ? at::zeros({d.groups, d.heads, d.skills}, opts) : at::Tensor();
  const auto runs = d.rows > 0 ? group_runs(group_ids, d) : std::vector<Run>();
  // The fused kernel (fp32, unit column strides once x and grad_y are in the compute dtype).
  // (Operands and grad_y come in rows_layout: unit column strides.)
  const CpuIsa isa =
      ct == at::kFloat ? routed_lora_group_grads_isa(d.rank, d.d_in, d.d_out, 1, 1, allowed_cpu_isa()) : CpuIsa::kNone;
  const bool grouped = d.rows > 0 && use_grouped(runs, d, isa != CpuIsa::kNone);
  // The base GEMM adds into an fp32/fp64 dx directly; fp16/bf16 x keeps it in x's dtype (as
  // F.linear's backward would) and adds it to the adapter's part afterwards.
  const bool fold_base = mask[0] && has_base && grouped && x.scalar_type() == ct;
  const at::Tensor gy = d.rows > 0 ? rows_layout(grad_y.to(ct)) : grad_y.to(ct);
  at::Tensor dx;
  bool dx_written = false;  // whether dx already holds a part the adapter must add to
  if (mask[0]) {
    if (has_base && !fold_base) {
      dx = at::mm(grad_y.scalar_type() == ct ? gy : rows_layout(grad_y), *base_weight).to(ct);
      dx_written = true;
    } else {
      dx = at::empty({d.rows, d.d_in}, opts);
    }
  }
  if (d.rows > 0) {
    Operands o = operands(x, A, B, weights, d);
    if (!grouped && use_rows_backward(d, ct, x.scalar_type())) {
      rows_backward(dx, dA, dB, dw, o, gy, z, runs, d, scale, dx_written);
    } else if (grouped) {
      // Rows split into pieces of one group (runs, long runs cut so that every thread has
      // work even for a single group), the pieces in parallel: they write disjoint dx rows
      // and each its own slot of the fp32 partials dA_g [d_in, r] and dB_g^T [d_out, r].
      // All slots pass back through the mixing in three batched GEMMs afterwards.
      const std::vector<Run> pieces = split_runs(runs, d.rows);
      const int64_t n_pieces = static_cast<int64_t>(pieces.size());
      const GroupSlots slots = group_slots(pieces);
      const auto& slot = slots.slot;
      const auto [a_mix, bt_mix] = mix_groups(o, slots.ids, d, scale);  // A_g, scale * B_g^T
      const at::Tensor dag_all = at::zeros({n_pieces, d.d_in, d.rank}, opts);
      const at::Tensor dbgt_all = at::zeros({n_pieces, d.d_out, d.rank}, opts);
      TORCH_INTERNAL_ASSERT(isa == CpuIsa::kNone || (o.x.stride(1) == 1 && gy.stride(1) == 1));
      const at::Tensor gz_rows = isa != CpuIsa::kNone ? at::empty({d.rows, d.rank}, opts) : at::Tensor();
      const at::Tensor zc = z.contiguous();
      const double dx_beta = dx_written ? 1.0 : 0.0;
      if (isa != CpuIsa::kNone) {  // raw pointers only in the loop (per-piece ATen views cost ~2 us each)
        LoraGroupGradParams base;
        base.x = o.x.data_ptr();
        base.x_stride_n = o.x.stride(0);
        base.x_stride_c = o.x.stride(1);
        base.grad_y = gy.data_ptr();
        base.gy_stride_n = gy.stride(0);
        base.gy_stride_c = gy.stride(1);
        base.z = zc.data_ptr();
        base.gz = gz_rows.data_ptr();
        base.d_in = d.d_in;
        base.d_out = d.d_out;
        base.rank = d.rank;
        base.scale = scale;
        if (mask[0]) {  // dx rows in the same kernel (a thin BLAS GEMM with K = r is slow)
          base.dx = dx.data_ptr();
          base.dx_stride_n = dx.stride(0);
          base.dx_accumulate = dx_written;
        }
        const float* a_base = a_mix.const_data_ptr<float>();
        const float* bt_base = bt_mix.const_data_ptr<float>();
        float* da_base = dag_all.data_ptr<float>();
        float* dbt_base = dbgt_all.data_ptr<float>();
        std::atomic<bool> refused{false};
        at::parallel_for(0, n_pieces, 1, [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) {
            const int64_t g = slot.at(pieces[i].group);
            LoraGroupGradParams p = base;
            p.a_mix = a_base + g * d.d_in * d.rank;
            p.bt_mix = bt_base + g * d.d_out * d.rank;
            p.da = da_base + i * d.d_in * d.rank;
            p.dbt = dbt_base + i * d.d_out * d.rank;
            p.row_begin = pieces[i].start;
            p.row_end = pieces[i].start + pieces[i].rows;
            if (!routed_lora_group_grads_cpu(p, isa)) refused = true;
          }
        });
        TORCH_CHECK(!refused, "routed_lora backward: CPU kernel refused its problem");
      } else {
        const at::ThreadLocalState tls;  // the caller's dispatch state for the workers' ATen calls
        at::parallel_for(0, n_pieces, 1, [&](int64_t begin, int64_t end) {
          const at::ThreadLocalStateGuard tls_guard(tls);
          for (int64_t i = begin; i < end; ++i) {
            const Run& piece = pieces[i];
            const int64_t g = slot.at(piece.group);
            const at::Tensor ag = a_mix.select(0, g), bg_t = bt_mix.select(0, g);
            at::Tensor dag = dag_all.select(0, i), dbgt = dbgt_all.select(0, i);
            const at::Tensor gys = gy.narrow(0, piece.start, piece.rows);
            const at::Tensor gz = at::mm(gys, bg_t);
            dag.addmm_(o.x.narrow(0, piece.start, piece.rows).t(), gz);
            dbgt.addmm_(gys.t(), zc.narrow(0, piece.start, piece.rows), 1.0, scale);
            if (mask[0]) dx.narrow(0, piece.start, piece.rows).addmm_(gz, ag.t(), dx_beta);
          }
        });
      }
      if (fold_base) dx.addmm_(gy, *base_weight);
      // Through the mixing, A_g[k] = sum_s w[g,k,s] A[k,s] (B likewise), batched over heads:
      //   dA[k] = W_k^T dA_g[k],  dw[g,k,s] = A[k,s] . dA_g[k] + B[k,s] . dB_g[k]
      // with W_k [pieces, S] each piece's group weights and dA_g[k] [pieces, dk_in * r].
      std::vector<int64_t> piece_groups(n_pieces);
      for (int64_t i = 0; i < n_pieces; ++i) piece_groups[i] = pieces[i].group;
      const at::Tensor piece_ids = at::tensor(piece_groups, at::kLong);
      const at::Tensor w_used = o.w.index_select(0, piece_ids).permute({1, 0, 2});  // [h, n, S]
      const at::Tensor dag_h = dag_all.view({n_pieces, d.heads, d.dk_in * d.rank}).transpose(0, 1);  // [h, n, .]
      const at::Tensor dbg_h = swap_pairs(dbgt_all.view({n_pieces, d.heads, d.dk_out, d.rank}), 1.0)
                                   .view({d.heads, n_pieces, d.rank * d.dk_out});  // [h, n, .]
      if (mask[1]) at::bmm_out(dA, w_used.transpose(1, 2), dag_h);
      if (mask[2]) at::bmm_out(dB, w_used.transpose(1, 2), dbg_h);
      if (mask[3]) {
        const at::Tensor dw_used = at::bmm(o.A, dag_h.transpose(1, 2)).baddbmm_(o.B, dbg_h.transpose(1, 2));
        dw.index_add_(0, piece_ids, dw_used.permute({2, 0, 1}));  // [h, S, n] -> [n, h, S]; a group's pieces sum
      }
    } else {
      const at::Tensor rows_w = row_weights(o, group_ids, d);
      const at::Tensor ac = a_cat(o, d), bc = b_cat(o, d);
      const at::Tensor x_h = heads_of(o.x, d.heads), gy_h = heads_of(gy, d.heads);
      const at::Tensor U = at::bmm(x_h, ac);                   // [h, N, S*r]
      const at::Tensor T = at::bmm(gy_h, bc.transpose(1, 2)).mul_(scale);
      const at::Tensor gz = mix_rows(T, rows_w, d);
      const at::Tensor wgz = spread_rows(gz, rows_w, d);
      if (mask[0]) {
        const at::Tensor lora_dx = at::bmm(wgz, ac.transpose(1, 2)).transpose(0, 1).reshape({d.rows, d.d_in});
        dx_written ? dx.add_(lora_dx) : dx.copy_(lora_dx);
      }
      if (mask[1])
        dA.copy_(at::bmm(x_h.transpose(1, 2), wgz)
                     .view({d.heads, d.dk_in, d.skills, d.rank})
                     .permute({0, 2, 1, 3})
                     .reshape(dA.sizes()));
      if (mask[2]) dB.copy_(at::bmm(spread_rows(z, rows_w, d).transpose(1, 2), gy_h).mul_(scale).view(dB.sizes()));
      if (mask[3])
        dw.index_add_(0, group_ids.to(at::kLong).repeat_interleave(d.rows_per_id), row_weight_grads(U, gz, T, z, d));
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
  m.impl("mhr_linear", &mhr_ops::mhr_linear_cpu);
}
