"""moe_lora (mixture of LoRA experts, docs/API.md) against the float64 reference: k, E, repeated
ids, odd sizes, N = 0, layouts, out=, leading dims, dtypes, gradients, gradcheck, opcheck,
torch.compile, bad input, invalid ids without validation, determinism; MoELoRALinear,
patch_moe_lora and moe_aux_loss on a tiny Llama."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import ADAPTER_DTYPES, DEVICES, assert_close, bad_input_test, max_diff, scale_and_out_errors, tiny_llama

import mhr_ops
from mhr_ops import reference
from mhr_ops.nn import MoELoRALinear

DTYPES = ADAPTER_DTYPES  # (x dtype, adapter dtype)


def make(E, d_in, r, d_out, lead, k, *, device="cpu", dtype=torch.float32, expert_dtype=None, seed=0):
    """Fresh random inputs; a third of the rows (k >= 2) repeat an expert within the row."""
    gen = torch.Generator().manual_seed(seed)
    expert_dtype = expert_dtype or dtype

    def rnd(*shape, dt, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dt).to(device)

    x = rnd(*lead, d_in, dt=dtype)
    A = rnd(E, d_in, r, dt=expert_dtype, scale=d_in**-0.5)
    B = rnd(E, r, d_out, dt=expert_dtype, scale=r**-0.5)
    ids = torch.randint(0, E, (*lead, k), generator=gen)
    if k >= 2:
        ids.view(-1, k)[::3, 1] = ids.view(-1, k)[::3, 0]
    w_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    w = torch.rand(*lead, k, generator=gen, dtype=torch.float64).to(w_dtype)
    return x, A, B, w.to(device), ids.to(device)


def plain_torch(x, A, B, w, ids, scale):
    """The gather-and-matmul computation in the inputs' own dtype: the error bar for low precision."""
    k = ids.shape[-1]
    rows = x.reshape(-1, x.shape[-1]).to(A.dtype)
    ids2, w2 = ids.reshape(-1, k), w.reshape(-1, k).to(A.dtype)
    y = 0
    for j in range(k):
        z = (rows.unsqueeze(1) @ A[ids2[:, j]]).squeeze(1)
        y = y + scale * w2[:, j : j + 1] * (z.unsqueeze(1) @ B[ids2[:, j]]).squeeze(1)
    return y.to(x.dtype).reshape(*x.shape[:-1], -1)


def check_low_precision(out, ref, plain, what):
    """Error against the float64 reference at most 2x plain PyTorch's in the same dtype, plus a
    floor for outputs plain PyTorch gets exact."""
    err, err_plain = max_diff(out, ref), max_diff(plain, ref)
    print(f"{what}: max err {err:.3e}, plain torch {err_plain:.3e}")
    assert err <= 2 * err_plain + 1e-2 * (ref.abs().max().item() * 2**-7 + 1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,expert_dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("E", [1, 8, 64])
def test_forward_matches_reference(device, dtype, expert_dtype, k, E):
    k = min(k, E) if E == 1 else k  # E = 1 with k > 1: the one expert repeated, which must count k times
    lead = (3, 23)  # 69 rows: past a 64-row block (on CUDA, fp16 / bf16 run the tensor-core rows pass)
    seed = hash((str(dtype), str(expert_dtype), k, E)) % 1000
    x, A, B, w, ids = make(E, 21, 5 if E == 8 else 8, 70, lead, k, device=device, dtype=dtype,
                           expert_dtype=expert_dtype, seed=seed)  # fmt: skip
    y = mhr_ops.moe_lora(x, A, B, w, ids, scale=0.7)
    ref = reference.moe_lora(x, A, B, w, ids, scale=0.7)
    assert y.shape == (*lead, 70) and y.dtype == dtype
    if dtype in (torch.float32, torch.float64):
        tol = 1e-10 if dtype == torch.float64 else 2e-5
        assert_close(y, ref, atol=tol, rtol=tol, what=f"moe_lora k={k} E={E}")
    else:
        check_low_precision(y, ref, plain_torch(x, A, B, w, ids, 0.7), f"moe_lora {dtype}/{expert_dtype}")


def test_repeated_expert_counts_twice_and_one_expert_k3():
    x, A, B, _, _ = make(1, 9, 3, 7, (5,), 3, seed=1)
    ids = torch.zeros(5, 3, dtype=torch.long)
    w = torch.tensor([[0.5, 0.25, 0.25]]).expand(5, 3)
    y = mhr_ops.moe_lora(x, A, B, w, ids, scale=2.0)
    assert_close(y, 2.0 * (x.double() @ A[0].double()) @ B[0].double(), atol=2e-5, rtol=2e-5, what="repeat")


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("E", [1, 8, 64])
def test_gradients_match_reference(k, E):
    x, A, B, w, ids = make(E, 13, 4, 11, (4, 19), k, dtype=torch.float64, seed=k * 100 + E)
    gy = torch.randn(4, 19, 11, dtype=torch.float64)
    ours = [t.clone().requires_grad_() for t in (x, A, B, w)]
    mhr_ops.moe_lora(*ours, ids, scale=0.3).backward(gy)
    refs = [t.clone().requires_grad_() for t in (x, A, B, w)]
    reference.moe_lora(*refs, ids, scale=0.3).backward(gy)
    for name, a, b in zip(["x", "A", "B", "topk_weights"], ours, refs, strict=True):
        assert_close(a.grad, b.grad, atol=1e-10, rtol=1e-10, what=f"d{name} k={k} E={E}")


@pytest.mark.parametrize(
    "dtype,expert_dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float16, torch.float32)],
)
def test_fp32_and_mixed_gradients(dtype, expert_dtype):
    x, A, B, w, ids = make(8, 32, 8, 24, (3, 40), 2, dtype=dtype, expert_dtype=expert_dtype, seed=5)
    gy = torch.randn(3, 40, 24).to(dtype)
    ours = [t.clone().requires_grad_() for t in (x, A, B, w)]
    mhr_ops.moe_lora(*ours, ids, scale=0.25).backward(gy)
    refs = [t.clone().requires_grad_() for t in (x, A, B, w)]
    reference.moe_lora(*refs, ids, scale=0.25).backward(gy.double())
    for name, a, b in zip(["x", "A", "B", "topk_weights"], ours, refs, strict=True):
        assert a.grad.dtype == a.dtype
        tol = 2e-5 if dtype == torch.float32 else 3e-2
        assert_close(a.grad, b.grad, atol=tol * max(1.0, b.grad.abs().max().item()), rtol=tol, what=f"d{name}")


def test_gradcheck_float64():
    x, A, B, w, ids = make(5, 6, 3, 4, (2, 7), 2, dtype=torch.float64, seed=6)
    args = [t.clone().requires_grad_() for t in (x, A, B, w)]
    assert torch.autograd.gradcheck(lambda *t: mhr_ops.moe_lora(*t, ids, scale=0.6), args)


def test_empty_rows():
    x, A, B, w, ids = make(8, 16, 4, 12, (0,), 2, seed=7)
    xg, Ag = x.requires_grad_(), A.clone().requires_grad_()
    y = mhr_ops.moe_lora(xg, Ag, B, w, ids, scale=1.0)
    assert y.shape == (0, 12)
    y.sum().backward()
    assert xg.grad.shape == (0, 16) and torch.equal(Ag.grad, torch.zeros_like(A))
    out = torch.zeros(0, 12)
    assert mhr_ops.moe_lora(x, A, B, w, ids, scale=1.0, out=out) is out


def test_non_contiguous_inputs():
    x, A, B, w, ids = make(8, 21, 4, 15, (2, 9), 3, seed=8)
    wide = torch.randn(2, 9, 50)
    wide[..., 3:45:2] = x
    xs = wide[..., 3:45:2]  # column stride 2
    At = A.transpose(1, 2).contiguous().transpose(1, 2)  # A as a transposed view
    ids_t = ids.reshape(-1, 3).t().contiguous().t()  # column-major ids [N, k]
    w_t = w.reshape(-1, 3).t().contiguous().t()
    y = mhr_ops.moe_lora(xs, At, B, w_t, ids_t, scale=0.5)
    assert_close(y, reference.moe_lora(x, A, B, w, ids, scale=0.5), atol=2e-5, rtol=2e-5, what="non-contiguous")
    xg = xs.detach().requires_grad_()
    mhr_ops.moe_lora(xg, At, B, w_t, ids_t, scale=0.5).square().sum().backward()
    xr = x.double().requires_grad_()
    reference.moe_lora(xr, A, B, w, ids, scale=0.5).square().sum().backward()
    assert_close(xg.grad, xr.grad, atol=1e-4, rtol=1e-4, what="dx non-contiguous")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_out_accumulates_in_place(dtype):
    x, A, B, w, ids = make(8, 16, 4, 12, (3, 5), 2, dtype=dtype, expert_dtype=torch.float32, seed=9)
    out0 = torch.randn(3, 5, 12).to(dtype)
    out = out0.clone()
    got = mhr_ops.moe_lora(x, A, B, w, ids, scale=0.5, out=out)  # no autograd: moe_lora_add_
    assert got is out
    expected = out0.double() + reference.moe_lora(x, A, B, w, ids, scale=0.5)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    assert_close(out, expected, atol=tol, rtol=tol, what="out=")
    cols = torch.randn(12, 15).to(dtype).t()  # a column-strided out
    cols0 = cols.clone()
    mhr_ops.moe_lora(x.reshape(15, 16), A, B, w.reshape(15, 2), ids.reshape(15, 2), scale=0.5, out=cols)
    expected = cols0.double() + reference.moe_lora(
        x.reshape(15, 16), A, B, w.reshape(15, 2), ids.reshape(15, 2), scale=0.5
    )
    assert_close(cols, expected, atol=tol, rtol=tol, what="column-strided out=")
    # with autograd: the functional op, then one add; gradients reach x
    xg = x.clone().requires_grad_()
    out = out0.clone()
    mhr_ops.moe_lora(xg, A, B, w, ids, scale=0.5, out=out).sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()


def test_leading_dims_on_x_and_ids():
    x, A, B, w, ids = make(8, 10, 4, 6, (2, 3, 5), 2, seed=10)
    ref = reference.moe_lora(x, A, B, w, ids, scale=1.0)
    y_lead = mhr_ops.moe_lora(x, A, B, w, ids, scale=1.0)  # ids [2, 3, 5, k]
    y_flat = mhr_ops.moe_lora(x, A, B, w.reshape(30, 2), ids.reshape(30, 2), scale=1.0)  # ids [N, k]
    assert y_lead.shape == y_flat.shape == (2, 3, 5, 6)
    assert_close(y_lead, ref, atol=2e-5, rtol=2e-5, what="leading dims")
    assert torch.equal(y_lead, y_flat)
    y1 = mhr_ops.moe_lora(x[0, 0, 0], A, B, w[0, 0, 0], ids[0, 0, 0], scale=1.0)  # 1-D x, ids [k]
    assert_close(y1, ref[0, 0, 0], atol=2e-5, rtol=2e-5, what="1-D x")


def test_opcheck():
    x, A, B, w, ids = make(6, 8, 3, 5, (20,), 2, seed=11)
    req = [t.clone().requires_grad_() for t in (x, A, B, w)]
    torch.library.opcheck(torch.ops.mhr_ops.moe_lora, (*req, ids, 0.5))
    torch.library.opcheck(torch.ops.mhr_ops.moe_lora, (*req, ids.int(), 0.5))
    torch.library.opcheck(torch.ops.mhr_ops.moe_lora_add_, (torch.randn(20, 5), x, A, B, w, ids, 0.5))
    _, z = torch.ops.mhr_ops.moe_lora(x, A, B, w, ids, 0.5)
    gy = torch.randn(20, 5)
    for mask in ([True] * 4, [False, True, False, True], [True, False, True, False]):
        torch.library.opcheck(torch.ops.mhr_ops.moe_lora_backward, (gy, x, A, B, w, ids, 0.5, z, mask))


def test_torch_compile_fullgraph():
    torch.manual_seed(0)
    layer = MoELoRALinear(torch.nn.Linear(12, 10), n_experts=6, r=4, top_k=2)
    torch.nn.init.normal_(layer.B)
    x = torch.randn(3, 7, 12, requires_grad=True)

    def f(xx):
        y = layer(xx)
        return y.square().sum() + layer.last_aux_loss

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    expected = f(x)
    g_expected = torch.autograd.grad(expected, (x, layer.A, layer.B, layer.router.weight))
    got = compiled(x)
    g_got = torch.autograd.grad(got, (x, layer.A, layer.B, layer.router.weight))
    torch.testing.assert_close(got, expected)
    for a, b in zip(g_got, g_expected, strict=True):
        torch.testing.assert_close(a, b)


def _good():
    x, A, B, w, ids = make(8, 16, 4, 12, (2, 5), 2, seed=12)
    return dict(x=x, A=A, B=B, topk_weights=w, topk_ids=ids)


BAD = [
    (dict(topk_ids=torch.full((2, 5, 2), 8)), ValueError, r"topk_ids: expected expert ids in \[0, 8\), got 8"),
    (dict(topk_ids=torch.full((2, 5, 2), -1)), ValueError, r"topk_ids: expected expert ids in \[0, 8\), got -1"),
    (dict(topk_ids=torch.zeros(2, 5, 2)), TypeError, "topk_ids: expected an int32 or int64 tensor, got float32"),
    (dict(topk_ids=[[0, 1]] * 10), TypeError, "topk_ids: expected an int tensor"),
    (dict(topk_weights=torch.rand(2, 5, 3)), ValueError, r"topk_weights: expected shape \(2, 5, 2\)"),
    (dict(topk_ids=torch.zeros(2, 4, 2, dtype=torch.long)), ValueError, r"topk_ids: expected shape \(2, 5, 'k'\)"),
    (dict(B=torch.randn(7, 4, 12)), ValueError, r"B: expected E = 8 experts"),
    (dict(B=torch.randn(8, 5, 12)), ValueError, r"B: expected rank r = 4"),
    (dict(A=torch.randn(8, 15, 4)), ValueError, r"x: expected last dim d_in = A.shape\[1\] = 15, got 16"),
    (dict(A=torch.randn(8, 16)), ValueError, "A: expected a 3-D tensor"),
    (
        dict(A=torch.randn(8, 16, 4, dtype=torch.float64)),
        ValueError,
        r"A: expected dtype torch.float32 for x of dtype torch.float32, got torch.float64",
    ),
    (
        dict(B=torch.randn(8, 4, 12, dtype=torch.float64)),
        ValueError,
        r"B: expected dtype torch.float32 \(A's dtype\), got torch.float64",
    ),
    (
        dict(x=torch.randn(2, 5, 16).bfloat16(), A=torch.randn(8, 16, 4).half()),
        ValueError,
        r"A: expected dtype torch.bfloat16 or torch.float32 for x of dtype torch.bfloat16, got torch.float16",
    ),
    (dict(topk_weights=torch.ones(2, 5, 2, dtype=torch.long)), ValueError, "topk_weights: expected dtype"),
]
BAD += scale_and_out_errors((2, 5, 12))
test_bad_input = bad_input_test(mhr_ops.moe_lora, _good, ("x", "A", "B", "topk_weights", "topk_ids"), BAD)


def test_op_level_checks_raise_value_and_type_errors_naming_the_argument():
    kw = _good()
    x, A, B, w, ids = (kw[k] for k in ("x", "A", "B", "topk_weights", "topk_ids"))
    x2, w2, ids2 = x.reshape(10, 16), w.reshape(10, 2), ids.reshape(10, 2)
    op = torch.ops.mhr_ops.moe_lora
    with pytest.raises(TypeError, match="topk_ids: expected an int64 or int32 tensor"):
        op(x2, A, B, w2, ids2.float(), 1.0)
    with pytest.raises(ValueError, match=r"topk_weights: expected shape \[10, 2\]"):
        op(x2, A, B, w2[:, :1], ids2, 1.0)
    with pytest.raises(ValueError, match="B: expected E = 8 experts"):
        op(x2, A, B[:7], w2, ids2, 1.0)
    with pytest.raises(ValueError, match="B: expected rank r = 4"):
        op(x2, A, B[:, :3], w2, ids2, 1.0)
    with pytest.raises(ValueError, match="x: expected d_in = A.shape"):
        op(x2[:, :15], A, B, w2, ids2, 1.0)
    with pytest.raises(ValueError, match="topk_ids: expected 10 rows"):
        op(x2, A, B, w2[:9], ids2[:9], 1.0)
    with pytest.raises(ValueError, match="z: expected the forward's bottleneck"):
        torch.ops.mhr_ops.moe_lora_backward(
            torch.randn(10, 12), x2, A, B, w2, ids2, 1.0, torch.randn(10, 4), [True] * 4
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_non_finite_expert_values_reach_only_the_rows_that_use_the_expert(dtype):
    """An inf in one expert's B and a -inf in another's A make non-finite only the rows routed to
    those experts, where the reference is non-finite. On CUDA (past 64 rows, fp16 / bf16: tensor
    cores) the other rows of a 16-row tile multiply that B column by zero, which must not leak."""
    x, A, B, w, ids = make(4, 16, 8, 24, (70,), 2, dtype=dtype, expert_dtype=torch.float32, seed=11)
    A, B = A.clone(), B.clone()
    B[1, 3, 5] = float("inf")
    A[2, 4, 0] = float("-inf")
    y = mhr_ops.moe_lora(x, A, B, w, ids, scale=0.5)
    ref = reference.moe_lora(x, A, B, w, ids, scale=0.5)
    uses = (ids == 1).any(-1) | (ids == 2).any(-1)
    assert 0 < int(uses.sum()) < 70
    assert torch.equal(torch.isfinite(y), torch.isfinite(ref)) and not torch.isfinite(y[uses]).all()
    if dtype == torch.float32:
        assert_close(y[~uses], ref[~uses], atol=2e-5, rtol=2e-5, what="rows without the non-finite experts")
    else:
        check_low_precision(y[~uses], ref[~uses], plain_torch(x, A, B, w, ids, 0.5)[~uses], f"finite rows {dtype}")


def test_invalid_ids_without_validation_give_nan_rows_only():
    x, A, B, w, ids = make(8, 16, 4, 12, (10,), 2, seed=13)
    bad = ids.clone()
    bad[3, 1], bad[7, 0] = 8, -5
    good_rows = [n for n in range(10) if n not in (3, 7)]
    out = torch.zeros(10, 12)
    xg, Ag, Bg, wg = (t.clone().requires_grad_() for t in (x, A, B, w))
    y = mhr_ops.moe_lora(xg, Ag, Bg, wg, bad, scale=1.0, check_ids=False)
    assert torch.isnan(y[[3, 7]]).all()
    ref = reference.moe_lora(x[good_rows], A, B, w[good_rows], ids[good_rows], scale=1.0)
    assert_close(y[good_rows], ref, atol=2e-5, rtol=2e-5, what="valid rows")
    y[good_rows].sum().backward()  # the NaN rows get no gradient: dA, dB stay finite
    assert torch.isfinite(Ag.grad).all() and torch.isfinite(Bg.grad).all()
    assert torch.isnan(wg.grad[3, 1]) and torch.isfinite(wg.grad[good_rows]).all()
    mhr_ops.moe_lora(x, A, B, w, bad, scale=1.0, out=out, check_ids=False)
    assert torch.isnan(out[[3, 7]]).all() and torch.isfinite(out[good_rows]).all()


def test_bitwise_deterministic_across_thread_counts():
    """Every sum has a fixed order: the same bits with 1 thread and with several."""
    x, A, B, w, ids = make(8, 64, 8, 48, (300,), 2, seed=14)
    gy = torch.randn(300, 48)

    def run():
        ts = [t.clone().requires_grad_() for t in (x, A, B, w)]
        y = mhr_ops.moe_lora(*ts, ids, scale=0.5)
        y.backward(gy)
        return [y.detach(), *(t.grad for t in ts)]

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(max(2, threads))
        many = run()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many, strict=True):
        assert torch.equal(a, b)


@pytest.mark.cpu_kernels("the CPU kernels' portable build under ATEN_CPU_CAPABILITY, in a subprocess")
@pytest.mark.parametrize("capability", ["default"])
def test_portable_kernels_under_capability_cap(capability):
    """ATEN_CPU_CAPABILITY=default caps the kernels to their portable build: rerun the reference
    comparisons in a subprocess under the cap."""
    script = textwrap.dedent(f"""
        import sys
        import torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        assert torch.backends.cpu.get_cpu_capability() == "DEFAULT"
        import test_moe_lora as t
        for k in (1, 2, 3):
            for E in (1, 8, 64):
                t.test_forward_matches_reference("cpu", torch.float32, torch.float32, k, E)
                t.test_gradients_match_reference(k, E)
        t.test_fp32_and_mixed_gradients(torch.bfloat16, torch.float32)
        print("checked DEFAULT")
    """)
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "checked DEFAULT" in done.stdout


# ---- moe_lora_linear: the base layer and the experts in one op ----


def make_linear(d_in, d_out, *, dtype, bias=True, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    W = (torch.randn(d_out, d_in, generator=gen, dtype=torch.float64) * d_in**-0.5).to(dtype).to(device)
    b = torch.randn(d_out, generator=gen, dtype=torch.float64).to(dtype).to(device) if bias else None
    return W, b


def linear_reference(x, W, b, A, B, w, ids, scale):
    base = torch.nn.functional.linear(x.double(), W.double(), None if b is None else b.double())
    return base + reference.moe_lora(x, A, B, w, ids, scale=scale)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,expert_dtype", DTYPES)
@pytest.mark.parametrize("k,E", [(1, 8), (2, 8), (3, 64), (2, 1)])
@pytest.mark.parametrize("bias", [True, False])
def test_moe_lora_linear_matches_reference(device, dtype, expert_dtype, k, E, bias):
    lead = (3, 23)  # 69 rows: one full block of 64 and a short one
    seed = hash((str(dtype), str(expert_dtype), k, E, bias)) % 1000
    x, A, B, w, ids = make(E, 37, 8, 45, lead, k, device=device, dtype=dtype, expert_dtype=expert_dtype, seed=seed)
    W, b = make_linear(37, 45, dtype=dtype, bias=bias, device=device, seed=seed + 1)
    y = mhr_ops.moe_lora_linear(x, W, b, A, B, w, ids, scale=0.7)
    ref = linear_reference(x, W, b, A, B, w, ids, 0.7)
    assert y.shape == (*lead, 45) and y.dtype == dtype
    if dtype in (torch.float32, torch.float64):
        tol = 1e-10 if dtype == torch.float64 else 3e-5
        assert_close(y, ref, atol=tol, rtol=tol, what=f"moe_lora_linear k={k} E={E}")
    else:
        plain = torch.nn.functional.linear(x, W, b) + plain_torch(x, A, B, w, ids, 0.7)
        check_low_precision(y, ref, plain, f"moe_lora_linear {dtype}/{expert_dtype}")


@pytest.mark.parametrize("bias", [True, False])
def test_moe_lora_linear_gradients_match_reference(bias):
    x, A, B, w, ids = make(8, 19, 4, 13, (5, 14), 2, dtype=torch.float64, seed=21)
    W, b = make_linear(19, 13, dtype=torch.float64, bias=bias, seed=22)
    gy = torch.randn(5, 14, 13, dtype=torch.float64)
    leaves = [t for t in (x, W, b, A, B, w) if t is not None]

    def run(fn):
        ts = [t.clone().requires_grad_() for t in leaves]
        it = iter(ts)
        xx, WW = next(it), next(it)
        bb = next(it) if bias else None
        AA, BB, ww = it
        fn(xx, WW, bb, AA, BB, ww, ids, 0.3).backward(gy)
        return [t.grad for t in ts]

    ours = run(lambda *a: mhr_ops.moe_lora_linear(*a[:-1], scale=a[-1]))
    refs = run(linear_reference)
    for a, r in zip(ours, refs, strict=True):
        assert_close(a, r, atol=1e-10, rtol=1e-10, what="moe_lora_linear gradient")


def test_moe_lora_linear_fp32_gradients_with_frozen_base():
    x, A, B, w, ids = make(8, 64, 8, 48, (130,), 2, seed=23)
    W, b = make_linear(64, 48, dtype=torch.float32, seed=24)
    gy = torch.randn(130, 48)
    ours = [t.clone().requires_grad_() for t in (x, A, B, w)]
    y = mhr_ops.moe_lora_linear(ours[0], W, b, *ours[1:], ids, scale=0.5)
    y.backward(gy)
    refs = [t.double().requires_grad_() for t in (x, A, B, w)]
    linear_reference(refs[0], W, b, *refs[1:], ids, 0.5).backward(gy.double())
    for name, a, r in zip(["x", "A", "B", "topk_weights"], ours, refs, strict=True):
        assert a.grad.dtype == torch.float32
        assert_close(a.grad, r.grad, atol=3e-5 * max(1.0, r.grad.abs().max().item()), rtol=3e-5, what=f"d{name}")


def test_moe_lora_linear_gradcheck_float64():
    x, A, B, w, ids = make(5, 6, 3, 4, (2, 7), 2, dtype=torch.float64, seed=25)
    W, b = make_linear(6, 4, dtype=torch.float64, seed=26)
    args = [t.clone().requires_grad_() for t in (x, W, b, A, B, w)]
    assert torch.autograd.gradcheck(lambda *t: mhr_ops.moe_lora_linear(*t, ids, scale=0.6), args)


def test_moe_lora_linear_non_contiguous_empty_and_invalid_ids():
    x, A, B, w, ids = make(8, 21, 4, 15, (2, 9), 3, seed=27)
    W, b = make_linear(21, 15, dtype=torch.float32, seed=28)
    wide = torch.randn(2, 9, 50)
    wide[..., 3:45:2] = x
    Wt = W.t().contiguous().t()  # column-major weight
    y = mhr_ops.moe_lora_linear(wide[..., 3:45:2], Wt, b, A, B, w, ids, scale=0.5)
    assert_close(y, linear_reference(x, W, b, A, B, w, ids, 0.5), atol=3e-5, rtol=3e-5, what="non-contiguous")
    x0, _, _, w0, ids0 = make(8, 21, 4, 15, (0,), 3, seed=29)
    assert mhr_ops.moe_lora_linear(x0, W, b, A, B, w0, ids0, scale=0.5).shape == (0, 15)
    bad = ids.clone()
    bad[1, 4, 2] = 8
    with pytest.raises(ValueError, match=r"topk_ids: expected expert ids in \[0, 8\), got 8"):
        mhr_ops.moe_lora_linear(x, W, b, A, B, w, bad, scale=0.5)
    y = mhr_ops.moe_lora_linear(x, W, b, A, B, w, bad, scale=0.5, check_ids=False)
    assert y[1, 4].isnan().all()
    rest = torch.ones(2, 9, dtype=torch.bool)
    rest[1, 4] = False
    assert_close(y[rest], linear_reference(x, W, b, A, B, w, ids, 0.5)[rest], atol=3e-5, rtol=3e-5, what="others")


def test_moe_lora_linear_opcheck():
    x, A, B, w, ids = make(6, 8, 3, 5, (20,), 2, seed=30)
    W, b = make_linear(8, 5, dtype=torch.float32, seed=31)
    req = [t.clone().requires_grad_() for t in (x, W, b, A, B, w)]
    op = torch.ops.mhr_ops.moe_lora_linear
    torch.library.opcheck(op, (*req, ids, 0.5))
    torch.library.opcheck(op, (req[0], req[1], None, *req[3:], ids.int(), 0.5))
    _, z = op(x, W, b, A, B, w, ids, 0.5)
    gy = torch.randn(20, 5)
    for has_bias, mask in ((True, [True] * 6), (False, [True, True, True, False, True, False]),
                           (True, [False, False, True, True, False, True])):  # fmt: skip
        args = (gy, x, W, has_bias, A, B, w, ids, 0.5, z, mask)
        torch.library.opcheck(torch.ops.mhr_ops.moe_lora_linear_backward, args)


def _good_linear():
    kw = _good()
    W, b = make_linear(16, 12, dtype=torch.float32, seed=32)
    return dict(x=kw["x"], weight=W, bias=b, A=kw["A"], B=kw["B"], topk_weights=kw["topk_weights"],
                topk_ids=kw["topk_ids"])  # fmt: skip


BAD_LINEAR = [case for case in BAD if "out" not in case[0]] + [
    (dict(weight=torch.randn(12, 15)), ValueError, r"weight: expected shape \(12, 16\) \[d_out, d_in\]"),
    (dict(weight=torch.randn(12)), ValueError, "weight: expected a 2-D tensor"),
    (dict(weight=torch.randn(12, 16, dtype=torch.float64)), ValueError, "weight: expected dtype torch.float32"),
    (dict(weight=[[0.0] * 16] * 12), TypeError, "weight: expected a torch.Tensor, got list"),
    (dict(bias=torch.randn(11)), ValueError, r"bias: expected shape \(12,\)"),
    (dict(bias=torch.randn(12, 1)), ValueError, "bias: expected a 1-D tensor"),
]
test_moe_lora_linear_bad_input = bad_input_test(
    mhr_ops.moe_lora_linear,
    _good_linear,
    ("x", "weight", "bias", "A", "B", "topk_weights", "topk_ids"),
    BAD_LINEAR,
)


# ---- module and model integration ----


def test_moe_lora_linear_matches_reference_and_records_aux_loss():
    torch.manual_seed(2)
    base = torch.nn.Linear(12, 10)
    layer = MoELoRALinear(base, n_experts=5, r=3, top_k=2, alpha=6.0)
    torch.nn.init.normal_(layer.B)
    assert layer.scale == 2.0 and not base.weight.requires_grad
    assert MoELoRALinear(torch.nn.Linear(4, 4), n_experts=2, r=4, top_k=1).scale == 1.0  # alpha=None: alpha=r
    x = torch.randn(4, 6, 12)
    y = layer(x)
    probs = torch.softmax(x @ layer.router.weight.T, -1)
    top_w, top_i = probs.topk(2, -1)
    top_w = top_w / top_w.sum(-1, keepdim=True)
    expected = base(x).double() + reference.moe_lora(x, layer.A, layer.B, top_w, top_i, scale=2.0)
    assert_close(y, expected, atol=1e-5, rtol=1e-5, what="MoELoRALinear")
    f = torch.stack([(top_i == e).float().sum() / top_i.numel() for e in range(5)])
    aux = 5 * (f * probs.reshape(-1, 5).mean(0)).sum()
    torch.testing.assert_close(layer.last_aux_loss, aux)
    torch.testing.assert_close(layer.last_expert_load, f)
    assert sorted(layer.state_dict()) == ["A", "B", "base.bias", "base.weight", "router.weight"]


def test_moe_lora_linear_module_fuses_a_plain_base_and_respects_hooks_and_subclasses():
    torch.manual_seed(4)
    layer = MoELoRALinear(torch.nn.Linear(12, 10), n_experts=5, r=3, top_k=2, alpha=6.0)
    torch.nn.init.normal_(layer.B)
    x = torch.randn(4, 6, 12)
    w, ids, _ = layer.route(x)
    update = reference.moe_lora(x, layer.A, layer.B, w, ids, scale=2.0)
    assert layer._plain_base(x)
    assert_close(layer(x), layer.base(x).double() + update, atol=2e-5, rtol=2e-5, what="fused")
    handle = layer.base.register_forward_hook(lambda mod, args, out: 2 * out)  # a hook sees the base output
    assert not layer._plain_base(x)
    plain = torch.nn.functional.linear(x, layer.base.weight, layer.base.bias).double()
    assert_close(layer(x), 2 * plain + update, atol=2e-5, rtol=2e-5, what="hooked base")
    handle.remove()
    seen = []
    handle = layer.base.register_full_backward_hook(lambda mod, gin, gout: seen.append(gout[0].shape))
    assert not layer._plain_base(x)  # a backward hook runs only when the base module is called
    layer(x.requires_grad_()).sum().backward()
    assert seen == [(4, 6, 10)]
    handle.remove()
    x = x.detach()
    assert layer._plain_base(x)

    class Doubled(torch.nn.Linear):  # a subclass computes its own way (as quantized layers do)
        def forward(self, inp):
            return 2 * super().forward(inp)

    sub = Doubled(12, 10)
    sub.load_state_dict(layer.base.state_dict())
    layer.base = sub
    assert not layer._plain_base(x)
    assert_close(layer(x), 2 * torch.nn.functional.linear(x, sub.weight, sub.bias).double() + update,
                 atol=2e-5, rtol=2e-5, what="subclass base")  # fmt: skip


def test_moe_lora_linear_bad_arguments():
    with pytest.raises(TypeError, match="base: expected an nn.Linear"):
        MoELoRALinear(torch.nn.Conv1d(2, 2, 1), n_experts=2, r=2, top_k=1)
    with pytest.raises(ValueError, match=r"top_k: expected in \[1, 4\]"):
        MoELoRALinear(torch.nn.Linear(4, 4), n_experts=4, r=2, top_k=5)
    with pytest.raises(ValueError, match="router: expected 'softmax'"):
        MoELoRALinear(torch.nn.Linear(4, 4), n_experts=4, r=2, top_k=2, router="sigmoid")
    with pytest.raises(ValueError, match="no MoELoRALinear layers"):
        mhr_ops.moe_aux_loss(torch.nn.Linear(4, 4))


def test_patched_llama_trains_with_aux_loss():
    model = tiny_llama(seed=3)
    mhr_ops.patch_moe_lora(model, ["q_proj", "v_proj", "down_proj"], n_experts=4, r=4, top_k=2, alpha=8.0)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, MoELoRALinear)}
    assert len(layers) == 6
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.rsplit(".", 1)[-1] in ("A", "B") or n.endswith(".router.weight") for n in trainable)
    assert len(trainable) == 3 * len(layers)
    keys = model.state_dict().keys()
    for suffix in ("q_proj.A", "q_proj.B", "q_proj.router.weight", "q_proj.base.weight"):
        assert "model.layers.0.self_attn." + suffix in keys
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(1, 64, (4, 12), generator=torch.Generator().manual_seed(0))
    losses, aux = [], []
    for _ in range(15):
        out = model(input_ids=ids, labels=ids)
        balance = mhr_ops.moe_aux_loss(model)
        loss = out.loss + 0.01 * balance
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(out.loss.item())
        aux.append(balance.item())
    print("loss", losses[0], "->", losses[-1], "aux", aux[0], "->", aux[-1])
    assert losses[-1] < losses[0] - 0.1
    assert all(a >= 0.99 * len(layers) for a in aux)  # each layer's Switch loss is >= 1
    for name, layer in layers.items():
        load = layer.last_expert_load
        print(name, "expert load", [round(v, 3) for v in load.tolist()])
        assert load.shape == (4,) and abs(load.sum().item() - 1.0) < 1e-6
        assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0
