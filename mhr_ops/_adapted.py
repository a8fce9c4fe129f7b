"""The adapted-layer flow, written once for ``nn.MHRLinear`` and PEFT's Poly layer: each layer hands
it views (``RoutedAdapter``) onto the adapters it holds, and the merged-task check, id resolution,
routing groups, the fused/unfused choice and the dense task delta live here."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ._autograd import needs_autograd
from ._tasks import check_merged_task_once, resolve_task_ids
from .lora import adapted_linear, routed_lora
from .routing import route


class RoutedAdapter:
    """A view onto one routed Poly/MHR adapter as its layer keeps it: the ``A [h, S, d_in/h, r]``,
    ``B [h, S, r, d_out/h]`` and ``logits [T, h*S]`` Parameters, the scale, the routing options, the
    base layer and the merged task. Subclasses say where the layer keeps each; the defaults of the
    routing options are PEFT's Poly router's, which has no others."""

    __slots__ = ("layer",)
    label = "adapted layer"  # names the layer kind in errors
    train_mode = "relaxed_bernoulli"
    eval_mode = "sigmoid"
    top_k: int | None = None
    temperature = 1.0
    eps = 1e-12

    def __init__(self, layer: nn.Module):
        self.layer = layer

    # ---- where the layer keeps things: subclasses ----

    def where(self, what: str) -> tuple[nn.Module, str]:
        """``(module, attribute)`` holding Parameter ``what`` (``"A"``, ``"B"`` or ``"logits"``)."""
        raise NotImplementedError

    @property
    def scale(self) -> float:
        raise NotImplementedError

    @property
    def training(self) -> bool:
        raise NotImplementedError

    @property
    def base_layer(self) -> nn.Module:
        raise NotImplementedError

    @property
    def merged_task(self) -> int | None:
        raise NotImplementedError

    @merged_task.setter
    def merged_task(self, task_id: int | None) -> None:
        raise NotImplementedError

    def set_counts(self, *, n_skills: int | None = None, n_tasks: int | None = None) -> None:
        """Records new inventory / task counts where the layer keeps them (after a reshape)."""
        raise NotImplementedError

    def use_average_routing(self) -> None:
        """Routing becomes ``average`` where the layer can say so (a PEFT router cannot: over one
        skill its normalized weight is 1 up to eps anyway)."""

    @property
    def _cache_slot(self) -> str | None:
        """Which of the layer's kept task weights are this adapter's."""
        return None

    # ---- the same for every layer ----

    def param(self, what: str) -> nn.Parameter:
        module, name = self.where(what)
        return getattr(module, name)

    def replace(self, what: str, value: torch.Tensor) -> None:
        """Puts a new Parameter holding ``value`` in place of ``what``, keeping its requires_grad."""
        module, name = self.where(what)
        setattr(module, name, nn.Parameter(value, requires_grad=getattr(module, name).requires_grad))

    @property
    def A(self) -> nn.Parameter:
        return self.param("A")

    @property
    def B(self) -> nn.Parameter:
        return self.param("B")

    @property
    def logits(self) -> nn.Parameter:
        return self.param("logits")

    def routing_mode(self) -> str:
        return self.train_mode if self.training else self.eval_mode

    def routing_weights(self, task_ids: torch.Tensor, *, mode: str | None = None) -> torch.Tensor:
        """``[len(task_ids), h, S]`` mixing weights for these tasks (ids assumed in range)."""
        return route(
            self.logits,
            task_ids,
            n_skills=self.A.shape[1],
            mode=mode or self.routing_mode(),
            temperature=self.temperature,
            top_k=self.top_k,
            eps=self.eps,
            check_ids=False,
        )

    def routing_groups(self, ids: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weights [G, h, S], group_ids [len(ids)])`` for examples of tasks ``ids``: per task
        (``G = T``, the group ids are the task ids) for a mode without per-example noise unless
        ``T > max(256, len(ids))``; otherwise one group per example (relaxed-Bernoulli noise is
        drawn per example, PEFT's stream)."""
        mode = self.routing_mode()
        if routes_per_task(mode, self.logits.shape[0], ids.shape[0]):
            return self._task_weights(mode), ids
        return self.routing_weights(ids, mode=mode), torch.arange(ids.shape[0], device=device)

    def _task_weights(self, mode: str) -> torch.Tensor:
        """Weights of every task ``[T, h, S]``. Without autograd (serving) they are kept between
        calls while the logits and the routing options are unchanged (the logits' version
        counter moves with every in-place update, e.g. an optimizer step)."""
        logits = self.logits
        if needs_autograd(logits):
            return self.routing_weights(torch.arange(logits.shape[0], device=logits.device), mode=mode)
        key = task_weights_key(logits, mode, self.temperature, self.top_k, self.eps)
        kept = self.layer.__dict__.setdefault("_mhr_task_weights", {})
        cached = kept.get(self._cache_slot)
        if cached is not None and cached[0] == key:
            return cached[1]
        with torch.no_grad():
            weights = self.routing_weights(torch.arange(logits.shape[0], device=logits.device), mode=mode)
        if not torch.is_inference_mode_enabled():  # an inference tensor could not serve later no_grad calls
            kept[self._cache_slot] = (key, weights)
        return weights

    @torch.no_grad()
    def task_delta(self, task_id: int) -> torch.Tensor:
        """The task's adapter as a dense ``[d_out, d_in]`` fp32 matrix: ``scale * (A_t @ B_t)^T``
        with the eval-mode routing weights."""
        w = self.routing_weights(torch.tensor([task_id], device=self.logits.device), mode=self.eval_mode)
        a, b = mix_task_adapters(w, self.A, self.B, torch.float32)
        return (self.scale * (a[0] @ b[0])).T


def mix_task_adapters(
    weights: torch.Tensor, A: torch.Tensor, B: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each task's mixed LoRA, as PEFT's Poly layer forms it: ``a [T, d_in, r]`` (head k's rows
    ``sum_s w[t, k, s] A[k, s]``) and ``b [T, r, d_out]`` (head k's columns ``sum_s w[t, k, s]
    B[k, s]``), in ``dtype``, from ``weights [T, h, S]``, ``A [h, S, d_in/h, r]`` and
    ``B [h, S, r, d_out/h]``."""
    w, A, B = weights.to(dtype), A.to(dtype), B.to(dtype)
    n, r = w.shape[0], A.shape[3]
    a = torch.einsum("tks,ksdr->tkdr", w, A).reshape(n, -1, r)
    b = torch.einsum("tks,ksrd->trkd", w, B).reshape(n, r, -1)
    return a, b


def routes_per_task(mode: str, n_tasks: int, n_examples: int) -> bool:
    """Whether a batch of ``n_examples`` routes per task (``G = T``, group ids = task ids) rather
    than per example: a mode without per-example noise, unless there are far more tasks than
    examples (``T > max(256, n_examples)``: computing every task's weights would cost more)."""
    return mode != "relaxed_bernoulli" and n_tasks <= max(256, n_examples)


def task_weights_key(logits: torch.Tensor, mode: str, temperature, top_k, eps) -> tuple:
    """What kept task weights were computed from, compared whole on every serving call: the logits
    Parameter, its storage and version counter (an optimizer step or ``load_state_dict`` bumps the
    version; ``.to()`` / ``.half()`` swap the data without bumping it: data_ptr, dtype and device),
    and the routing options."""
    return (id(logits), logits.data_ptr(), logits._version, logits.dtype, logits.device, mode, temperature, top_k, eps)


def n_tasks(adapters: Sequence[RoutedAdapter]) -> int:
    """Tasks every adapter of a layer can route: the bound for its task ids."""
    return min(a.logits.shape[0] for a in adapters)


def _is_plain_linear(base: nn.Module) -> bool:
    """``base(x)`` is ``F.linear(x, base.weight, base.bias)``: mhr_linear can compute it."""
    return isinstance(base, nn.Linear) and type(base).forward is nn.Linear.forward


def adapted_forward(
    adapters: Sequence[RoutedAdapter], x: torch.Tensor, task_ids, args: tuple = (), kwargs: dict | None = None
) -> torch.Tensor:
    """``base(x, *args, **kwargs)`` plus every adapter's routed update for tasks ``task_ids``, in
    ``x``'s dtype. One adapter over a plain ``nn.Linear`` with ``x``'s dtype runs ``mhr_linear``;
    otherwise each adapter adds ``routed_lora`` into the base output, in the adapter's dtype. While
    a task is merged the base runs alone (other tasks raise)."""
    kwargs = kwargs or {}
    first = adapters[0]
    layer, base = first.layer, first.base_layer
    merged = first.merged_task
    if merged is not None:
        if task_ids is not None or getattr(layer, "_mhr_task_ids", None) is not None:
            check_merged_task_once(resolve_task_ids(layer, task_ids, x, n_tasks(adapters)), merged, first.label)
        return base(x, *args, **kwargs).to(x.dtype)
    ids = resolve_task_ids(layer, task_ids, x, n_tasks(adapters))
    if len(adapters) == 1 and not args and not kwargs and _is_plain_linear(base) and base.weight.dtype == x.dtype:
        weights, groups = first.routing_groups(ids, x.device)
        groups = groups.reshape(()) if x.dim() == 1 else groups
        return adapted_linear(x, base.weight, base.bias, first.A, first.B, weights, groups, first.scale)
    result = base(x, *args, **kwargs)
    for adapter in adapters:
        weights, groups = adapter.routing_groups(ids, x.device)
        groups = groups.reshape(()) if x.dim() == 1 else groups
        A = adapter.A
        xa = x if x.dtype == A.dtype else x.to(A.dtype)
        out = result if result.dtype == xa.dtype else result.to(xa.dtype)
        result = routed_lora(xa, A, adapter.B, weights, groups, scale=adapter.scale, out=out, check_ids=False)
    return result.to(x.dtype)
