"""Modules: ``MHRLinear``, a drop-in for ``nn.Linear`` with a routed skill inventory (Poly / MHR)."""

from __future__ import annotations

import math
import weakref

import torch
from torch import nn
from torch.nn.modules import module as _module_hooks

from . import _C
from ._adapted import (
    RoutedAdapter,
    _is_plain_linear,
    adapted_forward,
    mix_task_adapters,
    routes_per_task,
    task_weights_key,
)
from ._checks import accumulation_dtype
from ._tasks import ids_checked_once
from .lora import MHR_LINEAR_OP, TASK_LORA_LINEAR_OP
from .moh import head_gates
from .routing import check_route_options

# Read once: each is an attribute chain of a few hundred ns, and the serving path is a few us.
_below_autograd = torch._C._AutoDispatchBelowAutograd
_is_compiling = torch.compiler.is_compiling

# The tensor types the C++ serving hit path takes (subclasses go through Python).
_PLAIN_TENSOR_TYPES = (torch.Tensor, nn.Parameter)

# Serving calls of at most this many rows use the kept per-task mixed adapters (MHRLinear._serve);
# larger ones the routed op, which mixes only the groups a call uses (bench/NOTES.md, session 9).
MIXED_MAX_ROWS = 256


class _AdaptsLinear:
    """The wrapped ``nn.Linear``'s attributes on the adapted layer, so code that reads
    ``layer.weight`` or ``layer.in_features`` keeps working after patching."""

    base: nn.Linear

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


class MHRLinear(_AdaptsLinear, nn.Module):
    """``nn.Linear`` plus a Poly/MHR adapter: ``S`` LoRA skills split into ``h`` heads, mixed per
    task by learned routing logits (docs/API.md, MHRLinear; PEFT's ``poly`` layout and defaults).

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

    Serving (eval, no autograd, noise-free routing, at most ``MIXED_MAX_ROWS`` rows): the layer
    keeps every task's mixed adapter, ``T (d_in + d_out) r`` numbers in fp32, while they take at
    most ``mixed_cache_fraction`` of the base weight's bytes (set it to 0 to keep none); they are
    recomputed when the logits, ``A`` or ``B`` change and dropped by ``train()``. Results then
    agree with the routed op to rounding, not bit for bit.
    """

    #: The per-task mixed adapters kept for serving may take at most this fraction of the base
    #: weight's bytes (0: none are kept, every call runs the routed op).
    mixed_cache_fraction: float = 0.25

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
        for name, mode in (("train_mode", train_mode), ("eval_mode", eval_mode)):
            check_route_options(
                self.logits, n_skills=n_skills, mode=mode, top_k=top_k, temperature=temperature, eps=eps, name=name
            )
        self.merged_task: int | None = None
        self._mhr_task_ids = None
        self.reset_parameters(init_weights)

    def _mhr_n_tasks(self) -> int:
        return self.logits.shape[0]

    def _adapter(self) -> _MHRLinearAdapter:
        return _MHRLinearAdapter(self)

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
        return self._adapter().routing_mode()

    def routing_weights(self, task_ids: torch.Tensor, *, mode: str | None = None) -> torch.Tensor:
        """``[len(task_ids), h, S]`` mixing weights for these tasks (ids assumed in range)."""
        return self._adapter().routing_weights(task_ids, mode=mode)

    def routing_groups(self, ids: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weights [G, h, S], group_ids [len(ids)])`` for examples of tasks ``ids``.

        A mode without per-example noise (``sigmoid``, ``softmax``, ``average``: eval by default)
        routes per task: ``G = T`` and the group ids are the task ids, so a batch of many examples
        over few tasks costs what few groups cost, with no host sync. Relaxed-Bernoulli routing
        draws its noise per example (PEFT's stream): one group per example. With far more tasks
        than examples (``T > max(256, len(ids))``), per-example routing is cheaper and is used."""
        return self._adapter().routing_groups(ids, device)

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        if not name.startswith("_mhr"):  # the mode, a routing option, the scale, a merge, the base...
            self.__dict__.pop("_mhr_fast", None)

    def __getstate__(self):
        # copy.deepcopy / pickle (torch.save of the module): without serving's kept state (weak
        # references and a C++ object), which the next serving call rebuilds
        state = self.__dict__.copy()
        state.pop("_mhr_fast", None)
        state.pop("_mhr_mixed", None)
        return state

    def forward(self, x: torch.Tensor, task_ids=None) -> torch.Tensor:
        # The serving hit in one C++ call (csrc/torch/task_serve.cpp), kept by _serve: it checks what
        # a call can change (x, the ids, grad mode, A / B / logits and their versions, the base
        # weight), and __setattr__ drops it when anything else changes.
        fast = self.__dict__.get("_mhr_fast")
        if fast is not None and not _is_compiling():
            params, base_params = self._parameters, self._modules["base"]._parameters
            y = fast(
                x,
                self._mhr_task_ids if task_ids is None else task_ids,
                params.get("A"),
                params.get("B"),
                params.get("logits"),
                base_params.get("weight"),
                base_params.get("bias"),
                self.mixed_cache_fraction,
            )
            if y is not None:
                return y
        y = self._serve(x, task_ids)
        return adapted_forward((self._adapter(),), x, task_ids) if y is None else y

    def _serve(self, x: torch.Tensor, task_ids) -> torch.Tensor | None:
        """The common serving call, as directly as Python allows: ``task_lora_linear`` on the kept
        mixed adapters, or ``mhr_linear`` on the kept task weights below the Autograd key.
        ``adapted_forward`` runs the latter too, but its generic steps (the adapter view, id
        resolution, the task count, the kept weights' lookup, the plain-linear test, reshapes, the
        autograd test) cost several times the op's own Python overhead at small N (issue 11).

        Returns None, for the general flow to run (and raise where it should), unless: the ids are
        a 1-D tensor on x's device whose length divides ``x.shape[0]`` (the batch, possibly
        expanded), x is at least 2-D and not empty, no autograd is needed and nothing is being
        compiled, no task is merged, the routing mode draws no per-example noise and groups by
        task, and the base is a plain ``nn.Linear`` with x's dtype. Then: at most MIXED_MAX_ROWS
        rows, with the tasks' mixed adapters kept within their budget, run ``task_lora_linear``
        on them (the general flow's values to rounding); any other call is the general flow's op
        call with the same arguments (an expanded batch's ids are not repeated: rows_per_id covers
        the copies; the kernels map row n to ``ids[n // rows_per_id]`` either way), so the same
        bits. Both take the same id checks (once per ids tensor) and the same kept weights as the
        general flow."""
        ids = self._mhr_task_ids if task_ids is None else task_ids
        shape = x.shape
        if type(ids) is not torch.Tensor or self.merged_task is not None or ids.dim() != 1 or len(shape) < 2:
            return None
        mode = self.train_mode if self.training else self.eval_mode
        if _is_compiling():
            return None
        # Parameters straight from _parameters (nn.Module.__getattr__ costs ~0.5 us a read); one that
        # is not there (a parametrization, or a plain tensor put in its place) is the general flow's
        params = self._parameters
        A, B, logits = params.get("A"), params.get("B"), params.get("logits")
        base = self._modules["base"]
        if A is None or B is None or logits is None or (type(base) is not nn.Linear and not _is_plain_linear(base)):
            return None
        base_params = base._parameters
        W = base_params.get("weight")
        if W is None or "bias" not in base_params or x.dtype != W.dtype:
            return None
        b = base_params["bias"]
        if torch.is_grad_enabled() and (
            x.requires_grad
            or W.requires_grad
            or A.requires_grad
            or B.requires_grad
            or logits.requires_grad
            or (b is not None and b.requires_grad)
        ):
            return None
        n, n_ids, n_tasks = shape[0], ids.shape[0], logits.shape[0]
        rows = n if len(shape) == 2 else n * shape[1] if len(shape) == 3 else n * math.prod(shape[1:-1])
        if rows == 0 or n_ids == 0 or n % n_ids or not routes_per_task(mode, n_tasks, n) or ids.device != x.device:
            return None
        if not ids_checked_once(ids, n_tasks):
            return None
        mixed = self._mixed_task_adapters(mode, logits, A, B, W, x.dtype) if rows <= MIXED_MAX_ROWS else None
        if mixed is not None:
            # forward's next calls: the same checks and op call in C++ (a new one after any miss: it
            # may have been stale), with these ids noted as checked
            if all(type(t) in _PLAIN_TENSOR_TYPES for t in (x, ids, A, B, logits, W)):  # it declines subclasses
                self.__dict__["_mhr_fast"] = _C.TaskServe(
                    A, B, logits, W, mixed[0], mixed[1], self.mixed_cache_fraction, MIXED_MAX_ROWS
                )
                _C.note_checked_ids(ids, n_tasks)
            # x's leading dims as they are (the op flattens them), and no _below_autograd: the op has no
            # autograd kernel, and nothing here needs one
            return TASK_LORA_LINEAR_OP(x, W, b, mixed[0], mixed[1], ids, rows // n_ids)
        weights = self._kept_task_weights(task_weights_key(logits, mode, self.temperature, self.top_k, self.eps), mode)
        if len(shape) == 2:
            with _below_autograd():
                return MHR_LINEAR_OP(x, W, b, A, B, weights, ids, rows // n_ids, self.scale)[0]
        x2 = x.reshape(rows, shape[-1])
        with _below_autograd():
            y = MHR_LINEAR_OP(x2, W, b, A, B, weights, ids, rows // n_ids, self.scale)[0]
        # view(n, L, -1) rather than view(*shape[:-1], -1): unpacking a torch.Size costs ~0.7 us
        return y.view(n, shape[1], -1) if len(shape) == 3 else y.view(*shape[:-1], -1)

    def _kept_task_weights(self, key: tuple, mode: str) -> torch.Tensor:
        """Every task's routing weights, as ``RoutedAdapter._task_weights`` keeps them (its cache,
        our slot: None) when they were computed from ``key``."""
        kept = self.__dict__.get("_mhr_task_weights")
        cached = None if kept is None else kept.get(None)
        return cached[1] if cached is not None and cached[0] == key else self._adapter()._task_weights(mode)

    def _mixed_task_adapters(
        self,
        mode: str,
        logits: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        W: torch.Tensor,
        x_dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Every task's mixed adapter for the serving path, kept between calls: ``a [T, d_in, r]``
        and ``scale * b [T, r, d_out]`` (``mix_task_adapters``) in the op's accumulation dtype (fp64
        for fp64 x, else fp32), with ``mode``'s routing. Kept while the same ``logits``, ``A`` and
        ``B`` Parameters (weak references: a replaced one is a new object) hold the same storage at
        the same version (an optimizer step or ``load_state_dict`` bumps it; ``.to()`` swaps the
        storage), and the routing options, the scale and ``mixed_cache_fraction`` are unchanged
        (stale ones are dropped). None, for the routed op to
        run, when they would take more than ``mixed_cache_fraction`` of the base weight's bytes,
        or when the adapters' dtype is not one the routed op takes for x (it then raises)."""
        state = (
            A.data_ptr(),
            A._version,
            B.data_ptr(),
            B._version,
            logits.data_ptr(),
            logits._version,
            x_dtype,
            mode,
            self.temperature,
            self.top_k,
            self.eps,
            self.scale,
            self.mixed_cache_fraction,
        )
        kept = self.__dict__.get("_mhr_mixed")
        if kept is not None:
            refs, kept_state, mixed = kept
            if refs[0]() is A and refs[1]() is B and refs[2]() is logits and kept_state == state:
                return mixed
            del self.__dict__["_mhr_mixed"]  # stale: not kept alive while the routed op serves
            self.__dict__.pop("_mhr_fast", None)  # nor by forward's C++ hit path
        ct = accumulation_dtype(x_dtype)
        if B.dtype != A.dtype or A.dtype not in (x_dtype, ct):  # the ops' adapter dtype rule (docs/API.md)
            return None
        h, _, dk_in, r = A.shape
        n_bytes = logits.shape[0] * (h * dk_in + B.shape[0] * B.shape[3]) * r * ct.itemsize
        if n_bytes > self.mixed_cache_fraction * W.numel() * W.element_size():
            return None
        weights = self._kept_task_weights(task_weights_key(logits, mode, self.temperature, self.top_k, self.eps), mode)
        # Normal tensors even under inference_mode: they serve later no_grad calls too.
        with torch.inference_mode(False), torch.no_grad():
            a, b = mix_task_adapters(weights, A, B, ct)
            mixed = (a, b.mul_(self.scale))
        self.__dict__["_mhr_mixed"] = ((weakref.ref(A), weakref.ref(B), weakref.ref(logits)), state, mixed)
        return mixed

    def train(self, mode: bool = True):
        if mode:  # serving's mixed adapters: no use while training (setting training drops the hit path)
            self.__dict__.pop("_mhr_mixed", None)
        return super().train(mode)

    def task_delta(self, task_id: int) -> torch.Tensor:
        """The task's adapter as a dense ``[d_out, d_in]`` fp32 matrix: ``scale * (A_t @ B_t)^T``
        with the eval-mode routing weights."""
        return self._adapter().task_delta(task_id)

    def extra_repr(self) -> str:
        h, S, _, r = self.A.shape
        top = f", top_k={self.top_k}" if self.top_k else ""
        merged = f", merged_task={self.merged_task}" if self.merged_task is not None else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={r}, n_skills={S}, "
            f"n_splits={h}, n_tasks={self.logits.shape[0]}, scale={self.scale:g}, "
            f"routing={self.train_mode}/{self.eval_mode}{top}{merged}"
        )


class _MHRLinearAdapter(RoutedAdapter):
    """MHRLinear's view for the shared adapted-layer flow: its own attributes."""

    __slots__ = ()
    label = "MHRLinear"

    def where(self, what: str) -> tuple[nn.Module, str]:
        return self.layer, what

    # direct attribute reads: the flow reads these on every call
    A = property(lambda self: self.layer.A)
    B = property(lambda self: self.layer.B)
    logits = property(lambda self: self.layer.logits)
    scale = property(lambda self: self.layer.scale)
    training = property(lambda self: self.layer.training)
    base_layer = property(lambda self: self.layer.base)
    train_mode = property(lambda self: self.layer.train_mode)
    eval_mode = property(lambda self: self.layer.eval_mode)
    top_k = property(lambda self: self.layer.top_k)
    temperature = property(lambda self: self.layer.temperature)
    eps = property(lambda self: self.layer.eps)

    @property
    def merged_task(self) -> int | None:
        return self.layer.merged_task

    @merged_task.setter
    def merged_task(self, task_id: int | None) -> None:
        self.layer.merged_task = task_id

    def set_counts(self, *, n_skills: int | None = None, n_tasks: int | None = None) -> None:
        if n_skills is not None:
            self.layer.n_skills = n_skills
        if n_tasks is not None:
            self.layer.n_tasks = n_tasks

    def use_average_routing(self) -> None:
        self.layer.train_mode = self.layer.eval_mode = "average"
        self.layer.top_k = None


class MoHGate(nn.Module):
    """Mixture-of-Head router: per-token gates ``[..., H]`` for ``H = n_shared + n_routed`` heads,
    shared heads first (see :func:`mhr_ops.head_gates`).

    ``router="linear"``: routed logits ``W_r x`` (init N(0, 0.02)), shared-head logits ``W_s x``
    when ``n_shared > 1`` and stage logits ``W_st x`` when ``n_shared > 0`` (both zero-init, so
    shared and stage weights start at 1). ``router="qnorm"``: no parameters; routed logits are the
    per-head query norms over their std across heads, with binary gates (the LLaMA variant);
    ``forward`` then takes the query states ``[..., H, Dh]`` instead of the hidden states.
    ``last_router_probs`` / ``last_gates`` keep the latest forward's values for
    :func:`mhr_ops.load_balance_loss`."""

    def __init__(self, d_model: int, n_heads: int, *, n_shared: int, top_k: int, router: str = "linear"):
        super().__init__()
        if not 0 <= n_shared < n_heads:
            raise ValueError(f"n_shared: expected 0 <= n_shared < n_heads={n_heads}, got {n_shared}")
        n_routed = n_heads - n_shared
        head_gates(torch.empty(0, n_routed), top_k=top_k)  # the op owns top_k's range: fail here, not at forward
        if router not in ("linear", "qnorm"):
            raise ValueError(f"router: expected 'linear' or 'qnorm', got {router!r}")
        self.n_heads, self.n_shared, self.n_routed, self.top_k, self.router = n_heads, n_shared, n_routed, top_k, router
        self.routed = self.shared = self.stage = None
        if router == "linear":
            self.routed = nn.Linear(d_model, n_routed, bias=False)
            nn.init.normal_(self.routed.weight, std=0.02)
            if n_shared > 1:
                self.shared = nn.Linear(d_model, n_shared, bias=False)
                nn.init.zeros_(self.shared.weight)
            if n_shared > 0:
                self.stage = nn.Linear(d_model, 2, bias=False)
                nn.init.zeros_(self.stage.weight)
        self.last_router_probs: torch.Tensor | None = None
        self.last_gates: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.router == "qnorm":
            norms = x[..., self.n_shared :, :].float().norm(dim=-1)
            logits = norms / norms.std(dim=-1, keepdim=True).clamp_min(1e-6)
            gates = head_gates(logits, top_k=self.top_k, n_shared=self.n_shared, binary=True).to(x.dtype)
        else:
            logits = self.routed(x)
            gates = head_gates(
                logits,
                top_k=self.top_k,
                shared_logits=self.shared(x) if self.shared is not None else None,
                stage_logits=self.stage(x) if self.stage is not None else None,
                n_shared=self.n_shared if self.shared is None else 0,
            )
        self.last_router_probs = torch.softmax(logits.float(), dim=-1)
        self.last_gates = gates
        return gates

    def extra_repr(self) -> str:
        return f"n_heads={self.n_heads}, n_shared={self.n_shared}, top_k={self.top_k}, router={self.router!r}"


class GatedOutputProjection(nn.Module):
    """An attention block's output projection over gated heads: ``o_proj(attn_out)`` becomes
    ``gated_head_proj(attn_out.view(..., H, Dh), gates, o_proj.weight, o_proj.bias)``. The gates
    come from ``gate`` applied to ``router_input`` (set just before, e.g. by a hook on the
    attention's q_proj: see :func:`mhr_ops.patch_moh`), or are passed to ``forward``."""

    def __init__(self, o_proj: nn.Linear, gate: MoHGate, head_dim: int):
        super().__init__()
        if o_proj.in_features != gate.n_heads * head_dim:
            raise ValueError(
                f"o_proj: expected in_features = n_heads * head_dim = {gate.n_heads * head_dim}, "
                f"got {o_proj.in_features}"
            )
        self.o_proj, self.gate, self.head_dim = o_proj, gate, head_dim
        self.router_input: torch.Tensor | None = None

    @property
    def weight(self) -> torch.Tensor:
        return self.o_proj.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.o_proj.bias

    def forward(self, attn_output: torch.Tensor, gates: torch.Tensor | None = None) -> torch.Tensor:
        from .moh import gated_head_proj

        if gates is None:
            if self.router_input is None:
                raise RuntimeError("GatedOutputProjection: no gates given and no router input set for this forward")
            gates = self.gate(self.router_input)
            self.router_input = None
        o = attn_output.view(*attn_output.shape[:-1], self.gate.n_heads, self.head_dim)
        return gated_head_proj(o, gates.to(o.dtype), self.o_proj.weight, self.o_proj.bias)


class MoELoRALinear(_AdaptsLinear, nn.Module):
    """``nn.Linear`` plus a mixture of LoRA experts routed per token (docs/API.md, MoELoRALinear):
    ``y = base(x) + moe_lora(x, A, B, w, ids, scale=alpha / r)``.

    The router is a bias-free linear layer ``router`` (``[E, d_in]``, computed in its own dtype,
    fp32 by default): ``p = softmax(x @ W_r.T)``, the ``top_k`` largest kept (``torch.topk``) and
    renormalized over the kept experts. Each forward records ``last_aux_loss``, the
    Switch-Transformer load-balancing loss ``E * sum_e f_e * P_e`` (``f_e``: fraction of token
    slots routed to expert ``e``, ``P_e``: mean router probability of ``e``), and
    ``last_expert_load`` (``f``, detached); :func:`mhr_ops.moe_aux_loss` sums the former over a
    model.

    Args:
        base: the ``nn.Linear`` to adapt (kept as ``self.base``; frozen when ``freeze_base``).
        n_experts, r, top_k: ``E``, the rank, experts per token (``1 <= top_k <= E``).
        alpha: ``scale = alpha / r``; ``None`` means ``alpha = r`` (scale 1).
        router: ``"softmax"`` (the only router so far).
    Parameters (state-dict keys): ``A [E, d_in, r]`` (Kaiming-uniform per expert, as a LoRA A),
    ``B [E, r, d_out]`` (zero: the adapter starts as a no-op), ``router.weight [E, d_in]``
    (``nn.Linear``'s init), plus ``base.weight`` / ``base.bias``; on the base layer's device, in
    ``adapter_dtype``.
    """

    def __init__(
        self,
        base: nn.Linear,
        *,
        n_experts: int,
        r: int,
        top_k: int,
        alpha: float | None = None,
        router: str = "softmax",
        freeze_base: bool = True,
        adapter_dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base: expected an nn.Linear, got {type(base).__name__}")
        for name, value in (("n_experts", n_experts), ("r", r), ("top_k", top_k)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
        if top_k > n_experts:
            raise ValueError(f"top_k: expected in [1, {n_experts}] (n_experts), got {top_k}")
        if router != "softmax":
            raise ValueError(f"router: expected 'softmax', got {router!r}")
        if freeze_base:
            base.requires_grad_(False)
        self.base = base
        self.n_experts, self.r, self.top_k, self.router_kind = n_experts, r, top_k, router
        self.scale = (alpha if alpha is not None else r) / r
        kw = dict(device=base.weight.device, dtype=adapter_dtype)
        d_in, d_out = base.in_features, base.out_features
        self.A = nn.Parameter(torch.empty(n_experts, d_in, r, **kw))
        self.B = nn.Parameter(torch.zeros(n_experts, r, d_out, **kw))
        self.router = nn.Linear(d_in, n_experts, bias=False, **kw)
        self.last_aux_loss: torch.Tensor | None = None
        self.last_expert_load: torch.Tensor | None = None
        with torch.no_grad():
            for e in range(n_experts):
                a = torch.empty(r, d_in, device=self.A.device)
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                self.A[e].copy_(a.T)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(topk_weights [..., k], topk_ids [..., k], router probabilities [..., E])`` for ``x``."""
        probs = torch.softmax(self.router(x.to(self.router.weight.dtype)).float(), dim=-1)
        top_w, top_i = probs.topk(self.top_k, dim=-1)
        return top_w / top_w.sum(dim=-1, keepdim=True), top_i, probs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .moe import moe_lora, moe_lora_linear, switch_balance_loss

        weights, ids, probs = self.route(x)
        self.last_aux_loss, self.last_expert_load = switch_balance_loss(probs, ids, self.n_experts)
        if self._plain_base(x):  # one op for the base layer and the experts
            base = self.base
            return moe_lora_linear(
                x, base.weight, base.bias, self.A, self.B, weights, ids, scale=self.scale, check_ids=False
            )
        base_out = self.base(x)
        if torch.is_grad_enabled():  # not in place: a backward hook's output may not be modified in place
            return base_out + moe_lora(x, self.A, self.B, weights, ids, scale=self.scale, check_ids=False)
        return moe_lora(x, self.A, self.B, weights, ids, scale=self.scale, out=base_out, check_ids=False)

    def _plain_base(self, x: torch.Tensor) -> bool:
        """Whether ``self.base(x)`` is exactly ``F.linear(x, weight, bias)``, so that
        ``moe_lora_linear`` may stand in for it: a plain ``nn.Linear`` (not a subclass: quantized
        layers subclass it), no forward or backward hooks on it or global ones (they run only
        when the base module is called), no autocast."""
        base, g = self.base, _module_hooks
        return (
            type(base) is nn.Linear
            and not (base._forward_hooks or base._forward_pre_hooks)
            and not (base._backward_hooks or base._backward_pre_hooks)
            and not (g._global_forward_hooks or g._global_forward_pre_hooks)
            and not (g._global_backward_hooks or g._global_backward_pre_hooks)
            and not torch.is_autocast_enabled(x.device.type)
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, n_experts={self.n_experts}, "
            f"r={self.r}, top_k={self.top_k}, scale={self.scale:g}, router={self.router_kind!r}"
        )
