"""pytest-benchmark views of the layer and head-gating cases: `pytest bench/ --benchmark-only`.
The side-by-side table with ratios and ceilings is `python -m mhr_ops bench`."""

import pytest
import torch

import mhr_ops
from mhr_ops import benchmarks, reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPE = benchmarks.SHAPES["gpu-train" if DEVICE.type == "cuda" else "cpu-small"]


@pytest.fixture(scope="module")
def layer():
    s = SHAPE
    poly = benchmarks._peft_poly_linear(
        s["d_in"], s["d_out"], s["r"], s["S"], s["h"], s["T"], DEVICE, getattr(torch, s["dtype"])
    )
    return poly.eval()


@pytest.mark.parametrize("impl", ["bare", "peft", "mhr_ops", "reference"])
def test_linear_forward(benchmark, layer, impl):
    s = SHAPE
    x = torch.randn(s["bs"], s["L"], s["d_in"], device=DEVICE, dtype=getattr(torch, s["dtype"]))
    ids = torch.randint(0, s["T"], (s["bs"],), device=DEVICE)
    base, A, B = layer.base_layer, layer.poly_lora_A["default"], layer.poly_lora_B["default"]
    logits = layer.poly_router["default"].module_logits
    groups = torch.arange(s["bs"], device=DEVICE)

    def ours():
        w = mhr_ops.route(logits, ids, n_skills=s["S"], check_ids=False)
        return mhr_ops.mhr_linear(x, base.weight, base.bias, A, B, w, groups, scale=1 / s["r"], check_ids=False)

    def ref():
        w = reference.route(logits, ids, n_skills=s["S"])
        return reference.mhr_linear(x, base.weight, base.bias, A, B, w, groups, scale=1 / s["r"])

    fns = {"bare": lambda: base(x), "peft": lambda: layer(x, task_ids=ids), "mhr_ops": ours, "reference": ref}
    with torch.no_grad():
        out = benchmark(fns[impl])
    assert out.shape == (s["bs"], s["L"], s["d_out"])


@pytest.mark.parametrize("impl", ["dense", "gated", "torch_gate_then_linear"])
def test_gated_head_projection(benchmark, impl):
    s = benchmarks.SHAPES["moh" if DEVICE.type == "cuda" else "moh-cpu"]
    dt = getattr(torch, s["dtype"])
    o = torch.randn(s["N"], s["H"], s["Dh"], device=DEVICE, dtype=dt)
    W = torch.randn(s["D"], s["H"] * s["Dh"], device=DEVICE, dtype=dt) / (s["H"] * s["Dh"]) ** 0.5
    logits = torch.randn(s["N"], s["H"] - s["n_shared"], device=DEVICE, dtype=dt)
    gates = mhr_ops.head_gates(logits, top_k=s["top_k"], n_shared=s["n_shared"])
    flat = o.reshape(s["N"], -1)
    fns = {
        "dense": lambda: torch.nn.functional.linear(flat, W),
        "gated": lambda: mhr_ops.gated_head_proj(o, gates, W),
        "torch_gate_then_linear": lambda: torch.nn.functional.linear((o * gates.unsqueeze(-1)).reshape(s["N"], -1), W),
    }
    out = benchmark(fns[impl])
    assert out.shape == (s["N"], s["D"])
