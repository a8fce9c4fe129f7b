"""CPU serving latency of one adapted layer (eval, ``torch.no_grad()``), as a user serving calls
it: the bare ``F.linear``, PEFT's Poly layer ``layer(x, task_ids=t)`` and ``mhr_ops.nn.MHRLinear``
``module(x, task_ids=t)``, same base layer and adapter tensors. x is ``[N, 1, d]`` with one task
id per row. Plus one training case: the per-layer overhead of forward+backward in train mode
(default routing) over the bare frozen layer, at N 8 with 8 distinct tasks."""

from __future__ import annotations

import torch

from ..harness import time_side_by_side
from ..layers import mhr_linear_like, peft_poly_linear
from ..results import Result
from ..shapes import ShapeSet

# Targets the team tracks: time / bare, per row count (None: not tracked).
TARGET_VS_BARE = {1: 1.3, 8: 1.15, 4096: 1.1}
# The train overhead (mhr_ops - bare, us) measured before the op-layer speed-up
# (bench/results/serve-before.txt, median of mhr_ops - bare); the target is half of it.
TRAIN_OVERHEAD_BEFORE_US: float | None = 2321.0  # commit 0e27b1d, 2 threads, load ~3-4


def bench_serve(device: torch.device, shape_set: ShapeSet) -> list[Result]:
    p = shape_set.params
    d, r, S, h, T = p["d"], p["r"], p["S"], p["h"], p["T"]
    dt = getattr(torch, p["dtype"])
    layer = peft_poly_linear(d, d, r, S, h, T, device, dt)
    module = mhr_linear_like(layer)
    W, b = layer.base_layer.weight, layer.base_layer.bias
    F = torch.nn.functional
    results = []

    layer.eval(), module.eval()
    for n in p["rows"]:
        xs = [torch.randn(n, 1, d, device=device, dtype=dt) for _ in range(3)]
        ts = [torch.randint(0, T, (n,), device=device) for _ in range(3)]

        def eval_call(fn, xs=xs, ts=ts):
            def call(i):
                with torch.no_grad():
                    fn(xs[i % 3], ts[i % 3])

            return call

        impls = {
            "bare": eval_call(lambda x, t: F.linear(x, W, b)),
            "peft": eval_call(lambda x, t: layer(x, task_ids=t)),
            "mhr_ops": eval_call(lambda x, t: module(x, task_ids=t)),
        }
        case = f"eval N={n}" + (f" over {T} tasks" if n > T else "")
        result = Result(
            shape_set.name, case, dict(N=n, d=d, r=r, S=S, h=h, T=T), "bare", time_side_by_side(impls, device=device)
        )
        result.ratio("mhr_ops", "bare", target=TARGET_VS_BARE.get(n))
        result.ratio("peft", "bare")
        results.append(result)

    n = p["train_rows"]
    layer.train(), module.train()
    xs = [torch.randn(n, 1, d, device=device, dtype=dt).requires_grad_() for _ in range(3)]
    ts = [torch.randperm(T, device=device)[:n] for _ in range(3)]
    gy = torch.randn(n, 1, d, device=device, dtype=dt)
    adapters = [layer.poly_lora_A["default"], layer.poly_lora_B["default"], layer.poly_router["default"].module_logits]

    def train_call(fn):
        def call(i):
            x = xs[i % 3]
            x.grad = None
            for t in adapters:  # as a training step's zero_grad(set_to_none=True)
                t.grad = None
            fn(x, ts[i % 3]).backward(gy)

        return call

    impls = {
        "bare": train_call(lambda x, t: layer.base_layer(x)),
        "peft": train_call(lambda x, t: layer(x, task_ids=t)),
        "mhr_ops": train_call(lambda x, t: module(x, task_ids=t)),
    }
    case = f"train fwd+bwd N={n}, {n} tasks"
    result = Result(
        shape_set.name, case, dict(N=n, d=d, r=r, S=S, h=h, T=T), "bare", time_side_by_side(impls, device=device)
    )
    before = TRAIN_OVERHEAD_BEFORE_US
    result.difference(
        "mhr_ops",
        "bare",
        target=None if before is None else before / 2,
        target_note="" if before is None else f"half of {before:.0f} us before",
    )
    result.difference("peft", "bare")
    result.ratio("mhr_ops", "bare")
    result.ratio("peft", "bare")
    results.append(result)
    return results
