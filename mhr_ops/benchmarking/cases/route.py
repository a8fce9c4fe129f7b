"""The routing op alone: eval (sigmoid forward) and train (relaxed Bernoulli forward+backward),
against PEFT's PolyRouter and the float64 reference, same logits and task ids."""

from __future__ import annotations

import torch

import mhr_ops
from mhr_ops import reference

from ..harness import time_side_by_side
from ..layers import peft_router
from ..results import Result
from ..shapes import ShapeSet


def route_impls(router, logits, grad, ids, *, train: bool, n_skills: int) -> dict:
    """``{name: fn(i)}`` for PEFT's router, ``mhr_ops.route`` and the reference (i rotates ids)."""
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

    return {"peft": peft, "mhr_ops": ours, "reference_fp64": ref}


def bench_route(device: torch.device, shape_set: ShapeSet) -> list[Result]:
    T, h, S, G = (shape_set.params[k] for k in ("T", "h", "S", "G"))
    router = peft_router(T, h, S, device)
    ids = [torch.randint(0, T, (G,), device=device) for _ in range(4)]
    grad = torch.randn(G, h, S, device=device)
    results = []
    for train in (False, True):
        router.train(train)
        impls = route_impls(router, router.module_logits, grad, ids, train=train, n_skills=S)
        case = "train fwd+bwd" if train else "eval fwd"
        result = Result(shape_set.name, case, dict(shape_set.params), "peft", time_side_by_side(impls, device=device))
        result.ratio("mhr_ops", "peft")
        results.append(result)
    return results
