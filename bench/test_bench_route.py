"""pytest-benchmark view of the route benchmark: `pytest bench/ --benchmark-only`.
The side-by-side table with ratios is `python -m mhr_ops bench`."""

import pytest
import torch

import mhr_ops
from mhr_ops import benchmarks

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
T, H, S, G = 64, 8, 8, 256


@pytest.fixture(scope="module")
def router():
    return benchmarks._peft_router(T, H, S, DEVICE).eval()


@pytest.mark.parametrize("impl", ["peft", "mhr_ops"])
def test_route_eval_forward(benchmark, router, impl):
    ids = torch.randint(0, T, (G,), device=DEVICE)
    if impl == "peft":
        fn = lambda: router(task_ids=ids, input_ids=None)  # noqa: E731
    else:
        fn = lambda: mhr_ops.route(router.module_logits, ids, n_skills=S, check_ids=False)  # noqa: E731
    out = benchmark(fn)
    assert out.shape == (G, H, S)
