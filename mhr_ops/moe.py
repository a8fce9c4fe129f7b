"""Mixture-of-LoRA experts (docs/API.md, moe_lora): the ops ``moe_lora`` and ``moe_lora_linear``,
their fake kernels and autograd registration for torch.ops.mhr_ops.moe_lora / moe_lora_add_ /
moe_lora_backward / moe_lora_linear / moe_lora_linear_backward, and the Switch-Transformer
load-balancing loss."""

from __future__ import annotations

import math

import torch

from . import _C  # noqa: F401  (loads the op registrations)
from ._autograd import call_op, needed_grads, register_bottleneck_autograd, register_no_double_backward
from ._checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    accumulation_dtype,
    check_id_range,
    check_out,
    check_same_device,
    check_scale,
    check_tensor,
)


def _check_experts(x, A, B) -> tuple[int, int, int, int]:
    """Validates x / A / B; returns (E, d_in, r, d_out)."""
    check_tensor(x, "x", dtypes=FLOAT_DTYPES)
    if x.dim() < 1:
        raise ValueError(f"x: expected a tensor [..., d_in], got shape {tuple(x.shape)}")
    check_tensor(A, "A", ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor(B, "B", ndim=3, dtypes=FLOAT_DTYPES)
    E, d_in, r = A.shape
    if min(E, d_in, r) < 1:
        raise ValueError(f"A: expected a non-empty [E, d_in, r], got shape {tuple(A.shape)}")
    if B.shape[0] != E:
        raise ValueError(f"B: expected E = {E} experts (A's) in dim 0, got shape {tuple(B.shape)}")
    if B.shape[1] != r:
        raise ValueError(f"B: expected rank r = {r} (A's) in dim 1, got shape {tuple(B.shape)}")
    if B.shape[2] < 1:
        raise ValueError(f"B: expected d_out >= 1, got shape {tuple(B.shape)}")
    if x.shape[-1] != d_in:
        raise ValueError(f"x: expected last dim d_in = A.shape[1] = {d_in}, got {x.shape[-1]}")
    # The adapters' dtype rule (fp32 adapters with half activations) is the op's: csrc/torch/args/adapter_dtypes.h.
    for t, name in ((A, "A"), (B, "B")):
        check_same_device(t, name, x, "x")
    return E, d_in, r, B.shape[2]


def _routing_rows(x, topk_weights, topk_ids, n_experts: int, check_ids: bool):
    """The routing as the op takes it: ``(weights [N, k], ids [N, k])``."""
    if not isinstance(topk_ids, torch.Tensor):
        raise TypeError(f"topk_ids: expected an int tensor, got {type(topk_ids).__name__}")
    if topk_ids.dtype not in INDEX_DTYPES:
        raise TypeError(f"topk_ids: expected an int32 or int64 tensor, got {str(topk_ids.dtype).replace('torch.', '')}")
    check_tensor(topk_weights, "topk_weights", dtypes=FLOAT_DTYPES)
    lead = tuple(x.shape[:-1])
    n_rows = math.prod(lead)
    per_row = topk_ids.dim() == len(lead) + 1 and tuple(topk_ids.shape[:-1]) == lead
    flat = topk_ids.dim() == 2 and topk_ids.shape[0] == n_rows
    if not (per_row or flat) or topk_ids.shape[-1] < 1:
        raise ValueError(
            f"topk_ids: expected shape {(*lead, 'k')} or {(n_rows, 'k')} with k >= 1, got {tuple(topk_ids.shape)}"
        )
    if topk_weights.shape != topk_ids.shape:
        raise ValueError(
            f"topk_weights: expected shape {tuple(topk_ids.shape)} (topk_ids' shape: same k), "
            f"got {tuple(topk_weights.shape)}"
        )
    for t, name in ((topk_weights, "topk_weights"), (topk_ids, "topk_ids")):
        check_same_device(t, name, x, "x")
    k = topk_ids.shape[-1]
    ids, weights = topk_ids.reshape(n_rows, k), topk_weights.reshape(n_rows, k)
    if check_ids:
        check_id_range(ids, "topk_ids", n_experts, "expert")
    return weights, ids


def moe_lora(x, A, B, topk_weights, topk_ids, *, scale: float, out=None, check_ids: bool = True):
    """Mixture of LoRA experts: ``y_n = scale * sum_j w_nj * (x_n @ A[e_nj]) @ B[e_nj]`` with
    ``e_nj = topk_ids[n, j]`` and ``w_nj = topk_weights[n, j]``, computing only the selected experts
    (cost grows with ``N * k``, not ``N * E``). An expert repeated within a row counts twice.

    Args:
        x: ``[..., d_in]``, fp32 / fp16 / bf16 (fp64 for gradcheck); need not be contiguous.
        A: ``[E, d_in, r]`` expert down-projections. ``x``'s dtype, or fp32 with fp16/bf16 ``x``.
        B: ``[E, r, d_out]`` expert up-projections, ``A``'s dtype.
        topk_weights: ``[..., k]`` (``x``'s leading shape) or ``[N, k]``, any float dtype.
        topk_ids: int32/int64, the shape of ``topk_weights``, values in ``[0, E)``.
        scale: a Python number (``alpha / r``).
        out: if given (``[..., d_out]``, ``x``'s dtype), ``out += y`` in place and ``out`` is
            returned (one pass over ``out`` without autograd; one extra add with autograd).
        check_ids: raise ``ValueError`` for an id outside ``[0, E)`` (reads two numbers back from
            the device). With ``check_ids=False`` such a row comes out NaN and nothing outside the
            tensors is read or written.

    Returns ``y [..., d_out]`` in ``x``'s dtype (or ``out``), accumulated in fp32. Gradients reach
    ``x``, ``A``, ``B`` and ``topk_weights``.
    """
    E, _, _, d_out = _check_experts(x, A, B)
    weights, ids = _routing_rows(x, topk_weights, topk_ids, E, check_ids)
    scale = check_scale(scale)
    lead = tuple(x.shape[:-1])
    x2 = x.reshape(ids.shape[0], x.shape[-1])
    if out is None:
        y, _ = call_op(torch.ops.mhr_ops.moe_lora, (x2, A, B, weights, ids, scale), (x, A, B, topk_weights))
        return y.view(*lead, d_out)
    check_out(out, (*lead, d_out), x)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, A, B, topk_weights, out))
    try:
        out2 = out.view(x2.shape[0], d_out)
    except RuntimeError:
        out2 = None  # leading dims of out cannot be flattened without a copy
    if needs_grad or out2 is None or torch.compiler.is_compiling():
        y, _ = torch.ops.mhr_ops.moe_lora(x2, A, B, weights, ids, scale)
        return out.add_(y.view(out.shape))
    torch.ops.mhr_ops.moe_lora_add_(out2, x2, A, B, weights, ids, scale)
    return out


def moe_lora_linear(x, weight, bias, A, B, topk_weights, topk_ids, *, scale: float, check_ids: bool = True):
    """``F.linear(x, weight, bias) + moe_lora(x, A, B, topk_weights, topk_ids, scale=scale)`` in one
    op: what :class:`mhr_ops.nn.MoELoRALinear` runs for its base layer and experts.

    On the CPU with fp32 / fp64 ``x`` the experts' pass writes ``bias + update`` and the base GEMM
    accumulates into it, so the layer makes no extra pass over its output; elsewhere it is
    ``F.linear`` with the update added into its output. The backward adds the base layer's
    ``grad_y @ weight`` into the experts' dx inside the GEMM. Gradients reach ``x``, ``weight``,
    ``bias``, ``A``, ``B`` and ``topk_weights``.

    Args:
        x, A, B, topk_weights, topk_ids, scale, check_ids: as :func:`moe_lora`.
        weight: ``[d_out, d_in]`` in ``x``'s dtype (the base ``nn.Linear``'s).
        bias: ``[d_out]`` in ``x``'s dtype, or ``None``.

    Returns ``y [..., d_out]`` in ``x``'s dtype.
    """
    E, d_in, _, d_out = _check_experts(x, A, B)
    check_tensor(weight, "weight", ndim=2, dtypes=FLOAT_DTYPES)
    if bias is not None:
        check_tensor(bias, "bias", ndim=1, dtypes=FLOAT_DTYPES)
    weights, ids = _routing_rows(x, topk_weights, topk_ids, E, check_ids)
    scale = check_scale(scale)
    lead = tuple(x.shape[:-1])
    x2 = x.reshape(ids.shape[0], d_in)
    args = (x2, weight, bias, A, B, weights, ids, scale)
    y, _ = call_op(torch.ops.mhr_ops.moe_lora_linear, args, (x, weight, bias, A, B, topk_weights))
    return y.view(*lead, d_out)


def switch_balance_loss(router_probs: torch.Tensor, topk_ids: torch.Tensor, n_experts: int) -> tuple:
    """Switch-Transformer load-balancing loss ``E * sum_e f_e * P_e`` (``f_e``: fraction of token
    slots routed to expert ``e``, ``P_e``: mean router probability of ``e``) and the load ``f``.
    1 for a uniform load; 0 for no tokens."""
    probs = router_probs.reshape(-1, n_experts)
    ids = topk_ids.reshape(-1)
    if ids.numel() == 0:
        return probs.sum() * 0, probs.new_zeros(n_experts).detach()
    counts = torch.zeros(n_experts, dtype=probs.dtype, device=probs.device)
    counts = counts.scatter_add(0, ids, torch.ones_like(ids, dtype=probs.dtype))
    load = counts / ids.numel()
    return n_experts * (load * probs.mean(0)).sum(), load.detach()


# ---- fake kernels ----


def _bottleneck_like(x, A, k):
    return x.new_empty((x.shape[0], k, A.shape[2]), dtype=accumulation_dtype(x.dtype))


@torch.library.register_fake("mhr_ops::moe_lora")
def _moe_lora_fake(x, A, B, topk_weights, topk_ids, scale):
    return x.new_empty((x.shape[0], B.shape[2])), _bottleneck_like(x, A, topk_ids.shape[1])


@torch.library.register_fake("mhr_ops::moe_lora_add_")
def _moe_lora_add_fake(out, x, A, B, topk_weights, topk_ids, scale):
    return _bottleneck_like(x, A, topk_ids.shape[1])


@torch.library.register_fake("mhr_ops::moe_lora_backward")
def _moe_lora_backward_fake(grad_y, x, A, B, topk_weights, topk_ids, scale, z, output_mask):
    return tuple(
        t.new_empty(t.shape) if needed else t.new_empty((0,))
        for t, needed in zip((x, A, B, topk_weights), output_mask, strict=True)
    )


@torch.library.register_fake("mhr_ops::moe_lora_linear")
def _moe_lora_linear_fake(x, weight, bias, A, B, topk_weights, topk_ids, scale):
    return x.new_empty((x.shape[0], weight.shape[0])), _bottleneck_like(x, A, topk_ids.shape[1])


@torch.library.register_fake("mhr_ops::moe_lora_linear_backward")
def _moe_lora_linear_backward_fake(grad_y, x, weight, has_bias, A, B, topk_weights, topk_ids, scale, z, output_mask):
    shapes = (x.shape, weight.shape, weight.shape[:1], A.shape, B.shape, topk_weights.shape)
    likes = (x, weight, weight, A, B, topk_weights)
    return tuple(
        t.new_empty(shape) if needed and (i != 2 or has_bias) else t.new_empty((0,))
        for i, (t, shape, needed) in enumerate(zip(likes, shapes, output_mask, strict=True))
    )


# ---- autograd: the forward's per-slot z is saved, so the backward does not re-project x ----

register_bottleneck_autograd("mhr_ops::moe_lora", torch.ops.mhr_ops.moe_lora_backward, n_tensors=5, n_grads=4)
register_no_double_backward("mhr_ops::moe_lora_backward", "moe_lora")


def _linear_setup_context(ctx, inputs, output):
    x, weight, bias, A, B, topk_weights, topk_ids, ctx.scale = inputs
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, weight, A, B, topk_weights, topk_ids, output[1])


def _linear_backward(ctx, grad_y, grad_z):
    mask = list(ctx.needs_input_grad[:6])
    if not any(mask):
        return (None,) * 8
    x, weight, A, B, topk_weights, topk_ids, z = ctx.saved_tensors
    grads = torch.ops.mhr_ops.moe_lora_linear_backward(
        grad_y, x, weight, ctx.has_bias, A, B, topk_weights, topk_ids, ctx.scale, z, mask
    )
    return (*needed_grads(grads, mask), None, None)


torch.library.register_autograd("mhr_ops::moe_lora_linear", _linear_backward, setup_context=_linear_setup_context)
register_no_double_backward("mhr_ops::moe_lora_linear_backward", "moe_lora_linear")
