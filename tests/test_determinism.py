"""Bitwise determinism on the CPU (the contract's determinism section): for the same inputs and
thread count, forward and backward give the same bits in eager mode, again in eager mode, and
under AOT dispatch (``torch.compile(backend="aot_eager")``), on every CPU kernel variant this
machine has (native, and capped with ATEN_CPU_CAPABILITY in a subprocess).

The losses are ``.sum()``: eager autograd then hands the backward an expanded (stride 0)
gradient where AOT dispatch hands it a contiguous one, which is what once made the AVX-512
backward pick a different kernel under AOT."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import mhr_ops

CAPABILITIES = ["DEFAULT", "AVX2", "AVX512"]

# (name, rank, rows per example, x padded): ranks 4/8/16/32 reach the fused kernels where the CPU
# has them, rank 5 the BLAS grouped path; one-row examples with many tasks reach project-then-mix.
LINEAR_CASES = [
    ("r8-grouped", 8, 64, False),
    ("r16-grouped-padded-x", 16, 64, True),
    ("r4-grouped", 4, 64, False),
    ("r32-grouped", 32, 40, True),
    ("r5-blas-grouped", 5, 64, False),
    ("r8-project-then-mix", 8, 1, False),
]


def _linear_problem(r, rows, padded, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h, S, d_in, d_out, bs, T = 4, 3, 64, 48, 6, 5

    def rnd(*shape):
        return torch.randn(*shape, generator=gen)

    x = rnd(bs, rows, d_in)
    if padded:  # rows with a stride wider than d_in
        x = torch.cat([x, rnd(bs, rows, 3)], dim=-1)[..., :d_in]
    params = dict(
        weight=rnd(d_out, d_in) / 8,
        bias=rnd(d_out),
        A=rnd(h, S, d_in // h, r) / 4,
        B=rnd(h, S, r, d_out // h) / 4,
        logits=rnd(T, h * S),
    )
    task_ids = torch.randint(0, T, (bs,), generator=gen)
    return x, params, task_ids, S, r


def _linear_loss(x, weight, bias, A, B, logits, task_ids, noise, n_skills, r):
    w = mhr_ops.route(logits, task_ids, n_skills=n_skills, mode="relaxed_bernoulli", noise=noise, check_ids=False)
    groups = torch.arange(task_ids.shape[0])
    y = mhr_ops.mhr_linear(x, weight, bias, A, B, w, groups, scale=0.5, check_ids=False)
    u = mhr_ops.routed_lora(x, A, B, w, groups, scale=0.25, check_ids=False)
    return y.sum() + u.sum() + (y * y).mean()


def _grads(fn, x, params, task_ids, noise, S, r):
    leaves = [x.detach().clone().requires_grad_()] + [p.detach().clone().requires_grad_() for p in params.values()]
    loss = fn(leaves[0], *leaves[1:], task_ids, noise, S, r)
    loss.backward()
    return [loss.detach()] + [t.grad for t in leaves]


def _moh_loss(o, gates_logits, shared_logits, weight, bias):
    gates = mhr_ops.head_gates(gates_logits, top_k=2, shared_logits=shared_logits)
    return mhr_ops.gated_head_proj(o, gates, weight, bias).sum()


def check_linear_case(name, r, rows, padded):
    x, params, task_ids, S, _ = _linear_problem(r, rows, padded)
    noise = torch.rand(task_ids.shape[0], 4, S, generator=torch.Generator().manual_seed(1))
    eager = _grads(_linear_loss, x, params, task_ids, noise, S, r)
    again = _grads(_linear_loss, x, params, task_ids, noise, S, r)
    torch._dynamo.reset()
    compiled = torch.compile(_linear_loss, backend="aot_eager", fullgraph=True)
    aot = _grads(compiled, x, params, task_ids, noise, S, r)
    names = ["loss", "x", "weight", "bias", "A", "B", "logits"]
    for what, other in (("second eager run", again), ("aot_eager", aot)):
        for n, a, b in zip(names, eager, other, strict=True):
            assert torch.equal(a, b), f"{name}: {n} differs between eager and {what}: max {(a - b).abs().max()}"


def check_moh_case():
    gen = torch.Generator().manual_seed(2)
    N, Hs, Hr, Dh, D = 37, 2, 4, 8, 24
    args = [
        torch.randn(N, Hs + Hr, Dh, generator=gen),
        torch.randn(N, Hr, generator=gen),
        torch.randn(N, Hs, generator=gen),
        torch.randn(D, (Hs + Hr) * Dh, generator=gen),
        torch.randn(D, generator=gen),
    ]

    def grads(fn):
        leaves = [a.clone().requires_grad_() for a in args]
        fn(*leaves).backward()
        return [t.grad for t in leaves]

    eager, again = grads(_moh_loss), grads(_moh_loss)
    torch._dynamo.reset()
    aot = grads(torch.compile(_moh_loss, backend="aot_eager", fullgraph=True))
    for what, other in (("second eager run", again), ("aot_eager", aot)):
        for i, (a, b) in enumerate(zip(eager, other, strict=True)):
            assert torch.equal(a, b), f"head gating: gradient {i} differs between eager and {what}"


@pytest.mark.parametrize("case", LINEAR_CASES, ids=[c[0] for c in LINEAR_CASES])
def test_linear_backward_bitwise_eager_vs_aot(case):
    check_linear_case(*case)


def test_head_gating_backward_bitwise_eager_vs_aot():
    check_moh_case()


def test_expanded_and_contiguous_grad_give_the_same_bits():
    """The op itself, called directly: the gradient's layout does not change the result."""
    x, params, task_ids, S, r = _linear_problem(8, 64, True)
    x2 = x.reshape(-1, x.shape[-1])
    w = torch.rand(task_ids.shape[0], 4, S)
    A, B, weight = params["A"], params["B"], params["weight"]
    _, z = torch.ops.mhr_ops.routed_lora(x2, A, B, w, task_ids, 64, 0.5)
    gy = torch.ones(x2.shape[0], B.shape[0] * B.shape[3])
    expanded = torch.ones(1, 1).expand_as(gy)
    transposed = torch.ones(gy.shape[1], gy.shape[0]).t()
    ops = torch.ops.mhr_ops
    for op, args in (
        (ops.routed_lora_backward, (x2, A, B, w, task_ids, 64, 0.5, z, [True] * 4)),
        (ops.mhr_linear_backward, (x2, weight, True, A, B, w, task_ids, 64, 0.5, z, [True] * 6)),
    ):
        ref = op(gy, *args)
        for other in (expanded, transposed):
            for a, b in zip(ref, op(other, *args), strict=True):
                assert torch.equal(a, b)


def _capped_capabilities():
    native = torch.backends.cpu.get_cpu_capability()
    return [c.lower() for c in CAPABILITIES[: CAPABILITIES.index(native)]] if native in CAPABILITIES else []


@pytest.mark.parametrize("capability", _capped_capabilities())
def test_bitwise_under_capability_cap(capability):
    """The same checks on the kernel variants below this CPU's own (AVX2 kernels and BLAS on an
    AVX-512 machine; BLAS alone under "default"), each in a subprocess under ATEN_CPU_CAPABILITY.
    This CPU's own variant is the in-process tests above."""
    script = textwrap.dedent(f"""
        import sys
        import torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        assert torch.backends.cpu.get_cpu_capability() == {capability.upper()!r}
        import test_determinism as t
        for case in t.LINEAR_CASES:
            t.check_linear_case(*case)
        t.check_moh_case()
        print("bitwise under", torch.backends.cpu.get_cpu_capability())
    """)
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"bitwise under {capability.upper()}" in done.stdout
