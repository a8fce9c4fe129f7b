"""Modules: ``MHRLinear``, a drop-in for ``nn.Linear`` with a routed skill inventory (Poly / MHR)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ._tasks import check_merged_task_once, resolve_task_ids
from .lora import mhr_linear, routed_lora
from .routing import ROUTE_MODES, route


class MHRLinear(nn.Module):
    """``nn.Linear`` plus a Poly/MHR adapter: ``S`` LoRA skills split into ``h`` heads, mixed per
    task by learned routing logits (SPEC sections 1-3, PEFT's ``poly`` layout and defaults).

    ``y = base(x) + scale * (x @ A_t) @ B_t`` where ``A_t`` / ``B_t`` mix the skills with the
    weights ``route(logits, task_ids)``: ``relaxed_bernoulli`` in train mode and ``sigmoid`` in
    eval mode by default (PEFT), configurable (e.g. ``sigmoid`` for both, the MHR paper's T0
    recipe).

    Args:
        base: the ``nn.Linear`` to adapt (kept as ``self.base``; frozen when ``freeze_base``).
        r, n_skills, n_splits, n_tasks: rank, inventory size ``S``, heads ``h``, tasks ``T``.
        alpha: ``scale = alpha / r``; default ``scale = 1 / r`` (PEFT).
        train_mode, eval_mode: routing modes (see :func:`mhr_ops.route`).
        top_k, temperature, eps: routing options.
        init_weights: PEFT's ``init_weights``: B = 0 (the adapter starts as a no-op).
    Parameters: ``A [h, S, d_in/h, r]``, ``B [h, S, r, d_out/h]``, ``logits [T, h*S]``, on the base
    layer's device; fp32 unless ``adapter_dtype`` says otherwise (PEFT keeps adapters in fp32).
    """

    def __init__(
        self,
        base: nn.Linear,
        *,
        r: int,
        n_skills: int,
        n_tasks: int,
        n_splits: int = 1,
        alpha: float | None = None,
        train_mode: str = "relaxed_bernoulli",
        eval_mode: str = "sigmoid",
        top_k: int | None = None,
        temperature: float = 1.0,
        eps: float = 1e-12,
        init_weights: bool = True,
        freeze_base: bool = True,
        adapter_dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base: expected an nn.Linear, got {type(base).__name__}")
        for name, value in (("r", r), ("n_skills", n_skills), ("n_tasks", n_tasks), ("n_splits", n_splits)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
        d_in, d_out = base.in_features, base.out_features
        if d_in % n_splits or d_out % n_splits:
            raise ValueError(
                f"n_splits: expected a divisor of in_features={d_in} and out_features={d_out}, got {n_splits}"
            )
        for name, mode in (("train_mode", train_mode), ("eval_mode", eval_mode)):
            if mode not in ROUTE_MODES:
                raise ValueError(f"{name}: expected one of {ROUTE_MODES}, got {mode!r}")
        if top_k is not None and not 1 <= top_k <= n_skills:
            raise ValueError(f"top_k: expected in [1, {n_skills}], got {top_k}")
        if freeze_base:
            base.requires_grad_(False)
        self.base = base
        self.r, self.n_skills, self.n_splits, self.n_tasks = r, n_skills, n_splits, n_tasks
        self.scale = (alpha if alpha is not None else 1.0) / r
        self.train_mode, self.eval_mode = train_mode, eval_mode
        self.top_k, self.temperature, self.eps = top_k, temperature, eps
        device = base.weight.device
        kw = dict(device=device, dtype=adapter_dtype)
        self.A = nn.Parameter(torch.empty(n_splits, n_skills, d_in // n_splits, r, **kw))
        self.B = nn.Parameter(torch.empty(n_splits, n_skills, r, d_out // n_splits, **kw))
        self.logits = nn.Parameter(torch.empty(n_tasks, n_splits * n_skills, **kw))
        self.merged_task: int | None = None
        self._mhr_task_ids = None
        self.reset_parameters(init_weights)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def _mhr_n_tasks(self) -> int:
        return self.logits.shape[0]

    @torch.no_grad()
    def reset_parameters(self, init_weights: bool = True) -> None:
        """PEFT's poly init: A per (split, skill) like an nn.Linear weight (Kaiming-uniform,
        a=sqrt(5)); B zero (or the same init when ``init_weights`` is False); logits U(-1e-3, 1e-3)."""
        for k in range(self.A.shape[0]):
            for s in range(self.A.shape[1]):
                a = torch.empty(self.r, self.A.shape[2], device=self.A.device)
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                self.A[k, s].copy_(a.T)
                if not init_weights:
                    b = torch.empty(self.B.shape[3], self.r, device=self.B.device)
                    nn.init.kaiming_uniform_(b, a=math.sqrt(5))
                    self.B[k, s].copy_(b.T)
        if init_weights:
            self.B.zero_()
        self.logits.uniform_(-1e-3, 1e-3)

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

    def forward(self, x: torch.Tensor, task_ids=None) -> torch.Tensor:
        if self.merged_task is not None:
            if task_ids is not None or self._mhr_task_ids is not None:
                ids = resolve_task_ids(self, task_ids, x, self.logits.shape[0])
                check_merged_task_once(ids, self.merged_task, "MHRLinear")
            return self.base(x)
        ids = resolve_task_ids(self, task_ids, x, self.logits.shape[0])
        weights = self.routing_weights(ids)
        groups = torch.arange(ids.shape[0], device=x.device)
        if x.dim() == 1:
            groups = groups.reshape(())
        if self.base.weight.dtype == x.dtype:
            return mhr_linear(
                x, self.base.weight, self.base.bias, self.A, self.B, weights, groups, scale=self.scale, check_ids=False
            )
        return routed_lora(x, self.A, self.B, weights, groups, scale=self.scale, out=self.base(x), check_ids=False)

    @torch.no_grad()
    def task_delta(self, task_id: int) -> torch.Tensor:
        """The task's adapter as a dense ``[d_out, d_in]`` fp32 matrix: ``scale * (A_t @ B_t)^T``
        with the eval-mode routing weights."""
        w = self.routing_weights(torch.tensor([task_id], device=self.logits.device), mode=self.eval_mode)
        h, S, dk_in, r = self.A.shape
        a = torch.einsum("ks,ksdr->kdr", w[0].float(), self.A.float()).reshape(h * dk_in, r)
        b = torch.einsum("ks,ksrd->krd", w[0].float(), self.B.float()).transpose(0, 1).reshape(r, -1)
        return (self.scale * (a @ b)).T

    def extra_repr(self) -> str:
        h, S, _, r = self.A.shape
        top = f", top_k={self.top_k}" if self.top_k else ""
        merged = f", merged_task={self.merged_task}" if self.merged_task is not None else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={r}, n_skills={S}, "
            f"n_splits={h}, n_tasks={self.logits.shape[0]}, scale={self.scale:g}, "
            f"routing={self.train_mode}/{self.eval_mode}{top}{merged}"
        )
