"""Sparse head gating, Mixture-of-Head attention (docs/API.md): ``head_gates`` and
``gated_head_proj``, their fake kernels and autograd, and a load-balance loss."""

from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loads the op registrations)
from ._autograd import register_no_double_backward
from ._checks import FLOAT_DTYPES, check_int, check_same_device, check_tensor


def head_gates(
    routed_logits: torch.Tensor,
    *,
    top_k: int,
    shared_logits: torch.Tensor | None = None,
    stage_logits: torch.Tensor | None = None,
    n_shared: int = 0,
    binary: bool = False,
) -> torch.Tensor:
    """Per-token head gates ``[N, Hs + Hr]``, shared heads first.

    Routed heads: ``softmax(routed_logits)`` kept to its ``top_k`` (ties to the lower head),
    renormalized over the kept heads, times ``top_k``. Shared heads (``Hs`` = the width of
    ``shared_logits``, else ``n_shared``): ``softmax(shared_logits) * Hs``, or all ones when
    ``Hs <= 1`` or there are no shared logits. Stage weights ``[a1, a2] = softmax(stage_logits)
    * 2`` scale the two groups (both 1 when absent). ``binary=True``: 1 for shared and selected
    routed heads, 0 elsewhere, no gradient (the parameter-free variant, whose router logits are
    per-head query norms). Leading dims of the logits are flattened as tokens."""
    check_tensor(routed_logits, "routed_logits", dtypes=FLOAT_DTYPES)
    if routed_logits.dim() < 1 or routed_logits.shape[-1] < 1:
        raise ValueError(f"routed_logits: expected a tensor [..., Hr] with Hr >= 1, got {tuple(routed_logits.shape)}")
    lead, n_routed = routed_logits.shape[:-1], routed_logits.shape[-1]
    check_int(top_k, "top_k")  # its range [1, Hr] is the op's (moh_args.cpp)
    check_int(n_shared, "n_shared", low=0)
    flat = []
    for t, name, width in ((shared_logits, "shared_logits", None), (stage_logits, "stage_logits", 2)):
        if t is None:
            flat.append(None)
            continue
        check_tensor(t, name, dtypes=(routed_logits.dtype,))
        if tuple(t.shape[:-1]) != tuple(lead) or (width is not None and t.shape[-1] != width):
            want = (*lead, width if width else "Hs")
            raise ValueError(f"{name}: expected shape {want}, got {tuple(t.shape)}")
        check_same_device(t, name, routed_logits, "routed_logits")
        flat.append(t.reshape(-1, t.shape[-1]))
    if shared_logits is not None and n_shared not in (0, shared_logits.shape[-1]):
        raise ValueError(f"n_shared: expected 0 or {shared_logits.shape[-1]} (shared_logits' width), got {n_shared}")
    gates = torch.ops.mhr_ops.head_gates(
        routed_logits.reshape(-1, n_routed), flat[0], flat[1], top_k, n_shared, bool(binary)
    )
    return gates.view(*lead, gates.shape[-1])


def gated_head_proj(
    o: torch.Tensor, gates: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``y_n = sum_h gates[n, h] * o[n, h] @ weight[:, h*Dh:(h+1)*Dh].T + bias``: an attention
    output projection over gated heads, without writing the gated heads to memory on the GPU,
    where a (row, head) whose gate is exactly 0 costs no arithmetic.

    ``o [..., H, Dh]``, ``gates [..., H]``, ``weight [D, H*Dh]`` (``o_proj.weight``), ``bias [D]``;
    all one dtype. Returns ``[..., D]``."""
    check_tensor(o, "o", dtypes=FLOAT_DTYPES)
    if o.dim() < 2:
        raise ValueError(f"o: expected a tensor [..., H, Dh], got shape {tuple(o.shape)}")
    lead, H, Dh = o.shape[:-2], o.shape[-2], o.shape[-1]
    check_tensor(gates, "gates", dtypes=(o.dtype,))
    if tuple(gates.shape) != (*lead, H):
        raise ValueError(f"gates: expected shape {(*lead, H)} [..., H], got {tuple(gates.shape)}")
    check_tensor(weight, "weight", ndim=2, dtypes=(o.dtype,))
    if weight.shape[1] != H * Dh:
        raise ValueError(f"weight: expected shape (D, {H * Dh}) [D, H*Dh], got {tuple(weight.shape)}")
    if bias is not None:
        check_tensor(bias, "bias", ndim=1, dtypes=(o.dtype,))
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias: expected shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    for t, name in ((gates, "gates"), (weight, "weight"), (bias, "bias")):
        if t is not None:
            check_same_device(t, name, o, "o")
    y = torch.ops.mhr_ops.gated_head_proj(o.reshape(-1, H, Dh), gates.reshape(-1, H), weight, bias)
    return y.view(*lead, weight.shape[0])


def load_balance_loss(router_probs: torch.Tensor, gates: torch.Tensor, n_shared: int = 0) -> torch.Tensor:
    """MoH's load-balance auxiliary loss over the routed heads: ``Hr * sum_i f_i * P_i``, where
    ``f_i`` is the fraction of tokens that select routed head ``i`` and ``P_i`` the mean router
    probability of head ``i`` (``router_probs = softmax(routed_logits)``, ``[..., Hr]``). It is 1
    when load is uniform; minimize it with a small weight."""
    probs = router_probs.reshape(-1, router_probs.shape[-1])
    selected = (gates.reshape(-1, gates.shape[-1])[:, n_shared:] != 0).to(probs.dtype)
    if selected.shape != probs.shape:
        raise ValueError(f"gates: expected {probs.shape[1]} routed heads after {n_shared} shared, got {selected.shape}")
    f = selected.mean(0) / selected.sum(1).mean().clamp_min(1)
    return probs.shape[1] * (f * probs.mean(0)).sum()


# ---- fake kernels and autograd ----


@torch.library.register_fake("mhr_ops::head_gates")
def _head_gates_fake(routed, shared, stage, top_k, n_shared, binary):
    hs = shared.shape[1] if shared is not None else n_shared
    return routed.new_empty((routed.shape[0], hs + routed.shape[1]))


@torch.library.register_fake("mhr_ops::head_gates_backward")
def _head_gates_backward_fake(grad, routed, shared, stage, top_k, n_shared, binary):
    return tuple(t.new_empty(t.shape) if t is not None else routed.new_empty((0,)) for t in (routed, shared, stage))


@torch.library.register_fake("mhr_ops::gated_head_proj")
def _gated_head_proj_fake(o, gates, weight, bias):
    return o.new_empty((o.shape[0], weight.shape[0]))


@torch.library.register_fake("mhr_ops::gated_head_proj_backward")
def _gated_head_proj_backward_fake(grad_y, o, gates, weight, has_bias, output_mask):
    shapes = (o.shape, gates.shape, weight.shape, (weight.shape[0],) if has_bias else (0,))
    return tuple(o.new_empty(s if m else (0,)) for s, m in zip(shapes, output_mask, strict=True))


def _gates_setup(ctx, inputs, output):
    routed, shared, stage, ctx.top_k, ctx.n_shared, ctx.binary = inputs
    ctx.save_for_backward(routed, shared, stage)


def _gates_backward(ctx, grad):
    routed, shared, stage = ctx.saved_tensors
    if ctx.binary:
        return None, None, None, None, None, None
    gr, gs, gst = torch.ops.mhr_ops.head_gates_backward(
        grad, routed, shared, stage, ctx.top_k, ctx.n_shared, ctx.binary
    )
    return gr, gs if shared is not None else None, gst if stage is not None else None, None, None, None


def _proj_setup(ctx, inputs, output):
    o, gates, weight, bias = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(o, gates, weight)


def _proj_backward(ctx, grad_y):
    o, gates, weight = ctx.saved_tensors
    mask = list(ctx.needs_input_grad[:4])
    grads = torch.ops.mhr_ops.gated_head_proj_backward(grad_y, o, gates, weight, ctx.has_bias, mask)
    return tuple(g if m else None for g, m in zip(grads, mask, strict=True))


torch.library.register_autograd("mhr_ops::head_gates", _gates_backward, setup_context=_gates_setup)
torch.library.register_autograd("mhr_ops::gated_head_proj", _proj_backward, setup_context=_proj_setup)
register_no_double_backward("mhr_ops::head_gates_backward", "head_gates")
register_no_double_backward("mhr_ops::gated_head_proj_backward", "gated_head_proj")
