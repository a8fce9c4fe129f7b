"""The timing harness: one way of timing for every case. Implementations take turns within every
rep (machine drift hits all alike), in an order shuffled every rep (no implementation always
follows the same one), inputs rotate by rep index, CUDA is timed with events, and
Python's garbage collector is paused while timing. Every sample is kept, so that statistics can be
taken per implementation (median, quartiles) and per rep pair (ratios and differences of two
implementations timed back to back)."""

from __future__ import annotations

import gc
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass
class Stat:
    """Median and spread of a list of samples: quartiles (q1, q3) and extremes."""

    median: float
    q1: float
    q3: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        if not values:
            raise ValueError("values: expected at least one sample, got none")
        if len(values) == 1:
            v = float(values[0])
            return cls(v, v, v, v, v, 1)
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
        return cls(statistics.median(values), q1, q3, min(values), max(values), len(values))


def per_rep_ratio(samples: dict[str, list[float]], num: str, den: str) -> Stat:
    """``num / den`` within each rep (the two were timed back to back), summarized."""
    return Stat.of([a / b for a, b in zip(samples[num], samples[den], strict=True)])


def per_rep_difference(samples: dict[str, list[float]], a: str, b: str) -> Stat:
    """``a - b`` within each rep (microseconds), summarized."""
    return Stat.of([x - y for x, y in zip(samples[a], samples[b], strict=True)])


def _time_once(fn: Callable[[int], object], i: int, device: torch.device) -> float:
    """One call's time in microseconds."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        fn(i)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e3
    t0 = time.perf_counter()
    fn(i)
    return (time.perf_counter() - t0) * 1e6


def step(fn: Callable, xs: Sequence[torch.Tensor], extras: Sequence[tuple], grad_y: torch.Tensor | None):
    """A timed call ``i``: ``fn(x, *extra)`` on input set ``i % len(xs)``, under ``no_grad``; with
    ``grad_y`` (training), the forward with gradients for x and then the backward of ``grad_y``
    (in y's dtype)."""

    def call(i: int) -> None:
        x, extra = xs[i % len(xs)], extras[i % len(xs)]
        if grad_y is None:
            with torch.no_grad():
                fn(x.requires_grad_(False), *extra)
            return
        y = fn(x.requires_grad_(True), *extra)
        y.backward(grad_y.to(y.dtype))

    return call


def time_side_by_side(
    fns: dict[str, Callable[[int], object]],
    *,
    device: torch.device,
    warmup: int = 5,
    reps: int | None = None,
    budget_s: float = 2.0,
    min_reps: int = 20,
    max_reps: int = 1000,
) -> dict[str, list[float]]:
    """Samples in microseconds of each ``fn(i)`` (i = rep index, for rotating inputs), one per rep.

    Within a rep the implementations take turns in an order shuffled every rep (a seeded shuffle:
    the same sequence every run), so that each follows each other about equally often: a fixed
    order, or its rotations, made the call after a heavy one (PEFT's layer, which leaves the caches
    cold) pay for it in every rep (bench/NOTES.md, session 9).

    With ``reps=None`` the number of reps is chosen so that timing takes about ``budget_s``
    seconds (from the fastest warm-up round: a busy machine's slow round would cut the reps of
    the cases it hits), within ``[min_reps, max_reps]``: fast cases get many
    reps, slow ones at least ``min_reps``; timing stops after ``min_reps`` once it has taken
    twice the budget (the machine got slower). An explicit ``reps`` is always run in full."""
    stop_early = reps is None
    round_us = float("inf")
    for i in range(warmup):
        round_us = min(round_us, sum(_time_once(fn, i, device) for fn in fns.values()))
    if reps is None:
        reps = int(min(max_reps, max(min_reps, budget_s * 1e6 / max(round_us, 1.0))))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()  # as timeit does: a full collection would land on whichever call triggers it
    deadline = time.perf_counter() + 2 * budget_s  # cap when the machine slows down after warm-up
    items, order = list(fns.items()), random.Random(0)
    try:
        for i in range(reps):
            order.shuffle(items)
            for name, fn in items:
                samples[name].append(_time_once(fn, i, device))
            if stop_early and i + 1 >= min_reps and time.perf_counter() > deadline:
                break
    finally:
        if was_enabled:
            gc.enable()
    return samples


def measure_ceilings(device: torch.device) -> dict:
    """The two GPU ceilings, measured here: device-to-device copy bandwidth and bf16 GEMM rate."""
    n = 1 << 28  # 512 MiB of bf16 each way
    src = torch.randn(n, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    t_copy = Stat.of(time_side_by_side({"copy": lambda i: dst.copy_(src)}, device=device, reps=10)["copy"]).median
    m = 8192
    a, b = (torch.randn(m, m, device=device, dtype=torch.bfloat16) for _ in range(2))
    t_mm = Stat.of(time_side_by_side({"mm": lambda i: a @ b}, device=device, reps=10)["mm"]).median
    return {"copy_GBps": 2 * src.numel() * 2 / t_copy / 1e3, "bf16_gemm_TFLOPs": 2 * m**3 / t_mm / 1e6}
