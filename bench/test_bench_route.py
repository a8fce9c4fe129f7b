"""pytest-benchmark cases of the routing op against PEFT's PolyRouter, one group per mode.

    pytest bench/test_bench_route.py --benchmark-only [--benchmark-autosave | --benchmark-compare]

See bench/test_bench_ops.py and bench/NOTES.md for saving and comparing runs."""

import pytest
import torch

import mhr_ops
from mhr_ops.benchmarking import SHAPE_SETS, peft_router

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ROUTE = SHAPE_SETS["route"].params
T, H, S, G = ROUTE["T"], ROUTE["h"], ROUTE["S"], ROUTE["G"]


@pytest.fixture(scope="module")
def router():
    return peft_router(T, H, S, DEVICE)


@pytest.mark.benchmark(group="route eval fwd")
@pytest.mark.parametrize("impl", ["peft", "mhr_ops"])
def test_route_eval_forward(benchmark, router, impl):
    router.eval()
    ids = torch.randint(0, T, (G,), device=DEVICE)
    fns = {
        "peft": lambda: router(task_ids=ids, input_ids=None),
        "mhr_ops": lambda: mhr_ops.route(router.module_logits, ids, n_skills=S, check_ids=False),
    }
    with torch.no_grad():
        out = benchmark(fns[impl])
    assert out.shape == (G, H, S)


@pytest.mark.benchmark(group="route train fwd+bwd")
@pytest.mark.parametrize("impl", ["peft", "mhr_ops"])
def test_route_train_forward_backward(benchmark, router, impl):
    router.train()
    ids = torch.randint(0, T, (G,), device=DEVICE)
    grad = torch.randn(G, H, S, device=DEVICE)
    fns = {
        "peft": lambda: router(task_ids=ids, input_ids=None),
        "mhr_ops": lambda: mhr_ops.route(
            router.module_logits, ids, n_skills=S, mode="relaxed_bernoulli", check_ids=False
        ),
    }
    benchmark(lambda: fns[impl]().backward(grad))
    assert router.module_logits.grad is not None
