"""The case families: each ``bench_KIND(device, shape_set)`` returns a list of ``Result``."""

from .linear import bench_linear
from .moh import bench_moh
from .route import bench_route
from .serve import bench_serve

CASES = {"linear": bench_linear, "route": bench_route, "moh": bench_moh, "serve": bench_serve}

__all__ = ["CASES", "bench_linear", "bench_moh", "bench_route", "bench_serve"]
