"""The counted traffic model (issue 14), pure Python: H100 SXM ceilings, the ideal bytes and flops
of each op, upper bounds of each SIMT kernel's arithmetic read from its code, the modeled and
roofline times, and the affine extrapolation of counts from two emulated sizes to the full one.

The counts themselves come from the SIMT emulation (csrc/emulation/traffic.h) through
``emulated.py``; everything here is arithmetic on shapes and numbers, tested without the emulated
module (tests/test_traffic_model.py).

- ``roofline_us = max(ideal_bytes / HBM, ideal_flops / TENSOR)``: the time an op could take if it
  moved only the bytes it must (each input read once, each output written once) at HBM bandwidth
  and ran its GEMM flops on the tensor cores.
- ``modeled_us = max(counted_bytes / HBM, tc_flops / TENSOR, simt_flops / SIMT)``: counted_bytes is
  what DRAM moves with a perfect L2 (every distinct 32-byte sector the kernels read once, every one
  they write once back); tc_flops the tensor-core flops the mma wrappers counted; simt_flops the
  bounds below. A model, not a measurement: it ignores latency, occupancy, L2 misses, shared-memory
  bandwidth and launch overhead.
- ``modeled_lsu_us``: the same with the SIMT flops at 1/8 of the FMA rate. Every SIMT inner loop
  here feeds each FMA from two loads (shared memory, or L1 for the mixing's global reads), and an
  SM issues one 32-lane load instruction per clock against four 32-lane FMAs. The issue's formula
  does not see this limit; for the SIMT kernels this is the closer estimate.
"""

from __future__ import annotations

from dataclasses import dataclass

HBM_BYTES_PER_S = 3.35e12  # H100 SXM, HBM3
TENSOR_FLOPS = 989e12  # H100 SXM, dense bf16 / fp16 tensor cores
SIMT_FLOPS = 67e12  # H100 SXM, fp32 FMA (2 flops each) on every CUDA core
SIMT_LSU_FLOPS = SIMT_FLOPS / 8  # two load instructions per FMA, one load issued per SM and clock
SECTOR_BYTES = 32

# Tiles of the SIMT kernels, as in their .cu files (the bounds below read the loops there).
SHRINK_ROWS, SHRINK_CHUNK = 32, 32  # routed_lora_cuda.cu kShrinkRows, kShrinkChunk
EXPAND_ROWS, EXPAND_COLS, EXPAND_RANK_CHUNK = 32, 64, 32  # kExpandRows, kExpandCols, kExpandRankChunk
WGRAD_ROWS, WGRAD_COLS = 32, 32  # kWgradRows, kWgradCols
KERNEL_THREADS = 256  # kThreads of the routed_lora and gated_head_proj kernels
GHP_ROWS, GHP_COLS, GHP_CHUNK = 32, 64, 32  # gated_head_proj_cuda.cu kRows, kCols, kChunk
# gated_head_proj_cuda.cu's tensor-core kernel (fp16 / bf16): kTcRows, kTcOut, kTcK; its mma is m16n8k16.
GHP_TC_ROWS, GHP_TC_OUT, GHP_TC_K = 64, 64, 64
H100_SMS = 132
# Tiles of the tensor-core kernels (routed_lora_tc_cuda.cu): kTileRows, kProjCols, kExpandCols, kChunk.
TC_ROWS, TC_PROJ_COLS, TC_EXPAND_COLS, TC_WGRAD_COLS, TC_CHUNK = 64, 128, 64, 64, 32
TC_MIN_ROWS = 64  # kRoutedLoraTensorCoreMinRows: more rows than this run on tensor cores (fp16 / bf16 data)
# moe_lora_cuda.cu (SIMT, kThreads 256): kMoeRowBlock rows per moe_rows_kernel block, kRankChunk rank
# values per shrink pass, kMoeColBlock columns per moe_wgrad_kernel task (moe_lora.h).
MOE_ROW_BLOCK, MOE_RANK_CHUNK, MOE_COL_BLOCK = 64, 32, 16
# moe_lora_tc_cuda.cu (tensor cores, fp16 / bf16 data past kMoeTensorCoreMinRows rows): kThreads, kChunk
# src columns staged per step, kRankTiles n8 tiles per shrink pass, kTilesPerWarp slot tiles per warp
# and pass, kExpandTiles n8 tiles per expand column step.
MOE_TC_THREADS, MOE_TC_CHUNK, MOE_TC_RANK_TILES, MOE_TC_TILES_PER_WARP, MOE_TC_EXPAND_TILES = 128, 64, 4, 4, 8
MOE_TC_MIN_ROWS = 64  # kMoeTensorCoreMinRows


def roofline_us(ideal_bytes: float, ideal_flops: float) -> float:
    return max(ideal_bytes / HBM_BYTES_PER_S, ideal_flops / TENSOR_FLOPS) * 1e6


def modeled_us(counted_bytes: float, tc_flops: float, simt_flops: float) -> float:
    return max(counted_bytes / HBM_BYTES_PER_S, tc_flops / TENSOR_FLOPS, simt_flops / SIMT_FLOPS) * 1e6


def modeled_lsu_us(counted_bytes: float, tc_flops: float, simt_flops: float) -> float:
    return max(counted_bytes / HBM_BYTES_PER_S, tc_flops / TENSOR_FLOPS, simt_flops / SIMT_LSU_FLOPS) * 1e6


def sectors_per_request(request_sectors: float, requested_bytes: float) -> float:
    """Sectors per warp request normalized to 128-byte requests: 4 when coalesced (2 or 4 bytes a
    lane), 32 when every lane touches its own sector."""
    return request_sectors * 128.0 / requested_bytes if requested_bytes else 0.0


def affine_extrapolate(n1: float, v1: float, n2: float, v2: float, n: float) -> float:
    """The value at ``n`` of the line through ``(n1, v1)`` and ``(n2, v2)``: counts of row-tiled
    kernels are a fixed part (weights read once) plus a part linear in the rows."""
    if n1 == n2:
        raise ValueError(f"n1 and n2: expected two different sizes, got {n1} twice")
    return v1 + (v2 - v1) * (n - n1) / (n2 - n1)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# --- row layouts: contiguous groups of `rows_per_group` rows (x [bs, L, d], group_ids [bs]) ------


def tile_group_pairs(rows: int, rows_per_group: int, tile: int) -> int:
    """Sum over row tiles of the distinct groups among the tile's rows."""
    return sum((min(rows, t0 + tile) - 1) // rows_per_group - t0 // rows_per_group + 1 for t0 in range(0, rows, tile))


def group_runs(begin: int, end: int, rows_per_group: int) -> int:
    """Runs of equal group among rows [begin, end)."""
    return (end - 1) // rows_per_group - begin // rows_per_group + 1 if end > begin else 0


def wgrad_slices(rows: int, dk: int, heads: int, sms: int = H100_SMS) -> int:
    """Rows per slice of the wgrad launch (routed_lora_cuda.cu launch_wgrad)."""
    per_slice_blocks = cdiv(dk, WGRAD_COLS) * heads
    slices = max(1, min(cdiv(rows, WGRAD_ROWS), 4 * sms // max(1, per_slice_blocks)))
    return cdiv(rows, slices)


# --- SIMT arithmetic, bounded from each kernel's loops (an FMA is 2 flops; exp, compares and the
# like count as a few flops each: these kernels are far from compute-bound where those matter) ---


def shrink_simt_flops(rows: int, rank: int, skills: int, heads: int, dk: int, tile_groups: int) -> int:
    """shrink_kernel: for every reduction chunk (heads * ceil(dk/32)) and every group of a row tile,
    the chunk of the mixed adapter (32 x r elements, S FMAs each) is mixed; every row of the group
    then runs 32 FMAs per rank column. Plus the z_scale multiply per output."""
    chunks = heads * cdiv(dk, SHRINK_CHUNK)
    mix = tile_groups * SHRINK_CHUNK * rank * 2 * skills
    multiply = rows * rank * 2 * SHRINK_CHUNK
    return chunks * (mix + multiply) + rows * rank


def expand_simt_flops(rows: int, rank: int, skills: int, cols: int, tile_groups: int) -> int:
    """expand_kernel: per 64-column tile and group of a row tile, r x 64 mixed elements (S FMAs
    each); every (row, column) runs 32 FMAs per 32-rank chunk (32 even when r < 32); then scale and
    accumulate (3 flops) per output."""
    col_tiles = cdiv(cols, EXPAND_COLS)
    mix = tile_groups * rank * EXPAND_COLS * 2 * skills
    multiply = cdiv(rank, EXPAND_RANK_CHUNK) * rows * EXPAND_COLS * 2 * EXPAND_RANK_CHUNK
    return col_tiles * (mix + multiply + rows * EXPAND_COLS * 3)


def wgrad_simt_flops(rows: int, rank: int, skills: int, heads: int, dk: int, rows_per_group: int, sms=H100_SMS) -> int:
    """wgrad_kernel: per (32-column tile, head) block, every row of its slice adds one FMA per
    (column, rank) element; at each group change and at the end of the slice a flush runs, per
    skill, 4 flops per element (scale, dM FMA, dw dot FMA) and a warp sum (5 adds a lane)."""
    col_tiles = cdiv(dk, WGRAD_COLS)
    per_slice = wgrad_slices(rows, dk, heads, sms)
    flushes = sum(group_runs(b, min(rows, b + per_slice), rows_per_group) for b in range(0, rows, per_slice))
    multiply = rows * WGRAD_COLS * rank * 2
    flush = flushes * skills * (WGRAD_COLS * rank * 4 + KERNEL_THREADS * 5)
    return col_tiles * heads * (multiply + flush)


def uses_tensor_cores(dtype_bits: int, rows: int) -> bool:
    """routed_lora_uses_tensor_cores: fp16 / bf16 activations and more than TC_MIN_ROWS rows."""
    return dtype_bits == 16 and rows > TC_MIN_ROWS


# The tensor-core kernels' SIMT work is staging and epilogues (their products are tc_flops): each
# staged operand element costs at most 4 flops (convert, round to tf32, weight multiply).
def tc_shrink_simt_flops(rows: int, rank: int, skills: int, heads: int, dk: int) -> int:
    """tc_shrink_kernel: per row tile, head and S*r column pass, the x chunk and the Mcat_k chunk
    are staged (4 flops an element), and every (row, j) sums its skills' columns (an FMA each)
    plus the z_scale multiply-add."""
    tiles, sr = cdiv(rows, TC_ROWS), skills * rank
    passes = heads * cdiv(sr, TC_PROJ_COLS)
    stage = cdiv(dk, TC_CHUNK) * TC_CHUNK * (TC_ROWS + TC_PROJ_COLS) * 4
    epilogue = TC_ROWS * rank * (2 * cdiv(min(sr, TC_PROJ_COLS), rank) + 2)
    return tiles * passes * (stage + epilogue)


def tc_expand_simt_flops(rows: int, rank: int, skills: int, heads: int, dk: int) -> int:
    """tc_expand_kernel: per row tile, head and 64-column tile, w z (2 multiplies and the rounding)
    and the Mcat_k^T chunk are staged over the S*r reduction, then scale and accumulate (3 flops)
    per output."""
    blocks = cdiv(rows, TC_ROWS) * heads * cdiv(dk, TC_EXPAND_COLS)
    k = cdiv(skills * rank, TC_CHUNK) * TC_CHUNK
    return blocks * (k * (TC_ROWS + TC_EXPAND_COLS) * 4 + TC_ROWS * TC_EXPAND_COLS * 3)


def tc_wgrad_simt_flops(rows: int, rank: int, skills: int, heads: int, dk: int) -> int:
    """tc_wgrad_kernel: per (64-column tile of dk, 64-column tile of S*r, head) block and 32-row
    chunk, the X^T and w Q tiles are staged (4 flops an element) and dw takes one FMA per (row,
    column of the tile) against Q; dM's read-add-write (2 flops an element) at the end."""
    blocks = cdiv(dk, TC_ROWS) * cdiv(skills * rank, TC_WGRAD_COLS) * heads
    chunks = cdiv(rows, TC_CHUNK)
    per_chunk = TC_CHUNK * (TC_ROWS + TC_WGRAD_COLS) * 4 + TC_CHUNK * TC_WGRAD_COLS * 2
    return blocks * (chunks * per_chunk + TC_ROWS * (TC_WGRAD_COLS + TC_ROWS) * 4 + TC_ROWS * TC_WGRAD_COLS * 2)


def route_fwd_simt_flops(groups: int, heads: int, skills: int) -> int:
    """route_fwd_kernel: one warp per (group, head) row; per skill at most ~40 flops (sigmoid or
    relaxed-Bernoulli transform with its clamps, exp, normalization), plus a warp sum (5 adds a lane)."""
    return groups * heads * (40 * skills + 32 * 5)


def route_bwd_simt_flops(groups: int, heads: int, skills: int) -> int:
    """route_bwd_kernel: the forward's probabilities again, then the chain rule: at most ~80 flops
    per skill, plus two warp sums."""
    return groups * heads * (80 * skills + 2 * 32 * 5)


def head_gates_fwd_simt_flops(rows: int, n_shared: int, n_routed: int) -> int:
    """head_gates_fwd_kernel: one thread per row; softmax terms recomputed per head (~50 flops a
    head, exp included) and top-k membership by scanning the row (6 per comparison, twice per
    routed head: 12 Hr^2)."""
    return rows * (50 * (n_shared + n_routed) + 12 * n_routed * n_routed + 50)


def head_gates_bwd_simt_flops(rows: int, n_shared: int, n_routed: int) -> int:
    """head_gates_bwd_kernel: about twice the forward's work per row."""
    return 2 * head_gates_fwd_simt_flops(rows, n_shared, n_routed)


def gated_head_proj_simt_flops(
    rows: int, out_features: int, head_dim: int, open_pairs: int, open_tile_heads: int
) -> int:
    """gated_head_proj_kernel: for every open (row, head) the row's warp runs 32 FMAs per 32-wide
    chunk of the head, for every output column of the 64-wide column tiles; a head open in some row
    of a 32-row tile is gated (one multiply per loaded element, 32 x 32 a chunk) for every column
    tile; bias add per output."""
    chunks = cdiv(head_dim, GHP_CHUNK)
    col_tiles = cdiv(out_features, GHP_COLS)
    multiply = open_pairs * chunks * GHP_CHUNK * 2 * col_tiles * GHP_COLS
    gate = open_tile_heads * chunks * GHP_ROWS * GHP_CHUNK * col_tiles
    return multiply + gate + rows * out_features


def gated_head_proj_tc_slots(open_mask) -> int:
    """Packed slots of gated_head_proj_tc_kernel: for each 64-row block and head, its open rows
    rounded up to whole n8 tiles. open_mask: [rows, heads] bools (gate != 0)."""
    total = 0
    for r0 in range(0, open_mask.shape[0], GHP_TC_ROWS):
        per_head = open_mask[r0 : r0 + GHP_TC_ROWS].sum(0).tolist()
        total += sum(cdiv(int(c), 8) * 8 for c in per_head)
    return total


def gated_head_proj_tc_flops(slots: int, out_features: int, head_dim: int) -> int:
    """Tensor-core flops of gated_head_proj_tc_kernel: per packed slot, every 64-output block, and
    the head's columns in whole k16 steps (2 * 16 * 8 * 16 flops per m16n8k16)."""
    return 2 * slots * cdiv(out_features, GHP_TC_OUT) * GHP_TC_OUT * cdiv(head_dim, 16) * 16


def gated_head_proj_tc_simt_flops(rows: int, out_features: int, slots: int) -> int:
    """gated_head_proj_tc_kernel outside the mma: one multiply-add per packed slot and output (the
    gate times the head's product, into the accumulator), and the bias add per output."""
    return 2 * slots * cdiv(out_features, GHP_TC_OUT) * GHP_TC_OUT + rows * out_features


def moe_rows_simt_flops(
    rows: int, top_k: int, experts: int, rank: int, d_src: int, d_dst: int, backward: bool = False, accumulate=False
) -> int:
    """moe_rows_kernel over all rows (ids all valid), per 64-row block:
    - the counting sort of its slots (integer work, 2 ops per iteration): E + 1 bucket counts over
      the slots, each slot's rank in its bucket (a scan of the slots before it), each row's slots
      found by a scan of the sorted order;
    - shrink, a warp per slot: per 32-rank chunk the lanes stride d_src (rounded up to whole
      warps), converting x and running one FMA per rank value of the chunk; a warp sum (5 adds a
      lane) and the scale multiply per rank value; the backward adds z . g (an FMA), w_s g (a
      multiply) per rank value and one more warp sum;
    - expand, threads over d_dst (whole warps) for each row: the row's bad-id check (k per
      thread), then per (row, column) and slot the weight multiply, an FMA per rank value (v . X,
      2 flops) and the slot's c_s multiply-add into the row (2 flops); the store's convert, and the
      read-convert-add when accumulating."""
    lanes = cdiv(d_src, 32) * 32
    per_slot = lanes * (cdiv(rank, MOE_RANK_CHUNK) + 2 * rank) + rank * (32 * 5 + 1 + (3 if backward else 0))
    per_slot += 32 * 5 if backward else 0
    cols = cdiv(d_dst, 32) * 32
    per_row = KERNEL_THREADS * top_k + cols * (top_k * (1 + 2 * rank + 2) + 1 + (2 if accumulate else 0))
    total = rows * top_k * per_slot + rows * per_row
    for r0 in range(0, rows, MOE_ROW_BLOCK):
        block_rows = min(MOE_ROW_BLOCK, rows - r0)
        slots = block_rows * top_k
        total += 2 * ((experts + 1) * slots + slots * (slots - 1) // 2 + block_rows * slots)
    return total


def moe_uses_tensor_cores(dtype_bits: int, rows: int) -> bool:
    """moe_lora_uses_tensor_cores: fp16 / bf16 data and more than MOE_TC_MIN_ROWS rows (the shared
    memory condition holds for the k and E of the shape sets)."""
    return dtype_bits == 16 and rows > MOE_TC_MIN_ROWS


def moe_tc_rows_simt_flops(
    rows: int, top_k: int, experts: int, rank: int, d_src: int, d_dst: int, backward: bool = False, accumulate=False
) -> int:
    """moe_tc_rows_kernel's SIMT work over all rows (ids all valid), an upper bound: per 64-row block
    its tiles (runs of at most 16 slots of one expert) are taken at their maximum, slots // 16 +
    min(E, slots), and each warp's experts at min(E, 16 k):
    - the block's counting sort (as moe_rows_kernel), the tile list (2 ops per expert and tile) and
      each warp's experts (lane 0 scans the slots, 4 ops each);
    - shrink, per 32-rank pass and batch of 16 tiles: the src chunk staged (convert and store, 2 per
      element of 64 x whole 64-column chunks); per tile, each k8 step checks its four A values for
      inf / NaN (2 ops each) and splits two B elements per lane and n8 tile into tf32 terms (2 ops
      each); the epilogue scales each (slot, rank value), the backward
      adds z . g and w g (3 more) and the dots' quad sums (2 shuffle-adds per lane and row half);
    - expand, per warp with rows, 64-column step, expert and k8 step of the rank: four A elements
      a lane, each a scan of the row's k slots (compare, weight, scale, FMA: 4 ops a slot), its
      inf / NaN check and rounding (2 each), and per n8 tile two B elements checked and rounded (2
      each); the bad-id check (2 rows x k a lane); per output the convert and store, and the
      read-convert-add when accumulating."""
    total = 0
    for r0 in range(0, rows, MOE_ROW_BLOCK):
        block_rows = min(MOE_ROW_BLOCK, rows - r0)
        slots = block_rows * top_k
        tiles = slots // 16 + min(experts, slots)
        warp_experts = min(experts, 16 * top_k)
        total += 2 * ((experts + 1) * slots + slots * (slots - 1) // 2 + block_rows * slots)  # sort
        total += 2 * (experts + tiles) + 4 * (MOE_TC_THREADS // 32) * slots
        passes, batches = cdiv(rank, 8 * MOE_TC_RANK_TILES), cdiv(tiles, 4 * MOE_TC_TILES_PER_WARP)
        total += passes * batches * MOE_ROW_BLOCK * cdiv(d_src, MOE_TC_CHUNK) * MOE_TC_CHUNK * 2
        total += tiles * cdiv(d_src, 8) * (cdiv(rank, 8) * 32 * 2 * 2 + passes * 32 * 4 * 2)
        total += slots * rank * (1 + (3 if backward else 0)) + (tiles * passes * 32 * 2 * 2 if backward else 0)
        warps = cdiv(block_rows, 16)
        steps = cdiv(d_dst, 8 * MOE_TC_EXPAND_TILES)
        per_expert_step = 32 * 4 * (4 * top_k + 4)
        total += warps * (steps * warp_experts * cdiv(rank, 8) * per_expert_step + 32 * 2 * top_k)
        total += warps * warp_experts * cdiv(rank, 8) * cdiv(d_dst, 8) * 32 * 2 * 4
        total += block_rows * d_dst * (2 + (2 if accumulate else 0))
    return total


def moe_rows_kernel_name(dtype_bits: int, rows: int) -> str:
    """The rows kernel moe_lora_rows_cuda launches for this data width and row count."""
    return "moe_tc_rows_kernel" if moe_uses_tensor_cores(dtype_bits, rows) else "moe_rows_kernel"


def moe_rows_flops_bound(dtype_bits: int, rows: int, *args, **kwargs) -> int:
    """The SIMT bound of the rows kernel moe_lora_rows_cuda launches (moe_rows_kernel_name)."""
    if moe_uses_tensor_cores(dtype_bits, rows):
        return moe_tc_rows_simt_flops(rows, *args, **kwargs)
    return moe_rows_simt_flops(rows, *args, **kwargs)


def moe_plan_count_simt_flops(rows: int, top_k: int, experts: int) -> int:
    """moe_plan_count_kernel: a block per expert whose threads stride all N k slots (whole 256-slot
    passes), ~8 integer ops a slot (expert_of's index split, address and range check, the compare
    and count), then a warp sum (5 adds a lane) and the block's 8-warp total."""
    return experts * (cdiv(rows * top_k, KERNEL_THREADS) * KERNEL_THREADS * 8 + KERNEL_THREADS * 5 + 8)


def moe_plan_scan_simt_flops(experts: int) -> int:
    """moe_plan_scan_kernel: one thread, an add per expert."""
    return experts


def moe_plan_fill_simt_flops(rows: int, top_k: int, experts: int) -> int:
    """moe_plan_fill_kernel: a block per expert, 256-slot chunks over all N k slots; per thread and
    chunk ~40 integer ops (expert_of and its compare, the ballot's popcounts, the 8-warp prefix: an
    add, an add and a compare per warp)."""
    return experts * cdiv(rows * top_k, KERNEL_THREADS) * KERNEL_THREADS * 40


def moe_wgrad_tasks(experts: int, d_in: int, d_out: int) -> int:
    """moe_lora_wgrad_tasks: a task (block) per 16-column block of each expert's dA and dB."""
    return experts * (cdiv(d_in, MOE_COL_BLOCK) + cdiv(d_out, MOE_COL_BLOCK))


def moe_wgrad_simt_flops(rows: int, top_k: int, rank: int, d_in: int, d_out: int, experts_used: int) -> int:
    """moe_wgrad_kernel: every task's threads hold its (rank, column) pairs (16 r, in whole warps)
    and each sums its expert's slots; all tasks together visit every slot once per column block.
    Per (pair, slot): dA converts x and runs an FMA (3 flops); dB also multiplies z by w (4 flops).
    Per dB pair of an expert with slots (experts_used of them), one scale multiply after the sum."""
    pairs = cdiv(MOE_COL_BLOCK * rank, 32) * 32
    out_blocks = cdiv(d_out, MOE_COL_BLOCK)
    per_slot = rows * top_k * pairs * (3 * cdiv(d_in, MOE_COL_BLOCK) + 4 * out_blocks)
    return per_slot + experts_used * out_blocks * pairs


MOE_TC_COL_BLOCK, MOE_TC_WGRAD_SLOTS = 64, 32  # moe_lora.h kMoeTcColBlock; moe_lora_tc_cuda.cu kWgSlots


def moe_wgrad_tc_tasks(experts: int, d_in: int, d_out: int) -> int:
    """moe_lora_wgrad_tc_tasks: a task (block) per 64-column block of each expert's dA and dB."""
    return experts * (cdiv(d_in, MOE_TC_COL_BLOCK) + cdiv(d_out, MOE_TC_COL_BLOCK))


def moe_wgrad_tc_simt_flops(rows: int, top_k: int, rank: int, d_in: int, d_out: int, experts: int) -> int:
    """moe_tc_wgrad_kernel (fp16 / bf16 data), an upper bound: per task and 32-rank pass, its
    expert's slots in chunks of 32 (all experts' chunks together at most N k / 32 + E); per chunk
    each slot's row and weight (6 ops), the data tile staged (convert and store, 2 per element of
    32 x 64), the bottleneck tile (weight multiply, and the two tf32 terms: 6 per element of
    32 x 32), and each lane's A values checked for inf / NaN (4 a k8 step, 2 ops each, 4 warps);
    per task and pass, the scale and store of its 64 x 32 outputs (2 each)."""
    col_blocks = cdiv(d_in, MOE_TC_COL_BLOCK) + cdiv(d_out, MOE_TC_COL_BLOCK)
    passes = cdiv(rank, 8 * MOE_TC_RANK_TILES)
    chunks = rows * top_k // MOE_TC_WGRAD_SLOTS + experts
    per_chunk = MOE_TC_WGRAD_SLOTS * (6 + 2 * MOE_TC_COL_BLOCK + 6 * 8 * MOE_TC_RANK_TILES)
    per_chunk += MOE_TC_WGRAD_SLOTS // 8 * (MOE_TC_THREADS // 32) * 32 * 4 * 2
    epilogue = MOE_TC_COL_BLOCK * 8 * MOE_TC_RANK_TILES * 2
    return col_blocks * passes * (chunks * per_chunk + experts * epilogue)


# --- ideal traffic and flops of each op ---------------------------------------------------------


@dataclass(frozen=True)
class LinearShape:
    """One adapted linear layer: x [rows, d_in] in groups of rows_per_group rows; A/B fp32 as PEFT
    keeps them; routing weights fp32 [groups, h, S]; group ids int64."""

    rows: int
    d_in: int
    d_out: int
    rank: int
    skills: int
    heads: int
    groups: int
    rows_per_group: int
    x_bytes: int  # element size of x, y and the base weight
    adapter_bytes: int = 4

    @property
    def matrices_bytes(self) -> int:  # A and B
        return self.skills * self.rank * (self.d_in + self.d_out) * self.adapter_bytes

    @property
    def routing_bytes(self) -> int:  # weights and group ids
        return self.groups * self.heads * self.skills * 4 + self.groups * 8

    @property
    def mixing_flops(self) -> int:  # each group's A_g and B_g from the S skills
        return 2 * self.groups * self.skills * self.rank * (self.d_in + self.d_out)


def adapter_fwd_ideal(s: LinearShape) -> tuple[int, int]:
    """routed_lora added into the base layer's output (mhr_linear's adapter): read x, read and
    write y, read A, B and the routing, write z [N, r] fp32 (saved for the backward)."""
    nbytes = s.rows * s.d_in * s.x_bytes + 2 * s.rows * s.d_out * s.x_bytes
    nbytes += s.matrices_bytes + s.routing_bytes + s.rows * s.rank * 4
    flops = 2 * s.rows * s.rank * (s.d_in + s.d_out) + s.mixing_flops
    return nbytes, flops


def adapter_bwd_ideal(s: LinearShape) -> tuple[int, int]:
    """routed_lora_backward after the base layer's dgrad: read grad_y, x, z, A, B and the routing;
    read and write dx (the base GEMM wrote it); write dA, dB (fp32) and dweights. Flops: gz, dx,
    dA_g, dB_g (2 N r d each), the mixing again and its chain back to dA, dB, dweights."""
    grad_y, x, dx = s.rows * s.d_out * s.x_bytes, s.rows * s.d_in * s.x_bytes, 2 * s.rows * s.d_in * s.x_bytes
    nbytes = grad_y + x + dx + s.rows * s.rank * 4
    nbytes += 2 * s.matrices_bytes + s.routing_bytes + s.groups * s.heads * s.skills * 4
    flops = 4 * s.rows * s.rank * (s.d_in + s.d_out) + 3 * s.mixing_flops
    return nbytes, flops


def base_gemm_ideal(s: LinearShape) -> tuple[int, int]:
    """One GEMM of the base layer, for comparison (it runs in ATen / cuBLAS, not counted): the
    forward x W^T reads x and W and writes y; the backward's dgrad grad_y W (frozen base) reads
    grad_y and W and writes dx: the same bytes and flops."""
    return gemm_ideal(s.rows, s.d_in, s.d_out, s.x_bytes)


def gemm_ideal(rows: int, d_in: int, d_out: int, elem_bytes: int) -> tuple[int, int]:
    """A base layer's GEMM x W^T: read x [rows, d_in] and W [d_out, d_in], write y [rows, d_out]."""
    return (rows * (d_in + d_out) + d_in * d_out) * elem_bytes, 2 * rows * d_in * d_out


def route_ideal(
    tasks: int, tasks_used: int, groups: int, heads: int, skills: int, backward: bool = False, noise: bool = False
) -> tuple[int, int]:
    """route: read the logits rows of the tasks used ([h*S] fp32 each), the task ids and the noise
    (relaxed Bernoulli), write weights [G, h, S] fp32. The backward reads the weights' gradient,
    those logits, the ids and the noise again, and writes the whole logits' gradient [T, h*S]."""
    row, weights = heads * skills * 4, groups * heads * skills * 4
    noise_bytes = weights if noise else 0
    fwd = tasks_used * row + groups * 8 + weights + noise_bytes
    bwd = weights + tasks_used * row + groups * 8 + noise_bytes + tasks * row
    return fwd + (bwd if backward else 0), 0


@dataclass(frozen=True)
class MohShape:
    rows: int
    heads: int  # H = n_shared + n_routed
    head_dim: int
    out_features: int
    n_shared: int
    top_k: int
    elem_bytes: int

    @property
    def n_routed(self) -> int:
        return self.heads - self.n_shared


def head_gates_ideal(s: MohShape, backward: bool = False) -> tuple[int, int]:
    """head_gates: read the routed, shared and stage logits, write the gates; the backward reads
    the gates' gradient and the logits, writes the logits' gradients."""
    logits = s.rows * (s.heads + 2) * s.elem_bytes
    gates = s.rows * s.heads * s.elem_bytes
    return logits + gates + ((gates + 2 * logits) if backward else 0), 0


def gated_head_proj_ideal(s: MohShape, open_pairs: int) -> tuple[int, int]:
    """gated_head_proj: read the gates, the open heads' rows of o and the whole weight (every head
    is open somewhere), write y; 2 Dh D flops per open (row, head)."""
    nbytes = s.rows * s.heads * s.elem_bytes + open_pairs * s.head_dim * s.elem_bytes
    nbytes += s.out_features * s.heads * s.head_dim * s.elem_bytes + s.rows * s.out_features * s.elem_bytes
    return nbytes, 2 * open_pairs * s.head_dim * s.out_features


def dense_proj_ideal(s: MohShape) -> tuple[int, int]:
    """The dense o_proj over every head: read o and the weight, write y; 2 N H Dh D flops."""
    k = s.heads * s.head_dim
    nbytes = (s.rows * k + s.out_features * k + s.rows * s.out_features) * s.elem_bytes
    return nbytes, 2 * s.rows * k * s.out_features


@dataclass(frozen=True)
class MoeShape:
    """moe_lora on x [rows, d_in]: E experts A [E, d_in, r], B [E, r, d_out] (fp32 as MoELoRALinear
    keeps them), top_k experts a row with int64 ids and fp32 weights (the router's torch.topk)."""

    rows: int
    d_in: int
    d_out: int
    experts: int
    top_k: int
    rank: int
    x_bytes: int  # element size of x, y, grad_y and dx
    adapter_bytes: int = 4

    @property
    def experts_bytes(self) -> int:  # A and B
        return self.experts * self.rank * (self.d_in + self.d_out) * self.adapter_bytes

    @property
    def routing_bytes(self) -> int:  # ids int64 and weights fp32
        return self.rows * self.top_k * (8 + 4)

    @property
    def z_bytes(self) -> int:  # the bottleneck z [rows, k, r] fp32
        return self.rows * self.top_k * self.rank * 4

    @property
    def gemm_flops(self) -> int:  # x A_e then z B_e for every (row, slot)
        return 2 * self.rows * self.top_k * self.rank * (self.d_in + self.d_out)


def moe_fwd_ideal(s: MoeShape, accumulate: bool) -> tuple[int, int]:
    """moe_lora forward: read x, the experts and the routing, write z (saved for the backward) and
    y, or read and write y when accumulating into the base layer's output (moe_lora_add_, the
    module's path without autograd). Flops: the selected experts' GEMMs."""
    y = s.rows * s.d_out * s.x_bytes * (2 if accumulate else 1)
    return s.rows * s.d_in * s.x_bytes + y + s.experts_bytes + s.routing_bytes + s.z_bytes, s.gemm_flops


def moe_bwd_ideal(s: MoeShape) -> tuple[int, int]:
    """moe_lora_backward for x, A, B and the weights: read grad_y, x, z, the experts and the
    routing; write dx, dA, dB (fp32) and dweights [rows, k] fp32. Flops: g = grad_y B_e^T, dx, dA_e,
    dB_e (the GEMMs twice over) and dw = z . g."""
    nbytes = s.rows * (s.d_out + 2 * s.d_in) * s.x_bytes + s.z_bytes + 2 * s.experts_bytes + s.routing_bytes
    nbytes += s.rows * s.top_k * 4
    return nbytes, 2 * s.gemm_flops + 2 * s.rows * s.top_k * s.rank
