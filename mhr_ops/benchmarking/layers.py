"""The layers the cases compare, built with the same weights: PEFT's Poly router and layer, and an
``mhr_ops.nn.MHRLinear`` that shares a PEFT layer's base layer and adapter tensors. Public, for
``bench/`` (pytest-benchmark) and for anyone timing their own shapes."""

from __future__ import annotations

import torch

from mhr_ops.nn import MHRLinear


def peft_router(n_tasks: int, n_splits: int, n_skills: int, device: torch.device):
    """PEFT's ``PolyRouter`` with its default init."""
    from peft.tuners.poly.config import PolyConfig
    from peft.tuners.poly.router import PolyRouter

    router = PolyRouter(PolyConfig(n_tasks=n_tasks, n_skills=n_skills, n_splits=n_splits, r=1)).to(device)
    router.reset()
    return router


def peft_poly_linear(d_in, d_out, r, S, h, T, device, dtype):
    """PEFT's Poly ``Linear`` around a frozen ``nn.Linear`` (as ``get_peft_model`` leaves it), B
    randomized: PEFT zero-inits B, and a zero adapter would time a no-op."""
    from peft.tuners.poly.config import PolyConfig
    from peft.tuners.poly.layer import Linear as PolyLinear

    base = torch.nn.Linear(d_in, d_out, device=device, dtype=dtype).requires_grad_(False)
    layer = PolyLinear(base, "default", PolyConfig(r=r, n_tasks=T, n_skills=S, n_splits=h)).to(device)
    with torch.no_grad():
        layer.poly_lora_B["default"].normal_(0, 0.02)
    return layer


def mhr_linear_like(peft_layer) -> MHRLinear:
    """An ``MHRLinear`` on the PEFT layer's own base layer whose A, B and routing logits are the
    PEFT layer's tensors (the same Parameters: one update moves both)."""
    A = peft_layer.poly_lora_A["default"]
    B = peft_layer.poly_lora_B["default"]
    logits = peft_layer.poly_router["default"].module_logits
    h, S, _, r = A.shape
    module = MHRLinear(peft_layer.base_layer, r=r, n_skills=S, n_tasks=logits.shape[0], n_splits=h)
    module.A, module.B, module.logits = A, B, logits
    return module
