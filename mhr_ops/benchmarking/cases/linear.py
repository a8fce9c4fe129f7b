"""One adapted linear layer: PEFT's Poly layer vs route + mhr_linear vs the bare nn.Linear vs the
float64 reference, forward (eval) and forward+backward (train, base frozen), same weights and
inputs; adapters fp32 as PEFT keeps them. On CUDA also the adapter path alone against the HBM
roofline, and peak memory."""

from __future__ import annotations

import torch

import mhr_ops
from mhr_ops import reference

from ..harness import Stat, measure_ceilings, step, time_side_by_side
from ..layers import peft_poly_linear
from ..results import Metric, Result
from ..shapes import ShapeSet

# Targets the team tracks for cpu-small (bench/NOTES.md): time vs the bare layer, overhead vs PEFT.
TARGETS = {"cpu-small": {"eval fwd": 1.15, "train fwd+bwd": 1.25, "overhead_reduction": 2.5}}


def overhead_reduction(result: Result, ours: str = "mhr_ops", theirs: str = "peft", base: str = "bare") -> Metric:
    """PEFT's overhead over the bare layer divided by ours: the ratio of the medians of the per-rep
    differences, bracketed by the quartiles of both (low = q1 theirs / q3 ours, high = q3 theirs /
    q1 ours; inf when our overhead's q1 is <= 0). It divides two small differences of noisy
    times, so it moves far more than either time; read the bracket, not the median."""
    s = result.samples_us
    d_theirs = Stat.of([a - b for a, b in zip(s[theirs], s[base], strict=True)])
    d_ours = Stat.of([a - b for a, b in zip(s[ours], s[base], strict=True)])
    mid = d_theirs.median / d_ours.median if d_ours.median > 0 else float("inf")
    low = d_theirs.q1 / d_ours.q3 if d_ours.q3 > 0 else float("inf")
    high = d_theirs.q3 / d_ours.q1 if d_ours.q1 > 0 else float("inf")
    return Metric(
        f"({theirs} - {base}) / ({ours} - {base})",
        Stat(mid, low, high, low, high, d_ours.n),
        "x",
        better="higher",
        note="overhead reduction: a ratio of two small noisy differences (see the notes)",
    )


def bench_linear(device: torch.device, shape_set: ShapeSet) -> list[Result]:
    p = shape_set.params
    bs, L, d_in, d_out, r, S, h, T = (p[k] for k in ("bs", "L", "d_in", "d_out", "r", "S", "h", "T"))
    dt = getattr(torch, p["dtype"])
    layer = peft_poly_linear(d_in, d_out, r, S, h, T, device, dt)
    base = layer.base_layer
    A, B = layer.poly_lora_A["default"], layer.poly_lora_B["default"]
    logits = layer.poly_router["default"].module_logits
    xs = [torch.randn(bs, L, d_in, device=device, dtype=dt) for _ in range(3)]
    tids = [torch.randint(0, T, (bs,), device=device) for _ in range(3)]
    gy = torch.randn(bs, L, d_out, device=device, dtype=dt)
    groups = torch.arange(bs, device=device)
    targets = TARGETS.get(shape_set.name, {})

    def ours(x, t, mode):
        w = mhr_ops.route(logits, t, n_skills=S, mode=mode, check_ids=False)
        return mhr_ops.mhr_linear(x, base.weight, base.bias, A, B, w, groups, scale=1.0 / r, check_ids=False)

    def ref(x, t, mode):  # the plain-PyTorch float64 reference of SPEC, route included
        noise = torch.rand(len(t), h, S, device=device) if mode == "relaxed_bernoulli" else None
        w = reference.route(logits, t, n_skills=S, mode=mode, noise=noise)
        return reference.mhr_linear(x, base.weight, base.bias, A, B, w, groups, scale=1.0 / r)

    results = []
    for train in (False, True):
        layer.train(train)
        mode = "relaxed_bernoulli" if train else "sigmoid"
        impls = {
            "bare": lambda x, t: base(x),
            "peft": lambda x, t: layer(x, task_ids=t),
            "mhr_ops": lambda x, t, mode=mode: ours(x, t, mode),
            "reference_fp64": lambda x, t, mode=mode: ref(x, t, mode),
        }

        case = "train fwd+bwd" if train else "eval fwd"
        calls = {k: step(f, xs, [(t,) for t in tids], gy if train else None) for k, f in impls.items()}
        samples = time_side_by_side(calls, device=device)
        result = Result(shape_set.name, case, dict(p), "bare", samples)
        result.ratio("mhr_ops", "bare", target=targets.get(case))
        result.ratio("peft", "bare")
        result.ratio("reference_fp64", "bare")
        result.difference("mhr_ops", "bare")
        result.difference("peft", "bare")
        reduction = overhead_reduction(result)
        reduction.target = targets.get("overhead_reduction")
        result.metrics.append(reduction)
        results.append(result)
    if device.type == "cuda":
        results.append(_adapter_roofline(device, shape_set, xs, A, B, logits, tids, groups, layer))
    return results


def _adapter_roofline(device, shape_set, xs, A, B, logits, tids, groups, layer) -> Result:
    """The adapter path alone (route + routed_lora into an existing output) with its bytes (read x,
    read and write y) and flops (shrink and expand), for the roofline; and peak memory."""
    p = shape_set.params
    S, r = p["S"], p["r"]
    y = torch.empty(xs[0].shape[:-1] + (p["d_out"],), device=device, dtype=xs[0].dtype)

    def adapter(i):
        with torch.no_grad():
            w = mhr_ops.route(logits, tids[i % 3], n_skills=S, check_ids=False)
            mhr_ops.routed_lora(xs[i % 3], A, B, w, groups, scale=1.0 / r, out=y, check_ids=False)

    def peft_layer_eval(i):  # PEFT's whole layer in eval, base GEMM included
        with torch.no_grad():
            layer.eval()
            layer(xs[i % 3], task_ids=tids[i % 3])

    samples = time_side_by_side({"mhr_ops_adapter": adapter, "peft_layer_eval": peft_layer_eval}, device=device)
    rows = xs[0].numel() // p["d_in"]
    extra = {
        "bytes": xs[0].numel() * xs[0].element_size() + 2 * y.numel() * y.element_size(),
        "flops": 2 * rows * r * (p["d_in"] + p["d_out"]),
        "roofline_impl": "mhr_ops_adapter",
        "ceilings": measure_ceilings(device),
        **_peak_memory(device, xs[0], A, B, logits, tids[0], groups, p, layer),
    }
    result = Result(shape_set.name, "adapter path (eval)", dict(p), "peft_layer_eval", samples, extra=extra)
    result.ratio("mhr_ops_adapter", "peft_layer_eval")
    return result


def _peak_memory(device, x, A, B, logits, tids, groups, p, layer) -> dict:
    """Peak memory of one fwd+bwd: ours vs a plain LoRA layer (x @ A @ B) of the same rank."""
    base, S, r = layer.base_layer, p["S"], p["r"]
    lora_a = A[:, 0].reshape(-1, r).detach().clone().requires_grad_()
    lora_b = B[:, 0].transpose(0, 1).reshape(r, -1).detach().clone().requires_grad_()

    def peak(fn):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn().sum().backward()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before

    xg = x.detach().requires_grad_()
    ours = peak(
        lambda: mhr_ops.mhr_linear(
            xg, base.weight, base.bias, A, B, mhr_ops.route(logits, tids, n_skills=S), groups, scale=1 / r
        )
    )
    plain = peak(lambda: base(xg) + (xg @ lora_a.to(x.dtype)) @ lora_b.to(x.dtype) / r)
    return {"peak_bytes_mhr_ops": ours, "peak_bytes_plain_lora": plain}
