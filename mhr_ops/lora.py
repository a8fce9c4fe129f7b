"""`routed_lora` and `mhr_linear` (docs/API.md), with the fake kernels of torch.ops.mhr_ops.routed_lora /
routed_lora_add_ / routed_lora_backward / mhr_linear / mhr_linear_backward (their autograd is C++:
csrc/torch/autograd.cpp)."""

from __future__ import annotations

import math

import torch

from . import _C  # noqa: F401  (loads the op registrations)
from ._autograd import call_op, register_no_double_backward
from ._checks import (
    accumulation_dtype,
    as_index_tensor,
    check_id_range,
    check_out,
    check_same_device,
    check_scale,
    check_tensor,
)

# The OpOverload itself, read once (torch.ops.mhr_ops.mhr_linear.default is an attribute chain
# of about half a us): for serving paths that call the op directly.
MHR_LINEAR_OP = torch.ops.mhr_ops.mhr_linear.default
TASK_LORA_LINEAR_OP = torch.ops.mhr_ops.task_lora_linear.default


def _check_tensors(x, named) -> None:
    """What the op cannot see: arguments that are not tensors, x's leading dims, and tensors off
    x's device (a meta or fake tensor among them sends the call to the fake kernel, where no C++
    check runs). Shapes and dtypes are the op's contract (csrc/torch/args/routed_lora_args.cpp): it
    raises ValueError naming the argument."""
    check_tensor(x, "x")
    if x.dim() < 1:
        raise ValueError(f"x: expected a tensor [..., d_in], got shape {tuple(x.shape)}")
    for name, t in named:
        check_tensor(t, name)
        check_same_device(t, name, x, "x")


def _d_out(A, B) -> int | None:
    """d_out for an ``out=`` shape check; None when A or B is not 4-D (the op then says how)."""
    return A.shape[0] * B.shape[3] if A.dim() == 4 and B.dim() == 4 else None


def _rows(x, group_ids, n_groups: int | None, check_ids: bool):
    """x as [N, d_in] and the group ids as the op takes them: (x2, ids, rows_per_group_id)."""
    lead = tuple(x.shape[:-1])
    ids = as_index_tensor(group_ids, "group_ids", x.device)
    check_same_device(ids, "group_ids", x, "x")
    n_rows = math.prod(lead)
    if tuple(ids.shape) == lead:
        ids, rows_per_id = ids.reshape(-1), 1
    elif lead and tuple(ids.shape) == lead[:1]:
        rows_per_id = math.prod(lead[1:])
    else:
        per_batch = f" or {lead[:1]} (one per leading batch element)" if len(lead) > 1 else ""
        raise ValueError(f"group_ids: expected shape {lead} (one id per row){per_batch}, got {tuple(ids.shape)}")
    if n_rows == 0:
        ids, rows_per_id = ids.reshape(-1)[:0], 1
    if check_ids and n_groups is not None:
        check_id_range(ids, "group_ids", n_groups, "group")
    return x.reshape(n_rows, x.shape[-1]), ids, rows_per_id


def _n_groups(weights) -> int | None:
    """G for the opt-in id range check; None for a 0-d weights (the op refuses it)."""
    return weights.shape[0] if weights.dim() > 0 else None


def routed_lora(x, A, B, weights, group_ids, *, scale: float, out=None, check_ids: bool = True):
    """Routed LoRA update ``scale * (x_row @ A_g) @ B_g`` for every row of ``x``.

    ``A_g`` / ``B_g`` mix the skill inventory with group ``g``'s weights head by head:
    head block ``k`` of ``A_g`` is ``sum_s weights[g, k, s] * A[k, s]`` (likewise ``B``). With
    ``x [bs, L, d_in]``, ``group_ids = arange(bs)`` and ``scale = 1/r`` this is PEFT's Poly/MHR
    ``x.bmm(A).bmm(B) / r``.

    Args:
        x: ``[..., d_in]``, fp32 / fp16 / bf16 (fp64 for gradcheck); need not be contiguous.
        A: ``[h, S, d_in/h, r]`` skill down-projections (PEFT ``poly_lora_A``).
        B: ``[h, S, r, d_out/h]`` skill up-projections (PEFT ``poly_lora_B``). Same dtype as
            ``A``: ``x``'s dtype, or fp32 with fp16/bf16 ``x`` (PEFT's fp32 adapters).
        weights: ``[G, h, S]`` routing weights (e.g. from :func:`mhr_ops.route`).
        group_ids: int tensor of groups in ``[0, G)``: one per row (``x.shape[:-1]``) or one per
            leading batch element (``x.shape[:1]``, broadcast over the other leading dims).
            Rows need not be sorted by group.
        scale: ``1/r`` for PEFT, ``alpha/r`` for mttl.
        out: if given (shape ``[..., d_out]``, ``x``'s dtype), ``out += y`` in place and ``out`` is
            returned. Without autograd this is a single fused pass over ``out``; when autograd is
            recording it costs one extra elementwise add (custom ops with autograd are
            functional); :func:`mhr_linear` is the fused training path.
        check_ids: raise if a group id is outside ``[0, G)`` (one device read-back on CUDA).

    Returns:
        ``y [..., d_out]`` in ``x``'s dtype (or ``out``), accumulated in fp32.
    """
    _check_tensors(x, (("A", A), ("B", B), ("weights", weights)))
    scale = check_scale(scale)
    lead = tuple(x.shape[:-1])
    x2, ids, rows_per_id = _rows(x, group_ids, _n_groups(weights), check_ids)
    if out is None:
        args = (x2, A, B, weights, ids, rows_per_id, scale)
        y, _ = call_op(torch.ops.mhr_ops.routed_lora, args, (x, A, B, weights))
        return y.view(*lead, y.shape[-1])
    d_out = _d_out(A, B)
    if d_out is not None:
        check_out(out, (*lead, d_out), x)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, A, B, weights, out))
    try:
        out2 = out.view(x2.shape[0], d_out) if d_out is not None else None
    except RuntimeError:
        out2 = None  # leading dims of out cannot be flattened without a copy
    if needs_grad or out2 is None:
        y, _ = torch.ops.mhr_ops.routed_lora(x2, A, B, weights, ids, rows_per_id, scale)
        return out.add_(y.view(out.shape))
    torch.ops.mhr_ops.routed_lora_add_(out2, x2, A, B, weights, ids, rows_per_id, scale)
    return out


def mhr_linear(x, weight, bias, A, B, weights, group_ids, *, scale: float, check_ids: bool = True):
    """``F.linear(x, weight, bias) + routed_lora(x, A, B, weights, group_ids, scale=scale)`` in one
    call with one output allocation: the routed update is added into the base layer's output.

    ``weight`` is ``[d_out, d_in]`` in ``x``'s dtype, ``bias`` ``[d_out]`` or None; the other
    arguments are as in :func:`routed_lora`. Autograd covers every tensor argument.
    """
    base = (("weight", weight),) + ((("bias", bias),) if bias is not None else ())
    _check_tensors(x, (("A", A), ("B", B), ("weights", weights), *base))
    scale = check_scale(scale)
    lead = tuple(x.shape[:-1])
    x2, ids, rows_per_id = _rows(x, group_ids, _n_groups(weights), check_ids)
    args = (x2, weight, bias, A, B, weights, ids, rows_per_id, scale)
    y, _ = call_op(torch.ops.mhr_ops.mhr_linear, args, (x, weight, bias, A, B, weights))
    return y.view(*lead, y.shape[-1])


def adapted_linear(x, weight, bias, A, B, weights, group_ids, scale: float):
    """``mhr_linear`` for adapted layers (``nn.MHRLinear``), whose own tensors are known good: one
    group id per ``x.shape[0]`` (or a 0-d id for a 1-D ``x``). No Python checks (the op checks
    shapes, dtypes and devices) and no autograd kernel when nothing needs a gradient: the per-call
    cost a serving layer pays."""
    d_in = x.shape[-1]
    x2 = x.reshape(-1, d_in)
    ids = group_ids.reshape(-1)
    if x2.shape[0] == 0 or ids.shape[0] == 0:
        return mhr_linear(x, weight, bias, A, B, weights, group_ids, scale=scale, check_ids=False)
    args = (x2, weight, bias, A, B, weights, ids, x2.shape[0] // ids.shape[0], scale)
    y, _ = call_op(torch.ops.mhr_ops.mhr_linear, args, (x, weight, bias, A, B, weights))
    return y.view(*x.shape[:-1], weight.shape[0])


# ---- fake kernels ----


def _bottleneck_like(x, A):
    return x.new_empty((x.shape[0], A.shape[3]), dtype=accumulation_dtype(x.dtype))


@torch.library.register_fake("mhr_ops::routed_lora")
def _routed_lora_fake(x, A, B, weights, group_ids, rows_per_group_id, scale):
    return x.new_empty((x.shape[0], A.shape[0] * B.shape[3])), _bottleneck_like(x, A)


@torch.library.register_fake("mhr_ops::task_lora_linear")
def _task_lora_linear_fake(x, weight, bias, A, B, task_ids, rows_per_task_id):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake("mhr_ops::routed_lora_add_")
def _routed_lora_add_fake(out, x, A, B, weights, group_ids, rows_per_group_id, scale):
    return _bottleneck_like(x, A)


def _grads_like(tensors, output_mask):
    return tuple(
        t.new_empty(t.shape) if needed else t.new_empty((0,)) for t, needed in zip(tensors, output_mask, strict=True)
    )


@torch.library.register_fake("mhr_ops::routed_lora_backward")
def _routed_lora_backward_fake(grad_y, x, A, B, weights, group_ids, rows_per_group_id, scale, z, output_mask):
    return _grads_like((x, A, B, weights), output_mask)


@torch.library.register_fake("mhr_ops::mhr_linear_backward")
def _mhr_linear_backward_fake(
    grad_y, x, weight, has_bias, A, B, weights, group_ids, rows_per_group_id, scale, z, output_mask
):
    bias_like = x.new_empty((weight.shape[0],) if has_bias else (0,))
    mask = list(output_mask)
    mask[2] = mask[2] and has_bias
    return _grads_like((x, weight, bias_like, A, B, weights), mask)


# ---- autograd: in C++ (csrc/torch/autograd.cpp), saving the forward's z so that the backward
# reads x once less; the backward ops refuse double backward ----

register_no_double_backward("mhr_ops::routed_lora_backward", "routed_lora")
register_no_double_backward("mhr_ops::mhr_linear_backward", "mhr_linear")
