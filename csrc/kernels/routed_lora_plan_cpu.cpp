#include "routed_lora_plan_cpu.h"

#include <algorithm>

namespace mhr_ops {
namespace {

// Cost model for the strategy choice, in FLOPs at ~10 GFLOP/s, measured on the 2-core dev VM.
// Project-then-mix pays (S - 1) extra shrink and expand FLOPs per row. The runs paths pay per
// run of rows: with the fused kernels ~2 us plus re-laying out the group's [d, r] matrices
// (~1 ns per element, 2 (d_in + d_out) r elements), with BLAS ~50 us (its GEMM calls).
constexpr double kRunOverheadFlopsBlas = 5e5;
constexpr double kRunOverheadFlopsFused = 2e4;
constexpr double kRelayoutFlopsPerElement = 20;

bool use_runs(const std::vector<LoraRun>& runs, const LoraDims& d, bool fused) {
  const double extra_flops = 2.0 * d.rows * (d.d_in + d.d_out) * d.rank * (d.skills - 1);
  const double per_run =
      fused ? kRunOverheadFlopsFused + kRelayoutFlopsPerElement * (d.d_in + d.d_out) * d.rank : kRunOverheadFlopsBlas;
  return !runs.empty() && per_run * static_cast<double>(runs.size()) < extra_flops;
}

// Whether BLAS over runs of rows beats the row-tile kernels: long runs (a training batch, one
// task per example), where each run is two thin GEMMs.
bool use_blas_runs(const std::vector<LoraRun>& runs, const LoraDims& d) {
  return !runs.empty() && d.rows >= 64 * static_cast<int64_t>(runs.size());
}

// The row-tile kernels' choice, in units of one row's LoRA arithmetic 2 (d_in + d_out) r:
// rows-in-registers pays S per row; the gathered path S per used group (batched GEMMs) + 1 per
// row + ~30 us of set-up.
LoraForwardPath tile_path(int64_t used_groups, const LoraDims& d) {
  const double unit = 2.0 * static_cast<double>(d.d_in + d.d_out) * static_cast<double>(d.rank);
  const double rows_cost = static_cast<double>(d.rows * d.skills);
  const double gathered_cost =
      static_cast<double>(used_groups) * static_cast<double>(d.skills) + static_cast<double>(d.rows) + 3e5 / unit;
  return rows_cost <= gathered_cost ? LoraForwardPath::kTileRows : LoraForwardPath::kTileGathered;
}

// The distinct groups of `runs` in order of first appearance; sets every run's slot.
std::vector<int64_t> assign_slots(std::vector<LoraRun>& runs, int64_t groups) {
  std::vector<int64_t> slot_of(groups, -1), slot_groups;
  for (LoraRun& run : runs) {
    int64_t& slot = slot_of[run.group];
    if (slot < 0) {
      slot = static_cast<int64_t>(slot_groups.size());
      slot_groups.push_back(run.group);
    }
    run.slot = slot;
  }
  return slot_groups;
}

// Runs longer than an even share of the rows are cut (at multiples of 8 rows, the CPU kernels'
// tile), so that one long run still uses every core.
std::vector<LoraRun> split_runs(const std::vector<LoraRun>& runs, int64_t rows, int64_t threads) {
  const int64_t share = (rows + 2 * threads - 1) / (2 * threads);
  const int64_t max_rows = std::max<int64_t>(64, (share + 7) / 8 * 8);
  std::vector<LoraRun> pieces;
  for (const LoraRun& run : runs)
    for (int64_t start = 0; start < run.rows; start += max_rows)
      pieces.push_back({run.start + start, std::min(max_rows, run.rows - start), run.group, run.slot});
  return pieces;
}

void extend(std::vector<LoraRun>& runs, int64_t start, int64_t rows, int64_t group) {
  if (!runs.empty() && runs.back().group == group && runs.back().start + runs.back().rows == start)
    runs.back().rows += rows;
  else
    runs.push_back({start, rows, group, 0});
}

}  // namespace

LoraRowGroups routed_lora_row_groups(const LoraDims& d, const LoraGroupIds& ids) {
  LoraRowGroups out;
  out.row_group.resize(d.rows);
  const int64_t n_ids = d.rows_per_id > 0 ? d.rows / d.rows_per_id : 0;
  for (int64_t i = 0; i < n_ids; ++i) {
    int64_t g = load_index(ids.data, ids.type, ids.stride, i);
    const int64_t start = i * d.rows_per_id;
    if (g < 0 || g >= d.groups) {
      extend(out.bad, start, d.rows_per_id, -1);
      g = d.groups > 0 ? 0 : -1;
    }
    std::fill(out.row_group.begin() + start, out.row_group.begin() + start + d.rows_per_id, g);
    if (g >= 0) extend(out.runs, start, d.rows_per_id, g);
  }
  return out;
}

std::vector<LoraRun> gathered_pieces(const LoraRowGroups& groups, const LoraDims& d,
                                     const std::vector<int64_t>& slot_groups, int64_t threads,
                                     std::vector<int64_t>& order) {
  order.resize(d.rows);
  std::vector<int64_t> start(d.groups + 1);
  sort_rows_by_group(groups.row_group.data(), d.rows, d.groups, order.data(), start.data());
  threads = std::max<int64_t>(1, threads);
  const int64_t share =
      std::max<int64_t>(kLoraRowTile, (d.rows + 4 * threads - 1) / (4 * threads) / kLoraRowTile * kLoraRowTile);
  std::vector<LoraRun> pieces;
  for (size_t slot = 0; slot < slot_groups.size(); ++slot) {
    const int64_t g = slot_groups[slot];
    for (int64_t off = start[g]; off < start[g + 1]; off += share)
      pieces.push_back({off, std::min(share, start[g + 1] - off), g, static_cast<int64_t>(slot)});
  }
  return pieces;
}

LoraForwardPlan plan_routed_lora_forward(const LoraDims& d, const LoraGroupIds& ids, DType x_type, DType y_type,
                                         CpuIsa max_isa, int64_t threads) {
  LoraForwardPlan plan;
  plan.groups = routed_lora_row_groups(d, ids);
  if (plan.groups.runs.empty()) return plan;  // no row, or no group
  std::vector<LoraRun> runs = plan.groups.runs;
  threads = std::max<int64_t>(1, threads);
  const CpuIsa isa = x_type == DType::kFloat32 && y_type == DType::kFloat32
                         ? routed_lora_group_forward_isa(d.rank, d.d_in, d.d_out, max_isa)
                         : CpuIsa::kNone;
  const bool direct = y_type == accumulation_dtype(x_type);
  plan.slot_groups = assign_slots(runs, d.groups);
  if (isa != CpuIsa::kNone && use_runs(runs, d, /*fused=*/true)) {
    plan.path = LoraForwardPath::kFusedRuns;
    plan.isa = isa;
  } else if (direct && !use_blas_runs(runs, d)) {
    plan.path = tile_path(static_cast<int64_t>(plan.slot_groups.size()), d);
  } else {
    plan.path = use_runs(runs, d, /*fused=*/false) ? LoraForwardPath::kBlasRuns : LoraForwardPath::kProjectThenMix;
  }
  switch (plan.path) {
    case LoraForwardPath::kFusedRuns:
    case LoraForwardPath::kBlasRuns:
      plan.pieces = split_runs(runs, d.rows, threads);
      break;
    case LoraForwardPath::kTileGathered:
      plan.pieces = gathered_pieces(plan.groups, d, plan.slot_groups, threads, plan.order);
      break;
    default:  // the row-tile and project-then-mix paths mix per row: no slots
      plan.slot_groups.clear();
  }
  return plan;
}

LoraBackwardPlan plan_routed_lora_backward(const LoraDims& d, const LoraGroupIds& ids, DType x_type, CpuIsa max_isa,
                                           int64_t threads) {
  const DType ct = accumulation_dtype(x_type);
  // The fused kernel: fp32, unit column strides (the binding lays x and grad_y out so).
  const CpuIsa isa =
      ct == DType::kFloat32 ? routed_lora_group_grads_isa(d.rank, d.d_in, d.d_out, 1, 1, max_isa) : CpuIsa::kNone;
  LoraBackwardPlan plan;
  plan.groups = routed_lora_row_groups(d, ids);
  if (plan.groups.runs.empty()) return plan;  // no row, or no group
  if (use_runs(plan.groups.runs, d, isa != CpuIsa::kNone)) {
    plan.path = isa != CpuIsa::kNone ? LoraBackwardPath::kFusedRuns : LoraBackwardPath::kBlasRuns;
    plan.isa = isa;
    std::vector<LoraRun> runs = plan.groups.runs;
    plan.slot_groups = assign_slots(runs, d.groups);
    plan.pieces = split_runs(runs, d.rows, std::max<int64_t>(1, threads));
  } else if (x_type == ct && d.rows * d.skills <= 256) {
    // Few rows in short runs (a training step on a few short sequences, one task each): the row
    // kernel projects each row onto every skill (~4 S times LoRA's arithmetic per row), reading
    // each skill matrix and writing its gradient once per call, with no ATen call per skill
    // matrix; more rows take project-then-mix's batched GEMMs.
    plan.path = LoraBackwardPath::kRows;
  } else {
    plan.path = LoraBackwardPath::kProjectThenMix;
  }
  return plan;
}

bool routed_lora_runs_forward_cpu(const LoraGroupForwardParams& base, const LoraRun* pieces, int64_t begin, int64_t end,
                                  CpuIsa isa) {
  const float* a_mix = static_cast<const float*>(base.a_mix);
  const float* bt_mix = static_cast<const float*>(base.bt_mix);
  bool ok = true;
  for (int64_t i = begin; i < end; ++i) {
    LoraGroupForwardParams p = base;
    p.a_mix = a_mix + pieces[i].slot * base.d_in * base.rank;
    p.bt_mix = bt_mix + pieces[i].slot * base.d_out * base.rank;
    p.row_begin = pieces[i].start;
    p.row_end = pieces[i].start + pieces[i].rows;
    ok = routed_lora_group_forward_cpu(p, isa) && ok;
  }
  return ok;
}

bool routed_lora_runs_grads_cpu(const LoraGroupGradParams& base, const LoraRun* pieces, int64_t begin, int64_t end,
                                CpuIsa isa) {
  const float* a_mix = static_cast<const float*>(base.a_mix);
  const float* bt_mix = static_cast<const float*>(base.bt_mix);
  float* da = static_cast<float*>(base.da);
  float* dbt = static_cast<float*>(base.dbt);
  bool ok = true;
  for (int64_t i = begin; i < end; ++i) {
    LoraGroupGradParams p = base;
    p.a_mix = a_mix + pieces[i].slot * base.d_in * base.rank;
    p.bt_mix = bt_mix + pieces[i].slot * base.d_out * base.rank;
    p.da = da + i * base.d_in * base.rank;
    p.dbt = dbt + i * base.d_out * base.rank;
    p.row_begin = pieces[i].start;
    p.row_end = pieces[i].start + pieces[i].rows;
    ok = routed_lora_group_grads_cpu(p, isa) && ok;
  }
  return ok;
}

}  // namespace mhr_ops
