"""Printing a run as tables (one per shape set: times with their spread, then the ratios with
targets) and the JSON record (commit of the build, device, every sample)."""

from __future__ import annotations

import json
import math
import platform
from dataclasses import asdict

import torch

import mhr_ops

from .harness import Stat
from .results import Metric, Result
from .shapes import ShapeSet

NOTES = """\
How to read these tables:
  time: median over the reps [q1 - q3, the interquartile range]. The implementations of a case take
    turns within every rep (same inputs, machine drift hits all alike), in an order shuffled every
    rep (each follows each other about equally often); reps are as many as fit in ~2 s of timing per
    case (20 to 1000; cut after 4 s if the machine slows down).
  A / B: A's time over B's within each rep, median [q1 - q3] over the reps; a time ratio, so
    lower is better. bare = the layer without adapter, the floor any adapter pays on top of.
  A - B: A's extra time over B within each rep, in microseconds (the adapter's overhead).
  (peft - bare) / (mhr_ops - bare): how many times smaller our overhead over the bare layer is than
    PEFT's (higher is better). It divides two small differences of noisy times, so it swings far
    more between runs than the times do: the bracket combines both overheads' quartiles, and is
    open (inf) when our overhead's q1 is <= 0, i.e. within the noise of the bare layer.
  target: the bound the team tracks; status says whether the median meets it."""

EXTRA_LABELS = {
    "open_head_fraction": "open heads (fraction of gates that are nonzero)",
    "peak_bytes_mhr_ops": "peak memory of one fwd+bwd, mhr_ops (bytes)",
    "peak_bytes_plain_lora": "peak memory of one fwd+bwd, a plain LoRA of the same rank (bytes)",
}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    n = torch.get_num_threads()
    return f"CPU {platform.processor() or platform.machine()}, {n} thread{'' if n == 1 else 's'}"


def format_time(us: float) -> str:
    return f"{us:.1f} us" if abs(us) < 1000 else f"{us / 1e3:.2f} ms"


def format_stat(stat: Stat, unit: str) -> str:
    if unit == "us":
        scale, suffix = (1.0, " us") if max(abs(stat.q1), abs(stat.q3)) < 1000 else (1e-3, " ms")
        return f"{stat.median * scale:.1f}{suffix} [{stat.q1 * scale:.1f} - {stat.q3 * scale:.1f}]"

    def x(v: float) -> str:
        return "inf" if math.isinf(v) else f"{v:.2f}"

    return f"{x(stat.median)}x [{x(stat.q1)} - {x(stat.q3)}]"


def format_time_stat(stat: Stat) -> str:
    return f"{format_time(stat.median)} [{format_time(stat.q1).split()[0]} - {format_time(stat.q3)}]"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def format_shape_set(shape_set: ShapeSet, results: list[Result]) -> str:
    impls: list[str] = []
    for r in results:
        impls += [name for name in r.samples_us if name not in impls]
    lines = [f"== {shape_set.name}: {shape_set.description}", "time per call, median [q1 - q3]:"]
    rows = [["case", "reps", *impls]]
    for r in results:
        times = r.times
        rows.append([r.case, str(r.reps), *(format_time_stat(times[i]) if i in times else "-" for i in impls)])
    lines.append(_table(rows))
    lines.append("ratios and overheads, per rep, median [q1 - q3]:")
    rows = [["case", "metric", "value", "better", "target", "status"]]
    for r in results:
        for m in r.metrics:
            target = "" if m.target is None else ("<= " if m.better == "lower" else ">= ") + _bound(m)
            rows.append([r.case, m.name, format_stat(m.stat, m.unit), m.better, target, m.status])
    lines.append(_table(rows))
    for r in results:
        for key, value in r.extra.items():
            if key in EXTRA_LABELS:
                shown = f"{value:.2f}" if isinstance(value, float) else f"{value:,}"
                lines.append(f"  {r.case}: {EXTRA_LABELS[key]}: {shown}")
        if "bytes" in r.extra:
            t = r.times[r.extra["roofline_impl"]].median
            gbps = r.extra["bytes"] / t / 1e3
            ceiling = r.extra["ceilings"]["copy_GBps"]
            lines.append(
                f"  {r.case}: {r.extra['roofline_impl']} moves {gbps:.0f} GB/s, "
                f"{gbps / ceiling:.0%} of the measured copy bandwidth ({ceiling:.0f} GB/s)"
            )
    return "\n".join(lines)


def _bound(m: Metric) -> str:
    text = f"{m.target:.0f} us" if m.unit == "us" else f"{m.target:g}x"
    return f"{text} ({m.target_note})" if m.target_note else text


def record(device: torch.device, shape_sets: list[ShapeSet], results: list[Result]) -> dict:
    """The JSON record of a run. ``commit`` is the commit the installed mhr_ops was built from
    (``mhr_ops.build_info()``, stamped by setup.py), not the current directory's repository."""
    build = mhr_ops.build_info()
    return {
        "commit": build["commit"],
        "device": device_name(device),
        "torch": torch.__version__,
        "build": build,
        "shape_sets": {s.name: {"kind": s.kind, "description": s.description, **s.params} for s in shape_sets},
        "results": [
            {
                "shape_set": r.shape_set,
                "case": r.case,
                "shape": r.shape,
                "baseline": r.baseline,
                "reps": r.reps,
                "times_us": {name: asdict(stat) for name, stat in r.times.items()},
                "metrics": [{**asdict(m), "status": m.status} for m in r.metrics],
                "extra": r.extra,
                "samples_us": r.samples_us,
            }
            for r in results
        ],
    }


def write_json(rec: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(rec, f, indent=1, default=lambda v: list(v) if isinstance(v, tuple) else str(v))
