"""``python -m mhr_ops bench --emulated``: the GPU bench cases run through the SIMT emulation
(``mhr_ops._emulated_cuda``) with counted traffic, turned into modeled times (traffic.py) and
written to a JSON record (``bench/results/emulated.json``; bench/NOTES.md, "Counted traffic model").

Each case runs the ops on CPU tensors, which the emulated module routes to the CUDA bindings and
kernels, with the emulation counting every launch. Only our kernels are counted: ATen work around
them (the base layer's GEMMs, casts) is not, and is reported as its own roofline where it matters.

Emulation runs one OS thread per CUDA thread, so the large cases run at fewer rows: at two sizes
n1 < n2 (batch elements for the linear sets, rows for moh), with the emulated device reporting
132 * n / n_full multiprocessors so the launchers pick the grid the full problem would get on an
H100. Every count is then a fixed part (weights, read once however many rows) plus a part linear in
the rows, and is extrapolated along the line through the two sizes to the full one
("counts": "extrapolated" in the record); cases small enough run at full size ("counts": "full").
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import traffic as T
from .shapes import SHAPE_SETS, ShapeSet

EMULATED_SHAPES = ["gpu-train", "gpu-decode", "t0-mhr", "moh", "gpu-moe"]

# Emulated sizes per shape set: (n1, n2) to extrapolate from, or (n_full,) to run as is.
# gpu-decode's 256 rows run on tensor cores (more than 64 rows of bf16): its emulated sizes must too,
# and stay whole 64-row tiles so the counts remain affine in the rows.
# gpu-moe's sizes repeat its first size's rows and routing (whole 64-row blocks), as moh's do.
EMULATED_SIZES = {
    "gpu-train": (1, 2),
    "gpu-decode": (128, 192),
    "t0-mhr": (1, 2),
    "moh": (64, 128),
    "gpu-moe": (128, 256),
}

BUILD_HINT = "MHR_OPS_EMULATED_CUDA=1 python setup.py build_ext --inplace"


class EmulationMissing(RuntimeError):
    pass


def load_module():
    """The emulated CUDA module (imported after mhr_ops, so its registrations win), or
    EmulationMissing saying how to build it."""
    import mhr_ops  # noqa: F401

    try:
        from mhr_ops import _emulated_cuda
    except ImportError as e:
        raise EmulationMissing(
            f"the emulated CUDA module mhr_ops._emulated_cuda is not built ({e}); build it with `{BUILD_HINT}` "
            "(README, 'Testing the CUDA kernels without a GPU')"
        ) from e
    if not hasattr(_emulated_cuda, "launch_records"):
        raise EmulationMissing(f"mhr_ops._emulated_cuda predates traffic counting; rebuild it with `{BUILD_HINT}`")
    return _emulated_cuda


def kernel_base_name(spelling: str) -> str:
    """``(shrink_kernel<xt, mt>)`` -> ``shrink_kernel``."""
    return re.sub(r"<.*>", "", spelling.strip().strip("()")).strip()


def count_launches(module, fn: Callable[[], object], sms: int) -> list[dict]:
    """Runs ``fn`` with traffic counting on and the device reporting ``sms`` multiprocessors;
    returns its launch records."""
    previous = module.set_sm_count(sms)
    module.reset_launch_records()
    module.set_traffic_counting(True)
    try:
        fn()
    finally:
        module.set_traffic_counting(False)
        module.set_sm_count(previous)
    return module.launch_records()


ADDITIVE = ("launches", "counted_bytes", "requested_bytes", "request_sectors", "tc_flops")


def totals(records: list[dict]) -> tuple[dict, dict[str, dict]]:
    """Sums over the launches, overall and per kernel (base name)."""

    def add(acc: dict, r: dict) -> None:
        acc["launches"] += 1
        acc["counted_bytes"] += r["dram_bytes"]
        acc["requested_bytes"] += r["load_bytes"] + r["store_bytes"] + r["atomic_bytes"]
        acc["request_sectors"] += r["load_request_sectors"] + r["store_request_sectors"] + r["atomic_request_sectors"]
        acc["tc_flops"] += r["tensor_core_flops"]

    overall = dict.fromkeys(ADDITIVE, 0)
    per_kernel: dict[str, dict] = {}
    for r in records:
        add(overall, r)
        add(per_kernel.setdefault(kernel_base_name(r["kernel"]), dict.fromkeys(ADDITIVE, 0)), r)
    return overall, per_kernel


def at_full_size(sizes: tuple[int, ...], values: list[dict], n_full: int) -> dict:
    """The counts at n_full: as counted (one size), or extrapolated along the line through two."""
    if len(sizes) == 1:
        return dict(values[0])
    (n1, n2), (v1, v2) = sizes, values
    return {k: T.affine_extrapolate(n1, v1.get(k, 0), n2, v2.get(k, 0), n_full) for k in ADDITIVE}


@dataclass
class Case:
    """One modeled case. ``run(n)`` runs it at size n and returns its launch records; ``plan`` lists
    the kernels it must launch (base names, in order; cudaMemset aside) with each launch's SIMT flop
    bound at full size."""

    name: str
    kernel: str
    n_full: int
    sizes: tuple[int, ...]
    run: Callable[[int], list[dict]]
    ideal: tuple[int, int]
    plan: list[tuple[str, int]]
    extra: dict = field(default_factory=dict)
    targets: list[Callable[[dict], dict]] = field(default_factory=list)


def evaluate(case: Case) -> dict:
    counted, kernels_per_size = [], []
    for n in case.sizes:
        records = case.run(n)
        launched = [kernel_base_name(r["kernel"]) for r in records if r["kernel"] != "cudaMemset"]
        expected = [k for k, _ in case.plan]
        if launched != expected:
            raise RuntimeError(
                f"{case.name}: the kernels launched changed: expected {expected}, got {launched}; give every "
                "kernel its SIMT flop bound in mhr_ops/benchmarking/traffic.py and the case's plan in emulated.py"
            )
        overall, per_kernel = totals(records)
        counted.append(overall)
        kernels_per_size.append(per_kernel)
    full = at_full_size(case.sizes, counted, case.n_full)
    simt = sum(f for _, f in case.plan)
    ideal_bytes, ideal_flops = case.ideal
    out = {
        "name": case.name,
        "kernel": case.kernel,
        "ideal_bytes": int(ideal_bytes),
        "counted_bytes": int(round(full["counted_bytes"])),
        "sectors_per_request": round(T.sectors_per_request(full["request_sectors"], full["requested_bytes"]), 3),
        "tc_flops": int(round(full["tc_flops"])),
        "modeled_us": round(T.modeled_us(full["counted_bytes"], full["tc_flops"], simt), 3),
        "roofline_us": round(T.roofline_us(ideal_bytes, ideal_flops), 3),
        "ideal_flops": int(ideal_flops),
        "simt_flops": int(simt),
        "requested_bytes": int(round(full["requested_bytes"])),
        "counted_over_ideal_bytes": round(full["counted_bytes"] / ideal_bytes, 3),
        "n_full": case.n_full,
        "n_emulated": list(case.sizes),
        "counts": "full" if len(case.sizes) == 1 else "extrapolated",
    }
    out["modeled_lsu_us"] = round(T.modeled_lsu_us(full["counted_bytes"], full["tc_flops"], simt), 3)
    out["roofline_over_modeled"] = round(out["roofline_us"] / out["modeled_us"], 4) if out["modeled_us"] else None
    out["roofline_over_modeled_lsu"] = (
        round(out["roofline_us"] / out["modeled_lsu_us"], 4) if out["modeled_lsu_us"] else None
    )
    launches = []
    for name in dict.fromkeys(k for k, _ in case.plan):
        k_full = at_full_size(
            case.sizes, [p.get(name, dict.fromkeys(ADDITIVE, 0)) for p in kernels_per_size], case.n_full
        )
        k_simt = sum(f for k, f in case.plan if k == name)
        launches.append(
            {
                "kernel": name,
                "launches": int(round(k_full["launches"])),
                "counted_bytes": int(round(k_full["counted_bytes"])),
                "sectors_per_request": round(
                    T.sectors_per_request(k_full["request_sectors"], k_full["requested_bytes"]), 3
                ),
                "tc_flops": int(round(k_full["tc_flops"])),
                "simt_flops": int(k_simt),
                "modeled_us": round(T.modeled_us(k_full["counted_bytes"], k_full["tc_flops"], k_simt), 3),
                "modeled_lsu_us": round(T.modeled_lsu_us(k_full["counted_bytes"], k_full["tc_flops"], k_simt), 3),
            }
        )
    memset = at_full_size(
        case.sizes, [p.get("cudaMemset", dict.fromkeys(ADDITIVE, 0)) for p in kernels_per_size], case.n_full
    )
    if memset["launches"]:
        launches.append(
            {
                "kernel": "cudaMemset",
                "launches": int(round(memset["launches"])),
                "counted_bytes": int(round(memset["counted_bytes"])),
            }
        )
    out["launches"] = launches
    out.update(case.extra)
    for ref in ("base_gemm_roofline", "dense_roofline"):  # the layer this op adapts or replaces
        if f"{ref}_us" in out:
            out[f"modeled_over_{ref}"] = round(out["modeled_us"] / out[f"{ref}_us"], 3)
            out[f"modeled_lsu_over_{ref}"] = round(out["modeled_lsu_us"] / out[f"{ref}_us"], 3)
    out["targets"] = [t(out) for t in case.targets]
    return out


# --- the cases ---------------------------------------------------------------------------------


def sms_for(n: int, n_full: int) -> int:
    return max(1, T.H100_SMS * n // n_full)


def linear_cases(module, s: ShapeSet) -> list[Case]:
    import mhr_ops

    p = s.params
    bs, L, d_in, d_out, r, S, h, tasks = (p[k] for k in ("bs", "L", "d_in", "d_out", "r", "S", "h", "T"))
    dt = getattr(torch, p["dtype"])
    xb = torch.finfo(dt).bits // 8
    sizes = EMULATED_SIZES[s.name]
    dk_in, dk_out = d_in // h, d_out // h
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(h, S, dk_in, r, generator=gen) * 0.02
    B = torch.randn(h, S, r, dk_out, generator=gen) * 0.02
    W = (torch.randn(d_out, d_in, generator=gen) / d_in**0.5).to(dt)
    bias = torch.randn(d_out, generator=gen).to(dt)
    logits = torch.randn(tasks, h * S, generator=gen)

    def task_ids(n: int) -> torch.Tensor:
        return torch.randint(0, tasks, (n,), generator=torch.Generator().manual_seed(n))

    def inputs(n: int):
        g = torch.Generator().manual_seed(n)
        x = torch.randn(n, L, d_in, generator=g).to(dt)
        tids = task_ids(n)
        w = mhr_ops.route(logits, tids, n_skills=S, mode="sigmoid", check_ids=False)
        gy = torch.randn(n, L, d_out, generator=g).to(dt)
        return x, tids, w, gy, torch.arange(n)

    def check_wgrad_grids(records, n):  # the bound replays launch_wgrad's slicing: check it did the same
        rows, sms = n * L, sms_for(n, bs)
        wgrads = [rec for rec in records if kernel_base_name(rec["kernel"]) == "wgrad_kernel"]
        for rec, dk in zip(wgrads, (dk_in, dk_out), strict=True):
            want = T.cdiv(rows, T.wgrad_slices(rows, dk, h, sms))
            if rec["grid"][2] != want:
                raise RuntimeError(f"{s.name}: wgrad_kernel grid {rec['grid']}, the model expects {want} row slices")

    def fwd(n: int) -> list[dict]:
        x, _, w, _, groups = inputs(n)

        def call():
            with torch.no_grad():
                mhr_ops.mhr_linear(x, W, bias, A, B, w, groups, scale=1.0 / r, check_ids=False)

        return count_launches(module, call, sms_for(n, bs))

    def fwd_bwd(n: int) -> list[dict]:
        x, _, w, gy, groups = inputs(n)
        x = x.requires_grad_()
        a, b, wl = A.clone().requires_grad_(), B.clone().requires_grad_(), w.detach().requires_grad_()

        def call():
            mhr_ops.mhr_linear(x, W, bias, a, b, wl, groups, scale=1.0 / r, check_ids=False).backward(gy)

        records = count_launches(module, call, sms_for(n, bs))
        if not tensor_cores:  # the tensor-core wgrad's grid does not depend on the SM count
            check_wgrad_grids(records, n)
        return records

    def route_fwd(n: int) -> list[dict]:
        _, tids, _, _, _ = inputs(n)

        def call():
            with torch.no_grad():
                mhr_ops.route(logits, tids, n_skills=S, mode="sigmoid", check_ids=False)

        return count_launches(module, call, sms_for(n, bs))

    def route_fwd_bwd(n: int) -> list[dict]:
        _, tids, _, _, _ = inputs(n)
        lg = logits.clone().requires_grad_()
        gw = torch.randn(n, h, S, generator=torch.Generator().manual_seed(1))

        def call():
            mhr_ops.route(lg, tids, n_skills=S, mode="relaxed_bernoulli", check_ids=False).backward(gw)

        return count_launches(module, call, sms_for(n, bs))

    rows = bs * L
    tasks_used = len(set(task_ids(bs).tolist()))  # the route cases run at full size, on these ids
    shape = T.LinearShape(rows, d_in, d_out, r, S, h, bs, L, xb)
    pairs_in = T.tile_group_pairs(rows, L, T.SHRINK_ROWS)
    pairs_out = T.tile_group_pairs(rows, L, T.EXPAND_ROWS)
    # The emulated sizes must take the full size's path (tensor cores or SIMT).
    tensor_cores = T.uses_tensor_cores(8 * xb, rows)
    if any(T.uses_tensor_cores(8 * xb, n * L) != tensor_cores for n in sizes):
        raise ValueError(f"{s.name}: emulated sizes {sizes} x {L} rows would not take the full size's kernels")
    if tensor_cores:
        shrink_fwd = ("tc_shrink_kernel", T.tc_shrink_simt_flops(rows, r, S, h, dk_in))
        expand_fwd = ("tc_expand_kernel", T.tc_expand_simt_flops(rows, r, S, h, dk_out))
        bwd_plan = [
            ("tc_shrink_kernel", T.tc_shrink_simt_flops(rows, r, S, h, dk_out)),  # gz = grad_y B_g^T
            ("tc_expand_kernel", T.tc_expand_simt_flops(rows, r, S, h, dk_in)),  # dx = gz A_g^T
            ("tc_wgrad_kernel", T.tc_wgrad_simt_flops(rows, r, S, h, dk_in)),  # dA, dweights
            ("tc_wgrad_kernel", T.tc_wgrad_simt_flops(rows, r, S, h, dk_out)),  # dB, dweights
        ]
    else:
        shrink_fwd = ("shrink_kernel", T.shrink_simt_flops(rows, r, S, h, dk_in, pairs_in))
        expand_fwd = ("expand_kernel", T.expand_simt_flops(rows, r, S, d_out, pairs_out))
        bwd_plan = [
            ("shrink_kernel", T.shrink_simt_flops(rows, r, S, h, dk_out, pairs_in)),  # gz = grad_y B_g^T
            ("expand_kernel", T.expand_simt_flops(rows, r, S, d_in, pairs_out)),  # dx += gz A_g^T
            ("wgrad_kernel", T.wgrad_simt_flops(rows, r, S, h, dk_in, L)),  # dA, dweights
            ("wgrad_kernel", T.wgrad_simt_flops(rows, r, S, h, dk_out, L)),  # dB, dweights
        ]
    fb, ff = T.adapter_fwd_ideal(shape)
    bb, bf = T.adapter_bwd_ideal(shape)
    base = T.roofline_us(*T.base_gemm_ideal(shape))
    describe = f"x [{bs}, {L}, {d_in}] {p['dtype']} -> {d_out}, r {r}, S {S}, h {h}, {bs} groups"

    cases = [
        Case(
            f"{s.name} routed_lora fwd",
            f"routed_lora fwd (mhr_linear's adapter): {shrink_fwd[0]} + {expand_fwd[0]}, accumulating into the base "
            "output",
            bs,
            sizes,
            fwd,
            (fb, ff),
            [shrink_fwd, expand_fwd],
            extra={"shape": describe, "base_gemm_roofline_us": round(base, 3)},
        ),
        Case(
            f"{s.name} routed_lora fwd+bwd",
            "routed_lora fwd+bwd (mhr_linear's adapter; dx, dA, dB, dweights): shrink, expand, then shrink, "
            "expand, 2x wgrad",
            bs,
            sizes,
            fwd_bwd,
            (fb + bb, ff + bf),
            [shrink_fwd, expand_fwd, *bwd_plan],
            extra={"shape": describe, "base_gemm_roofline_us": round(2 * base, 3)},
        ),
        Case(
            f"{s.name} route fwd",
            "route fwd (sigmoid): route_fwd_kernel",
            bs,
            (bs,),
            route_fwd,
            T.route_ideal(tasks, tasks_used, bs, h, S),
            [("route_fwd_kernel", T.route_fwd_simt_flops(bs, h, S))],
            extra={"shape": f"T {tasks}, h {h}, S {S}, G {bs}"},
        ),
        Case(
            f"{s.name} route fwd+bwd",
            "route fwd+bwd (relaxed_bernoulli): route_fwd_kernel + route_bwd_kernel",
            bs,
            (bs,),
            route_fwd_bwd,
            T.route_ideal(tasks, tasks_used, bs, h, S, backward=True, noise=True),
            [
                ("route_fwd_kernel", T.route_fwd_simt_flops(bs, h, S)),
                ("route_bwd_kernel", T.route_bwd_simt_flops(bs, h, S)),
            ],
            extra={"shape": f"T {tasks}, h {h}, S {S}, G {bs}"},
        ),
    ]
    if s.name == "gpu-train":  # the issue's targets
        cases[0].targets += [
            lambda c: target("roofline_us / modeled_us", c["roofline_over_modeled"], ">=", 0.8),
            lambda c: target("roofline_us / modeled_lsu_us", c["roofline_over_modeled_lsu"], ">=", 0.8),
            lambda c: target("sectors per 128-byte request", c["sectors_per_request"], "<=", 4.5),
        ]
        cases[1].targets.append(
            lambda c: target("counted_bytes / ideal_bytes", c["counted_over_ideal_bytes"], "<=", 1.3)
        )
    return cases


def moh_cases(module, s: ShapeSet) -> list[Case]:
    import mhr_ops

    p = s.params
    N, H, Dh, D, n_shared, top_k = (p[k] for k in ("N", "H", "Dh", "D", "n_shared", "top_k"))
    dt = getattr(torch, p["dtype"])
    eb = torch.finfo(dt).bits // 8
    sizes = EMULATED_SIZES[s.name]
    n_routed = H - n_shared
    gen = torch.Generator().manual_seed(0)
    base_rows = sizes[0]
    # The larger sizes repeat the first one's rows, so every count is exactly affine in the rows.
    routed = torch.randn(base_rows, n_routed, generator=gen).to(dt)
    shared = torch.randn(base_rows, n_shared, generator=gen).to(dt)
    stage = torch.randn(base_rows, 2, generator=gen).to(dt)
    o_rows = torch.randn(base_rows, H, Dh, generator=gen).to(dt)
    weight = (torch.randn(D, H * Dh, generator=gen) / (H * Dh) ** 0.5).to(dt)
    bias = torch.randn(D, generator=gen).to(dt)

    def rows_of(t: torch.Tensor, n: int) -> torch.Tensor:
        if n % base_rows:
            raise ValueError(f"moh sizes: expected multiples of {base_rows}, got {n}")
        return t.repeat(n // base_rows, *([1] * (t.dim() - 1)))

    def gates_of(n: int, requires_grad: bool = False):
        lr, ls, lst = (rows_of(t, n).requires_grad_(requires_grad) for t in (routed, shared, stage))
        return mhr_ops.head_gates(lr, top_k=top_k, shared_logits=ls, stage_logits=lst, n_shared=n_shared), (lr, ls, lst)

    tensor_cores = eb == 2  # gated_head_proj_cuda.cu: fp16 / bf16 on tensor cores, else SIMT
    tile_rows = T.GHP_TC_ROWS if tensor_cores else T.GHP_ROWS
    if base_rows % tile_rows:
        raise ValueError(f"moh sizes: expected multiples of {tile_rows} rows, got {base_rows}")
    with torch.no_grad():
        base_gates, _ = gates_of(base_rows)
    open_mask = base_gates != 0
    open_pairs_base = int(open_mask.sum())
    open_tile_heads_base = sum(
        int(open_mask[t0 : t0 + T.GHP_ROWS].any(0).sum()) for t0 in range(0, base_rows, T.GHP_ROWS)
    )
    open_pairs = open_pairs_base * N // base_rows
    open_tile_heads = open_tile_heads_base * N // base_rows
    slots = T.gated_head_proj_tc_slots(open_mask) * N // base_rows
    if tensor_cores:
        proj_kernel = "gated_head_proj_tc_kernel"
        proj_simt = T.gated_head_proj_tc_simt_flops(N, D, slots)
    else:
        proj_kernel = "gated_head_proj_kernel"
        proj_simt = T.gated_head_proj_simt_flops(N, D, Dh, open_pairs, open_tile_heads)

    def check_tc_flops(records: list[dict], n: int) -> None:  # the bound replays the kernel's packing
        if not tensor_cores:
            return
        expected = T.gated_head_proj_tc_flops(T.gated_head_proj_tc_slots(open_mask) * n // base_rows, D, Dh)
        counted = sum(r["tensor_core_flops"] for r in records)
        if counted != expected:
            raise RuntimeError(f"gated_head_proj_tc_kernel ran {counted} tensor-core flops, the model says {expected}")

    shape = T.MohShape(N, H, Dh, D, n_shared, top_k, eb)
    dense = T.roofline_us(*T.dense_proj_ideal(shape))
    open_fraction = open_pairs_base / (base_rows * H)

    def proj(n: int) -> list[dict]:
        o = rows_of(o_rows, n)
        with torch.no_grad():
            g, _ = gates_of(n)
        records = count_launches(module, lambda: mhr_ops.gated_head_proj(o, g, weight, bias), T.H100_SMS)
        check_tc_flops(records, n)
        return records

    def gates_fwd(n: int) -> list[dict]:
        def call():
            with torch.no_grad():
                gates_of(n)

        return count_launches(module, call, T.H100_SMS)

    def gates_fwd_bwd(n: int) -> list[dict]:
        gg = rows_of(torch.randn(base_rows, H, generator=torch.Generator().manual_seed(1)).to(dt), n)

        def call():
            g, _ = gates_of(n, requires_grad=True)
            g.backward(gg)

        return count_launches(module, call, T.H100_SMS)

    describe = f"N {N}, {H} heads of {Dh} ({n_shared} shared + top-{top_k} of {n_routed}), D {D}, {p['dtype']}"
    return [
        Case(
            f"{s.name} gated_head_proj fwd",
            f"gated_head_proj fwd: {proj_kernel}" + ("" if tensor_cores else " (SIMT)"),
            N,
            sizes,
            proj,
            T.gated_head_proj_ideal(shape, open_pairs),
            [(proj_kernel, proj_simt)],
            extra={
                "shape": describe,
                "open_head_fraction": round(open_fraction, 4),
                "packed_slot_fraction": round(slots / (N * H), 4),
                "dense_roofline_us": round(dense, 3),
            },
            targets=[
                lambda c: target("modeled_us / dense roofline_us", c["modeled_over_dense_roofline"], "<=", 0.85),
                lambda c: target(
                    "modeled_lsu_us / dense roofline_us", c["modeled_lsu_over_dense_roofline"], "<=", 0.85
                ),
            ],
        ),
        Case(
            f"{s.name} head_gates fwd",
            "head_gates fwd: head_gates_fwd_kernel",
            N,
            sizes,
            gates_fwd,
            T.head_gates_ideal(shape),
            [("head_gates_fwd_kernel", T.head_gates_fwd_simt_flops(N, n_shared, n_routed))],
            extra={"shape": describe, "dense_roofline_us": round(dense, 3)},
        ),
        Case(
            f"{s.name} head_gates fwd+bwd",
            "head_gates fwd+bwd: head_gates_fwd_kernel + head_gates_bwd_kernel",
            N,
            sizes,
            gates_fwd_bwd,
            T.head_gates_ideal(shape, backward=True),
            [
                ("head_gates_fwd_kernel", T.head_gates_fwd_simt_flops(N, n_shared, n_routed)),
                ("head_gates_bwd_kernel", T.head_gates_bwd_simt_flops(N, n_shared, n_routed)),
            ],
            extra={"shape": describe},
        ),
    ]


def moe_cases(module, s: ShapeSet) -> list[Case]:
    import mhr_ops

    p = s.params
    N, d_in, d_out, E, k, r = (p[key] for key in ("N", "d_in", "d_out", "E", "k", "r"))
    dt = getattr(torch, p["dtype"])
    xb = torch.finfo(dt).bits // 8
    sizes = EMULATED_SIZES[s.name]
    base_rows, scale = sizes[0], 2.0
    # The larger sizes repeat the first one's rows and routing in whole row blocks, so every
    # count (each block's sort, each expert's slots in the wgrad) is exactly affine in the rows.
    if base_rows % T.MOE_ROW_BLOCK or any(n % base_rows for n in (*sizes, N)):
        raise ValueError(
            f"{s.name} sizes {sizes}, N {N}: expected multiples of {base_rows}, itself of {T.MOE_ROW_BLOCK}"
        )
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(E, d_in, r, generator=gen) * d_in**-0.5  # fp32, as MoELoRALinear keeps them
    B = torch.randn(E, r, d_out, generator=gen) * r**-0.5
    # MoELoRALinear's routing: softmax, top-k, renormalized over the kept experts
    top_w, ids0 = torch.softmax(torch.randn(base_rows, E, generator=gen), -1).topk(k, -1)
    w0 = top_w / top_w.sum(-1, keepdim=True)
    if len(set(ids0.flatten().tolist())) != E:  # at full size every expert is used: the weights' fixed part
        raise ValueError(f"{s.name}: the {base_rows} emulated rows do not use all {E} experts")
    x0, y0 = (torch.randn(base_rows, d, generator=gen).to(dt) for d in (d_in, d_out))
    gy0 = torch.randn(base_rows, d_out, generator=gen).to(dt)

    def rows_of(t: torch.Tensor, n: int) -> torch.Tensor:
        return t.repeat(n // base_rows, 1)

    def check_grids(records: list[dict], n: int) -> None:  # the bounds replay the launchers' grids
        for rec in records:
            name, want = kernel_base_name(rec["kernel"]), None
            if name in ("moe_rows_kernel", "moe_tc_rows_kernel"):
                want = T.cdiv(n, T.MOE_ROW_BLOCK)
            elif name == "moe_wgrad_kernel":
                want = T.moe_wgrad_tasks(E, d_in, d_out)
            elif name == "moe_tc_wgrad_kernel":
                want = T.moe_wgrad_tc_tasks(E, d_in, d_out)
            elif name in ("moe_plan_count_kernel", "moe_plan_fill_kernel"):
                want = E
            if want is not None and tuple(rec["grid"]) != (want, 1, 1):
                raise RuntimeError(f"{s.name}: {name} grid {rec['grid']}, the model expects ({want}, 1, 1)")

    def fwd(n: int) -> list[dict]:
        x, w, ids, out = rows_of(x0, n), rows_of(w0, n), rows_of(ids0, n), rows_of(y0, n)

        def call():
            with torch.no_grad():  # MoELoRALinear without autograd: moe_lora_add_ into the base output
                mhr_ops.moe_lora(x, A, B, w, ids, scale=scale, out=out, check_ids=False)

        records = count_launches(module, call, T.H100_SMS)  # the moe launchers' grids ignore the SM count
        check_grids(records, n)
        return records

    def fwd_bwd(n: int) -> list[dict]:
        x, w, ids, gy = (
            rows_of(x0, n).requires_grad_(),
            rows_of(w0, n).requires_grad_(),
            rows_of(ids0, n),
            rows_of(gy0, n),
        )
        a, b = A.clone().requires_grad_(), B.clone().requires_grad_()

        def call():
            mhr_ops.moe_lora(x, a, b, w, ids, scale=scale, check_ids=False).backward(gy)

        records = count_launches(module, call, T.H100_SMS)
        check_grids(records, n)
        return records

    shape = T.MoeShape(N, d_in, d_out, E, k, r, xb)
    fb, ff = T.moe_fwd_ideal(shape, accumulate=True)
    tb, tf = T.moe_fwd_ideal(shape, accumulate=False)
    bb, bf = T.moe_bwd_ideal(shape)
    base = T.roofline_us(*T.gemm_ideal(N, d_in, d_out, xb))
    bits = 8 * xb
    rows_kernel = T.moe_rows_kernel_name(bits, N)
    if any(T.moe_rows_kernel_name(bits, n) != rows_kernel for n in sizes):
        raise ValueError(f"{s.name}: sizes {sizes} and N {N} do not all run {rows_kernel}")
    if bits == 16:  # fp16 / bf16 data: the tensor-core weight gradients
        wgrad_kernel, wgrad_bound = "moe_tc_wgrad_kernel", T.moe_wgrad_tc_simt_flops(N, k, r, d_in, d_out, E)
    else:
        wgrad_kernel, wgrad_bound = "moe_wgrad_kernel", T.moe_wgrad_simt_flops(N, k, r, d_in, d_out, experts_used=E)
    describe = (
        f"x [{N}, {d_in}] {p['dtype']} -> {d_out}, E {E}, top-{k}, r {r}, A / B fp32; softmax top-{k} routing of "
        f"{base_rows} random rows, repeated"
    )
    issue = [  # issue 15: the adapter path within 0.8 of the HBM roofline on the GPU, modeled
        lambda c: target("roofline_us / modeled_us", c["roofline_over_modeled"], ">=", 0.8),
        lambda c: target("roofline_us / modeled_lsu_us", c["roofline_over_modeled_lsu"], ">=", 0.8),
    ]
    return [
        Case(
            f"{s.name} moe_lora fwd",
            f"moe_lora fwd into the base output (moe_lora_add_, MoELoRALinear without autograd): {rows_kernel}",
            N,
            sizes,
            fwd,
            (fb, ff),
            [(rows_kernel, T.moe_rows_flops_bound(bits, N, k, E, r, d_in, d_out, accumulate=True))],
            extra={"shape": describe, "base_gemm_roofline_us": round(base, 3)},
            targets=list(issue),
        ),
        Case(
            f"{s.name} moe_lora fwd+bwd",
            f"moe_lora fwd+bwd (dx, dA, dB, dweights): {rows_kernel}, then {rows_kernel} (gz, dw, dx), "
            f"the slot plan (count, scan, fill) and {wgrad_kernel} (dA, dB)",
            N,
            sizes,
            fwd_bwd,
            (tb + bb, tf + bf),
            [
                (rows_kernel, T.moe_rows_flops_bound(bits, N, k, E, r, d_in, d_out)),
                (rows_kernel, T.moe_rows_flops_bound(bits, N, k, E, r, d_out, d_in, backward=True)),
                ("moe_plan_count_kernel", T.moe_plan_count_simt_flops(N, k, E)),
                ("moe_plan_scan_kernel", T.moe_plan_scan_simt_flops(E)),
                ("moe_plan_fill_kernel", T.moe_plan_fill_simt_flops(N, k, E)),
                (wgrad_kernel, wgrad_bound),
            ],
            extra={"shape": describe, "base_gemm_roofline_us": round(2 * base, 3)},
            targets=list(issue),
        ),
    ]


def target(what: str, value: float, op: str, bound: float) -> dict:
    met = value >= bound if op == ">=" else value <= bound
    return {"what": what, "value": value, "target": f"{op} {bound}", "met": bool(met)}


CASE_BUILDERS = {"linear": linear_cases, "moh": moh_cases, "moe": moe_cases}


def format_case(c: dict) -> str:
    def us(v: float) -> str:
        return f"{v:.1f} us" if v < 1000 else f"{v / 1e3:.2f} ms"

    line = (
        f"  {c['name']:<28} modeled {us(c['modeled_us']):>9} (LSU-bound {us(c['modeled_lsu_us']):>9})  "
        f"roofline {us(c['roofline_us']):>9}  counted/ideal bytes {c['counted_over_ideal_bytes']:>5.2f}  "
        f"sectors/req {c['sectors_per_request']:>5.2f}"
    )
    for t in c["targets"]:
        line += f"\n      target {t['what']} {t['target']}: {t['value']} ({'met' if t['met'] else 'NOT met'})"
    return line


def merge_records(record: dict, part: dict) -> dict:
    """``record`` with its cases of part's shape sets replaced by part's, the other cases kept as
    they were (under the record's commit and command); part's commit and command are listed under
    "merged". Both must use the same model (ceilings and formulas)."""
    if record["model"] != part["model"]:
        raise ValueError("the records to merge use different models (ceilings or formulas); rerun every shape set")
    sets = sorted({c["name"].split(" ", 1)[0] for c in part["cases"]})
    kept = [c for c in record["cases"] if c["name"].split(" ", 1)[0] not in sets]
    merged = [m for m in record.get("merged", []) if not set(m["shape_sets"]) <= set(sets)]
    merged.append({"shape_sets": sets, "commit": part["commit"], "command": part["command"]})
    complete = bool(record.get("complete")) and bool(part.get("complete"))
    return {**record, "cases": kept + part["cases"], "merged": merged, "complete": complete}


def run(
    shapes: list[str] | None = None,
    json_path: str | None = None,
    log: Callable[[str], None] = print,
    merge: bool = False,
) -> dict:
    """Runs the emulated cases of the shape sets (default: EMULATED_SHAPES); returns the record and
    writes it to json_path, or with ``merge`` into the record already there (merge_records).
    Raises EmulationMissing when the module is not built."""
    import mhr_ops

    previous = None
    if merge:
        if not json_path:
            raise ValueError("merge: expected the path of a record to merge into")
        with open(json_path) as f:
            previous = json.load(f)
    module = load_module()
    names = shapes or EMULATED_SHAPES
    unknown = [n for n in names if n not in EMULATED_SIZES]
    if unknown:
        raise ValueError(
            f"shape set(s) {', '.join(unknown)} have no emulated cases; emulated: {', '.join(EMULATED_SIZES)}"
        )
    cases = []
    record = {
        "commit": mhr_ops.build_info()["commit"],
        "command": "python -m mhr_ops bench --emulated"
        + (f" --shapes {','.join(names)}" if shapes else "")
        + (" --merge" if merge else ""),
        "model": {
            "what": "modeled from counted emulation traffic: an estimate, not a measurement (bench/NOTES.md)",
            "hbm_bytes_per_s": T.HBM_BYTES_PER_S,
            "tensor_flops": T.TENSOR_FLOPS,
            "simt_flops": T.SIMT_FLOPS,
            "roofline_us": "max(ideal_bytes / hbm, ideal_flops / tensor) * 1e6",
            "modeled_us": "max(counted_bytes / hbm, tc_flops / tensor, simt_flops / simt) * 1e6",
            "modeled_lsu_us": "modeled_us with simt / 8: two load instructions per FMA in the SIMT inner loops",
            "counted_bytes": "32 * (distinct sectors read + distinct sectors written): DRAM traffic with a perfect L2",
        },
        "cases": cases,
    }

    def write(complete: bool) -> None:  # after every case: an interrupted run keeps what it measured
        if json_path:
            record["complete"] = complete
            with open(json_path, "w") as f:
                json.dump(merge_records(previous, record) if previous else record, f, indent=1)
                f.write("\n")

    for name in names:
        s = SHAPE_SETS[name]
        for case in CASE_BUILDERS[s.kind](module, s):
            log(f"emulating {case.name} at n = {', '.join(map(str, case.sizes))} (full: {case.n_full}) ...")
            cases.append(evaluate(case))
            log(format_case(cases[-1]))
            write(complete=False)
    write(complete=True)
    if json_path:
        log(f"wrote {json_path}")
    return record
