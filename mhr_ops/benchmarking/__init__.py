"""Benchmarks of mhr_ops against the bare layer, PEFT and the float64 reference.

- ``harness``: timing (implementations interleaved rep by rep, all samples kept) and statistics;
- ``shapes``: the named shape sets (``SHAPE_SETS``, ``DEFAULT_SHAPES``);
- ``layers``: PEFT and mhr_ops layers built with the same weights;
- ``cases``: one module per case family (linear, serve, route, moh);
- ``report``: tables and the JSON record; ``plot``: the PNG (matplotlib).

``python -m mhr_ops bench`` calls :func:`run`; ``bench/`` (pytest-benchmark) imports the public
names."""

from __future__ import annotations

import torch

from .cases import CASES
from .harness import Stat, per_rep_difference, per_rep_ratio, time_side_by_side
from .layers import mhr_linear_like, peft_poly_linear, peft_router
from .report import NOTES, format_shape_set, record, write_json
from .results import Metric, Result
from .shapes import DEFAULT_SHAPES, SHAPE_SETS, ShapeSet, resolve

__all__ = [
    "CASES",
    "DEFAULT_SHAPES",
    "NOTES",
    "SHAPE_SETS",
    "Metric",
    "Result",
    "ShapeSet",
    "Stat",
    "format_shape_set",
    "mhr_linear_like",
    "peft_poly_linear",
    "peft_router",
    "per_rep_difference",
    "per_rep_ratio",
    "record",
    "resolve",
    "run",
    "time_side_by_side",
    "write_json",
]


def run(
    device: torch.device, shapes: list[str] | None = None, json_path: str | None = None, png_path: str | None = None
) -> dict:
    """Run the shape sets (default: the device's), print one table per set, write the JSON record
    and the PNG; return the record."""
    sets = resolve(shapes, device.type)
    results: list[Result] = []
    for shape_set in sets:
        torch.manual_seed(0)
        set_results = CASES[shape_set.kind](device, shape_set)
        print(format_shape_set(shape_set, set_results), flush=True)
        print(flush=True)
        results += set_results
    print(NOTES)
    rec = record(device, sets, results)
    print(f"device: {rec['device']}; torch {rec['torch']}; mhr_ops built from commit {rec['commit']}")
    if json_path:
        write_json(rec, json_path)
        print(f"wrote {json_path}")
    if png_path:
        try:
            from .plot import plot
        except ImportError:
            print(f"not writing {png_path}: matplotlib is missing (pip install matplotlib, or the [demo] extra)")
        else:
            plot(rec, png_path)
            print(f"wrote {png_path}")
    return rec
