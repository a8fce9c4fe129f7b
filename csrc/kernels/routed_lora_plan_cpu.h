// routed_lora on the CPU: which kernels compute one problem and how its rows are cut for the
// threads, decided once per call from the group ids (host-visible on the CPU), the sizes and the
// dtypes. Torch-free; the binding (csrc/torch/cpu/routed_lora_cpu.cpp) maps tensors and runs the plan.
//
// Forward paths:
//  - fused runs: rows come in runs of one group (a training batch: one task per example). Each
//    group's adapter is mixed once and every run goes through the fused kernel (routed_lora.h):
//    one pass over x for z, one over y for the update.
//  - BLAS runs: the same with two thin GEMMs a run (no fused kernel for this rank, ISA or dtype).
//  - row tiles (routed_lora_rows.h): project-then-mix in registers (few rows against the groups
//    they use), or rows sorted by group with each used adapter mixed once ("gathered").
//  - project-then-mix: x @ [A_k,1 .. A_k,S] for all skills at once (S times the shrink arithmetic,
//    batched over heads), mixed per row afterwards (routed_lora_mix_cpu.h): no per-group loop.
// The backward has the rows kernel (few rows), fused runs, BLAS runs and project-then-mix.
//
// Group ids outside [0, G) (validation skipped: SPEC section 7) are never dereferenced: their
// rows are computed as group 0's and listed in `bad`, where the binding writes NaN (forward) or
// zeroes the rows' grad_y and z first so that they add nothing to dA, dB, dw (backward).
#pragma once

#include <cstdint>
#include <vector>

#include "common.h"
#include "routed_lora_cpu.h"
#include "routed_lora_rows.h"

namespace mhr_ops {

// The group ids as the op received them: [N / rows_per_id] of int32 or int64, element stride.
struct LoraGroupIds {
  const void* data = nullptr;
  IndexType type = IndexType::kInt64;
  int64_t stride = 1;
};

// Every row's group, checked once.
struct LoraRowGroups {
  std::vector<int64_t> row_group;  // [N]; an id outside [0, G) is replaced by 0 (G = 0: by -1)
  std::vector<LoraRun> runs;       // consecutive rows of one group (over row_group), in row order
  std::vector<LoraRun> bad;        // consecutive rows whose id is outside [0, G)
};
LoraRowGroups routed_lora_row_groups(const LoraDims& d, const LoraGroupIds& ids);

enum class LoraForwardPath {
  kNone,            // nothing to compute (N = 0, or G = 0: every row is bad)
  kFusedRuns,       // runs of one group, the fused kernel (z and y in one pass each)
  kBlasRuns,        // runs of one group, two thin GEMMs each
  kTileRows,        // row-tile kernel, project-then-mix in registers
  kTileGathered,    // row-tile kernel, rows sorted by group, each used adapter mixed once
  kProjectThenMix,  // BLAS over all skills at once, mixed per row (half-precision y)
};

struct LoraForwardPlan {
  LoraForwardPath path = LoraForwardPath::kNone;
  LoraRowGroups groups;
  // The groups whose adapter the path mixes (runs and gathered paths), one slot each, in order
  // of first appearance; pieces[i].slot indexes it.
  std::vector<int64_t> slot_groups;
  // The threads' work items: runs cut to a fair share of the rows (runs paths), or ranges of
  // `order` (gathered). Pieces write disjoint rows.
  std::vector<LoraRun> pieces;
  std::vector<int64_t> order;  // kTileGathered: rows listed by group
  CpuIsa isa = CpuIsa::kNone;  // kFusedRuns: the kernel's variant
  // The paths whose kernel can write y = bias + update (mhr_linear then lets the GEMM add x W^T).
  bool takes_bias() const { return path == LoraForwardPath::kFusedRuns || path == LoraForwardPath::kTileGathered; }
};

// The gathered row-tile kernel's work: the rows listed by group (`order`, resized to N) and each
// group of slot_groups cut into pieces of whole row tiles, a fair share for `threads`; a piece's
// slot is its group's index in slot_groups. routed_lora's gathered path passes the used groups;
// task_lora_linear every task (slot = task).
std::vector<LoraRun> gathered_pieces(const LoraRowGroups& groups, const LoraDims& d,
                                     const std::vector<int64_t>& slot_groups, int64_t threads,
                                     std::vector<int64_t>& order);

// x_type, y_type: the dtypes of x and y. The fused and row-tile kernels write y in the compute
// dtype (fp32; fp64 for fp64 x). max_isa: what ATEN_CPU_CAPABILITY allows; threads: the pool size.
LoraForwardPlan plan_routed_lora_forward(const LoraDims& d, const LoraGroupIds& ids, DType x_type, DType y_type,
                                         CpuIsa max_isa, int64_t threads);

enum class LoraBackwardPath {
  kNone,            // nothing to compute
  kRows,            // the rows backward kernel, in steps over heads and (head, skill) pairs
  kFusedRuns,       // runs of one group, the fused gradient kernel
  kBlasRuns,        // runs of one group, thin GEMMs
  kProjectThenMix,  // BLAS over all skills at once, mixed per row
};

struct LoraBackwardPlan {
  LoraBackwardPath path = LoraBackwardPath::kNone;
  LoraRowGroups groups;
  std::vector<int64_t> slot_groups;  // runs paths: as LoraForwardPlan
  // Runs paths: cut runs, each with its own dA_g / dB_g accumulator (index in pieces).
  std::vector<LoraRun> pieces;
  CpuIsa isa = CpuIsa::kNone;  // kFusedRuns: the kernel's variant
  // The group of every piece, in piece order (the runs paths pass their partials back through
  // these groups' mixing weights).
  std::vector<int64_t> piece_groups() const {
    std::vector<int64_t> out;
    out.reserve(pieces.size());
    for (const LoraRun& piece : pieces) out.push_back(piece.group);
    return out;
  }
};

LoraBackwardPlan plan_routed_lora_backward(const LoraDims& d, const LoraGroupIds& ids, DType x_type, CpuIsa max_isa,
                                           int64_t threads);

// The fused kernels over pieces [begin, end) of a runs plan. `base` holds everything but the
// per-piece fields: its a_mix / bt_mix point at slot 0's mixed adapter ([slots, d_in, r] and
// [slots, d_out, r], contiguous) and, for the gradients, da / dbt at piece 0's accumulators
// ([pieces, d_in, r], [pieces, d_out, r]). False if the kernel refused a piece.
bool routed_lora_runs_forward_cpu(const LoraGroupForwardParams& base, const LoraRun* pieces, int64_t begin, int64_t end,
                                  CpuIsa isa);
bool routed_lora_runs_grads_cpu(const LoraGroupGradParams& base, const LoraRun* pieces, int64_t begin, int64_t end,
                                CpuIsa isa);

}  // namespace mhr_ops
