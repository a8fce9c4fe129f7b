"""Sparse head gating: the gated output projection against the dense o_proj and the plain-PyTorch
gate-then-linear, forward; and the router + gates against the projection."""

from __future__ import annotations

import torch

import mhr_ops
from mhr_ops.nn import MoHGate

from ..harness import time_side_by_side
from ..results import Result
from ..shapes import ShapeSet


def bench_moh(device: torch.device, shape_set: ShapeSet) -> list[Result]:
    p = shape_set.params
    N, H, Dh, D = p["N"], p["H"], p["Dh"], p["D"]
    dt = getattr(torch, p["dtype"])
    gate = MoHGate(D, H, n_shared=p["n_shared"], top_k=p["top_k"]).to(device, dt)
    weight = torch.randn(D, H * Dh, device=device, dtype=dt) / (H * Dh) ** 0.5
    xs = [torch.randn(N, D, device=device, dtype=dt) for _ in range(3)]
    os_ = [torch.randn(N, H, Dh, device=device, dtype=dt) for _ in range(3)]
    with torch.no_grad():
        gates = [gate(x) for x in xs]
    active = (gates[0] != 0).float().mean().item()

    def fwd(fn):
        def call(i):
            with torch.no_grad():
                fn(i % 3)

        return call

    F = torch.nn.functional
    impls = {
        "dense_o_proj": fwd(lambda i: F.linear(os_[i].reshape(N, H * Dh), weight)),
        "mhr_ops_gated": fwd(lambda i: mhr_ops.gated_head_proj(os_[i], gates[i], weight)),
        "torch_gate_then_linear": fwd(lambda i: F.linear((os_[i] * gates[i].unsqueeze(-1)).reshape(N, H * Dh), weight)),
        "router_and_gates": fwd(lambda i: gate(xs[i])),
    }
    result = Result(
        shape_set.name, "gated o_proj fwd", dict(p), "dense_o_proj", time_side_by_side(impls, device=device)
    )
    result.ratio("mhr_ops_gated", "dense_o_proj")
    result.ratio("torch_gate_then_linear", "dense_o_proj")
    result.ratio("mhr_ops_gated", "torch_gate_then_linear")
    result.ratio("router_and_gates", "mhr_ops_gated", note="the router's share of the projection's time")
    result.extra["open_head_fraction"] = active
    return [result]
