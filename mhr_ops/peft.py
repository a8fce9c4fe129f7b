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

from ._adapted import RoutedAdapter, adapted_forward, n_tasks

_original_forward = None


def _poly_linear_cls():
    try:
        from peft.tuners.poly.layer import Linear
    except ImportError as exc:  # pragma: no cover - peft is an optional dependency
        raise ImportError("mhr_ops.peft needs the `peft` package: pip install 'mhr-ops[peft]'") from exc
    return Linear


class _PolyAdapter(RoutedAdapter):
    """One active adapter of a PEFT Poly layer, as a view for the shared adapted-layer flow: its
    Parameters stay in PEFT's dicts (same state-dict keys), its router has PEFT's fixed options."""

    __slots__ = ("name",)
    label = "PEFT Poly layer"

    def __init__(self, layer, name: str):
        super().__init__(layer)
        self.name = name

    def where(self, what: str) -> tuple[nn.Module, str]:
        if what == "logits":
            return self.layer.poly_router[self.name], "module_logits"
        return getattr(self.layer, f"poly_lora_{what}"), self.name

    @property
    def scale(self) -> float:
        return 1.0 / self.layer.r[self.name]

    @property
    def training(self) -> bool:
        return self.layer.poly_router[self.name].training

    @property
    def base_layer(self) -> nn.Module:
        return self.layer.base_layer

    @property
    def merged_task(self) -> int | None:
        return self.layer.__dict__.get("_mhr_merged_task")

    @merged_task.setter
    def merged_task(self, task_id: int | None) -> None:
        self.layer._mhr_merged_task = task_id

    def set_counts(self, *, n_skills: int | None = None, n_tasks: int | None = None) -> None:
        router = self.layer.poly_router[self.name]
        if n_skills is not None:
            self.layer.n_skills[self.name] = router.n_skills = n_skills
        if n_tasks is not None:
            self.layer.n_tasks[self.name] = router.n_tasks = n_tasks

    @property
    def _cache_slot(self) -> str:
        return self.name


def _poly_adapters(layer) -> list[_PolyAdapter]:
    """Views onto a PEFT Poly layer's active adapters."""
    return [_PolyAdapter(layer, a) for a in layer.active_adapters if a in layer.poly_lora_A]


def _n_tasks(self) -> int:
    return n_tasks(_poly_adapters(self))


def accelerated_forward(self, x: torch.Tensor, *args, task_ids=None, **kwargs) -> torch.Tensor:
    """Drop-in for ``peft.tuners.poly.layer.Linear.forward`` running mhr_ops kernels."""
    adapters = [] if self.disable_adapters else _poly_adapters(self)
    if not adapters:
        return self.base_layer(x, *args, **kwargs)
    return adapted_forward(adapters, x, task_ids, args, kwargs)


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
