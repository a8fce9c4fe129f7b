"""route (SPEC section 2) against the float64 reference, PEFT's PolyRouter, gradcheck, opcheck,
torch.compile, odd and empty shapes, non-contiguous inputs, and every bad input of SPEC section 7."""

import contextlib

import pytest
import torch
from conftest import DEVICES, EMULATED_CUDA, assert_close

import mhr_ops
from mhr_ops import reference

MODES = ["sigmoid", "relaxed_bernoulli", "softmax", "average"]
# Per-dtype tolerance: the kernels compute in fp32 (fp64 for fp64) and round the output once.
TOL = {
    torch.float64: dict(atol=1e-12, rtol=1e-10),
    torch.float32: dict(atol=2e-6, rtol=2e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}


def make_inputs(T, h, S, G, *, device, dtype=torch.float32, scale=2.0, mode="sigmoid", seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(T, h * S, generator=gen, dtype=torch.float64) * scale).to(dtype).to(device)
    task_ids = torch.randint(0, T, (G,), generator=gen).to(device)
    noise = None
    if mode == "relaxed_bernoulli":
        noise = torch.rand(G, h, S, generator=gen, dtype=torch.float64).to(dtype).to(device)
    return logits, task_ids, noise


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("top_k", [None, 1, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T,h,S,G", [(5, 3, 7, 13), (1, 1, 3, 1), (16, 8, 8, 129), (3, 2, 40, 5)])
def test_matches_reference(device, mode, top_k, dtype, T, h, S, G):
    if top_k is not None and top_k > S:
        top_k = S
    logits, task_ids, noise = make_inputs(T, h, S, G, device=device, dtype=dtype, mode=mode)
    out = mhr_ops.route(logits, task_ids, n_skills=S, mode=mode, temperature=0.7, top_k=top_k, noise=noise)
    ref = reference.route(logits, task_ids, n_skills=S, mode=mode, temperature=0.7, top_k=top_k, noise=noise)
    assert out.shape == (G, h, S) and out.dtype == dtype and out.device == logits.device
    assert_close(out, ref, **TOL[dtype], what=f"route {mode} {dtype}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["sigmoid", "relaxed_bernoulli", "softmax"])
@pytest.mark.parametrize("top_k", [None, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradient_matches_reference(device, mode, top_k, dtype):
    T, h, S, G = 6, 3, 5, 17  # G > T: several groups share a task, their gradients add up
    logits, task_ids, noise = make_inputs(T, h, S, G, device=device, dtype=dtype, mode=mode, seed=3)
    grad_out = torch.randn(G, h, S, dtype=dtype, device=device)
    kw = dict(n_skills=S, mode=mode, temperature=1.3, top_k=top_k, noise=noise)
    a = logits.clone().requires_grad_()
    mhr_ops.route(a, task_ids, **kw).backward(grad_out)
    b = logits.clone().requires_grad_()
    reference.route(b, task_ids, **kw).backward(grad_out)
    assert_close(a.grad, b.grad, **TOL[dtype], what=f"d logits {mode}")


@pytest.mark.parametrize("device", DEVICES)
def test_average_has_no_gradient_and_is_uniform(device):
    logits = torch.randn(4, 2 * 6, device=device, requires_grad=True)
    w = mhr_ops.route(logits, torch.tensor([0, 3, 3], device=device), n_skills=6, mode="average")
    torch.testing.assert_close(w, torch.full_like(w, 1 / 6), atol=1e-7, rtol=0)
    w.sum().backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("G", [1, 5])
def test_deterministic_algorithms_alert_where_cuda_uses_atomics(mode, G):
    """SPEC section 8. The CUDA backward sums each task's gradient over its groups with atomics:
    with more than one group (two may share a task) it raises torch's non-determinism alert under
    torch.use_deterministic_algorithms(True); one group, the average mode (no gradient, nothing
    launched) and the CPU kernels (each task summed in group order) do not."""
    logits, task_ids, noise = make_inputs(3, 2, 4, G, device="cpu", mode=mode, seed=5)
    before, warn_only = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    torch.use_deterministic_algorithms(True)
    try:
        kw = dict(n_skills=4, mode=mode, temperature=1.0, top_k=None, noise=noise)
        w = mhr_ops.route(logits.clone().requires_grad_(), task_ids, **kw)  # the forward never alerts
        expect = EMULATED_CUDA and G > 1 and mode != "average"
        alert = pytest.raises(
            RuntimeError, match=r"route_backward \(CUDA\) does not have a deterministic implementation"
        )
        with alert if expect else contextlib.nullcontext():
            w.sum().backward()
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


@pytest.mark.parametrize("mode", ["sigmoid", "relaxed_bernoulli", "softmax", "average"])
@pytest.mark.parametrize("top_k", [None, 2])
def test_gradcheck_float64(mode, top_k):
    T, h, S, G = 3, 2, 4, 5
    logits, task_ids, noise = make_inputs(T, h, S, G, device="cpu", dtype=torch.float64, mode=mode, seed=7)
    logits.requires_grad_()

    def fn(lg):
        return mhr_ops.route(lg, task_ids, n_skills=S, mode=mode, temperature=0.8, top_k=top_k, noise=noise)

    assert torch.autograd.gradcheck(fn, (logits,), eps=1e-6, atol=1e-7)


def _peft_router(n_tasks, n_splits, n_skills):
    from peft.tuners.poly.config import PolyConfig
    from peft.tuners.poly.router import PolyRouter

    config = PolyConfig(n_tasks=n_tasks, n_skills=n_skills, n_splits=n_splits, r=2)
    router = PolyRouter(config)
    with torch.no_grad():
        router.module_logits.copy_(torch.randn(n_tasks, n_splits * n_skills) * 2)
    return router


def test_peft_parity_eval():
    router = _peft_router(n_tasks=7, n_splits=4, n_skills=8).eval()
    task_ids = torch.tensor([6, 0, 3, 3, 1])
    expected = router(task_ids=task_ids, input_ids=None)
    got = mhr_ops.route(router.module_logits, task_ids, n_skills=8, mode="sigmoid")
    assert_close(got, expected, atol=1e-7, rtol=1e-6, what="peft eval")


@pytest.mark.parametrize("seed", [0, 1234])
def test_peft_parity_train_same_seed(seed):
    """Same seed: the same random stream and the same numbers, forward and backward."""
    router = _peft_router(n_tasks=5, n_splits=2, n_skills=6).train()
    task_ids = torch.tensor([4, 1, 1, 0, 2, 3, 3])
    grad_out = torch.randn(7, 2, 6)

    torch.manual_seed(seed)
    expected = router(task_ids=task_ids, input_ids=None)
    expected.backward(grad_out)
    after_peft = torch.rand(3)

    logits = router.module_logits.detach().clone().requires_grad_()
    torch.manual_seed(seed)
    got = mhr_ops.route(logits, task_ids, n_skills=6, mode="relaxed_bernoulli")
    got.backward(grad_out)
    after_ours = torch.rand(3)

    assert_close(got, expected, atol=1e-6, rtol=1e-5, what="peft train")
    assert_close(logits.grad, router.module_logits.grad, atol=1e-5, rtol=1e-4, what="peft train grad")
    assert torch.equal(after_peft, after_ours), "route must consume the random stream exactly like PEFT"


def test_generator_controls_noise():
    logits = torch.randn(3, 8)
    ids = torch.tensor([0, 1, 2, 2])
    a = mhr_ops.route(logits, ids, n_skills=4, mode="relaxed_bernoulli", generator=torch.Generator().manual_seed(5))
    b = mhr_ops.route(logits, ids, n_skills=4, mode="relaxed_bernoulli", generator=torch.Generator().manual_seed(5))
    c = mhr_ops.route(logits, ids, n_skills=4, mode="relaxed_bernoulli", generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("device", DEVICES)
def test_top_k_ties_go_to_lower_index(device):
    logits = torch.zeros(1, 6, device=device)  # all skills tie
    w = mhr_ops.route(logits, torch.tensor([0], device=device), n_skills=6, mode="sigmoid", top_k=2)
    expected = torch.tensor([[[0.5, 0.5, 0, 0, 0, 0]]], device=device)
    torch.testing.assert_close(w, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_non_contiguous_inputs(device, mode):
    T, h, S, G = 4, 3, 5, 9
    wide = torch.randn(T, 2 * h * S, device=device, dtype=torch.float64)
    logits = wide[:, ::2]  # column stride 2
    task_ids = torch.randint(0, T, (2 * G,), device=device)[::2]
    noise = None
    if mode == "relaxed_bernoulli":
        noise = torch.rand(S, h, G, device=device, dtype=torch.float64).permute(2, 1, 0)
    assert not logits.is_contiguous() and not task_ids.is_contiguous()
    kw = dict(n_skills=S, mode=mode, top_k=2, noise=noise)
    a = logits.clone().requires_grad_(mode != "average")
    out = mhr_ops.route(a, task_ids, **kw)
    ref = reference.route(logits, task_ids, **kw)
    assert_close(out, ref, **TOL[torch.float64], what="non-contiguous")
    if mode != "average":
        g = torch.randn(S, G, h, device=device, dtype=torch.float64).permute(1, 2, 0)  # non-contiguous grad
        out.backward(g)
        b = logits.clone().requires_grad_()
        reference.route(b, task_ids, **kw).backward(g)
        assert_close(a.grad, b.grad, **TOL[torch.float64], what="non-contiguous grad")


@pytest.mark.parametrize("device", DEVICES)
def test_int32_task_ids_and_sequences(device):
    logits = torch.randn(5, 12, device=device)
    ref = mhr_ops.route(logits, torch.tensor([4, 0, 2], device=device), n_skills=3)
    got32 = mhr_ops.route(logits, torch.tensor([4, 0, 2], dtype=torch.int32, device=device), n_skills=3)
    got_list = mhr_ops.route(logits, [4, 0, 2], n_skills=3)
    assert torch.equal(ref, got32) and torch.equal(ref, got_list)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_empty_groups(device, mode):
    logits = torch.randn(3, 8, device=device, requires_grad=True)
    out = mhr_ops.route(logits, torch.empty(0, dtype=torch.long, device=device), n_skills=4, mode=mode)
    assert out.shape == (0, 2, 4)
    out.sum().backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("top_k", [None, 2])
def test_nan_propagates(device, mode, top_k):
    logits = torch.randn(2, 8, device=device)
    logits[1, 1] = float("nan")
    out = mhr_ops.route(logits, torch.tensor([0, 1], device=device), n_skills=4, mode=mode, top_k=top_k)
    assert torch.isfinite(out[0]).all()
    assert torch.isfinite(out[1, 1]).all()  # the other head of task 1 is untouched
    if mode != "average":
        assert torch.isnan(out[1, 0]).any()


@pytest.mark.parametrize("device", DEVICES)
def test_unchecked_out_of_range_ids_give_nan_not_a_crash(device):
    logits = torch.randn(3, 4, device=device, requires_grad=True)
    out = mhr_ops.route(logits, torch.tensor([0, 7, -1], device=device), n_skills=2, check_ids=False)
    assert torch.isfinite(out[0]).all() and torch.isnan(out[1:]).all()
    out[0].sum().backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_opcheck(device, mode):
    logits, task_ids, noise = make_inputs(4, 2, 5, 6, device=device, mode=mode, seed=11)
    for top_k in (None, 2):
        args = (logits, task_ids, noise, 5, mode, 0.9, top_k, 1e-12)
        torch.library.opcheck(torch.ops.mhr_ops.route, (logits.clone().requires_grad_(), *args[1:]))
        grad = torch.randn(6, 2, 5, device=device)
        torch.library.opcheck(torch.ops.mhr_ops.route_backward, (grad, *args))


def test_double_backward_raises_clearly():
    logits = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    w = mhr_ops.route(logits, torch.tensor([0, 2]), n_skills=2)
    (g,) = torch.autograd.grad(w.square().sum(), logits, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()


def test_torch_compile_fullgraph():
    logits = torch.randn(6, 4 * 3, requires_grad=True)
    task_ids = torch.tensor([5, 0, 2, 2])

    def f(lg, ids):
        return mhr_ops.route(lg, ids, n_skills=3, mode="softmax", top_k=2).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    expected = f(logits, task_ids)
    (g_expected,) = torch.autograd.grad(expected, logits)
    got = compiled(logits, task_ids)
    (g_got,) = torch.autograd.grad(got, logits)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(g_got, g_expected)


# ---- Bad input: every case of SPEC section 7 that applies to route. ----

BAD = [
    (dict(logits=torch.randn(2, 3, 4)), ValueError, "logits: expected a 2-D"),
    (dict(logits=torch.randint(0, 3, (4, 8))), ValueError, "logits: expected dtype"),
    (dict(n_skills=3), ValueError, r"logits: expected shape\[1\]"),
    (dict(n_skills=0), ValueError, "n_skills: expected >= 1"),
    (dict(n_skills=2.0), TypeError, "n_skills: expected an int"),
    (dict(task_ids=torch.tensor([0.0, 1.0])), ValueError, "task_ids: expected dtype"),
    (dict(task_ids=torch.tensor([[0, 1]])), ValueError, "task_ids: expected a 1-D"),
    (dict(task_ids=torch.tensor([0, 4])), ValueError, r"task_ids: expected task ids in \[0, 4\), got 4"),
    (dict(task_ids=torch.tensor([-1, 2])), ValueError, r"task_ids: expected task ids in \[0, 4\), got -1"),
    (dict(mode="gumbel"), ValueError, "mode: expected one of"),
    (dict(temperature=0.0), ValueError, "temperature: expected a number > 0"),
    (dict(temperature=-1.0), ValueError, "temperature: expected a number > 0"),
    (dict(top_k=0), ValueError, r"top_k: expected in \[1, 4\]"),
    (dict(top_k=5), ValueError, r"top_k: expected in \[1, 4\]"),
    (dict(eps=-1.0), ValueError, "eps: expected a number >= 0"),
    (dict(noise=torch.rand(3, 2, 4)), ValueError, "noise: only mode 'relaxed_bernoulli'"),
    (dict(mode="relaxed_bernoulli", noise=torch.rand(3, 2, 5)), ValueError, "noise: expected shape"),
    (
        dict(mode="relaxed_bernoulli", noise=torch.rand(3, 2, 4, dtype=torch.float64)),
        ValueError,
        "noise: expected dtype",
    ),
]


@pytest.mark.parametrize("override,exc,match", BAD)
def test_bad_input(override, exc, match):
    kw = dict(logits=torch.randn(4, 8), task_ids=torch.tensor([0, 3, 1]), n_skills=4)
    kw.update(override)
    logits, task_ids = kw.pop("logits"), kw.pop("task_ids")
    with pytest.raises(exc, match=match):
        mhr_ops.route(logits, task_ids, **kw)


def test_bad_input_device_mismatch():
    logits = torch.randn(4, 8, device="meta")
    with pytest.raises(ValueError, match="task_ids: expected a tensor on meta"):
        mhr_ops.route(logits, torch.tensor([0]), n_skills=4)


def test_op_level_checks_name_the_argument():
    """Direct torch.ops calls get the same argument-naming ValueErrors: the op owns its contract."""
    route = torch.ops.mhr_ops.route
    with pytest.raises(ValueError, match=r"top_k: expected in \[1, 2\] \(1..n_skills\), got 3"):
        route(torch.randn(2, 4), torch.tensor([0]), None, 2, "sigmoid", 1.0, 3, 1e-12)
    with pytest.raises(ValueError, match=r"top_k: expected in \[1, 2\] \(1..n_skills\), got 0"):
        route(torch.randn(2, 4), torch.tensor([0]), None, 2, "sigmoid", 1.0, 0, 1e-12)
    with pytest.raises(ValueError, match="noise: mode 'relaxed_bernoulli' needs"):
        route(torch.randn(2, 4), torch.tensor([0]), None, 2, "relaxed_bernoulli", 1.0, None, 1e-12)
    with pytest.raises(ValueError, match=r"mode: expected one of \('sigmoid', 'relaxed_bernoulli', 'softmax', 'av"):
        route(torch.randn(2, 4), torch.tensor([0]), None, 2, "nope", 1.0, None, 1e-12)


def test_temperature_as_0d_tensor():
    """A 0-d tensor temperature is read as its number (constant); a learnable one is refused."""
    logits, ids = torch.randn(4, 6), torch.tensor([0, 3, 1])
    noise = torch.rand(3, 2, 3)
    kw = dict(n_skills=3, mode="relaxed_bernoulli", noise=noise)
    expected = mhr_ops.route(logits, ids, temperature=0.5, **kw)
    got = mhr_ops.route(logits, ids, temperature=torch.tensor(0.5), **kw)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="temperature: expected a constant"):
        mhr_ops.route(logits, ids, temperature=torch.tensor(0.5, requires_grad=True), **kw)
    with pytest.raises(TypeError, match="temperature: expected a number or a 0-d real tensor"):
        mhr_ops.route(logits, ids, temperature=torch.tensor([0.5]), **kw)
    with pytest.raises(ValueError, match="temperature: expected a number > 0"):
        mhr_ops.route(logits, ids, temperature=torch.tensor(0.0), **kw)
