"""Benchmark harness: timing done one way for every op (warm-up, device events on CUDA, medians,
rotated fresh random inputs), plus the benchmark cases. Used by ``python -m mhr_ops bench`` and
by ``bench/`` (pytest-benchmark)."""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

import mhr_ops
from mhr_ops import reference


def median_time_us(
    fn: Callable[[object], object], inputs: Sequence[object], *, device: torch.device, warmup: int = 5, reps: int = 30
) -> float:
    """Median wall time of ``fn(inputs[i % len(inputs)])`` in microseconds. Rotating through
    several input sets keeps one set from sitting in cache; CUDA is timed with events."""
    for i in range(warmup):
        fn(inputs[i % len(inputs)])
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for i in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(inputs[i % len(inputs)])
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
    else:
        for i in range(reps):
            t0 = time.perf_counter()
            fn(inputs[i % len(inputs)])
            times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


@dataclass
class Result:
    case: str
    shape: dict
    times_us: dict  # implementation -> median microseconds
    ratios: dict = field(default_factory=dict)  # name -> ratio (> 1: ours faster)


def _peft_router(n_tasks: int, n_splits: int, n_skills: int, device: torch.device):
    from peft.tuners.poly.config import PolyConfig
    from peft.tuners.poly.router import PolyRouter

    router = PolyRouter(PolyConfig(n_tasks=n_tasks, n_skills=n_skills, n_splits=n_splits, r=1)).to(device)
    router.reset()
    return router


def _route_impls(router, logits, grad, *, train: bool, n_skills: int, device: torch.device) -> dict:
    mode = "relaxed_bernoulli" if train else "sigmoid"

    def peft(ids):
        w = router(task_ids=ids, input_ids=None)
        if train:
            w.backward(grad)

    def ours(ids):
        w = mhr_ops.route(logits, ids, n_skills=n_skills, mode=mode, check_ids=False)
        if train:
            w.backward(grad)

    def ref(ids):
        noise = torch.rand(grad.shape, device=device) if train else None
        w = reference.route(logits, ids, n_skills=n_skills, mode=mode, noise=noise)
        if train:
            w.backward(grad.double())

    return {"peft": peft, "mhr_ops": ours, "reference": ref}


def bench_route(device: torch.device, *, n_tasks: int, n_splits: int, n_skills: int, n_groups: int) -> list[Result]:
    """route forward+backward (train: relaxed Bernoulli; eval: sigmoid forward) against PEFT's
    PolyRouter and the float64 reference, on the same logits and task ids."""
    router = _peft_router(n_tasks, n_splits, n_skills, device)
    logits = router.module_logits
    inputs = [torch.randint(0, n_tasks, (n_groups,), device=device) for _ in range(4)]
    grad = torch.randn(n_groups, n_splits, n_skills, device=device)
    shape = dict(T=n_tasks, h=n_splits, S=n_skills, G=n_groups)
    results = []
    for train in (False, True):
        router.train(train)
        fns = _route_impls(router, logits, grad, train=train, n_skills=n_skills, device=device)
        times = {name: median_time_us(fn, inputs, device=device) for name, fn in fns.items()}
        case = "route train fwd+bwd" if train else "route eval fwd"
        results.append(Result(case, shape, times, {"speedup_vs_peft": times["peft"] / times["mhr_ops"]}))
    return results


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def run(device: torch.device, json_path: str | None = None) -> dict:
    results = bench_route(device, n_tasks=16, n_splits=8, n_skills=8, n_groups=16)
    results += bench_route(device, n_tasks=64, n_splits=8, n_skills=8, n_groups=256)
    record = {
        "commit": git_commit(),
        "device": device_name(device),
        "torch": torch.__version__,
        "build": mhr_ops.build_info(),
        "results": [asdict(r) for r in results],
    }
    print(f"{'case':<22} {'shape':<28} {'peft us':>9} {'ours us':>9} {'ref us':>9} {'vs PEFT':>8}")
    for r in results:
        shape = ",".join(f"{k}={v}" for k, v in r.shape.items())
        t = r.times_us
        print(
            f"{r.case:<22} {shape:<28} {t['peft']:>9.1f} {t['mhr_ops']:>9.1f} {t['reference']:>9.1f} "
            f"{r.ratios['speedup_vs_peft']:>7.2f}x"
        )
    if json_path:
        with open(json_path, "w") as f:
            json.dump(record, f, indent=2)
        print(f"wrote {json_path}")
    return record
