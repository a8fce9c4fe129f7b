"""Sparse head gating (SPEC section 5): head_gates and gated_head_proj against the float64
reference, gradcheck, opcheck, torch.compile, bad input; MoHGate / GatedOutputProjection /
patch_moh on a tiny Llama built from a config."""

import pytest
import torch
from conftest import DEVICES, EMULATED_CUDA, assert_backward_close, assert_close, tiny_llama

import mhr_ops
from mhr_ops import reference
from mhr_ops.nn import GatedOutputProjection, MoHGate

TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 3e-3}

CASES = [  # (Hr, Hs, top_k, shared logits, stage logits)
    (16, 16, 8, True, True),
    (5, 0, 2, False, False),
    (7, 3, 7, True, False),
    (4, 1, 1, False, True),
    (3, 2, 3, False, True),
]


def gate_inputs(N, Hr, Hs, with_shared, with_stage, *, device, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).to(device)

    return rnd(N, Hr), rnd(N, Hs) if with_shared else None, rnd(N, 2) if with_stage else None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("Hr,Hs,top_k,with_shared,with_stage", CASES)
@pytest.mark.parametrize("binary", [False, True])
def test_head_gates_match_reference(device, dtype, Hr, Hs, top_k, with_shared, with_stage, binary):
    lr, ls, st = gate_inputs(37, Hr, Hs, with_shared, with_stage, device=device, dtype=dtype)
    kw = dict(top_k=top_k, shared_logits=ls, stage_logits=st, n_shared=0 if with_shared else Hs, binary=binary)
    got = mhr_ops.head_gates(lr, **kw)
    assert got.shape == (37, Hs + Hr) and got.dtype == dtype
    assert_close(got, reference.head_gates(lr, **kw), atol=TOL[dtype], rtol=TOL[dtype], what="head_gates")
    kept = (got[:, Hs:] != 0).sum(-1)
    assert torch.equal(kept, torch.full_like(kept, top_k))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("Hr,Hs,top_k,with_shared,with_stage", CASES)
def test_head_gates_gradients(device, Hr, Hs, top_k, with_shared, with_stage):
    ins = gate_inputs(23, Hr, Hs, with_shared, with_stage, device=device, dtype=torch.float64, seed=1)
    n_shared = 0 if with_shared else Hs

    def f(fn, lr, ls, st):
        return fn(lr, top_k=top_k, shared_logits=ls, stage_logits=st, n_shared=n_shared)

    ours = [t.clone().requires_grad_() if t is not None else None for t in ins]
    refs = [t.clone().requires_grad_() if t is not None else None for t in ins]
    gy = torch.randn(23, Hs + Hr, dtype=torch.float64, device=device)
    f(mhr_ops.head_gates, *ours).backward(gy)
    f(reference.head_gates, *refs).backward(gy)
    for a, b in zip(ours, refs, strict=True):
        if a is not None:
            assert_close(a.grad, b.grad, atol=1e-10, rtol=1e-9, what="d logits")
    if device == "cpu":
        present = [t for t in ours if t is not None]

        def g(*args):
            it = iter(args)
            return f(mhr_ops.head_gates, *[next(it) if t is not None else None for t in ours])

        assert torch.autograd.gradcheck(g, [t.detach().requires_grad_() for t in present])


@pytest.mark.parametrize("device", DEVICES)
def test_binary_gates_have_no_gradient(device):
    lr = torch.randn(5, 6, device=device, requires_grad=True)
    gates = mhr_ops.head_gates(lr, top_k=2, n_shared=2, binary=True)
    assert torch.equal(gates[:, :2], torch.ones(5, 2, device=device))
    gates.sum().backward()
    assert lr.grad is None or torch.equal(lr.grad, torch.zeros_like(lr))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,H,Dh,D", [(37, 4, 3, 5), (64, 8, 16, 24), (1, 1, 1, 1)])
def test_gated_head_proj_matches_reference(device, dtype, N, H, Dh, D):
    gen = torch.Generator().manual_seed(2)
    o = torch.randn(N, H, Dh, generator=gen).to(dtype).to(device)
    gates = torch.rand(N, H, generator=gen)
    gates[torch.rand(N, H, generator=gen) < 0.3] = 0.0  # closed heads
    gates = gates.to(dtype).to(device)
    W = (torch.randn(D, H * Dh, generator=gen) / (H * Dh) ** 0.5).to(dtype).to(device)
    b = torch.randn(D, generator=gen).to(dtype).to(device)
    ins = [t.clone().requires_grad_() for t in (o, gates, W, b)]
    y = mhr_ops.gated_head_proj(*ins)
    refs = [t.detach().double().requires_grad_() for t in (o, gates, W, b)]
    ref = reference.gated_head_proj(*refs)
    tol = TOL[dtype] * (4 if dtype == torch.bfloat16 else 1)
    assert y.dtype == dtype and y.shape == (N, D)
    assert_close(y, ref, atol=tol, rtol=tol, what="gated_head_proj")
    assert_backward_close(y, ref, ins, refs, tol=tol, what="gated_head_proj")


@pytest.mark.parametrize("device", DEVICES)
def test_closed_heads_are_skipped_not_multiplied(device):
    """SPEC section 5: a head whose gate is exactly 0 contributes nothing to y and receives and
    gives no gradient, even where its o holds NaN or Inf; a NaN gate counts as open."""
    gen = torch.Generator().manual_seed(5)
    N, H, Dh, D = 7, 4, 3, 5
    o = torch.randn(N, H, Dh, generator=gen, dtype=torch.float64)
    gates = torch.rand(N, H, generator=gen, dtype=torch.float64) + 0.1
    gates[:, 1] = 0.0
    gates[2, 3] = 0.0
    o[:, 1] = float("nan")
    o[2, 3, 0] = float("inf")
    gates[5, 2] = float("nan")  # open: row 5 of y is NaN
    W = torch.randn(D, H * Dh, generator=gen, dtype=torch.float64)
    b = torch.randn(D, generator=gen, dtype=torch.float64)
    for dtype in (torch.float64, torch.float32):
        ins = [t.to(dtype).to(device).clone().requires_grad_() for t in (o, gates, W, b)]
        y = mhr_ops.gated_head_proj(*ins)
        refs = [t.clone().requires_grad_() for t in (o, gates, W, b)]
        ref = reference.gated_head_proj(*refs)
        assert torch.equal(y.isnan().cpu(), ref.isnan()) and ref[5].isnan().all()
        assert ref[[0, 1, 2, 3, 4, 6]].isfinite().all()
        tol = TOL[dtype]
        assert_close(y[ref.isfinite()], ref[ref.isfinite()], atol=tol, rtol=tol, what="y")
        gy = torch.randn(N, D, generator=gen, dtype=torch.float64)
        gy[5] = 0.0  # keep the NaN row out of the gradients
        y.backward(gy.to(dtype).to(device))
        ref.backward(gy)
        d_o, d_g = ins[0].grad.cpu(), ins[1].grad.cpu()
        assert (d_o[:, 1] == 0).all() and (d_o[2, 3] == 0).all()
        assert (d_g[:, 1] == 0).all() and d_g[2, 3] == 0
        assert ins[2].grad[:, Dh : 2 * Dh].isfinite().all()  # head 1 is closed in every row
        for a, r in zip(ins, refs, strict=True):
            fin = r.grad.isfinite()
            assert torch.equal(a.grad.isfinite().cpu(), fin)
            assert_close(a.grad.cpu()[fin], r.grad[fin], atol=tol * 10, rtol=tol, what="grad")


def test_gated_head_proj_gradcheck_and_non_contiguous():
    o = torch.randn(6, 3, 2, dtype=torch.float64, requires_grad=True)
    wide = torch.randn(6, 6, dtype=torch.float64)
    gates = wide[:, ::2].clone().requires_grad_()
    W = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(mhr_ops.gated_head_proj, (o, gates, W, b))
    strided_o = torch.randn(3, 6, 2, dtype=torch.float64).transpose(0, 1)
    strided_g = wide[:, 1::2]
    assert not strided_o.is_contiguous() and not strided_g.is_contiguous()
    assert_close(
        mhr_ops.gated_head_proj(strided_o, strided_g, W.detach(), b.detach()),
        reference.gated_head_proj(strided_o, strided_g, W, b),
        atol=1e-12,
        rtol=1e-12,
        what="non-contiguous",
    )


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    lr, ls, st = gate_inputs(9, 5, 3, True, True, device=device, seed=4)
    args = (lr.clone().requires_grad_(), ls.clone().requires_grad_(), st.clone().requires_grad_(), 2, 0, False)
    torch.library.opcheck(torch.ops.mhr_ops.head_gates, args)
    torch.library.opcheck(torch.ops.mhr_ops.head_gates, (lr, None, None, 3, 2, True))
    gy = torch.randn(9, 8, device=device)
    torch.library.opcheck(torch.ops.mhr_ops.head_gates_backward, (gy, lr, ls, st, 2, 0, False))
    o, g = torch.randn(9, 4, 3, device=device), torch.rand(9, 4, device=device)
    W, b = torch.randn(5, 12, device=device), torch.randn(5, device=device)
    req = [t.clone().requires_grad_() for t in (o, g, W, b)]
    torch.library.opcheck(torch.ops.mhr_ops.gated_head_proj, tuple(req))
    torch.library.opcheck(torch.ops.mhr_ops.gated_head_proj, (o, g, W, None))
    gy = torch.randn(9, 5, device=device)
    torch.library.opcheck(torch.ops.mhr_ops.gated_head_proj_backward, (gy, o, g, W, True, [True] * 4))


def test_torch_compile_fullgraph():
    gate = MoHGate(12, 6, n_shared=2, top_k=2)
    proj = GatedOutputProjection(torch.nn.Linear(6 * 3, 12), gate, head_dim=3)
    x, attn = torch.randn(2, 5, 12), torch.randn(2, 5, 18)

    def f(x, attn):
        return proj(attn, gates=gate(x)).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, attn), f(x, attn))


def test_patched_llama_dense_equivalence_is_exact():
    dense = tiny_llama()
    model = mhr_ops.patch_moh(tiny_llama(), n_shared=2, top_k=2)  # 2 routed heads, all kept
    for m in model.modules():
        if isinstance(m, MoHGate):
            torch.nn.init.zeros_(m.routed.weight)  # every gate exactly 1
    ids = torch.randint(1, 64, (3, 11))
    # Bitwise on the CPU (gates, then the dense GEMM itself); the CUDA SIMT kernel sums in its own
    # order (under MHR_OPS_EMULATED_CUDA: differences of an fp32 rounding).
    tol = dict(atol=1e-6, rtol=1e-5) if EMULATED_CUDA else dict(atol=0, rtol=0)
    torch.testing.assert_close(model(input_ids=ids).logits, dense(input_ids=ids).logits, **tol)
    gates = [m.last_gates for m in model.modules() if isinstance(m, MoHGate)]
    assert len(gates) == 2 and all(torch.equal(g, torch.ones_like(g)) for g in gates)


@pytest.mark.parametrize("router", ["linear", "qnorm"])
def test_patched_llama_trains(router):
    model = mhr_ops.patch_moh(tiny_llama(seed=1), n_shared=1, top_k=2, router=router)
    assert sum(isinstance(m, GatedOutputProjection) for m in model.modules()) == 2
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(1, 64, (4, 12), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(8):
        out = model(input_ids=ids, labels=ids)
        loss = out.loss
        if router == "linear":
            gates = [m for m in model.modules() if isinstance(m, MoHGate)]
            loss = loss + 0.01 * sum(mhr_ops.load_balance_loss(g.last_router_probs, g.last_gates, 1) for g in gates)
        assert torch.isfinite(out.logits).all()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0]
    gate = next(m for m in model.modules() if isinstance(m, MoHGate))
    assert ((gate.last_gates[..., 1:] != 0).sum(-1) == 2).all()  # top-2 of the 3 routed heads


def test_load_balance_loss_is_one_when_uniform():
    probs = torch.full((8, 4), 0.25)
    gates = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1]] * 4, dtype=torch.float32)
    torch.testing.assert_close(mhr_ops.load_balance_loss(probs, gates), torch.tensor(1.0))


BAD = [
    (dict(top_k=0), ValueError, r"top_k: expected in \[1, 5\]"),
    (dict(top_k=6), ValueError, r"top_k: expected in \[1, 5\]"),
    (dict(n_shared=-1), ValueError, "n_shared: expected >= 0"),
    (dict(shared_logits=torch.randn(4, 3), n_shared=2), ValueError, "n_shared: expected 0 or 3"),
    (dict(shared_logits=torch.randn(3, 3)), ValueError, "shared_logits: expected shape"),
    (dict(stage_logits=torch.randn(4, 3)), ValueError, "stage_logits: expected shape"),
    (dict(stage_logits=torch.randn(4, 2, dtype=torch.float64)), ValueError, "stage_logits: expected dtype"),
]


@pytest.mark.parametrize("override,exc,match", BAD)
def test_head_gates_bad_input(override, exc, match):
    kw = dict(top_k=2)
    kw.update(override)
    with pytest.raises(exc, match=match):
        mhr_ops.head_gates(torch.randn(4, 5), **kw)


def test_gated_head_proj_and_modules_bad_input():
    o, g, W = torch.randn(4, 3, 2), torch.rand(4, 3), torch.randn(5, 6)
    with pytest.raises(ValueError, match="gates: expected shape"):
        mhr_ops.gated_head_proj(o, torch.rand(4, 2), W)
    with pytest.raises(ValueError, match=r"weight: expected shape \(D, 6\)"):
        mhr_ops.gated_head_proj(o, g, torch.randn(5, 7))
    with pytest.raises(ValueError, match=r"bias: expected shape \(5,\)"):
        mhr_ops.gated_head_proj(o, g, W, torch.randn(4))
    with pytest.raises(ValueError, match="gates: expected dtype"):
        mhr_ops.gated_head_proj(o, g.double(), W)
    with pytest.raises(ValueError, match=r"top_k: expected in \[1, 2\] \(1..Hr\), got 3"):
        MoHGate(8, 4, n_shared=2, top_k=3)
    with pytest.raises(ValueError, match="n_shared: expected 0 <= n_shared < n_heads"):
        MoHGate(8, 4, n_shared=4, top_k=1)
    with pytest.raises(ValueError, match="o_proj: expected in_features"):
        GatedOutputProjection(torch.nn.Linear(10, 8), MoHGate(8, 4, n_shared=0, top_k=1), head_dim=3)
    with pytest.raises(ValueError, match="no attention modules"):
        mhr_ops.patch_moh(torch.nn.Linear(2, 2), n_shared=0, top_k=1)


@pytest.mark.parametrize("device", DEVICES)
def test_head_gates_non_contiguous(device):
    wide = torch.randn(11, 20, dtype=torch.float64, device=device)
    lr, ls, st = wide[:, 0:14:2], wide[:, 1:7:2], wide[:, 15:19:2]  # strided columns
    assert not any(t.is_contiguous() for t in (lr, ls, st))
    ours = [t.clone().requires_grad_() for t in (lr, ls, st)]
    refs = [t.clone().requires_grad_() for t in (lr, ls, st)]
    kw = dict(top_k=3)
    got = mhr_ops.head_gates(ours[0], shared_logits=ours[1], stage_logits=ours[2], **kw)
    ref = reference.head_gates(refs[0], shared_logits=refs[1], stage_logits=refs[2], **kw)
    assert_close(got, ref, atol=1e-12, rtol=1e-12, what="non-contiguous gates")
    gy = torch.randn(10, 11, dtype=torch.float64, device=device).t()  # non-contiguous grad
    got.backward(gy)
    ref.backward(gy)
    for a, b in zip(ours, refs, strict=True):
        assert_close(a.grad, b.grad, atol=1e-12, rtol=1e-10, what="non-contiguous grads")


@pytest.mark.parametrize("where", ["routed", "shared", "stage"])
def test_nan_logit_propagates_as_in_the_reference(where):
    """The rule (docs/API.md): NaN propagates as through a softmax. A NaN routed logit makes every
    routed gate of its token NaN (kept or not), a NaN shared logit every shared gate, a NaN
    stage logit every gate; other tokens are untouched. Gradients of such a token are NaN."""
    gen = torch.Generator().manual_seed(3)
    routed, shared, stage = torch.randn(3, 5, generator=gen), torch.randn(3, 3, generator=gen), torch.randn(3, 2)
    {"routed": routed, "shared": shared, "stage": stage}[where][1, 1] = float("nan")
    args = [t.clone().requires_grad_() for t in (routed, shared, stage)]
    got = mhr_ops.head_gates(args[0], top_k=2, shared_logits=args[1], stage_logits=args[2])
    ref = reference.head_gates(routed, top_k=2, shared_logits=shared, stage_logits=stage)
    print(got[1], ref[1])
    assert torch.equal(got.isnan(), ref.isnan())
    nan_cols = {"routed": slice(3, 8), "shared": slice(0, 3), "stage": slice(0, 8)}[where]
    assert got[1, nan_cols].isnan().all() and not got[[0, 2]].isnan().any()
    torch.testing.assert_close(got[[0, 2]].double(), ref[[0, 2]])
    got.sum().backward()
    g = args[["routed", "shared", "stage"].index(where)].grad
    assert g[1].isnan().all() and not g[[0, 2]].isnan().any()
