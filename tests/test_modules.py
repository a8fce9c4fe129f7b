"""MHRLinear, patch, use_tasks, MHR-z (routing_only), MHR-mu (average_skills), merge_task /
unmerge, torch.compile, and their bad inputs (SPEC section 6)."""

import copy

import pytest
import torch
from conftest import assert_close, tiny_llama
from torch import nn

import mhr_ops
from mhr_ops import reference
from mhr_ops.nn import MHRLinear


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 24), nn.GELU(), nn.Linear(24, 12), nn.GELU(), nn.Linear(12, 6))


def randomize_adapters(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MHRLinear):
                m.B.copy_(torch.randn(m.B.shape, generator=gen) * 0.3)
                m.logits.copy_(torch.randn(m.logits.shape, generator=gen))
    return model


def test_mhrlinear_matches_reference_and_peft_init():
    base = nn.Linear(12, 8)
    layer = MHRLinear(base, r=3, n_skills=4, n_splits=2, n_tasks=5, alpha=6.0)
    assert layer.A.shape == (2, 4, 6, 3) and layer.B.shape == (2, 4, 3, 4) and layer.logits.shape == (5, 8)
    assert torch.equal(layer.B, torch.zeros_like(layer.B)) and layer.logits.abs().max() <= 1e-3
    bound = 1 / 6**0.5  # kaiming_uniform(a=sqrt(5)) on [r, d]: 1/sqrt(fan_in=d)
    assert layer.A.abs().max() <= bound and layer.A.std() > bound / 4
    assert not base.weight.requires_grad and layer.A.requires_grad
    assert "r=3, n_skills=4, n_splits=2, n_tasks=5, scale=2" in repr(layer)
    randomize_adapters(nn.Sequential(layer))
    layer.eval()
    x, ids = torch.randn(3, 7, 12), torch.tensor([4, 0, 4])
    w = reference.route(layer.logits, ids, n_skills=4)
    expected = base(x).double() + reference.routed_lora(x, layer.A, layer.B, w, torch.arange(3), scale=2.0)
    assert_close(layer(x, task_ids=ids), expected, atol=1e-5, rtol=1e-5, what="MHRLinear eval")


def test_train_mode_routes_relaxed_bernoulli_and_is_configurable():
    layer = randomize_adapters(nn.Sequential(MHRLinear(nn.Linear(8, 8), r=2, n_skills=3, n_tasks=2)))[0]
    x, ids = torch.randn(2, 4, 8), torch.tensor([1, 0])
    layer.train()
    torch.manual_seed(3)
    a = layer(x, task_ids=ids)
    torch.manual_seed(4)
    b = layer(x, task_ids=ids)
    assert not torch.allclose(a, b)  # stochastic routing in train mode
    layer.train_mode = "sigmoid"  # the MHR paper's T0 recipe
    layer.eval()
    e = layer(x, task_ids=ids)
    layer.train()
    assert torch.equal(layer(x, task_ids=ids), e)


def test_patch_by_names_and_regex():
    model = mhr_ops.patch(tiny_model(), ["0", "4"], r=2, n_skills=3, n_splits=2, n_tasks=4)
    assert isinstance(model[0], MHRLinear) and isinstance(model[4], MHRLinear) and isinstance(model[2], nn.Linear)
    model2 = mhr_ops.patch(tiny_model(), r"[02]", r=2, n_skills=3, n_tasks=4, top_k=2)
    assert isinstance(model2[0], MHRLinear) and isinstance(model2[2], MHRLinear) and model2[2].top_k == 2
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{i}.{p}" for i in (0, 4) for p in ("A", "B", "logits")}  # PEFT's rule
    with pytest.raises(ValueError, match="target_modules: .* matches no nn.Linear"):
        mhr_ops.patch(tiny_model(), ["q_proj"], r=2, n_skills=3, n_tasks=4)


def test_use_tasks_checks_once_and_expands_batches():
    model = randomize_adapters(mhr_ops.patch(tiny_model(), ["0", "2"], r=2, n_skills=3, n_tasks=4)).eval()
    x = torch.randn(3, 5, 12)
    ids = torch.tensor([3, 0, 1])
    with mhr_ops.use_tasks(model, ids):
        y = model(x)
        # a batch expanded by repeating each example (beam search) follows the ids
        y_expanded = model(x.repeat_interleave(2, dim=0))
    assert torch.allclose(y_expanded, y.repeat_interleave(2, dim=0), atol=1e-6)
    explicit = model[4](model[3](model[2](model[1](model[0](x, task_ids=ids)), task_ids=ids)))
    assert torch.allclose(y, explicit, atol=1e-6)
    with pytest.raises(ValueError, match=r"task_ids: expected task ids in \[0, 4\), got 4"):
        with mhr_ops.use_tasks(model, torch.tensor([4, 0, 0])):
            pass
    with pytest.raises(ValueError, match="needs task ids"):
        model(x)
    with pytest.raises(ValueError, match="no mhr_ops-adapted layers"):
        with mhr_ops.use_tasks(tiny_model(), ids):
            pass


def test_use_tasks_checks_range_once_per_forward(monkeypatch):
    model = mhr_ops.patch(tiny_model(), ["0", "2", "4"], r=2, n_skills=3, n_tasks=4)
    calls = []
    import mhr_ops._tasks as tasks

    original = tasks.check_id_range
    monkeypatch.setattr(tasks, "check_id_range", lambda *a, **k: (calls.append(1), original(*a, **k)))
    with mhr_ops.use_tasks(model, torch.tensor([1, 2])):
        model(torch.randn(2, 3, 12))
    assert len(calls) == 1


def test_routing_only_freezes_skills_and_adds_tasks():
    model = mhr_ops.patch(tiny_model(), ["0", "2"], r=2, n_skills=3, n_splits=2, n_tasks=4)
    mhr_ops.routing_only(model, n_tasks=7)
    for m in (model[0], model[2]):
        assert not m.A.requires_grad and not m.B.requires_grad and m.logits.requires_grad
        assert m.logits.shape == (7, 6) and m.logits.abs().max() <= 1e-3
    with mhr_ops.use_tasks(model, torch.tensor([6, 5])):
        model(torch.randn(2, 3, 12)).sum().backward()
    assert model[0].logits.grad is not None and model[0].A.grad is None


def test_average_skills_is_the_mean_adapter():
    model = randomize_adapters(mhr_ops.patch(tiny_model(), ["0"], r=2, n_skills=4, n_splits=2, n_tasks=3))
    layer = model[0]
    A_mean, B_mean = layer.A.detach().mean(1), layer.B.detach().mean(1)
    mhr_ops.average_skills(model)
    assert layer.A.shape == (2, 1, 6, 2) and layer.B.shape == (2, 1, 2, 12)
    x = torch.randn(2, 3, 12)
    lora_a = A_mean.reshape(12, 2)
    lora_b = B_mean.transpose(0, 1).reshape(2, 24)
    expected = layer.base(x) + (x @ lora_a) @ lora_b / 2
    for train in (True, False):  # "average" routing in both modes: a plain LoRA
        layer.train(train)
        assert_close(layer(x, task_ids=torch.tensor([0, 2])), expected, atol=1e-5, rtol=1e-5, what="MHR-mu")
    layer(x, task_ids=torch.tensor([0, 2])).sum().backward()
    assert layer.A.grad is not None and layer.B.grad is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_and_unmerge(dtype):
    model = randomize_adapters(mhr_ops.patch(tiny_model(), ["0", "2"], r=2, n_skills=3, n_splits=2, n_tasks=4))
    model = model.to(dtype).eval()
    for m in (model[0], model[2]):  # adapters stay fp32
        m.A.data, m.B.data, m.logits.data = m.A.data.float(), m.B.data.float(), m.logits.data.float()
    originals = [model[i].base.weight.detach().clone() for i in (0, 2)]
    x = torch.randn(4, 5, 12, dtype=dtype)
    ids = torch.full((4,), 2)
    with mhr_ops.use_tasks(model, ids):
        expected = model(x)
    mhr_ops.merge_task(model, 2)
    with mhr_ops.use_tasks(model, ids):
        merged = model(x)
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    assert_close(merged, expected, atol=tol, rtol=tol, what="merged output")
    with pytest.raises(RuntimeError, match="task 2 is merged"):
        with mhr_ops.use_tasks(model, torch.tensor([2, 1, 2, 2])):
            model(x)
    with pytest.raises(RuntimeError, match="already merged"):
        mhr_ops.merge_task(model, 1)
    mhr_ops.unmerge(model)
    for i, w0 in zip((0, 2), originals, strict=True):
        err = (model[i].base.weight.float() - w0.float()).abs().max().item()
        bound = 1e-6 if dtype == torch.float32 else 2**-7 * w0.float().abs().max().item()
        assert err <= bound, f"unmerge error {err} > {bound}"
    with pytest.raises(ValueError, match=r"task_id: expected an int in \[0, 4\)"):
        mhr_ops.merge_task(model, 4)


def test_torch_compile_fullgraph_matches_eager():
    model = randomize_adapters(mhr_ops.patch(tiny_model(), ["0", "2"], r=2, n_skills=3, n_tasks=4)).eval()
    x, ids = torch.randn(3, 5, 12), torch.tensor([1, 3, 0])

    def f(inp, task_ids):
        h = model[1](model[0](inp, task_ids=task_ids))
        return model[4](model[3](model[2](h, task_ids=task_ids)))

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert_close(compiled(x, ids), f(x, ids), atol=1e-6, rtol=1e-6, what="compiled")


def test_gradients_reach_adapters_and_inputs():
    model = randomize_adapters(mhr_ops.patch(tiny_model(), ["0", "4"], r=2, n_skills=3, n_tasks=4))
    ref_model = copy.deepcopy(model)
    x = torch.randn(2, 6, 12, requires_grad=True)
    ids = torch.tensor([1, 3])
    with mhr_ops.use_tasks(model, ids):
        torch.manual_seed(5)
        model(x).square().mean().backward()

    def ref_forward(inp):  # same network through the float64 reference ops, same noise
        torch.manual_seed(5)
        out = inp
        for m in ref_model:
            if isinstance(m, MHRLinear):
                noise = torch.rand((2, 1, 3))
                w = reference.route(m.logits, ids, n_skills=3, mode="relaxed_bernoulli", noise=noise)
                out = m.base(out).double() + reference.routed_lora(out, m.A, m.B, w, torch.arange(2), scale=0.5)
                out = out.float()
            else:
                out = m(out)
        return out

    xr = x.detach().clone().requires_grad_()
    ref_forward(xr).square().mean().backward()
    assert_close(x.grad, xr.grad, atol=1e-5, rtol=1e-4, what="dx")
    for (name, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters(), strict=True):
        if p.requires_grad:
            assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, what=f"d{name}")


def test_bad_module_arguments():
    with pytest.raises(TypeError, match="base: expected an nn.Linear"):
        MHRLinear(nn.Conv1d(2, 2, 1), r=1, n_skills=1, n_tasks=1)
    with pytest.raises(ValueError, match="n_splits: expected a divisor"):
        MHRLinear(nn.Linear(10, 8), r=1, n_skills=2, n_tasks=1, n_splits=4)
    with pytest.raises(ValueError, match=r"train_mode: expected one of \('sigmoid', .*got 'gumbel'"):
        MHRLinear(nn.Linear(8, 8), r=1, n_skills=2, n_tasks=1, train_mode="gumbel")
    with pytest.raises(ValueError, match=r"eval_mode: expected one of \('sigmoid', .*got 'hard'"):
        MHRLinear(nn.Linear(8, 8), r=1, n_skills=2, n_tasks=1, eval_mode="hard")
    with pytest.raises(ValueError, match="temperature: expected a number > 0"):
        MHRLinear(nn.Linear(8, 8), r=1, n_skills=2, n_tasks=1, temperature=0.0)
    with pytest.raises(ValueError, match=r"top_k: expected in \[1, 2\]"):
        MHRLinear(nn.Linear(8, 8), r=1, n_skills=2, n_tasks=1, top_k=3)
    with pytest.raises(ValueError, match="r: expected an int >= 1"):
        MHRLinear(nn.Linear(8, 8), r=0, n_skills=2, n_tasks=1)
    layer = MHRLinear(nn.Linear(8, 8), r=1, n_skills=2, n_tasks=3)
    with pytest.raises(ValueError, match=r"task_ids: expected task ids in \[0, 3\), got 3"):
        layer(torch.randn(2, 8), task_ids=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="task_ids: expected one id per example"):
        layer(torch.randn(5, 8), task_ids=torch.tensor([0, 1]))


def test_compiled_patched_model_with_use_tasks():
    model = randomize_adapters(mhr_ops.patch(tiny_model(), ["0", "2", "4"], r=2, n_skills=3, n_tasks=4))
    x, ids = torch.randn(3, 5, 12), torch.tensor([1, 3, 0])
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for train in (False, True):
        model.train(train)
        with mhr_ops.use_tasks(model, ids):
            torch.manual_seed(2)
            got = compiled(x)
            torch.manual_seed(2)
            expected = model(x)
        assert_close(got, expected, atol=1e-6, rtol=1e-6, what=f"compiled model (train={train})")


def test_generate_with_beams_on_a_patched_transformer():
    model = mhr_ops.patch(tiny_llama(seed=0), ["q_proj", "v_proj"], r=2, n_skills=3, n_tasks=4)
    randomize_adapters(model).eval()
    prompts, ids = torch.randint(1, 64, (2, 6)), torch.tensor([3, 1])
    kw = dict(max_new_tokens=4, num_beams=3, num_return_sequences=2, do_sample=False, pad_token_id=0)
    with mhr_ops.use_tasks(model, ids):
        both = model.generate(input_ids=prompts, **kw)
    for i in range(2):
        with mhr_ops.use_tasks(model, ids[i : i + 1]):
            single = model.generate(input_ids=prompts[i : i + 1], **kw)
        torch.testing.assert_close(both[2 * i : 2 * i + 2, : single.shape[1]], single)
