"""The counted traffic model's pure-Python parts (mhr_ops/benchmarking/traffic.py and the plumbing
of emulated.py), without the emulated module: formulas, ideal bytes, the SIMT bounds against a
walk of the kernels' loops, the extrapolation, the command's errors, and the committed record."""

import json
import math
import pathlib
import sys

import pytest
import torch

from mhr_ops.__main__ import main
from mhr_ops.benchmarking import emulated
from mhr_ops.benchmarking import traffic as T

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_times_take_the_binding_ceiling():
    assert T.roofline_us(3.35e12, 0) == pytest.approx(1e6)
    assert T.roofline_us(0, 989e12) == pytest.approx(1e6)
    assert T.roofline_us(3.35e6, 989e3) == pytest.approx(1.0)  # both 1 us
    assert T.modeled_us(3.35e6, 0, 0) == pytest.approx(1.0)
    assert T.modeled_us(0, 2 * 989e6, 0) == pytest.approx(2.0)
    assert T.modeled_us(3.35e6, 989e6, 67e9) == pytest.approx(1000.0)  # SIMT binds
    assert T.modeled_lsu_us(3.35e6, 989e6, 67e9) == pytest.approx(8000.0)  # two loads per FMA: 1/8 the rate
    assert T.modeled_lsu_us(3.35e10, 0, 67e9) == pytest.approx(10000.0)  # bytes still bind when they do


def test_sectors_per_request_is_normalized_to_128_bytes():
    assert T.sectors_per_request(4, 128) == 4.0  # one coalesced 4-byte-per-lane warp request
    assert T.sectors_per_request(2, 64) == 4.0  # 2 bytes a lane
    assert T.sectors_per_request(32, 128) == 32.0  # a sector per lane
    assert T.sectors_per_request(0, 0) == 0.0


def test_affine_extrapolation_is_exact_on_a_line():
    fixed, per_row = 4_194_304, 24_576
    v = lambda n: fixed + per_row * n  # noqa: E731
    assert T.affine_extrapolate(512, v(512), 1024, v(1024), 8192) == pytest.approx(v(8192))
    with pytest.raises(ValueError, match="two different sizes"):
        T.affine_extrapolate(3, 1.0, 3, 2.0, 5)


@pytest.mark.parametrize("rows,rows_per_group,tile", [(8192, 512, 32), (256, 1, 32), (100, 10, 32), (77, 33, 32)])
def test_tile_group_pairs_and_runs_match_a_direct_count(rows, rows_per_group, tile):
    direct = sum(len({n // rows_per_group for n in range(t0, min(rows, t0 + tile))}) for t0 in range(0, rows, tile))
    assert T.tile_group_pairs(rows, rows_per_group, tile) == direct
    for begin, end in ((0, rows), (5, rows - 3), (7, 7)):
        groups = [n // rows_per_group for n in range(begin, end)]
        runs = sum(1 for i, g in enumerate(groups) if i == 0 or g != groups[i - 1])
        assert T.group_runs(begin, end, rows_per_group) == runs


def test_wgrad_slices_replays_the_launcher():
    # gpu-train: 16 column tiles x 8 heads = 128 blocks a slice, 4 * 132 // 128 = 4 slices
    assert T.wgrad_slices(8192, 512, 8) == 2048
    assert T.wgrad_slices(512, 512, 8, sms=8) == 512  # an emulated slice of it: one slice
    assert T.wgrad_slices(4096, 32, 64) == 512  # t0-mhr: 64 blocks a slice, 8 slices


def walk_shrink(rows, rank, skills, heads, dk, rows_per_group):
    """FMAs of shrink_kernel counted by walking its loops (one block per 32-row tile)."""
    fma = 0
    for t0 in range(0, rows, T.SHRINK_ROWS):
        tile = range(t0, min(rows, t0 + T.SHRINK_ROWS))
        for g in sorted({n // rows_per_group for n in tile}):
            for _chunk in range(heads * math.ceil(dk / T.SHRINK_CHUNK)):
                fma += T.SHRINK_CHUNK * rank * skills  # mix: every (c, j) of the chunk, S FMAs
                fma += sum(1 for n in tile if n // rows_per_group == g) * rank * T.SHRINK_CHUNK
    return 2 * fma + rows * rank


def walk_expand(rows, rank, skills, cols, rows_per_group):
    fma = 0
    for t0 in range(0, rows, T.EXPAND_ROWS):
        tile = range(t0, min(rows, t0 + T.EXPAND_ROWS))
        for _ct in range(math.ceil(cols / T.EXPAND_COLS)):
            for g in sorted({n // rows_per_group for n in tile}):
                for j0 in range(0, rank, T.EXPAND_RANK_CHUNK):
                    fma += min(T.EXPAND_RANK_CHUNK, rank - j0) * T.EXPAND_COLS * skills
                    fma += sum(1 for n in tile if n // rows_per_group == g) * T.EXPAND_COLS * T.EXPAND_RANK_CHUNK
    col_tiles = math.ceil(cols / T.EXPAND_COLS)
    return 2 * fma + col_tiles * rows * T.EXPAND_COLS * 3


@pytest.mark.parametrize("rows,rank,skills,heads,d,rows_per_group", [(96, 16, 8, 2, 128, 40), (33, 1, 4, 4, 256, 1)])
def test_simt_bounds_match_a_walk_of_the_loops(rows, rank, skills, heads, d, rows_per_group):
    dk = d // heads
    pairs = T.tile_group_pairs(rows, rows_per_group, 32)
    assert T.shrink_simt_flops(rows, rank, skills, heads, dk, pairs) == walk_shrink(
        rows, rank, skills, heads, dk, rows_per_group
    )
    assert T.expand_simt_flops(rows, rank, skills, d, pairs) == walk_expand(rows, rank, skills, d, rows_per_group)


def walk_moe_rows(rows, k, experts, rank, d_src, d_dst, backward=False, accumulate=False):
    """Ops of moe_rows_kernel counted by walking its loops (moe_lora_cuda.cu; 256 threads, one
    block per 64 rows), every lane of a warp that runs an iteration counted."""
    ops = 0
    for n0 in range(0, rows, T.MOE_ROW_BLOCK):
        block_rows = min(T.MOE_ROW_BLOCK, rows - n0)
        slots = block_rows * k
        for _b in range(experts + 1):  # bucket counts
            ops += 2 * slots
        for i in range(slots):  # rank in the bucket
            ops += 2 * i
        ops += 2 * block_rows * slots  # each row's slots from the sorted order
        for _slot in range(slots):  # shrink, a warp per slot
            for r0 in range(0, rank, T.MOE_RANK_CHUNK):
                width = min(T.MOE_RANK_CHUNK, rank - r0)
                for _lane in range(32):
                    for _c in range(0, d_src, 32):
                        ops += 1 + 2 * width  # convert, an FMA per rank value of the chunk
                ops += width * 32 * 5  # a warp sum per rank value
                ops += width * (1 + (3 if backward else 0))  # scale; z . g, w g
            if backward:
                ops += 32 * 5  # dw's warp sum
        for _r in range(block_rows):  # expand
            ops += 256 * k  # the bad-id check, every thread
            for _warp in range(0, d_dst, 32):
                for _lane in range(32):
                    for _t in range(k):
                        ops += 1 + 2 * rank + 2  # c_s; an FMA per rank value; out += c_s * part
                    ops += 1 + (2 if accumulate else 0)
    return ops


def walk_moe_wgrad(ids, rank, d_in, d_out):
    """Ops of moe_wgrad_kernel walked task by task: each task's (rank, column) pairs, in whole
    warps, over its expert's slots."""
    experts = int(ids.max()) + 1
    per_expert = [int((ids == e).sum()) for e in range(experts)]
    ops = 0
    for is_a, cols in ((True, d_in), (False, d_out)):
        for e in range(experts):
            for _c0 in range(0, cols, T.MOE_COL_BLOCK):
                for _pair in range(math.ceil(T.MOE_COL_BLOCK * rank / 32) * 32):
                    ops += per_expert[e] * (3 if is_a else 4)  # convert, FMA; dB: z w
                    ops += 1 if not is_a and per_expert[e] > 0 else 0  # dB: the scale, once
    return ops, experts


@pytest.mark.parametrize(
    "rows,k,experts,rank,d_src,d_dst", [(130, 2, 3, 5, 70, 33), (64, 1, 8, 40, 32, 64), (20, 1, 40, 3, 17, 16)]
)
def test_moe_bounds_match_a_walk_of_the_loops(rows, k, experts, rank, d_src, d_dst):
    for backward, accumulate in ((False, False), (False, True), (True, False)):
        assert T.moe_rows_simt_flops(rows, k, experts, rank, d_src, d_dst, backward, accumulate) == walk_moe_rows(
            rows, k, experts, rank, d_src, d_dst, backward, accumulate
        )
    ids = torch.randint(0, experts, (rows, k), generator=torch.Generator().manual_seed(rows))
    ids[0, 0] = experts - 1  # every expert's dA and dB tasks launch, used or not
    walked, e = walk_moe_wgrad(ids, rank, d_src, d_dst)
    used = len(set(ids.flatten().tolist()))
    assert e == experts and T.moe_wgrad_simt_flops(rows, k, rank, d_src, d_dst, used) == walked
    assert T.moe_wgrad_tasks(experts, d_src, d_dst) == experts * (math.ceil(d_src / 16) + math.ceil(d_dst / 16))
    passes = math.ceil(rows * k / 256)
    assert T.moe_plan_count_simt_flops(rows, k, experts) == experts * (passes * 256 * 8 + 256 * 5 + 8)
    assert T.moe_plan_fill_simt_flops(rows, k, experts) == experts * passes * 256 * 40


def walk_moe_tc_rows(ids, experts, rank, d_src, d_dst, backward=False, accumulate=False):
    """Ops of moe_tc_rows_kernel walked block by block with the real routing `ids` [N, k] (all
    valid): its actual tiles and each warp's actual experts, every lane that runs a step counted."""
    rows, k = ids.shape
    ops = 0
    for n0 in range(0, rows, T.MOE_ROW_BLOCK):
        block = ids[n0 : n0 + T.MOE_ROW_BLOCK]
        block_rows, slots = block.shape[0], block.numel()
        counts = [int((block == e).sum()) for e in range(experts)]
        tiles = sum(math.ceil(c / 16) for c in counts)
        ops += 2 * ((experts + 1) * slots + slots * (slots - 1) // 2 + block_rows * slots)
        ops += 2 * (experts + tiles) + 4 * 4 * slots
        for r0 in range(0, rank, 32):
            n_tiles = min(4, math.ceil((rank - r0) / 8))
            for _t0 in range(0, tiles, 16):
                ops += 64 * math.ceil(d_src / 64) * 64 * 2  # staging
            for _tile in range(tiles):
                for _k0 in range(0, d_src, 8):
                    ops += 32 * 4 * 2 + n_tiles * 32 * 2 * 2  # A values checked; B elements split
                ops += 32 * 2 * 2 if backward else 0  # dw's quad sums
        ops += slots * rank * (1 + (3 if backward else 0))
        for w0 in range(0, block_rows, 16):
            used = len(set(block[w0 : w0 + 16].flatten().tolist()))
            ops += 32 * 2 * k  # bad-id check
            for c0 in range(0, d_dst, 64):
                n_tiles = min(8, math.ceil((d_dst - c0) / 8))
                for _e in range(used):
                    for _u0 in range(0, rank, 8):
                        ops += 32 * 4 * (4 * k + 4) + n_tiles * 32 * 2 * 4
        ops += block_rows * d_dst * (2 + (2 if accumulate else 0))
    return ops


@pytest.mark.parametrize("rows,k,experts,rank,d_src,d_dst", [(130, 2, 3, 5, 70, 33), (200, 3, 8, 40, 130, 64)])
def test_moe_tc_bound_holds_for_a_walk_of_the_loops(rows, k, experts, rank, d_src, d_dst):
    """The tensor-core rows bound takes the most tiles and experts a block and warp can have: it is
    at least the walked count of a random routing (and within 2x of it) and of a one-expert
    routing."""
    ids = torch.randint(0, experts, (rows, k), generator=torch.Generator().manual_seed(rows))
    for backward, accumulate in ((False, False), (False, True), (True, False)):
        bound = T.moe_tc_rows_simt_flops(rows, k, experts, rank, d_src, d_dst, backward, accumulate)
        walked = walk_moe_tc_rows(ids, experts, rank, d_src, d_dst, backward, accumulate)
        assert walked <= bound < 2 * walked
    one = torch.zeros(rows, k, dtype=torch.long)
    tight = walk_moe_tc_rows(one, 1, rank, d_src, d_dst, True)
    assert T.moe_tc_rows_simt_flops(rows, k, 1, rank, d_src, d_dst, True) >= tight
    assert T.moe_rows_kernel_name(16, 65) == "moe_tc_rows_kernel"
    assert T.moe_rows_kernel_name(16, 64) == T.moe_rows_kernel_name(32, 10**6) == "moe_rows_kernel"


@pytest.mark.parametrize("rows,k,experts,rank,d_in,d_out", [(130, 2, 3, 5, 70, 33), (300, 3, 8, 40, 130, 64)])
def test_moe_tc_wgrad_bound_holds_for_a_walk_of_the_loops(rows, k, experts, rank, d_in, d_out):
    """The tensor-core wgrad bound against its loops walked task by task with a real routing: each
    task's chunks of its expert's slots."""
    ids = torch.randint(0, experts, (rows, k), generator=torch.Generator().manual_seed(rows))
    per_expert = [int((ids == e).sum()) for e in range(experts)]
    walked = 0
    for cols in (d_in, d_out):
        for e in range(experts):
            for _c0 in range(0, cols, 64):
                for _r0 in range(0, rank, 32):
                    for _q in range(0, per_expert[e], 32):
                        walked += 32 * 6 + 32 * 64 * 2 + 32 * 32 * 6 + 4 * 4 * 32 * 4 * 2
                    walked += 64 * 32 * 2
    bound = T.moe_wgrad_tc_simt_flops(rows, k, rank, d_in, d_out, experts)
    assert walked <= bound < 1.5 * walked
    assert T.moe_wgrad_tc_tasks(experts, d_in, d_out) == experts * (math.ceil(d_in / 64) + math.ceil(d_out / 64))


def test_gated_head_proj_bound_counts_open_heads_only():
    all_open = T.gated_head_proj_simt_flops(64, 128, 64, 64 * 8, 2 * 8)
    three_quarters = T.gated_head_proj_simt_flops(64, 128, 64, 64 * 6, 2 * 8)
    assert all_open == 2 * 64 * 8 * 64 * 128 + 2 * 8 * 2 * 32 * 32 * 2 + 64 * 128
    assert three_quarters < all_open
    assert three_quarters - all_open == -2 * 64 * 2 * 64 * 128


def test_gated_head_proj_tc_bound_rounds_each_head_to_n8_tiles():
    mask = torch.zeros(130, 3, dtype=torch.bool)
    mask[:, 0] = True  # open everywhere: 64 + 64 + 2 rows -> 64 + 64 + 8 slots
    mask[3:12, 1] = True  # 9 rows of the first block -> 16 slots; closed in the other blocks
    slots = T.gated_head_proj_tc_slots(mask)
    assert slots == (64 + 64 + 8) + 16
    # 70 outputs -> two 64-output blocks; head_dim 33 -> three k16 steps
    assert T.gated_head_proj_tc_flops(slots, 70, 33) == 2 * slots * 128 * 48
    assert T.gated_head_proj_tc_simt_flops(130, 70, slots) == 2 * slots * 128 + 130 * 70


def test_ideal_bytes_at_gpu_train():
    s = T.LinearShape(
        rows=8192, d_in=4096, d_out=4096, rank=16, skills=8, heads=8, groups=16, rows_per_group=512, x_bytes=2
    )
    nbytes, flops = T.adapter_fwd_ideal(s)
    x, y = 8192 * 4096 * 2, 2 * 8192 * 4096 * 2
    assert nbytes == x + y + 8 * 16 * 8192 * 4 + (16 * 8 * 8 * 4 + 16 * 8) + 8192 * 16 * 4
    assert flops == 2 * 8192 * 16 * 8192 + 2 * 16 * 8 * 16 * 8192
    assert T.roofline_us(nbytes, flops) == pytest.approx(nbytes / 3.35e12 * 1e6)  # memory-bound: ~61.5 us
    bwd_bytes, bwd_flops = T.adapter_bwd_ideal(s)
    assert bwd_bytes > nbytes and bwd_flops == 2 * (flops - s.mixing_flops) + 3 * s.mixing_flops
    assert T.base_gemm_ideal(s)[1] == 2 * 8192 * 4096 * 4096


def test_ideal_bytes_at_gpu_moe():
    s = T.MoeShape(rows=8192, d_in=4096, d_out=4096, experts=8, top_k=2, rank=16, x_bytes=2)
    x = y = 8192 * 4096 * 2
    experts, routing, z = 8 * 16 * (4096 + 4096) * 4, 8192 * 2 * (8 + 4), 8192 * 2 * 16 * 4
    gemm = 2 * 8192 * 2 * 16 * (4096 + 4096)
    assert T.moe_fwd_ideal(s, accumulate=True) == (x + 2 * y + experts + routing + z, gemm)
    assert T.moe_fwd_ideal(s, accumulate=False) == (x + y + experts + routing + z, gemm)
    bwd_bytes, bwd_flops = T.moe_bwd_ideal(s)  # + dx, dA, dB, dweights written
    assert bwd_bytes == (y + x) + z + experts + routing + (x + experts + 8192 * 2 * 4)
    assert bwd_flops == 2 * gemm + 2 * 8192 * 2 * 16
    nbytes, flops = T.moe_fwd_ideal(s, accumulate=True)
    assert T.roofline_us(nbytes, flops) == pytest.approx(nbytes / 3.35e12 * 1e6)  # memory-bound: ~61 us
    assert T.gemm_ideal(8192, 4096, 4096, 2) == ((8192 * 8192 + 4096 * 4096) * 2, 2 * 8192 * 4096 * 4096)


def test_dense_projection_is_compute_bound_at_moh():
    s = T.MohShape(rows=8192, heads=32, head_dim=128, out_features=4096, n_shared=16, top_k=8, elem_bytes=2)
    nbytes, flops = T.dense_proj_ideal(s)
    assert flops == 2 * 8192 * 4096 * 4096
    assert T.roofline_us(nbytes, flops) == pytest.approx(flops / 989e12 * 1e6)  # ~278 us
    g_bytes, g_flops = T.gated_head_proj_ideal(s, open_pairs=8192 * 24)
    assert g_flops == 0.75 * flops and g_bytes < nbytes


def fake_record(kernel, n, fixed=1000, per_row=10, tc=0):
    """A launch record whose counts are fixed + per_row * n (as a row-tiled kernel's)."""
    r = {
        "kernel": kernel,
        "grid": (1, 1, 1),
        "dram_bytes": fixed + per_row * n,
        "tensor_core_flops": tc * n,
    }
    for kind in ("load", "store", "atomic"):
        r[f"{kind}_bytes"] = 128 * n if kind == "load" else 0
        r[f"{kind}_request_sectors"] = 4 * n if kind == "load" else 0
    return r


def test_evaluate_extrapolates_checks_the_plan_and_the_targets():
    def run(n):
        return [
            fake_record("(shrink_kernel<xt, mt>)", n),
            fake_record("cudaMemset", n, 0, 1),
            fake_record("expand_kernel<xt, mt>", n, 0, 20, tc=7),
        ]

    case = emulated.Case(
        "fake routed_lora fwd",
        "shrink + expand",
        n_full=100,
        sizes=(2, 4),
        run=run,
        ideal=(1000 + 30 * 100, 0),
        plan=[("shrink_kernel", 67_000_000_000), ("expand_kernel", 0)],
        targets=[lambda c: emulated.target("counted_bytes / ideal_bytes", c["counted_over_ideal_bytes"], "<=", 1.3)],
    )
    out = emulated.evaluate(case)
    assert out["counted_bytes"] == 1000 + 31 * 100  # memset included
    assert out["tc_flops"] == 700
    assert out["sectors_per_request"] == 4.0
    assert out["modeled_us"] == pytest.approx(1000.0)  # the SIMT bound binds: 67e9 flops at 67e12/s
    assert out["modeled_lsu_us"] == pytest.approx(8000.0)
    assert out["counts"] == "extrapolated" and out["n_emulated"] == [2, 4]
    assert [k["kernel"] for k in out["launches"]] == ["shrink_kernel", "expand_kernel", "cudaMemset"]
    assert out["targets"][0]["met"] is True
    text = emulated.format_case(out)
    assert "fake routed_lora fwd" in text and "1.00 ms" in text and "(met)" in text
    case.plan = [("shrink_kernel", 0)]
    with pytest.raises(RuntimeError, match="kernels launched changed"):
        emulated.evaluate(case)


def test_bench_emulated_without_the_module_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mhr_ops._emulated_cuda", None)  # import fails as if never built
    with pytest.raises(SystemExit) as e:
        main(["bench", "--emulated"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "mhr_ops._emulated_cuda is not built" in err and "MHR_OPS_EMULATED_CUDA=1 python setup.py build_ext" in err


@pytest.mark.parametrize(
    "args,message",
    [
        (["--device", "cuda"], "--emulated runs the CUDA kernels on the CPU"),
        (["--shapes", "cpu-small"], "no emulated cases for cpu-small"),
        (["--shapes", "gpu-moe", "--merge", "--json", "/nonexistent/record.json"], "--merge: expected --json"),
        (["--shapes", "gpu-moe", "--merge"], "--merge: expected --json"),
    ],
)
def test_bench_emulated_argument_errors(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--emulated", *args])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_merge_replaces_only_the_merged_sets_cases():
    model = {"hbm_bytes_per_s": 3.35e12}
    record = {
        "commit": "a" * 40,
        "command": "python -m mhr_ops bench --emulated",
        "model": model,
        "complete": True,
        "cases": [{"name": "gpu-train routed_lora fwd"}, {"name": "gpu-moe moe_lora fwd", "old": True}],
    }
    part = {"commit": "b" * 40, "command": "... --shapes gpu-moe --merge", "model": model, "complete": True}
    part["cases"] = [{"name": "gpu-moe moe_lora fwd"}, {"name": "gpu-moe moe_lora fwd+bwd"}]
    out = emulated.merge_records(record, part)
    assert [c["name"] for c in out["cases"]] == [
        "gpu-train routed_lora fwd",
        "gpu-moe moe_lora fwd",
        "gpu-moe moe_lora fwd+bwd",
    ]
    assert not any(c.get("old") for c in out["cases"]) and out["commit"] == "a" * 40 and out["complete"]
    assert out["merged"] == [{"shape_sets": ["gpu-moe"], "commit": "b" * 40, "command": part["command"]}]
    again = emulated.merge_records(out, dict(part, commit="c" * 40, complete=False))  # a rerun replaces its entry
    assert [m["commit"] for m in again["merged"]] == ["c" * 40] and not again["complete"]
    with pytest.raises(ValueError, match="different models"):
        emulated.merge_records(record, dict(part, model={"hbm_bytes_per_s": 4.8e12}))


RECORDS = sorted((ROOT / "bench" / "results").glob("emulated*.json"))


def test_full_record_covers_every_emulated_shape():
    """bench/results/emulated.json: every shape set, and the forward case under the issue's names."""
    record = json.loads((ROOT / "bench" / "results" / "emulated.json").read_text())
    names = {c["name"] for c in record["cases"]}
    for shape_set in emulated.EMULATED_SHAPES:
        assert any(n.startswith(shape_set + " ") for n in names), shape_set
    fwd = [c for c in record["cases"] if "routed_lora" in c["name"] + c["kernel"] and "fwd" in c["name"] + c["kernel"]]
    assert fwd


@pytest.mark.parametrize("path", RECORDS, ids=[p.name for p in RECORDS])
def test_committed_record_is_consistent(path):
    """Every committed record: the issue's fields, and modeled / roofline times that follow from
    the record's own numbers."""
    record = json.loads(path.read_text())
    assert len(record["commit"]) >= 40 and record["cases"]
    for c in record["cases"]:
        for key in ("ideal_bytes", "counted_bytes", "sectors_per_request", "tc_flops", "modeled_us", "roofline_us"):
            assert key in c, (c["name"], key)
        assert c["modeled_us"] == pytest.approx(
            T.modeled_us(c["counted_bytes"], c["tc_flops"], c["simt_flops"]), rel=1e-3, abs=1e-3
        )
        assert c["modeled_lsu_us"] == pytest.approx(
            T.modeled_lsu_us(c["counted_bytes"], c["tc_flops"], c["simt_flops"]), rel=1e-3, abs=1e-3
        )
        assert c["roofline_us"] == pytest.approx(T.roofline_us(c["ideal_bytes"], c["ideal_flops"]), rel=1e-3, abs=1e-3)
        assert all(t["met"] in (True, False) for t in c["targets"])
        assert c["counts"] in ("full", "extrapolated") and c["n_full"] >= max(c["n_emulated"])


@pytest.mark.parametrize(
    "name, kernels",
    [
        ("gpu-train", ["tc_shrink_kernel", "tc_expand_kernel"]),
        ("gpu-decode", ["tc_shrink_kernel", "tc_expand_kernel"]),
        ("t0-mhr", ["tc_shrink_kernel", "tc_expand_kernel"]),
    ],
)
def test_linear_plans_follow_the_kernels_path(name, kernels):
    """The plans name the kernels routed_lora_uses_tensor_cores picks at the full size (fp16 / bf16,
    more than 64 rows), and the emulated sizes take the same path (else the cases refuse to build)."""
    from mhr_ops.benchmarking.shapes import SHAPE_SETS

    assert T.uses_tensor_cores(16, T.TC_MIN_ROWS + 1) and not T.uses_tensor_cores(16, T.TC_MIN_ROWS)
    assert not T.uses_tensor_cores(32, 10**6)
    cases = emulated.linear_cases(None, SHAPE_SETS[name])
    fwd = [c for c, _ in cases[0].plan]
    assert fwd == kernels
    assert all(f > 0 for _, f in cases[1].plan)


def test_moe_plans_name_the_kernels_the_op_launches():
    """gpu-moe: the forward into the base output is one moe_rows_kernel; forward + backward adds the
    backward rows pass, the slot plan and the wgrad, each with a positive bound; emulated sizes
    that would not repeat whole 64-row blocks are refused."""
    from mhr_ops.benchmarking.shapes import SHAPE_SETS

    fwd, fwd_bwd = emulated.moe_cases(None, SHAPE_SETS["gpu-moe"])
    assert [k for k, _ in fwd.plan] == ["moe_tc_rows_kernel"]  # bf16 data: the tensor-core rows pass
    assert [k for k, _ in fwd_bwd.plan] == [
        "moe_tc_rows_kernel",
        "moe_tc_rows_kernel",
        "moe_plan_count_kernel",
        "moe_plan_scan_kernel",
        "moe_plan_fill_kernel",
        "moe_tc_wgrad_kernel",
    ]
    assert all(f > 0 for _, f in fwd.plan + fwd_bwd.plan)
    assert fwd.ideal[0] > fwd_bwd.ideal[0] / 3 and fwd.n_full == 8192


@pytest.mark.parametrize("sizes", [(96, 192), (128, 200)])
def test_moe_cases_refuse_sizes_that_are_not_whole_blocks(sizes, monkeypatch):
    from mhr_ops.benchmarking.shapes import SHAPE_SETS

    monkeypatch.setitem(emulated.EMULATED_SIZES, "gpu-moe", sizes)
    with pytest.raises(ValueError, match="expected multiples"):
        emulated.moe_cases(None, SHAPE_SETS["gpu-moe"])
