"""Benchmark harness: one way of timing for every op (warm-up, device events on CUDA, medians,
implementations interleaved rep by rep so machine drift hits all alike, inputs rotated, fresh
random data), the benchmark cases, and the named shape sets. Used by ``python -m mhr_ops bench``
and by ``bench/`` (pytest-benchmark)."""

from __future__ import annotations

import gc
import json
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

import mhr_ops
from mhr_ops import reference

# Named shape sets. Linear cases: x [bs, L, d_in] -> d_out, r, S skills, h heads, T tasks.
SHAPES = {
    "cpu-small": dict(kind="linear", bs=8, L=256, d_in=1024, d_out=1024, r=8, S=8, h=8, T=16, dtype="float32"),
    "gpu-train": dict(kind="linear", bs=16, L=512, d_in=4096, d_out=4096, r=16, S=8, h=8, T=16, dtype="bfloat16"),
    # 256 single-token rows (decode), 64 distinct tasks
    "gpu-decode": dict(kind="linear", bs=256, L=1, d_in=4096, d_out=4096, r=16, S=8, h=8, T=64, dtype="bfloat16"),
    # the MHR paper's T0 recipe: rank 1, 64 heads, 8 skills
    "t0-mhr": dict(kind="linear", bs=8, L=512, d_in=2048, d_out=2048, r=1, S=8, h=64, T=16, dtype="bfloat16"),
    "route": dict(kind="route", T=64, h=8, S=8, G=256),
    # Mixture-of-Head attention output projection: 16 shared + top-8 of 16 routed heads (75% open).
    "moh": dict(kind="moh", N=8192, H=32, Dh=128, D=4096, n_shared=16, top_k=8, dtype="bfloat16"),
    "moh-cpu": dict(kind="moh", N=1024, H=16, Dh=64, D=1024, n_shared=8, top_k=4, dtype="float32"),
}
DEFAULT_SHAPES = {
    "cpu": ["cpu-small", "route", "moh-cpu"],
    "cuda": ["gpu-train", "gpu-decode", "t0-mhr", "route", "moh"],
}


def time_side_by_side(
    fns: dict[str, Callable[[int], object]], *, device: torch.device, warmup: int = 3, reps: int = 20
) -> dict[str, float]:
    """Median time in microseconds of each ``fn(i)`` (i = rep index, for rotating inputs). The
    implementations take turns within every rep; CUDA is timed with events. Python's garbage
    collector is paused while timing (as timeit does): with torch, transformers and peft loaded
    one full collection scans millions of objects and lands on whichever call triggers it."""
    for i in range(warmup):
        for fn in fns.values():
            fn(i)
    times: dict[str, list[float]] = {name: [] for name in fns}
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for i in range(reps):
            for name, fn in fns.items():
                if device.type == "cuda":
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    torch.cuda.synchronize(device)
                    start.record()
                    fn(i)
                    end.record()
                    end.synchronize()
                    times[name].append(start.elapsed_time(end) * 1e3)
                else:
                    t0 = time.perf_counter()
                    fn(i)
                    times[name].append((time.perf_counter() - t0) * 1e6)
    finally:
        if was_enabled:
            gc.enable()
    return {name: statistics.median(ts) for name, ts in times.items()}


def measure_ceilings(device: torch.device) -> dict:
    """The two ceilings, measured here: device-to-device copy bandwidth and bf16 GEMM rate."""
    n = 1 << 28  # 512 MiB of bf16 each way
    src = torch.randn(n, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    t_copy = time_side_by_side({"copy": lambda i: dst.copy_(src)}, device=device, reps=10)["copy"]
    m = 8192
    a, b = (torch.randn(m, m, device=device, dtype=torch.bfloat16) for _ in range(2))
    t_mm = time_side_by_side({"mm": lambda i: a @ b}, device=device, reps=10)["mm"]
    return {"copy_GBps": 2 * src.numel() * 2 / t_copy / 1e3, "bf16_gemm_TFLOPs": 2 * m**3 / t_mm / 1e6}


@dataclass
class Result:
    case: str
    shape: dict
    times_us: dict  # implementation -> median microseconds
    ratios: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)


# ---- route ----


def _peft_router(n_tasks: int, n_splits: int, n_skills: int, device: torch.device):
    from peft.tuners.poly.config import PolyConfig
    from peft.tuners.poly.router import PolyRouter

    router = PolyRouter(PolyConfig(n_tasks=n_tasks, n_skills=n_skills, n_splits=n_splits, r=1)).to(device)
    router.reset()
    return router


def _route_impls(router, logits, grad, ids, *, train: bool, n_skills: int) -> dict:
    mode = "relaxed_bernoulli" if train else "sigmoid"

    def peft(i):
        w = router(task_ids=ids[i % len(ids)], input_ids=None)
        if train:
            w.backward(grad)

    def ours(i):
        w = mhr_ops.route(logits, ids[i % len(ids)], n_skills=n_skills, mode=mode, check_ids=False)
        if train:
            w.backward(grad)

    def ref(i):
        noise = torch.rand(grad.shape, device=grad.device) if train else None
        w = reference.route(logits, ids[i % len(ids)], n_skills=n_skills, mode=mode, noise=noise)
        if train:
            w.backward(grad.double())

    return {"peft": peft, "mhr_ops": ours, "reference": ref}


def bench_route(device: torch.device, *, T: int, h: int, S: int, G: int, **_) -> list[Result]:
    """route (eval: sigmoid forward; train: relaxed Bernoulli forward+backward) against PEFT's
    PolyRouter and the float64 reference, same logits and task ids."""
    router = _peft_router(T, h, S, device)
    ids = [torch.randint(0, T, (G,), device=device) for _ in range(4)]
    grad = torch.randn(G, h, S, device=device)
    results = []
    for train in (False, True):
        router.train(train)
        impls = _route_impls(router, router.module_logits, grad, ids, train=train, n_skills=S)
        times = time_side_by_side(impls, device=device)
        case = "route train fwd+bwd" if train else "route eval fwd"
        results.append(
            Result(case, dict(T=T, h=h, S=S, G=G), times, {"speedup_vs_peft": times["peft"] / times["mhr_ops"]})
        )
    return results


# ---- routed LoRA linear layer ----


def _peft_poly_linear(d_in, d_out, r, S, h, T, device, dtype):
    from peft.tuners.poly.config import PolyConfig
    from peft.tuners.poly.layer import Linear as PolyLinear

    base = torch.nn.Linear(d_in, d_out, device=device, dtype=dtype).requires_grad_(False)  # frozen, as in PEFT
    layer = PolyLinear(base, "default", PolyConfig(r=r, n_tasks=T, n_skills=S, n_splits=h)).to(device)
    with torch.no_grad():
        layer.poly_lora_B["default"].normal_(0, 0.02)  # PEFT zero-inits B; random data, never zeros
    return layer


def bench_linear(device: torch.device, *, bs, L, d_in, d_out, r, S, h, T, dtype, **_) -> list[Result]:
    """PEFT's Poly layer vs route + mhr_linear vs the bare nn.Linear vs the float64 reference
    (route + mhr_linear of mhr_ops.reference), forward (eval) and forward+backward (train), same
    weights and inputs. Adapters fp32 as PEFT keeps them."""
    dt = getattr(torch, dtype)
    layer = _peft_poly_linear(d_in, d_out, r, S, h, T, device, dt)
    base = layer.base_layer
    A, B = layer.poly_lora_A["default"], layer.poly_lora_B["default"]
    logits = layer.poly_router["default"].module_logits
    xs = [torch.randn(bs, L, d_in, device=device, dtype=dt) for _ in range(3)]
    tids = [torch.randint(0, T, (bs,), device=device) for _ in range(3)]
    gy = torch.randn(bs, L, d_out, device=device, dtype=dt)
    groups = torch.arange(bs, device=device)
    shape = dict(bs=bs, L=L, d_in=d_in, d_out=d_out, r=r, S=S, h=h, T=T, dtype=dtype)

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

        def run(fn, train=train):
            def call(i):
                x = xs[i % 3].requires_grad_(train)
                if train:
                    y = fn(x, tids[i % 3])
                    y.backward(gy.to(y.dtype))
                else:
                    with torch.no_grad():
                        fn(x, tids[i % 3])

            return call

        times = time_side_by_side({k: run(f) for k, f in impls.items()}, device=device)
        bare = times["bare"]
        ratios = {
            "ours_vs_bare": times["mhr_ops"] / bare,
            "peft_vs_bare": times["peft"] / bare,
            "speedup_vs_peft": times["peft"] / times["mhr_ops"],
            "speedup_vs_reference": times["reference_fp64"] / times["mhr_ops"],
            # Our overhead is floored at 1% of the bare time (below that it is timing noise, and
            # can even come out negative): the ratio is then a lower bound, flagged below.
            "overhead_reduction_vs_peft": (times["peft"] - bare) / max(times["mhr_ops"] - bare, 0.01 * bare),
        }
        extra = {"ours_overhead_below_1pct_of_bare": times["mhr_ops"] - bare < 0.01 * bare}
        results.append(Result("linear fwd+bwd" if train else "linear fwd", shape, times, ratios, extra))
    if device.type == "cuda":
        results.append(_adapter_roofline(device, xs, A, B, logits, tids, groups, shape, layer))
    return results


def _adapter_roofline(device, xs, A, B, logits, tids, groups, shape, layer) -> Result:
    """The adapter path alone (route + routed_lora into an existing output) against the HBM
    roofline (bytes: read x, read and write y), and peak memory of fwd+bwd vs a plain LoRA."""
    S, r = shape["S"], shape["r"]
    y = torch.empty(xs[0].shape[:-1] + (shape["d_out"],), device=device, dtype=xs[0].dtype)

    def adapter(i):
        with torch.no_grad():
            w = mhr_ops.route(logits, tids[i % 3], n_skills=S, check_ids=False)
            mhr_ops.routed_lora(xs[i % 3], A, B, w, groups, scale=1.0 / r, out=y, check_ids=False)

    def peft_adapter(i):  # PEFT's adapter path as its layer runs it (router, einsums, bmm, add)
        with torch.no_grad():
            layer.eval()
            layer(xs[i % 3], task_ids=tids[i % 3])

    times = time_side_by_side({"mhr_ops_adapter": adapter, "peft_layer_eval": peft_adapter}, device=device)
    nbytes = xs[0].numel() * xs[0].element_size() + 2 * y.numel() * y.element_size()
    ceilings = measure_ceilings(device)
    gbps = nbytes / times["mhr_ops_adapter"] / 1e3
    return Result(
        "adapter path",
        shape,
        times,
        {"adapter_GBps": gbps, "fraction_of_copy_ceiling": gbps / ceilings["copy_GBps"]},
        {"ceilings": ceilings, **_peak_memory(device, xs[0], A, B, logits, tids[0], groups, shape, layer)},
    )


def _peak_memory(device, x, A, B, logits, tids, groups, shape, layer) -> dict:
    """Peak memory of one fwd+bwd: ours vs a plain LoRA layer (x @ A @ B) of the same rank."""
    base, S, r = layer.base_layer, shape["S"], shape["r"]
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


# ---- sparse head gating ----


def bench_moh(device: torch.device, *, N, H, Dh, D, n_shared, top_k, dtype, **_) -> list[Result]:
    """The gated output projection against the dense o_proj and the plain-PyTorch reference
    (gate multiply, then linear), forward; and the router + gates against the projection."""
    from mhr_ops.nn import MoHGate

    dt = getattr(torch, dtype)
    gate = MoHGate(D, H, n_shared=n_shared, top_k=top_k).to(device, dt)
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

    impls = {
        "dense_o_proj": fwd(lambda i: torch.nn.functional.linear(os_[i].reshape(N, H * Dh), weight)),
        "mhr_ops_gated": fwd(lambda i: mhr_ops.gated_head_proj(os_[i], gates[i], weight)),
        "torch_gate_then_linear": fwd(
            lambda i: torch.nn.functional.linear((os_[i] * gates[i].unsqueeze(-1)).reshape(N, H * Dh), weight)
        ),
        "router_and_gates": fwd(lambda i: gate(xs[i])),
    }
    times = time_side_by_side(impls, device=device)
    ratios = {
        "gated_vs_dense": times["mhr_ops_gated"] / times["dense_o_proj"],
        "gated_vs_torch_reference": times["mhr_ops_gated"] / times["torch_gate_then_linear"],
        "router_fraction_of_projection": times["router_and_gates"] / times["mhr_ops_gated"],
    }
    shape = dict(N=N, H=H, Dh=Dh, D=D, n_shared=n_shared, top_k=top_k, dtype=dtype)
    return [Result("moh gated o_proj fwd", shape, times, ratios, {"active_head_fraction": active})]


# ---- driver ----


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def _print_table(results: list[Result]) -> None:
    for r in results:
        shape = ",".join(f"{k}={v}" for k, v in r.shape.items())
        times = "  ".join(f"{k} {v / 1e3:.3f} ms" for k, v in r.times_us.items())
        ratios = "  ".join(f"{k} {v:.2f}" for k, v in r.ratios.items())
        print(f"{r.case:<22} [{shape}]\n    {times}\n    {ratios}")
        for k, v in r.extra.items():
            print(f"    {k}: {v}")


def plot(record: dict, path: str) -> None:
    """PNG of every result's ratios (speedups, fractions of a ceiling), one bar per ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, values = [], []
    for r in record["results"]:
        for name, value in r["ratios"].items():
            labels.append(f"{r['case']}: {name}")
            values.append(value)
    fig, ax = plt.subplots(figsize=(10, 0.35 * len(labels) + 1.5))
    ax.barh(range(len(values)), values, color="tab:blue")
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.invert_yaxis()
    ax.set_xlabel("ratio (see labels: speedups > 1 are better; *_vs_bare and fractions are times or shares)")
    ax.set_title(f"mhr_ops bench on {record['device']} @ {record['commit'][:10]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(
    device: torch.device, shapes: list[str] | None = None, json_path: str | None = None, png_path: str | None = None
) -> dict:
    shapes = shapes or DEFAULT_SHAPES[device.type]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        raise ValueError(f"shapes: unknown {unknown}; known: {sorted(SHAPES)}")
    results: list[Result] = []
    for name in shapes:
        spec = SHAPES[name]
        torch.manual_seed(0)
        bench = {"linear": bench_linear, "route": bench_route, "moh": bench_moh}[spec["kind"]]
        results += bench(device, **spec)
    record = {
        "commit": git_commit(),
        "device": device_name(device),
        "torch": torch.__version__,
        "build": mhr_ops.build_info(),
        "shapes": {name: SHAPES[name] for name in shapes},
        "results": [asdict(r) for r in results],
    }
    _print_table(results)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(record, f, indent=2)
        print(f"wrote {json_path}")
    if png_path:
        try:
            plot(record, png_path)
            print(f"wrote {png_path}")
        except ImportError:
            print(f"not writing {png_path}: matplotlib is missing (pip install 'mhr-ops[bench]')")
    return record
