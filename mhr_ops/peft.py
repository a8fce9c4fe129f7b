"""PEFT bridge: PEFT Poly/MHR layers (``peft.tuners.poly``) run mhr_ops kernels with their own
Parameters, state-dict keys, train/eval behaviour and random stream.

    model = get_peft_model(base, PolyConfig(...))
    mhr_ops.peft.accelerate(model)       # this model, in place
    mhr_ops.peft.enable()                # or: every PEFT Poly layer, globally (disable() undoes)

Differences from PEFT, all on purpose: task ids are range-checked once per ids tensor rather than
with a host sync in every layer, and they follow batches that ``generate`` expanded for beams or
``num_return_sequences`` (PEFT's Poly fails there).
"""

from __future__ import annotations

import types

import torch
from torch import nn

from ._tasks import check_merged_task_once, resolve_task_ids
from .lora import mhr_linear, routed_lora
from .routing import route

_original_forward = None


def _poly_linear_cls():
    try:
        from peft.tuners.poly.layer import Linear
    except ImportError as exc:  # pragma: no cover - peft is an optional dependency
        raise ImportError("mhr_ops.peft needs the `peft` package: pip install 'mhr-ops[peft]'") from exc
    return Linear


def _n_tasks(self) -> int:
    return min(self.poly_router[a].module_logits.shape[0] for a in self.active_adapters if a in self.poly_router)


def _routing_weights(layer, adapter: str, ids: torch.Tensor, *, eval_mode: bool = False) -> torch.Tensor:
    router = layer.poly_router[adapter]
    mode = "relaxed_bernoulli" if router.training and not eval_mode else "sigmoid"
    return route(router.module_logits, ids, n_skills=layer.poly_lora_A[adapter].shape[1], mode=mode, check_ids=False)


def accelerated_forward(self, x: torch.Tensor, *args, task_ids=None, **kwargs) -> torch.Tensor:
    """Drop-in for ``peft.tuners.poly.layer.Linear.forward`` running mhr_ops kernels."""
    if self.disable_adapters:
        return self.base_layer(x, *args, **kwargs)
    active = [a for a in self.active_adapters if a in self.poly_lora_A]
    if not active:
        return self.base_layer(x, *args, **kwargs)
    previous_dtype = x.dtype
    merged = self.__dict__.get("_mhr_merged_task")
    if merged is not None:
        if task_ids is not None or getattr(self, "_mhr_task_ids", None) is not None:
            check_merged_task_once(resolve_task_ids(self, task_ids, x, _n_tasks(self)), merged, "PEFT Poly layer")
        return self.base_layer(x, *args, **kwargs).to(previous_dtype)
    ids = resolve_task_ids(self, task_ids, x, _n_tasks(self))
    groups = torch.arange(ids.shape[0], device=x.device)
    base = self.base_layer
    fused = (
        len(active) == 1
        and type(base) is nn.Linear
        and not args
        and not kwargs
        and base.weight.dtype == x.dtype
        and x.dim() > 1
    )
    if fused:
        a = active[0]
        w = _routing_weights(self, a, ids)
        A, B = self.poly_lora_A[a], self.poly_lora_B[a]
        return mhr_linear(x, base.weight, base.bias, A, B, w, groups, scale=1.0 / self.r[a], check_ids=False)
    result = base(x, *args, **kwargs)
    for a in active:
        A, B = self.poly_lora_A[a], self.poly_lora_B[a]
        xa = x if x.dtype == A.dtype else x.to(A.dtype)
        out = result if result.dtype == xa.dtype else result.to(xa.dtype)
        result = routed_lora(
            xa, A, B, _routing_weights(self, a, ids), groups, scale=1.0 / self.r[a], out=out, check_ids=False
        )
    return result.to(previous_dtype)


def _accelerate_layer(layer) -> None:
    layer.forward = types.MethodType(accelerated_forward, layer)
    layer._mhr_n_tasks = types.MethodType(_n_tasks, layer)


def accelerate(peft_model: nn.Module, enabled: bool = True) -> nn.Module:
    """In place: every PEFT Poly layer of ``peft_model`` runs mhr_ops kernels (``enabled=False``
    puts PEFT's own forward back). Same Parameters, same state-dict keys, same outputs."""
    cls = _poly_linear_cls()
    layers = []
    for name, m in peft_model.named_modules():
        if isinstance(m, cls):
            m._mhr_name = name  # errors name the layer
            layers.append(m)
    if not layers:
        raise ValueError("peft_model: no PEFT Poly layers (peft.tuners.poly.layer.Linear) found")
    for layer in layers:
        if enabled:
            _accelerate_layer(layer)
        else:
            layer.__dict__.pop("forward", None)
            layer.__dict__.pop("_mhr_n_tasks", None)
    return peft_model


def enable() -> None:
    """Every PEFT Poly layer, existing or future, runs mhr_ops kernels."""
    global _original_forward
    cls = _poly_linear_cls()
    if _original_forward is None:
        _original_forward = cls.forward
    cls.forward = accelerated_forward
    cls._mhr_n_tasks = _n_tasks


def disable() -> None:
    """Undoes :func:`enable` (layers accelerated one by one with :func:`accelerate` stay so)."""
    global _original_forward
    cls = _poly_linear_cls()
    if _original_forward is not None:
        cls.forward = _original_forward
        _original_forward = None
    if "_mhr_n_tasks" in cls.__dict__:
        del cls._mhr_n_tasks


def is_enabled() -> bool:
    return _original_forward is not None


@torch.no_grad()
def peft_task_delta(layer, adapter: str, task_id: int) -> torch.Tensor:
    """A PEFT Poly layer's adapter for one task as a dense ``[d_out, d_in]`` fp32 matrix
    (eval-mode routing, scale 1/r)."""
    ids = torch.tensor([task_id], device=layer.poly_router[adapter].module_logits.device)
    w = _routing_weights(layer, adapter, ids, eval_mode=True)[0].float()
    A, B = layer.poly_lora_A[adapter].float(), layer.poly_lora_B[adapter].float()
    h, _, dk_in, r = A.shape
    a = torch.einsum("ks,ksdr->kdr", w, A).reshape(h * dk_in, r)
    b = torch.einsum("ks,ksrd->krd", w, B).transpose(0, 1).reshape(r, -1)
    return ((a @ b) / layer.r[adapter]).T
