"""routed_lora and mhr_linear (SPEC section 3) against the float64 reference and PEFT's Poly
Linear: dtypes, shapes, group layouts, out=, gradients, gradcheck, opcheck, torch.compile, bad
input."""

import contextlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    ADAPTER_DTYPES,
    DEVICES,
    EMULATED_CUDA,
    assert_backward_close,
    assert_close,
    bad_input_test,
    max_diff,
    scale_and_out_errors,
)

import mhr_ops
from mhr_ops import reference

DTYPES = ADAPTER_DTYPES  # (x dtype, adapter dtype)
# Tests of the CPU kernels themselves: deselected when the emulated CUDA kernels stand in (conftest).
CPU_PATH = pytest.mark.cpu_kernels(
    "a CPU-only strategy of routed_lora (grouped runs, row tiles, row backward), chosen by its size"
)
# (h, S, d_in/h, r, d_out/h)
SHAPES = [(1, 1, 7, 1, 5), (2, 3, 5, 4, 6), (8, 8, 4, 16, 4), (16, 8, 2, 1, 3), (1, 2, 9, 128, 3)]


def make(h, S, dk_in, r, dk_out, G, lead, *, device, dtype=torch.float32, adapter_dtype=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    adapter_dtype = adapter_dtype or dtype

    def rnd(*shape, dt, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dt).to(device)

    x = rnd(*lead, h * dk_in, dt=dtype)
    A = rnd(h, S, dk_in, r, dt=adapter_dtype, scale=(dk_in * h) ** -0.5)
    B = rnd(h, S, r, dk_out, dt=adapter_dtype, scale=r**-0.5)
    w_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    w = torch.rand(G, h, S, generator=gen, dtype=torch.float64).to(w_dtype).to(device)
    return x, A, B, w


def group_layout(kind, lead, G, device, gen):
    if kind == "per_batch":  # one id per example, long runs of rows
        return torch.randint(0, G, lead[:1], generator=gen).to(device)
    if kind == "per_row":  # unsorted, every row picks its own group
        return torch.randint(0, G, lead, generator=gen).to(device)
    if kind == "one_group":
        return torch.zeros(lead, dtype=torch.long, device=device)
    if kind == "own_group":  # every row its own group (G == N)
        return torch.randperm(G, generator=gen).reshape(lead).to(device)
    raise ValueError(kind)


def plain_torch(x, A, B, w, group_ids, scale):
    """The non-fused computation in the inputs' own dtype (PEFT's way): the error bar for the
    low-precision comparisons."""
    wd = w.to(A.dtype)
    a = torch.einsum("gks,ksdr->gkdr", wd, A).reshape(w.shape[0], -1, A.shape[-1])
    b = torch.einsum("gks,ksrd->gkrd", wd, B).transpose(1, 2).reshape(w.shape[0], B.shape[2], -1)
    rows = x.reshape(-1, x.shape[-1]).to(A.dtype)
    groups = reference._row_groups(x, group_ids)
    y = (rows.unsqueeze(1) @ a[groups]) @ b[groups] * scale
    return y.squeeze(1).to(x.dtype).reshape(*x.shape[:-1], -1)


def check_low_precision(out, ref, plain, what):
    """The kernel's error against the float64 reference is at most 2x plain PyTorch's in the same
    dtype (flash-attention's rule), plus a floor for outputs that plain PyTorch gets exact."""
    err, err_plain = max_diff(out, ref), max_diff(plain, ref)
    print(f"{what}: max err {err:.3e}, plain torch {err_plain:.3e}")
    assert err <= 2 * err_plain + 1e-2 * (ref.abs().max().item() * 2**-7 + 1e-6)


KINDS = ["per_batch", "per_row", "one_group", "own_group"]
FORWARD_GRID = [(kind, shape, *dts) for kind in KINDS for shape in SHAPES for dts in DTYPES]
if EMULATED_CUDA:
    # The emulation runs one OS thread per CUDA thread (256 a block here), so the whole grid would
    # take most of a CI run. A covering subset: every shape with every group layout, the dtype
    # pairs taken in turn (each one 3 or 4 times).
    FORWARD_GRID = [
        (kind, shape, *DTYPES[(i + j) % len(DTYPES)]) for i, shape in enumerate(SHAPES) for j, kind in enumerate(KINDS)
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind,shape,dtype,adapter_dtype", FORWARD_GRID)
def test_forward_matches_reference(device, dtype, adapter_dtype, shape, kind):
    h, S, dk_in, r, dk_out = shape
    lead = (3, 17)  # odd sizes; per_batch gives runs of 17 rows (grouped path on CPU)
    G = 51 if kind == "own_group" else 5
    gen = torch.Generator().manual_seed(1)
    x, A, B, w = make(*shape, G, lead, device=device, dtype=dtype, adapter_dtype=adapter_dtype)
    ids = group_layout(kind, lead, G, device, gen)
    scale = 1.0 / r
    y = mhr_ops.routed_lora(x, A, B, w, ids, scale=scale)
    ref = reference.routed_lora(x, A, B, w, ids, scale=scale)
    assert y.shape == (*lead, h * dk_out) and y.dtype == dtype
    if dtype in (torch.float32, torch.float64):
        tol = 1e-10 if dtype == torch.float64 else 2e-5
        assert_close(y, ref, atol=tol, rtol=tol, what=f"routed_lora {kind}")
    else:
        check_low_precision(y, ref, plain_torch(x, A, B, w, ids, scale), f"routed_lora {dtype}/{adapter_dtype}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["per_batch", "per_row"])
@pytest.mark.parametrize("shape", [(2, 3, 5, 4, 6), (8, 8, 4, 16, 4), (1, 2, 9, 128, 3)])
def test_gradients_match_reference(device, kind, shape):
    lead = (2, 19) if EMULATED_CUDA else (4, 19)  # 38 rows still cross a 32-row tile edge
    G = 6
    gen = torch.Generator().manual_seed(2)
    x, A, B, w = make(*shape, G, lead, device=device, dtype=torch.float64, seed=3)
    ids = group_layout(kind, lead, G, device, gen)
    gy = torch.randn(*lead, shape[0] * shape[4], dtype=torch.float64, device=device)
    ours = [t.clone().requires_grad_() for t in (x, A, B, w)]
    mhr_ops.routed_lora(*ours, ids, scale=0.3).backward(gy)
    refs = [t.clone().requires_grad_() for t in (x, A, B, w)]
    reference.routed_lora(*refs, ids, scale=0.3).backward(gy)
    for name, a, b in zip("x A B weights".split(), ours, refs, strict=True):
        assert_close(a.grad, b.grad, atol=1e-9, rtol=1e-9, what=f"d{name} {kind}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)])
def test_fp32_and_mixed_gradients(device, dtype, adapter_dtype):
    shape, lead, G = (4, 5, 8, 8, 8), (3, 40), 4
    x, A, B, w = make(*shape, G, lead, device=device, dtype=dtype, adapter_dtype=adapter_dtype, seed=5)
    ids = torch.tensor([3, 0, 3], device=device)
    gy = torch.randn(*lead, 32, device=device).to(dtype)
    ours = [t.clone().requires_grad_() for t in (x, A, B, w)]
    mhr_ops.routed_lora(*ours, ids, scale=0.25).backward(gy)
    refs = [t.clone().requires_grad_() for t in (x, A, B, w)]
    reference.routed_lora(*refs, ids, scale=0.25).backward(gy.double())
    for name, a, b in zip("x A B weights".split(), ours, refs, strict=True):
        assert a.grad.dtype == a.dtype
        tol = 2e-5 if dtype == torch.float32 else 3e-2
        assert_close(a.grad, b.grad, atol=tol * max(1.0, b.grad.abs().max().item()), rtol=tol, what=f"d{name}")


@pytest.mark.parametrize("kind", ["per_batch", "per_row"])
def test_gradcheck_float64(kind):
    shape, lead, G = (2, 3, 3, 2, 2), (2, 16), 3
    gen = torch.Generator().manual_seed(4)
    x, A, B, w = make(*shape, G, lead, device="cpu", dtype=torch.float64, seed=6)
    ids = group_layout(kind, lead, G, "cpu", gen)
    inputs = tuple(t.requires_grad_() for t in (x, A, B, w))
    # Under the emulation a kernel launch costs ~0.1 s (256 OS threads a block): fast mode checks
    # the Jacobian along random directions, a few launches per input instead of two per element.
    fast = EMULATED_CUDA
    assert torch.autograd.gradcheck(lambda *t: mhr_ops.routed_lora(*t, ids, scale=0.7), inputs, fast_mode=fast)
    weight = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda xx, W, b, a, bb, ww: mhr_ops.mhr_linear(xx, W, b, a, bb, ww, ids, scale=0.7),
        (x, weight, bias, *inputs[1:]),
        fast_mode=fast,
    )


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_flows_through_route_to_logits(device):
    h, S, T = 2, 4, 5
    logits = torch.randn(T, h * S, dtype=torch.float64, device=device, requires_grad=True)
    x, A, B, _ = make(h, S, 3, 2, 3, T, (3, 8), device=device, dtype=torch.float64)
    task_ids = torch.tensor([4, 1, 4], device=device)

    def f(lg, route_fn, lora_fn):
        w = route_fn(lg, task_ids, n_skills=S)
        return lora_fn(x, A, B, w, torch.arange(3, device=device), scale=0.5).square().sum()

    (g_ours,) = torch.autograd.grad(f(logits, mhr_ops.route, mhr_ops.routed_lora), logits)
    (g_ref,) = torch.autograd.grad(f(logits, reference.route, reference.routed_lora), logits)
    assert_close(g_ours, g_ref, atol=1e-9, rtol=1e-9, what="d logits")


@pytest.mark.parametrize("device", DEVICES)
def test_out_accumulates_in_place(device):
    x, A, B, w = make(2, 3, 4, 3, 5, 4, (2, 20), device=device)
    ids = torch.tensor([1, 3], device=device)
    base = torch.randn(2, 20, 10, device=device)
    out = base.clone()
    with torch.no_grad():
        ret = mhr_ops.routed_lora(x, A, B, w, ids, scale=0.5, out=out)
    assert ret is out
    assert_close(out, reference.routed_lora(x, A, B, w, ids, scale=0.5, out=base), atol=2e-5, rtol=2e-5, what="out=")
    # with autograd recording, out= still accumulates in place and gradients reach every input
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    out2 = base.clone()
    ret2 = mhr_ops.routed_lora(xg, A, B, wg, ids, scale=0.5, out=out2)
    assert ret2 is out2
    ret2.sum().backward()
    assert xg.grad is not None and wg.grad is not None
    assert_close(out2.detach(), out, atol=1e-6, rtol=1e-6, what="out= under autograd")
    # an out whose leading dims cannot be flattened without a copy still accumulates in place
    strided = torch.randn(20, 2, 10, device=device).transpose(0, 1)
    expected = reference.routed_lora(x, A, B, w, ids, scale=0.5, out=strided)
    with torch.no_grad():
        mhr_ops.routed_lora(x, A, B, w, ids, scale=0.5, out=strided)
    assert_close(strided, expected, atol=2e-5, rtol=2e-5, what="strided out=")


@pytest.mark.parametrize("device", DEVICES)
def test_out_with_internal_overlap_is_refused(device):
    """routed_lora_add_ writes through out's strides, each element once: an out whose elements
    share memory (a broadcast row) would be written several times, so every backend refuses it
    in the shared argument checks."""
    x, A, B, w = make(2, 3, 4, 3, 5, 4, (6,), device=device)
    ids = torch.tensor([1, 3, 0, 2, 1, 1], device=device)
    out = torch.zeros(1, 10, device=device).expand(6, 10)
    with pytest.raises(ValueError, match=r"out: expected a tensor without internal overlap .*strides \[0, 1\]"):
        torch.ops.mhr_ops.routed_lora_add_(out, x, A, B, w, ids, 1, 0.5)
    with torch.no_grad(), pytest.raises(ValueError, match="out: expected a tensor without internal overlap"):
        mhr_ops.routed_lora(x, A, B, w, ids, scale=0.5, out=out)
    assert torch.equal(out, torch.zeros(6, 10, device=device))  # refused before anything was written


@pytest.fixture
def deterministic_algorithms():
    before, warn_only = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before, warn_only=warn_only)


def test_deterministic_algorithms_alert_where_cuda_uses_atomics(deterministic_algorithms):
    """SPEC section 8. The CUDA binding raises torch's non-determinism alert exactly where a kernel
    sums with floating-point atomics: the shrink when it splits its reduction across blocks (few
    rows over more than one 32-column chunk of heads) and the wgrad kernel (dA, dB, dweights).
    The CPU kernels are deterministic and never raise. On CPU tensors this runs the CPU kernels,
    under MHR_OPS_EMULATED_CUDA=1 the CUDA binding and kernels."""

    def alert(op):
        if not EMULATED_CUDA:
            return contextlib.nullcontext()
        return pytest.raises(RuntimeError, match=rf"{op} \(CUDA\) does not have a deterministic implementation")

    ops = torch.ops.mhr_ops
    split = make(2, 3, 4, 3, 5, 4, (6,), device="cpu")  # 2 heads x 1 chunk, 1 row tile: split
    whole = make(1, 3, 32, 3, 5, 4, (6,), device="cpu")  # 1 head, 1 chunk: one block per row tile
    ids = torch.tensor([1, 3, 0, 2, 1, 1])
    with alert("routed_lora"):
        ops.routed_lora(*split, ids, 1, 0.5)
    with alert("routed_lora_add_"):
        ops.routed_lora_add_(torch.zeros(6, 10), *split, ids, 1, 0.5)
    x, A, B, w = whole
    y, z = ops.routed_lora(x, A, B, w, ids, 1, 0.5)  # no split: deterministic on every backend
    gy = torch.randn(6, 5)
    dx = ops.routed_lora_backward(gy, x, A, B, w, ids, 1, 0.5, z, [True, False, False, False])[0]
    assert dx.shape == x.shape  # dx alone: unsplit shrink and expand, no atomics
    with alert("routed_lora_backward"):
        ops.routed_lora_backward(gy, x, A, B, w, ids, 1, 0.5, z, [False, True, False, False])
    with alert("routed_lora_backward"):
        ops.routed_lora_backward(gy, x, A, B, w, ids, 1, 0.5, z, [False, False, False, True])
    with alert("routed_lora_add_"):  # mhr_linear: on CUDA the composite over routed_lora_add_
        ops.mhr_linear(split[0], torch.randn(10, 8), None, *split[1:], ids, 1, 0.5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_mhr_linear(device, dtype, adapter_dtype, with_bias):
    h, S, dk_in, r, dk_out = 4, 3, 6, 5, 7
    x, A, B, w = make(h, S, dk_in, r, dk_out, 3, (3, 21), device=device, dtype=dtype, adapter_dtype=adapter_dtype)
    weight = (torch.randn(h * dk_out, h * dk_in, device=device) / 5).to(dtype)
    bias = torch.randn(h * dk_out, device=device).to(dtype) if with_bias else None
    ids = torch.tensor([2, 0, 2], device=device)
    ins = [t.clone().requires_grad_() for t in (x, weight, A, B, w)] + (
        [bias.clone().requires_grad_()] if with_bias else []
    )
    xi, Wi, Ai, Bi, wi = ins[:5]
    bi = ins[5] if with_bias else None
    y = mhr_ops.mhr_linear(xi, Wi, bi, Ai, Bi, wi, ids, scale=0.2)
    refs = [t.detach().double().requires_grad_() for t in ins]
    ref = reference.mhr_linear(refs[0], refs[1], refs[5] if with_bias else None, *refs[2:5], ids, scale=0.2)
    assert y.dtype == dtype and y.shape == ref.shape
    tol = 2e-5 if dtype == torch.float32 else 4e-2
    assert_close(y, ref, atol=tol, rtol=tol, what="mhr_linear")
    assert_backward_close(y, ref, ins, refs, tol=tol, what="mhr_linear")


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    h, S, dk_in, r, dk_out = 3, 4, 5, 3, 4
    x_wide = torch.randn(2, 30, 2 * h * dk_in, dtype=torch.float64, device=device)
    x = x_wide[:, ::2, ::2]  # strided rows and columns
    A = torch.randn(r, dk_in, S, h, dtype=torch.float64, device=device).permute(3, 2, 1, 0)
    B = torch.randn(dk_out, r, S, h, dtype=torch.float64, device=device).permute(3, 2, 1, 0)
    w = torch.rand(h, S, 4, dtype=torch.float64, device=device).permute(2, 0, 1)
    ids = torch.tensor([3, 3, 1, 0], device=device)[::2]
    assert not any(t.is_contiguous() for t in (x, A, B, w, ids))
    ins = [t.clone().requires_grad_() for t in (x, A, B, w)]
    y = mhr_ops.routed_lora(*ins, ids, scale=0.5)
    refs = [t.clone().requires_grad_() for t in (x, A, B, w)]
    ref = reference.routed_lora(*refs, ids, scale=0.5)
    assert_close(y, ref, atol=1e-10, rtol=1e-10, what="non-contiguous")
    gy = torch.randn(15, 2, h * dk_out, dtype=torch.float64, device=device).transpose(0, 1)
    y.backward(gy)
    ref.backward(gy)
    for a, b in zip(ins, refs, strict=True):
        assert_close(a.grad, b.grad, atol=1e-10, rtol=1e-10, what="non-contiguous grad")
    # mhr_linear with a transposed base weight and a strided bias
    weight = torch.randn(h * dk_in, h * dk_out, dtype=torch.float64, device=device).t()
    bias = torch.randn(2 * h * dk_out, dtype=torch.float64, device=device)[::2]
    lin = [t.clone().requires_grad_() for t in (x, weight, bias, A, B, w)]
    y = mhr_ops.mhr_linear(*lin, ids, scale=0.5)
    lin_ref = [t.clone().requires_grad_() for t in (x, weight, bias, A, B, w)]
    ref = reference.mhr_linear(*lin_ref, ids, scale=0.5)
    assert_close(y, ref, atol=1e-10, rtol=1e-10, what="non-contiguous mhr_linear")
    y.backward(gy)
    ref.backward(gy)
    for a, b in zip(lin, lin_ref, strict=True):
        assert_close(a.grad, b.grad, atol=1e-10, rtol=1e-10, what="non-contiguous mhr_linear grad")


@pytest.mark.parametrize("device", DEVICES)
def test_empty_and_single_row(device):
    x, A, B, w = make(2, 3, 4, 2, 3, 2, (0, 5), device=device)
    ids = torch.empty(0, dtype=torch.long, device=device)
    xg = x.requires_grad_()
    y = mhr_ops.routed_lora(xg, A, B, w, ids, scale=1.0)
    assert y.shape == (0, 5, 6)
    y.sum().backward()
    assert xg.grad.shape == x.shape
    x1, A1, B1, w1 = make(2, 3, 4, 2, 3, 2, (), device=device)  # 1-D x: a single row
    y1 = mhr_ops.routed_lora(x1, A1, B1, w1, torch.tensor(1, device=device), scale=1.0)
    assert_close(y1, reference.routed_lora(x1, A1, B1, w1, torch.tensor(1), scale=1.0), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_nan_propagates_to_its_row_only(device):
    x, A, B, w = make(2, 3, 4, 2, 3, 2, (2, 18), device=device)
    x[1, 5, 0] = float("nan")
    y = mhr_ops.routed_lora(x, A, B, w, torch.tensor([0, 1], device=device), scale=1.0)
    assert torch.isnan(y[1, 5]).all()
    assert torch.isfinite(y[0]).all() and torch.isfinite(y[1, :5]).all() and torch.isfinite(y[1, 6:]).all()


# (lead, ids): rows in the forward's and backward's CPU paths: few rows (row tiles / row backward),
# long runs (runs paths), many rows in short runs (gathered row tiles / project-then-mix)
BAD_ID_LAYOUTS = {
    "few_rows": ((8,), [1, -3, 0, 7, -2, 2, -1, 1]),
    "runs": ((4, 256), [1, 9, -1, 2]),
    "short_runs": ((2048,), [5, 0, 1, -4, 2, 3] * 341 + [0, 1]),
}


@pytest.mark.parametrize("layout", list(BAD_ID_LAYOUTS))
def test_unchecked_out_of_range_group_ids_give_nan_rows(layout):
    """SPEC section 7: with validation skipped, a row whose group id is out of range gets a NaN
    row (y, and dx in the backward) and adds nothing to the other gradients; every other row gets
    its own value. The range check itself is the Python layer's (check_ids), on every backend."""
    lead, ids = BAD_ID_LAYOUTS[layout]
    r, dk = (8, 32) if layout == "runs" else (3, 16)
    x, A, B, w = make(2, 3, dk, r, dk // 2, 4, lead, device="cpu", seed=31)
    ids = torch.tensor(ids)
    bad = (ids < 0) | (ids >= 4)
    ins = [t.clone().requires_grad_() for t in (x, A, B, w)]
    y = mhr_ops.routed_lora(*ins, ids, scale=0.5, check_ids=False)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    y.backward(gy)
    refs = [t.clone().double().requires_grad_() for t in (x[~bad], A, B, w)]
    ref = reference.routed_lora(*refs, ids[~bad], scale=0.5)
    ref.backward(gy[~bad].double())
    assert_close(y[~bad], ref, atol=2e-5, rtol=2e-5, what="rows with valid ids")
    assert y[bad].isnan().all(), f"rows with ids {ids[bad].tolist()}: {y[bad]}"
    assert ins[0].grad[bad].isnan().all() and not ins[0].grad[~bad].isnan().any()
    assert_close(ins[0].grad[~bad], refs[0].grad, atol=2e-5, rtol=2e-5, what="dx of rows with valid ids")
    for name, a, b in zip(("A", "B", "weights"), ins[1:], refs[1:], strict=True):
        assert_close(a.grad, b.grad, atol=5e-5 * max(1.0, b.grad.abs().max().item()), rtol=5e-5, what=f"d{name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["per_batch", "per_row"])
def test_opcheck(device, kind):
    gen = torch.Generator().manual_seed(9)
    lead = (2, 5) if EMULATED_CUDA else (2, 16)  # opcheck calls each op many times: small under the emulation
    n = lead[0] * lead[1]
    x, A, B, w = make(2, 3, 4, 2, 3, 4, lead, device=device, seed=9)
    ids = group_layout(kind, lead, 4, device, gen)
    rows_per_id = lead[1] if kind == "per_batch" else 1
    x2 = x.reshape(n, 8)
    ids = ids.reshape(-1)
    req = [t.clone().requires_grad_() for t in (x2, A, B, w)]
    torch.library.opcheck(torch.ops.mhr_ops.routed_lora, (*req, ids, rows_per_id, 0.5))
    out = torch.randn(n, 6, device=device)
    torch.library.opcheck(torch.ops.mhr_ops.routed_lora_add_, (out, x2, A, B, w, ids, rows_per_id, 0.5))
    gy = torch.randn(n, 6, device=device)
    weight, bias = torch.randn(6, 8, device=device), torch.randn(6, device=device)
    _, z = torch.ops.mhr_ops.routed_lora(x2, A, B, w, ids, rows_per_id, 0.5)
    for mask in ([True] * 4, [False, True, False, True]):
        args = (gy, x2, A, B, w, ids, rows_per_id, 0.5, z, mask)
        torch.library.opcheck(torch.ops.mhr_ops.routed_lora_backward, args)
    req_lin = [t.clone().requires_grad_() for t in (x2, weight, bias, A, B, w)]
    torch.library.opcheck(torch.ops.mhr_ops.mhr_linear, (*req_lin, ids, rows_per_id, 0.5))
    for has_bias, mask in ((True, [True] * 6), (False, [True, False, True, False, True, False])):
        args = (gy, x2, weight, has_bias, A, B, w, ids, rows_per_id, 0.5, z, mask)
        torch.library.opcheck(torch.ops.mhr_ops.mhr_linear_backward, args)


def test_torch_compile_fullgraph():
    x, A, B, w = make(2, 3, 4, 2, 3, 3, (2, 16), device="cpu")
    weight, bias = torch.randn(6, 8), torch.randn(6)
    logits = torch.randn(5, 6, requires_grad=True)
    ids = torch.tensor([4, 0])

    def f(lg, xx):
        mix = mhr_ops.route(lg, ids, n_skills=3)
        y = mhr_ops.mhr_linear(xx, weight, bias, A, B, mix, torch.arange(2), scale=0.5)
        return (y + mhr_ops.routed_lora(xx, A, B, mix, torch.arange(2), scale=0.5)).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    xr = x.clone().requires_grad_()
    expected = f(logits, xr)
    g_expected = torch.autograd.grad(expected, (logits, xr))
    got = compiled(logits, xr)
    g_got = torch.autograd.grad(got, (logits, xr))
    torch.testing.assert_close(got, expected)
    for a, b in zip(g_got, g_expected, strict=True):
        torch.testing.assert_close(a, b)


# ---- PEFT parity ----


def _peft_linear(d_in, d_out, r, S, h, T, seed=0):
    from peft.tuners.poly.config import PolyConfig
    from peft.tuners.poly.layer import Linear as PolyLinear

    torch.manual_seed(seed)
    base = torch.nn.Linear(d_in, d_out)
    layer = PolyLinear(base, "default", PolyConfig(r=r, n_tasks=T, n_skills=S, n_splits=h))
    with torch.no_grad():  # PEFT zero-inits B; make the adapter matter
        layer.poly_lora_B["default"].normal_(0, 0.1)
        layer.poly_router["default"].module_logits.normal_(0, 1)
    return layer


def _ours(layer, x, task_ids, mode):
    A, B = layer.poly_lora_A["default"], layer.poly_lora_B["default"]
    logits = layer.poly_router["default"].module_logits
    w = mhr_ops.route(logits, task_ids, n_skills=A.shape[1], mode=mode)
    base = layer.base_layer
    return mhr_ops.mhr_linear(x, base.weight, base.bias, A, B, w, torch.arange(x.shape[0]), scale=1.0 / A.shape[-1])


@pytest.mark.parametrize("h,S,r", [(1, 4, 2), (4, 3, 8), (8, 8, 1)])
def test_peft_poly_linear_eval_and_train(h, S, r):
    layer = _peft_linear(32, 24, r, S, h, T=6)
    x = torch.randn(5, 11, 32)
    task_ids = torch.tensor([5, 0, 2, 2, 1])
    layer.eval()
    assert_close(_ours(layer, x, task_ids, "sigmoid"), layer(x, task_ids=task_ids), atol=1e-5, rtol=1e-5, what="eval")
    layer.train()
    params = list(layer.parameters())
    gy = torch.randn(5, 11, 24)
    torch.manual_seed(7)
    expected = layer(x, task_ids=task_ids)
    g_expected = torch.autograd.grad(expected, params, gy)
    torch.manual_seed(7)
    got = _ours(layer, x, task_ids, "relaxed_bernoulli")
    g_got = torch.autograd.grad(got, params, gy)
    assert_close(got, expected, atol=1e-5, rtol=1e-5, what="train (same seed)")
    for a, b in zip(g_got, g_expected, strict=True):
        assert_close(a, b, atol=1e-4, rtol=1e-4, what="train grads")


# ---- bad input (SPEC section 7) ----


def _good():
    x, A, B, w = make(2, 3, 4, 2, 3, 4, (2, 5), device="cpu")
    return dict(x=x, A=A, B=B, weights=w, group_ids=torch.tensor([0, 3]))


BAD = [
    (dict(x=torch.randn(2, 5, 9)), ValueError, "x: expected last dim d_in = h"),
    (dict(x=torch.randint(0, 2, (2, 5, 8))), ValueError, "x: expected dtype"),
    (dict(A=torch.randn(3, 4, 2)), ValueError, "A: expected a 4-D"),
    (dict(B=torch.randn(2, 4, 2, 3)), ValueError, r"B: expected shape \(2, 3, 2, d_out/h\)"),
    (dict(B=torch.randn(2, 3, 5, 3)), ValueError, r"B: expected shape \(2, 3, 2, d_out/h\)"),
    (dict(weights=torch.rand(4, 2, 4)), ValueError, r"weights: expected shape \(G, 2, 3\)"),
    (dict(weights=torch.rand(4, 2)), ValueError, "weights: expected a 3-D"),
    (dict(A=torch.randn(2, 3, 4, 2, dtype=torch.float64)), ValueError, "A: expected dtype"),
    (dict(B=torch.randn(2, 3, 2, 3, dtype=torch.float64)), ValueError, "B: expected dtype"),
    (dict(A=torch.randn(2, 3, 4, 0)), ValueError, r"A: expected a non-empty \[h, S, d_in/h, r\], got shape"),
    (
        dict(x=torch.randn(2, 5, 8).half(), A=torch.randn(2, 3, 4, 2, dtype=torch.float64)),
        ValueError,
        r"A: expected dtype torch.float16 or torch.float32 for x of dtype torch.float16, got torch.float64",
    ),
    (dict(A=torch.randn(2, 3, 4, 2).tolist()), TypeError, "A: expected a torch.Tensor, got list"),
    (dict(group_ids=torch.tensor([0, 4])), ValueError, r"group_ids: expected group ids in \[0, 4\), got 4"),
    (dict(group_ids=torch.tensor([-1, 0])), ValueError, r"group_ids: expected group ids in \[0, 4\), got -1"),
    (dict(group_ids=torch.tensor([0, 1, 2])), ValueError, r"group_ids: expected shape \(2, 5\)"),
    (dict(group_ids=torch.tensor([0.0, 1.0])), ValueError, "group_ids: expected dtype"),
]
BAD += scale_and_out_errors((2, 5, 6))
test_bad_input = bad_input_test(mhr_ops.routed_lora, _good, ("x", "A", "B", "weights", "group_ids"), BAD)


def test_bad_input_mhr_linear_and_devices():
    kw = _good()
    args = [kw[k] for k in ("x",)]
    with pytest.raises(ValueError, match=r"weight: expected shape \(6, 8\)"):
        mhr_ops.mhr_linear(*args, torch.randn(6, 7), None, kw["A"], kw["B"], kw["weights"], kw["group_ids"], scale=1.0)
    with pytest.raises(ValueError, match=r"bias: expected shape \(6,\)"):
        mhr_ops.mhr_linear(
            *args, torch.randn(6, 8), torch.randn(5), kw["A"], kw["B"], kw["weights"], kw["group_ids"], scale=1.0
        )
    with pytest.raises(ValueError, match="A: expected a tensor on meta"):
        mhr_ops.routed_lora(kw["x"].to("meta"), kw["A"], kw["B"], kw["weights"], kw["group_ids"], scale=1.0)


def test_op_level_checks_name_the_argument():
    kw = _good()
    x2 = kw["x"].reshape(10, 8)
    # the op never reads an out-of-range id: its rows come out NaN (SPEC section 7)
    y, _ = torch.ops.mhr_ops.routed_lora(x2, kw["A"], kw["B"], kw["weights"], torch.tensor([0, 9]), 5, 1.0)
    assert y[5:].isnan().all() and not y[:5].isnan().any()
    with pytest.raises(ValueError, match=r"z: expected the forward's bottleneck \(10, 2\) of dtype torch.float32"):
        torch.ops.mhr_ops.routed_lora_backward(
            torch.randn(10, 6),
            x2,
            kw["A"],
            kw["B"],
            kw["weights"],
            torch.tensor([0, 1]),
            5,
            1.0,
            torch.randn(10, 3),
            [True] * 4,
        )
    with pytest.raises(ValueError, match="group_ids: expected 10 / 5 ids"):
        torch.ops.mhr_ops.routed_lora(x2, kw["A"], kw["B"], kw["weights"], torch.tensor([0, 1, 2]), 5, 1.0)
    with pytest.raises(ValueError, match=r"x: expected last dim d_in = h \* A.shape\[2\] = 8 \(d_in must split"):
        torch.ops.mhr_ops.routed_lora(x2[:, :7], kw["A"], kw["B"], kw["weights"], torch.tensor([0, 1]), 5, 1.0)


def test_double_backward_raises_clearly():
    x, A, B, w = make(2, 3, 4, 2, 3, 2, (2, 4), device="cpu", dtype=torch.float64)
    xg = x.requires_grad_()
    y = mhr_ops.routed_lora(xg, A, B, w, torch.tensor([0, 1]), scale=1.0)
    (g,) = torch.autograd.grad(y.square().sum(), xg, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()


def test_matches_plain_linear_when_all_skills_equal():
    """One skill repeated: routed LoRA collapses to a plain LoRA with the normalized weights."""
    h, S, dk, r = 2, 4, 3, 2
    A1, B1 = torch.randn(h, 1, dk, r), torch.randn(h, 1, r, dk)
    A, B = A1.expand(h, S, dk, r), B1.expand(h, S, r, dk)
    w = torch.full((1, h, S), 1.0 / S)
    x = torch.randn(5, h * dk)
    y = mhr_ops.routed_lora(x, A, B, w, torch.zeros(5, dtype=torch.long), scale=0.5)
    lora_a = A1[:, 0].reshape(h * dk, r)
    lora_b = B1[:, 0].transpose(0, 1).reshape(r, h * dk)
    assert_close(y, 0.5 * F.linear(F.linear(x, lora_a.t()), lora_b.t()), atol=1e-5, rtol=1e-5, what="plain LoRA")


@CPU_PATH
@pytest.mark.parametrize("r", [4, 8, 16, 32, 5])
@pytest.mark.parametrize("with_base", [False, True])
def test_grouped_cpu_paths(r, with_base):
    """Long runs of rows per group take the CPU grouped strategy: in fp32 its fused kernels
    (AVX-512: ranks 4 / 8 / 16 / 32 forward and backward; AVX2: ranks 8 / 16 backward) where the
    CPU has them, BLAS otherwise (rank 5 always). Output and gradients against the float64
    reference, with a group repeated in two runs that are not adjacent, an odd run length, and
    a run long enough to be split between threads."""
    h, S, dk_in, dk_out = 4, 5, 16, 12
    x, A, B, w = make(h, S, dk_in, r, dk_out, 3, (5, 301), device="cpu", seed=12)
    ids = torch.tensor([2, 2, 0, 2, 1])  # runs of 602 (cut for two threads), 301, 301, 301 rows
    gy = torch.randn(5, 301, h * dk_out)
    weight = torch.randn(h * dk_out, h * dk_in) / 8
    ours = [t.clone().requires_grad_() for t in (x, A, B, w)]
    refs = [t.detach().double().requires_grad_() for t in (x, A, B, w)]
    bias = torch.randn(h * dk_out)
    if with_base:  # the fused forward writes bias + update, then the base GEMM adds into it
        y = mhr_ops.mhr_linear(ours[0], weight, bias, *ours[1:], ids, scale=0.25)
        ref = reference.mhr_linear(refs[0], weight, bias, *refs[1:], ids, scale=0.25)
    else:
        y = mhr_ops.routed_lora(*ours, ids, scale=0.25)
        ref = reference.routed_lora(*refs, ids, scale=0.25)
    assert_close(y, ref, atol=3e-5 * max(1.0, ref.abs().max().item()), rtol=3e-5, what=f"y r={r}")
    y.backward(gy)
    ref.backward(gy.double())
    for name, a, b in zip("x A B weights".split(), ours, refs, strict=True):
        scale = max(1.0, b.grad.abs().max().item())
        assert_close(a.grad, b.grad, atol=3e-5 * scale, rtol=3e-5, what=f"d{name} r={r}")
    out = torch.randn(5, 301, h * dk_out)  # out= accumulation through the same kernels
    expect = out.double() + reference.routed_lora(*(t.detach().double() for t in (x, A, B, w)), ids, scale=0.25)
    mhr_ops.routed_lora(x, A, B, w, ids, scale=0.25, out=out)
    assert_close(out, expect, atol=3e-5, rtol=3e-5, what=f"out= r={r}")


ROW_TILE_LAYOUTS = {
    # few groups, rows in random order, many rows: sorted by group, each adapter mixed once
    "gathered": dict(lead=(3001,), G=4),
    # few rows, each its own group: project-then-mix in registers (tiles of 8 and single rows)
    "rows": dict(lead=(13,), G=13),
}


@CPU_PATH
@pytest.mark.parametrize("layout", sorted(ROW_TILE_LAYOUTS))
@pytest.mark.parametrize("r", [1, 2, 4, 8, 16, 32, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_row_tile_cpu_paths(layout, r, dtype):
    """The CPU row-tile kernels, which serve rows in any group order where runs are short:
    every compile-time rank (1, 2, 4, 8, 16, 32) and a run-time one (5), fp32 and fp64, x with
    padded rows, y written, added into (out=) and written over a base layer (mhr_linear),
    against the float64 reference."""
    spec = ROW_TILE_LAYOUTS[layout]
    h, S, dk_in, dk_out = 2, 3, 9, 7
    x, A, B, w = make(h, S, dk_in, r, dk_out, spec["G"], spec["lead"], device="cpu", dtype=dtype, seed=r)
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, spec["G"], spec["lead"], generator=gen)
    x = torch.cat([x, torch.randn(*spec["lead"], 3, dtype=dtype)], dim=-1)[..., : h * dk_in]  # padded rows
    tol = 1e-12 if dtype == torch.float64 else 3e-5
    ref = reference.routed_lora(*(t.double() for t in (x, A, B, w)), ids, scale=0.5)
    y = mhr_ops.routed_lora(x, A, B, w, ids, scale=0.5)
    assert_close(y, ref, atol=tol * max(1.0, ref.abs().max().item()), rtol=tol, what=f"{layout} r={r}")
    out = torch.randn(*spec["lead"], h * dk_out, dtype=dtype)
    expect = out.double() + ref
    mhr_ops.routed_lora(x, A, B, w, ids, scale=0.5, out=out)
    assert_close(out, expect, atol=tol * max(1.0, expect.abs().max().item()), rtol=tol, what="out=")
    weight, bias = torch.randn(h * dk_out, h * dk_in, dtype=dtype), torch.randn(h * dk_out, dtype=dtype)
    y = mhr_ops.mhr_linear(x, weight, bias, A, B, w, ids, scale=0.5)
    ref = reference.mhr_linear(*(t.double() for t in (x, weight, bias, A, B, w)), ids, scale=0.5)
    assert_close(y, ref, atol=tol * max(1.0, ref.abs().max().item()), rtol=tol, what="mhr_linear")


@CPU_PATH
def test_opcheck_row_tile_gathered_path():
    """opcheck on the gathered row-tile path (many rows over few groups, unsorted, padded x),
    which the small opcheck cases above do not reach; mhr_linear there writes bias + update."""
    spec = ROW_TILE_LAYOUTS["gathered"]
    h, S, dk_in, dk_out, r = 2, 3, 9, 7, 8
    x, A, B, w = make(h, S, dk_in, r, dk_out, spec["G"], spec["lead"], device="cpu", seed=3)
    x = torch.cat([x, torch.randn(*spec["lead"], 3)], dim=-1)[..., : h * dk_in]
    ids = torch.randint(0, spec["G"], spec["lead"], generator=torch.Generator().manual_seed(4))
    weight, bias = torch.randn(h * dk_out, h * dk_in), torch.randn(h * dk_out)
    torch.library.opcheck(torch.ops.mhr_ops.routed_lora, (x, A, B, w, ids, 1, 0.5))
    req_lin = [t.clone().requires_grad_() for t in (x, weight, bias, A, B, w)]
    torch.library.opcheck(torch.ops.mhr_ops.mhr_linear, (*req_lin, ids, 1, 0.5))


@CPU_PATH
@pytest.mark.parametrize("r", [1, 5, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_base", [False, True])
def test_row_backward_cpu_path(r, dtype, with_base):
    """Few rows in short runs (here 11 rows, every row its own or a shared group, unsorted) take
    the CPU row backward kernel: dx (with mhr_linear's base part), dA, dB and the routing-weight
    gradient against the float64 reference, x with padded rows."""
    h, S, dk_in, dk_out = 3, 4, 5, 7
    x, A, B, w = make(h, S, dk_in, r, dk_out, 6, (11,), device="cpu", dtype=dtype, seed=40 + r)
    x = torch.cat([x, torch.randn(11, 2, dtype=dtype)], dim=-1)[:, : h * dk_in]
    ids = torch.tensor([5, 0, 3, 3, 1, 0, 2, 4, 5, 1, 2])
    weight, bias = torch.randn(h * dk_out, h * dk_in, dtype=dtype), torch.randn(h * dk_out, dtype=dtype)
    ours = [t.clone().requires_grad_() for t in (x, A, B, w)]
    refs = [t.detach().double().requires_grad_() for t in (x, A, B, w)]
    if with_base:
        y = mhr_ops.mhr_linear(ours[0], weight, bias, *ours[1:], ids, scale=0.5)
        ref = reference.mhr_linear(refs[0], weight.double(), bias.double(), *refs[1:], ids, scale=0.5)
    else:
        y = mhr_ops.routed_lora(*ours, ids, scale=0.5)
        ref = reference.routed_lora(*refs, ids, scale=0.5)
    gy = torch.randn(11, h * dk_out, dtype=dtype)
    y.backward(gy)
    ref.backward(gy.double())
    tol = 1e-12 if dtype == torch.float64 else 3e-5
    for name, a, b in zip("x A B weights".split(), ours, refs, strict=True):
        scale = max(1.0, b.grad.abs().max().item())
        assert_close(a.grad, b.grad, atol=tol * scale, rtol=tol, what=f"d{name} r={r}")


@CPU_PATH
def test_opcheck_grouped_cpu_path():
    """opcheck (schema, fake kernel, autograd registration, AOT dispatch) on the CPU grouped
    path: ranks 8, long runs (fused kernels where the CPU has them), x with padded rows."""
    h, S, dk_in, dk_out, r = 2, 3, 16, 8, 8
    x, A, B, w = make(h, S, dk_in, r, dk_out, 4, (3, 100), device="cpu", seed=21)
    x2 = torch.cat([x.reshape(300, -1), torch.randn(300, 5)], dim=1)[:, : h * dk_in]  # row stride 37
    assert x2.stride() == (h * dk_in + 5, 1)
    ids = torch.tensor([3, 1, 3])
    weight, bias = torch.randn(h * dk_out, h * dk_in), torch.randn(h * dk_out)
    req = [t.clone().requires_grad_() for t in (x2, A, B, w)]
    torch.library.opcheck(torch.ops.mhr_ops.routed_lora, (*req, ids, 100, 0.5))
    _, z = torch.ops.mhr_ops.routed_lora(x2, A, B, w, ids, 100, 0.5)
    gy = torch.randn(300, h * dk_out)
    torch.library.opcheck(torch.ops.mhr_ops.routed_lora_backward, (gy, x2, A, B, w, ids, 100, 0.5, z, [True] * 4))
    linear_args = (gy, x2, weight, True, A, B, w, ids, 100, 0.5, z, [True] * 6)
    torch.library.opcheck(torch.ops.mhr_ops.mhr_linear_backward, linear_args)
    req_lin = [t.clone().requires_grad_() for t in (x2, weight, bias, A, B, w)]
    torch.library.opcheck(torch.ops.mhr_ops.mhr_linear, (*req_lin, ids, 100, 0.5))
    y, _ = torch.ops.mhr_ops.mhr_linear(x2, weight, bias, A, B, w, ids, 100, 0.5)
    ref = reference.mhr_linear(x2.reshape(3, 100, -1), weight, bias, A, B, w, ids, scale=0.5).reshape(300, -1)
    assert_close(y, ref, atol=3e-5 * max(1.0, ref.abs().max().item()), rtol=3e-5, what="padded rows")


CAPABILITIES = ["DEFAULT", "AVX2", "AVX512"]


@pytest.mark.cpu_kernels("the CPU kernels' instruction-set variants under ATEN_CPU_CAPABILITY, in a subprocess")
@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_grouped_cpu_paths_under_capability_cap(capability):
    """ATEN_CPU_CAPABILITY caps the fused CPU kernels as it caps ATen's own: with "avx2" an
    AVX-512 machine runs the AVX2 backward kernel and BLAS for the forward, with "default" BLAS
    everywhere. The grouped-path test above, rerun in a subprocess under the cap."""
    # The CPU's own capability: with the whole suite already run under a cap (this process's
    # ATEN_CPU_CAPABILITY), only a subprocess without it can tell.
    bare_env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    probe = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    native = subprocess.run([sys.executable, "-c", probe], env=bare_env, capture_output=True, text=True).stdout.strip()
    want = CAPABILITIES[min(CAPABILITIES.index(capability.upper()), CAPABILITIES.index(native))]
    script = textwrap.dedent(f"""
        import sys
        import torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        got = torch.backends.cpu.get_cpu_capability()
        assert got == {want!r}, got
        import test_routed_lora as t
        for r in (4, 8, 16, 32, 5):
            for with_base in (False, True):
                t.test_grouped_cpu_paths(r, with_base)
        for layout in t.ROW_TILE_LAYOUTS:
            for r in (1, 8, 5):
                t.test_row_tile_cpu_paths(layout, r, torch.float32)
        for with_base in (False, True):
            t.test_row_backward_cpu_path(8, torch.float32, with_base)
        print("checked", got)
    """)
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"checked {want}" in done.stdout


@pytest.mark.cpu_kernels("how mhr_ops._C was built (OpenMP for the CPU kernels' parallel loops)")
@pytest.mark.skipif(
    not (sys.platform.startswith("linux") and "parallel backend: OpenMP" in torch.__config__.parallel_info()),
    reason="this torch does not run its parallel loops on OpenMP",
)
def test_cpu_build_runs_parallel_loops_on_threads():
    """at::parallel_for is a header template: built without -fopenmp its OpenMP pragma is
    dropped and every parallel CPU loop of the extension runs on one thread (silently slow).
    Wherever torch itself runs on OpenMP (Linux builds), ours must be built with it too."""
    assert mhr_ops.build_info()["openmp"] is True


# ---- mhr_linear_backward, the op ----

# (lead, group ids, G): the CPU paths of the backward, chosen by size: few rows in short runs (row
# kernel), long runs of one group (runs), many rows in short runs (project-then-mix)
LINEAR_BACKWARD_LAYOUTS = {
    "rows": ((7,), [2, 0, 2, 1, 1, 0, 2], 3),
    "runs": ((4, 256), [1, 2, 1, 0], 3),
    "project_then_mix": ((160,), None, 3),
}
LINEAR_BACKWARD_MASKS = [[True] * 6, [False, True, True, False, False, True], [True, False, False, True, True, False]]


@pytest.mark.parametrize("layout", list(LINEAR_BACKWARD_LAYOUTS))
@pytest.mark.parametrize("has_bias", [True, False])
def test_mhr_linear_backward_op_against_reference(layout, has_bias):
    """torch.ops.mhr_ops.mhr_linear_backward called directly in float64 against the gradients of
    the float64 reference (mhr_ops.reference.mhr_linear), on each CPU path; a gradient whose
    output_mask entry is False comes back empty."""
    lead, ids, G = LINEAR_BACKWARD_LAYOUTS[layout]
    h, S, dk_in, r, dk_out = (2, 4, 48, 4, 48) if layout == "runs" else (2, 3, 4, 2, 3)
    x, A, B, w = make(h, S, dk_in, r, dk_out, G, lead, device="cpu", dtype=torch.float64, seed=12)
    gen = torch.Generator().manual_seed(5)
    ids = torch.tensor(ids) if ids is not None else torch.randint(0, G, lead, generator=gen)
    weight = torch.randn(h * dk_out, h * dk_in, dtype=torch.float64, generator=gen)
    bias = torch.randn(h * dk_out, dtype=torch.float64, generator=gen) if has_bias else None
    inputs = [t.clone().requires_grad_() for t in (x, weight, bias, A, B, w) if t is not None]
    if not has_bias:
        inputs.insert(2, None)
    y = reference.mhr_linear(*inputs, ids, scale=0.5)
    gy = torch.randn(y.shape, dtype=torch.float64, generator=gen)
    wanted = torch.autograd.grad(y, [t for t in inputs if t is not None], gy)
    if not has_bias:
        wanted = (*wanted[:2], None, *wanted[2:])
    x2, gy2 = x.reshape(-1, x.shape[-1]), gy.reshape(-1, gy.shape[-1])
    rows_per_id = x2.shape[0] // ids.numel()
    _, z = torch.ops.mhr_ops.routed_lora(x2, A, B, w, ids.reshape(-1), rows_per_id, 0.5)
    for mask in LINEAR_BACKWARD_MASKS:
        got = torch.ops.mhr_ops.mhr_linear_backward(
            gy2, x2, weight, has_bias, A, B, w, ids.reshape(-1), rows_per_id, 0.5, z, mask
        )
        for name, g, want, needed in zip(("x", "weight", "bias", "A", "B", "weights"), got, wanted, mask, strict=True):
            if not needed or want is None:
                assert g.numel() == 0, f"d{name}: not asked for, got shape {tuple(g.shape)}"
                continue
            assert_close(g.reshape(want.shape), want, atol=1e-10, rtol=1e-10, what=f"d{name} ({layout}, {mask})")


def test_mhr_linear_gradcheck_project_then_mix():
    """fp64 gradcheck of mhr_linear (autograd through mhr_linear_backward) where the CPU backward
    takes project-then-mix (many rows in short runs); test_gradcheck_float64 covers the others."""
    x, A, B, w = make(2, 3, 2, 2, 2, 3, (100,), device="cpu", dtype=torch.float64, seed=8)
    ids = torch.randint(0, 3, (100,), generator=torch.Generator().manual_seed(2))
    weight = torch.randn(4, 4, dtype=torch.float64)
    bias = torch.randn(4, dtype=torch.float64)
    inputs = tuple(t.requires_grad_() for t in (x, weight, bias, A, B, w))
    assert torch.autograd.gradcheck(
        lambda xx, W, b, a, bb, ww: mhr_ops.mhr_linear(xx, W, b, a, bb, ww, ids, scale=0.3), inputs, fast_mode=True
    )


def test_mhr_linear_backward_bad_input():
    """The op checks its own arguments and names them; double backward is refused clearly."""
    kw = _good()
    x2 = kw["x"].reshape(10, 8)
    A, B, w, ids = kw["A"], kw["B"], kw["weights"], torch.tensor([0, 1])
    _, z = torch.ops.mhr_ops.routed_lora(x2, A, B, w, ids, 5, 1.0)
    gy, weight = torch.randn(10, 6), torch.randn(6, 8)
    op = torch.ops.mhr_ops.mhr_linear_backward
    with pytest.raises(ValueError, match=r"weight: expected shape \(6, 8\) \[d_out, d_in\], got \(6, 7\)"):
        op(gy, x2, torch.randn(6, 7), True, A, B, w, ids, 5, 1.0, z, [True] * 6)
    with pytest.raises(ValueError, match=r"weight: expected dtype torch.float32 \(x's dtype\), got torch.float64"):
        op(gy, x2, weight.double(), True, A, B, w, ids, 5, 1.0, z, [True] * 6)
    with pytest.raises(ValueError, match=r"grad_y: expected shape \(10, 6\), got \(10, 5\)"):
        op(torch.randn(10, 5), x2, weight, True, A, B, w, ids, 5, 1.0, z, [True] * 6)
    with pytest.raises(ValueError, match="z: expected the forward's bottleneck"):
        op(gy, x2, weight, True, A, B, w, ids, 5, 1.0, torch.randn(10, 3), [True] * 6)
    xg = kw["x"].double().requires_grad_()
    y = mhr_ops.mhr_linear(xg, weight.double(), None, A.double(), B.double(), w.double(), kw["group_ids"], scale=1.0)
    (g,) = torch.autograd.grad(y.square().sum(), xg, create_graph=True)
    with pytest.raises(RuntimeError, match="mhr_linear: double backward"):
        g.sum().backward()
