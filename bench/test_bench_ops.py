"""pytest-benchmark cases of one adapted layer, of the serving shapes and of head gating.

Each case is one benchmark group whose implementations are parametrized, so pytest-benchmark
prints them in one table, fastest first:

    pytest bench/ --benchmark-only                             # all groups
    pytest bench/ --benchmark-only -k serve                    # one family
    pytest bench/ --benchmark-only --benchmark-autosave        # save to .benchmarks/
    pytest bench/ --benchmark-only --benchmark-compare         # compare with the latest save
    pytest bench/ --benchmark-only --benchmark-compare=0001 --benchmark-compare-fail=median:10%

(bench/ is not in the default testpaths: name it.) The side-by-side report with per-rep ratios,
targets and the plot is ``python -m mhr_ops bench``; both build their layers with
``mhr_ops.benchmarking``."""

import pytest
import torch

import mhr_ops
from mhr_ops import reference
from mhr_ops.benchmarking import SHAPE_SETS, mhr_linear_like, peft_poly_linear

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
LINEAR = SHAPE_SETS["gpu-train" if DEVICE.type == "cuda" else "cpu-small"].params
SERVE = SHAPE_SETS["serve"].params
MOH = SHAPE_SETS["moh" if DEVICE.type == "cuda" else "moh-cpu"].params


@pytest.fixture(scope="module")
def layer():
    s = LINEAR
    dt = getattr(torch, s["dtype"])
    return peft_poly_linear(s["d_in"], s["d_out"], s["r"], s["S"], s["h"], s["T"], DEVICE, dt).eval()


@pytest.mark.benchmark(group="linear eval fwd")
@pytest.mark.parametrize("impl", ["bare", "peft", "mhr_ops", "reference_fp64"])
def test_linear_forward(benchmark, layer, impl):
    s = LINEAR
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

    fns = {"bare": lambda: base(x), "peft": lambda: layer(x, task_ids=ids), "mhr_ops": ours, "reference_fp64": ref}
    with torch.no_grad():
        out = benchmark(fns[impl])
    assert out.shape == (s["bs"], s["L"], s["d_out"])


@pytest.fixture(scope="module")
def serve_layers():
    s = SERVE
    peft_layer = peft_poly_linear(s["d"], s["d"], s["r"], s["S"], s["h"], s["T"], DEVICE, getattr(torch, s["dtype"]))
    return peft_layer.eval(), mhr_linear_like(peft_layer).eval()


@pytest.mark.parametrize("impl", ["bare", "peft", "mhr_ops"])
@pytest.mark.parametrize("n", [1, 8, 4096])
def test_serve_eval(benchmark, serve_layers, impl, n):
    """The serve set's eval cases: x [N, 1, d], one task per row, under torch.no_grad()."""
    benchmark.group = f"serve eval N={n}"
    peft_layer, module = serve_layers
    s = SERVE
    x = torch.randn(n, 1, s["d"], device=DEVICE, dtype=getattr(torch, s["dtype"]))
    ids = torch.randint(0, s["T"], (n,), device=DEVICE)
    base = peft_layer.base_layer
    fns = {
        "bare": lambda: torch.nn.functional.linear(x, base.weight, base.bias),
        "peft": lambda: peft_layer(x, task_ids=ids),
        "mhr_ops": lambda: module(x, task_ids=ids),
    }
    with torch.no_grad():
        out = benchmark(fns[impl])
    assert out.shape == (n, 1, s["d"])


@pytest.mark.benchmark(group="moh gated o_proj fwd")
@pytest.mark.parametrize("impl", ["dense_o_proj", "mhr_ops_gated", "torch_gate_then_linear"])
def test_gated_head_projection(benchmark, impl):
    s = MOH
    dt = getattr(torch, s["dtype"])
    o = torch.randn(s["N"], s["H"], s["Dh"], device=DEVICE, dtype=dt)
    W = torch.randn(s["D"], s["H"] * s["Dh"], device=DEVICE, dtype=dt) / (s["H"] * s["Dh"]) ** 0.5
    logits = torch.randn(s["N"], s["H"] - s["n_shared"], device=DEVICE, dtype=dt)
    gates = mhr_ops.head_gates(logits, top_k=s["top_k"], n_shared=s["n_shared"])
    flat = o.reshape(s["N"], -1)
    fns = {
        "dense_o_proj": lambda: torch.nn.functional.linear(flat, W),
        "mhr_ops_gated": lambda: mhr_ops.gated_head_proj(o, gates, W),
        "torch_gate_then_linear": lambda: torch.nn.functional.linear((o * gates.unsqueeze(-1)).reshape(s["N"], -1), W),
    }
    out = benchmark(fns[impl])
    assert out.shape == (s["N"], s["D"])
