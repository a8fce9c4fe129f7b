"""The case families: each ``bench_KIND(device, shape_set)`` returns a list of ``Result``."""

from .linear import bench_linear
from .moe import bench_moe
from .moh import bench_moh
from .route import bench_route
from .serve import bench_serve

CASES = {"linear": bench_linear, "route": bench_route, "moh": bench_moh, "moe": bench_moe, "serve": bench_serve}

__all__ = ["CASES", "bench_linear", "bench_moe", "bench_moh", "bench_route", "bench_serve"]
