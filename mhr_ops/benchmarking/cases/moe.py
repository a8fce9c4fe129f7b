"""Mixture of LoRA experts: one adapted layer, the bare nn.Linear against base + moe_lora (as
MoELoRALinear runs them: ``moe_lora_linear``, the base layer and the experts in one op) and the two
ways users write it today, gather + bmm (MeteoRA's reference path: each token's selected A and
B gathered, then batched matmuls) and dense einsum + mask (every expert computed, the unselected
ones zero-weighted: its cost grows with E). Forward (no grad) and forward + backward (base frozen,
gradients for x and the experts). Same inputs and routing for all; the router itself is not timed."""

from __future__ import annotations

import torch

import mhr_ops

from ..harness import step, time_side_by_side
from ..results import Result
from ..shapes import ShapeSet

# The targets of the mixture-of-LoRA-experts issue for the CPU set "moe" (time vs the bare layer).
TARGETS = {"moe": {"fwd": 1.08, "fwd+bwd": 1.2, "gather_speedup": 3.0, "dense_speedup": 1.05}}


def _implementations(base, A, B, scale):
    N_E = A.shape[0]

    def ours(x, w, ids):
        return mhr_ops.moe_lora_linear(x, base.weight, base.bias, A, B, w, ids, scale=scale, check_ids=False)

    def gather_bmm(x, w, ids):
        n, k = ids.shape
        z = torch.bmm(x.unsqueeze(1).expand(n, k, -1).reshape(n * k, 1, -1), A[ids.reshape(-1)])
        u = torch.bmm(z, B[ids.reshape(-1)]).view(n, k, -1)
        return base(x) + scale * (w.unsqueeze(-1) * u).sum(1)

    def dense_mask(x, w, ids):
        gates = torch.zeros(x.shape[0], N_E, dtype=x.dtype, device=x.device).scatter_add(1, ids, w)
        z = torch.einsum("nd,edr->ner", x, A) * gates.unsqueeze(-1)
        return base(x) + scale * torch.einsum("ner,erd->nd", z, B)

    return {"bare": lambda x, w, ids: base(x), "mhr_ops": ours, "gather_bmm": gather_bmm, "dense_mask": dense_mask}


def bench_moe(device: torch.device, shape_set: ShapeSet) -> list[Result]:
    p = shape_set.params
    N, d_in, d_out, E, k, r = (p[key] for key in ("N", "d_in", "d_out", "E", "k", "r"))
    dt = getattr(torch, p["dtype"])
    base = torch.nn.Linear(d_in, d_out, device=device, dtype=dt).requires_grad_(False)
    A = (torch.randn(E, d_in, r, device=device) * d_in**-0.5).to(dt).requires_grad_()
    B = (torch.randn(E, r, d_out, device=device) * r**-0.5).to(dt).requires_grad_()
    router = torch.randn(d_in, E, device=device, dtype=dt) * d_in**-0.5
    xs = [torch.randn(N, d_in, device=device, dtype=dt) for _ in range(3)]
    routing = []
    for x in xs:
        w, ids = torch.softmax(x @ router, -1).topk(k, -1)
        routing.append((w / w.sum(-1, keepdim=True), ids))
    gy = torch.randn(N, d_out, device=device, dtype=dt)
    impls = _implementations(base, A, B, scale=2.0)
    with torch.no_grad():  # the four compute the same layer
        outs = {name: fn(xs[0], *routing[0]).float() for name, fn in impls.items() if name != "bare"}
    tol = 1e-2 if dt == torch.float32 else 4 * torch.finfo(dt).eps  # a few roundings of half outputs apart
    for name, y in outs.items():
        torch.testing.assert_close(y, outs["dense_mask"], atol=tol, rtol=tol, msg=f"{name} differs from dense_mask")
    targets = TARGETS.get(shape_set.name, {})
    results = []
    for train in (False, True):
        case = "fwd+bwd" if train else "fwd"
        calls = {name: step(fn, xs, routing, gy if train else None) for name, fn in impls.items()}
        samples = time_side_by_side(calls, device=device)
        result = Result(shape_set.name, case, dict(p), "bare", samples)
        result.ratio("mhr_ops", "bare", target=targets.get(case))
        result.ratio("gather_bmm", "bare")
        result.ratio("dense_mask", "bare")
        result.ratio(
            "gather_bmm", "mhr_ops", better="higher", target=targets.get("gather_speedup") if not train else None
        )
        result.ratio(
            "dense_mask", "mhr_ops", better="higher", target=targets.get("dense_speedup") if not train else None
        )
        results.append(result)
    return results
