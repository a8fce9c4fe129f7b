"""Serving path of MHRLinear: routing without per-example noise groups rows by task (G = T, group
ids = task ids), the task weights are kept between no-grad calls while the logits are unchanged,
and the ops skip the Python autograd layer when nothing needs a gradient."""

import pytest
import torch
from conftest import assert_close

import mhr_ops
from mhr_ops import reference


def layer(T=6, h=2, S=3, r=4, d_in=12, d_out=10, seed=0, **kw):
    torch.manual_seed(seed)
    m = mhr_ops.nn.MHRLinear(torch.nn.Linear(d_in, d_out), r=r, n_skills=S, n_tasks=T, n_splits=h, **kw)
    with torch.no_grad():
        m.B.normal_()
        m.logits.normal_()
    return m


def per_example_reference(m, x, task_ids, mode):
    """Per-example routing (PEFT's way) in float64: the grouping by task must not change it."""
    w = reference.route(m.logits, task_ids, n_skills=m.A.shape[1], mode=mode, top_k=m.top_k, temperature=m.temperature)
    groups = torch.arange(task_ids.shape[0])
    return reference.mhr_linear(x, m.base.weight, m.base.bias, m.A, m.B, w, groups, scale=m.scale)


@pytest.mark.parametrize("lead", [(7, 5), (300, 1), (1, 1), (5,)])
def test_eval_groups_by_task_and_matches_per_example_routing(lead):
    m = layer().eval()
    x = torch.randn(*lead, 12)
    tasks = torch.randint(0, 6, lead[:1])
    with torch.no_grad():
        y = m(x, task_ids=tasks)
    xs = x if x.dim() > 1 else x.unsqueeze(0)
    ref = per_example_reference(m, xs if xs.dim() > 2 else xs.unsqueeze(1), tasks, "sigmoid")
    assert_close(y, ref.reshape(y.shape), atol=1e-5, rtol=1e-5, what=f"eval {lead}")
    weights, groups = m.routing_groups(tasks, x.device)
    assert weights.shape[0] == 6 and torch.equal(groups, tasks)


def test_kept_task_weights_follow_the_logits():
    """The kept weights are recomputed after an in-place update of the logits (an optimizer
    step), a new logits Parameter, or new routing options."""
    m = layer().eval()
    x, tasks = torch.randn(4, 3, 12), torch.tensor([0, 5, 2, 5])
    with torch.no_grad():
        m(x, task_ids=tasks)
        m.logits.mul_(-2.0)
        y = m(x, task_ids=tasks)
    assert_close(y, per_example_reference(m, x, tasks, "sigmoid"), atol=1e-5, rtol=1e-5, what="after logits.mul_")
    m.logits = torch.nn.Parameter(torch.randn(6, 6))
    m.top_k = 2
    with torch.no_grad():
        y = m(x, task_ids=tasks)
    assert_close(y, per_example_reference(m, x, tasks, "sigmoid"), atol=1e-5, rtol=1e-5, what="new logits, top_k")
    with torch.inference_mode():
        y = m(x, task_ids=tasks)
    assert_close(y, per_example_reference(m, x, tasks, "sigmoid"), atol=1e-5, rtol=1e-5, what="inference_mode")
    m.double()  # swaps the Parameters' data (no version bump): the kept weights must follow
    with torch.no_grad():
        y = m(x.double(), task_ids=tasks)
    assert y.dtype == torch.float64
    assert_close(y, per_example_reference(m, x, tasks, "sigmoid"), atol=1e-10, rtol=1e-10, what="after .double()")


def test_train_mode_without_noise_routes_per_task_with_gradients():
    """sigmoid routing in training (the MHR paper's T0 recipe) groups by task too, and the
    gradients still reach the logits of the tasks used, and only those."""
    m = layer(train_mode="sigmoid").train()
    x, tasks = torch.randn(4, 3, 12), torch.tensor([1, 4, 1, 4])
    m(x, task_ids=tasks).square().sum().backward()
    ref_logits = m.logits.detach().clone().requires_grad_()
    w = reference.route(ref_logits, tasks, n_skills=3, mode="sigmoid")
    ref = reference.mhr_linear(x, m.base.weight, m.base.bias, m.A, m.B, w, torch.arange(4), scale=m.scale)
    ref.square().sum().backward()
    assert_close(m.logits.grad, ref_logits.grad, atol=1e-5, rtol=1e-4, what="d logits")
    unused = [t for t in range(6) if t not in (1, 4)]
    assert torch.count_nonzero(m.logits.grad[unused]) == 0 and torch.count_nonzero(m.logits.grad[[1, 4]]) > 0


def test_no_grad_calls_skip_the_autograd_layer_but_grad_calls_do_not():
    """Without autograd the ops run below the Autograd key (no graph); with it they record."""
    m = layer().eval()
    x, tasks = torch.randn(2, 3, 12), torch.tensor([0, 1])
    with torch.no_grad():
        assert m(x, task_ids=tasks).grad_fn is None
    y = m(x.requires_grad_(), task_ids=tasks)
    assert y.grad_fn is not None
    y.sum().backward()
    assert x.grad is not None and m.logits.grad is not None


@pytest.mark.parametrize("serving", [False, True])
def test_missing_task_ids_error_names_the_layer(serving):
    from conftest import tiny_llama

    model = mhr_ops.patch(tiny_llama(), ["q_proj"], r=2, n_skills=2, n_tasks=3).train(not serving)
    with torch.set_grad_enabled(not serving):
        with pytest.raises(ValueError, match=r"layer MHRLinear 'model\.layers\.0\.self_attn\.q_proj' needs task ids"):
            model(input_ids=torch.tensor([[1, 2, 3]]))


def general_path(m, x, task_ids):
    """The shared adapted-layer flow, which the serving fast path must agree with bit for bit."""
    from mhr_ops._adapted import adapted_forward

    return adapted_forward((m._adapter(),), x, task_ids)


@pytest.mark.parametrize(
    "lead,n_ids,kw",
    [
        ((1, 1), 1, {}),
        ((8, 1), 8, {}),
        ((5, 3), 5, {}),
        ((6,), 6, {}),  # x [N, d_in]: no reshape at all
        ((6, 2), 3, {}),  # an expanded batch: each id covers two examples
        ((4, 3), 1, {}),
        ((5, 2), 5, dict(top_k=2, eval_mode="softmax", temperature=0.7)),
        ((5, 2), 5, dict(bias=False)),
    ],
)
def test_serving_fast_path_is_bitwise_the_general_path(lead, n_ids, kw):
    """The fast path (taken: _serve returns a tensor) gives exactly the general flow's bits, and
    the functional mhr_linear's with the eval routing weights of every task."""
    bias = kw.pop("bias", True)
    m = layer(**kw)
    if not bias:
        m.base.bias = None
    m.eval()
    x = torch.randn(*lead, 12)
    ids = torch.randint(0, 6, (n_ids,))
    with torch.no_grad():
        fast = m._serve(x, ids)
        assert fast is not None, "the serving call did not take the fast path"
        y = m(x, task_ids=ids)
        general = general_path(m, x, ids)
        weights = m.routing_weights(torch.arange(6))
        per_example = ids.repeat_interleave(lead[0] // n_ids)
        functional = mhr_ops.mhr_linear(x, m.base.weight, m.base.bias, m.A, m.B, weights, per_example, scale=m.scale)
    assert y.shape == (*lead, 10)
    for name, other in (("general", general), ("functional", functional), ("_serve", fast)):
        assert torch.equal(y, other), f"fast path vs {name}: max diff {(y - other).abs().max().item():.3e}"


def test_serving_fast_path_with_grad_enabled_and_nothing_to_train():
    """A frozen layer called without no_grad needs no autograd either: fast path, no graph."""
    m = layer().eval().requires_grad_(False)
    x, ids = torch.randn(3, 2, 12), torch.tensor([1, 0, 5])
    assert m._serve(x, ids) is not None
    y = m(x, task_ids=ids)
    assert y.grad_fn is None and torch.equal(y, general_path(m, x, ids))


def test_serving_fast_path_declines_what_the_general_flow_handles():
    """Calls the fast path does not cover go to the general flow (which raises where it should)."""
    m = layer().eval()
    x, ids = torch.randn(3, 2, 12), torch.tensor([1, 0, 5])
    with torch.no_grad():
        assert m._serve(x, [1, 0, 5]) is None  # not a tensor
        assert m._serve(x, ids.view(3, 1)) is None  # not 1-D
        assert m._serve(x, None) is None  # no ids: the general flow names the layer
        assert m._serve(x[0, 0], ids[:1]) is None  # x 1-D
        assert m._serve(x[:0], ids[:0]) is None  # empty batch
        assert m._serve(x, ids[:2]) is None  # 2 ids for 3 examples: the general flow's error
        assert m._serve(x.double(), ids) is None  # x's dtype is not the base's
        assert m._serve(x, ids.float()) is None  # not an index tensor
        m.train()  # relaxed-Bernoulli noise per example
        assert m._serve(x, ids) is None
        m.train_mode = "sigmoid"
        assert torch.equal(m._serve(x, ids), general_path(m, x, ids))
        m.eval()
    assert m._serve(x.requires_grad_(), ids) is None  # autograd needed
    mhr_ops.merge_task(torch.nn.Sequential(m), 1)
    with torch.no_grad():
        assert m._serve(x, torch.tensor([1, 1, 1])) is None
    big = layer(T=300)
    with torch.no_grad():  # far more tasks than examples: per-example routing
        assert big.eval()._serve(x, ids) is None


def test_serving_with_parametrized_tensors_takes_the_general_flow():
    """A parametrized base weight or adapter tensor is not in _parameters: the fast path declines,
    and the general flow reads the parametrized value."""
    from torch.nn.utils import parametrize

    class Double(torch.nn.Module):
        def forward(self, t):
            return 2 * t

    x, ids = torch.randn(3, 2, 12), torch.tensor([1, 0, 5])
    for where, name in (("base", "weight"), ("base", "bias"), ("layer", "logits"), ("layer", "A")):
        m = layer().eval()
        with torch.no_grad():
            plain = m(x, task_ids=ids)
        parametrize.register_parametrization(m.base if where == "base" else m, name, Double())
        with torch.no_grad():
            assert m._serve(x, ids) is None, name
            y = m(x, task_ids=ids)
        assert not torch.equal(y, plain), name
        assert torch.equal(y, general_path(m, x, ids)), name


def test_serving_fast_path_checks_ids_once_per_tensor(monkeypatch):
    import mhr_ops._tasks as tasks

    m = layer().eval()
    calls = []
    original = tasks.check_id_range
    monkeypatch.setattr(tasks, "check_id_range", lambda *a, **k: (calls.append(1), original(*a, **k)))
    x, ids = torch.randn(2, 1, 12), torch.tensor([5, 0])
    with torch.no_grad():
        for _ in range(3):
            assert m._serve(x, ids) is not None
        assert len(calls) == 1
        with pytest.raises(ValueError, match=r"task_ids: expected task ids in \[0, 6\), got 6"):
            m(x, task_ids=torch.tensor([0, 6]))


def test_serving_use_tasks_checks_ids_once_per_forward(monkeypatch):
    """In eval under no_grad every layer takes the fast path, and the ids set by use_tasks are
    range-checked once for the whole model, as in the general flow."""
    import mhr_ops._tasks as tasks

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 6))
    mhr_ops.patch(model, ["0", "1", "2"], r=2, n_skills=3, n_tasks=4).eval()
    calls = []
    original = tasks.check_id_range
    monkeypatch.setattr(tasks, "check_id_range", lambda *a, **k: (calls.append(1), original(*a, **k)))
    x = torch.randn(2, 3, 12)
    with torch.no_grad(), mhr_ops.use_tasks(model, torch.tensor([3, 1])):
        assert model[0]._serve(x, None) is not None
        model(x)
        model(x.repeat_interleave(2, dim=0))  # an expanded batch follows the ids
    assert len(calls) == 1


def test_serving_cache_follows_optimizer_steps_and_state_dicts():
    """Between two serving calls, an optimizer step on the logits and a load_state_dict change
    the output; each call matches the general flow bit for bit (no stale task weights)."""
    m = layer().eval()
    x, ids = torch.randn(4, 1, 12), torch.tensor([0, 5, 2, 5])
    with torch.no_grad():
        before = m(x, task_ids=ids)
    opt = torch.optim.SGD([m.logits], lr=1.0)
    m.logits.grad = torch.ones_like(m.logits)
    opt.step()
    with torch.no_grad():
        stepped = m(x, task_ids=ids)
        assert not torch.equal(stepped, before)
        assert torch.equal(stepped, general_path(m, x, ids))
    state = {k: v.clone() for k, v in m.state_dict().items()}
    state["logits"].normal_()
    m.load_state_dict(state)
    with torch.no_grad():
        loaded = m(x, task_ids=ids)
        assert not torch.equal(loaded, stepped)
        assert torch.equal(loaded, general_path(m, x, ids))
    assert_close(loaded, per_example_reference(m, x, ids, "sigmoid"), atol=1e-5, rtol=1e-5, what="after load")


# ---- the kept per-task mixed adapters (MHRLinear.mixed_cache_fraction) and task_lora_linear ----


def mixed_layer(**kw):
    """A layer whose mixed adapters the serving path keeps: the test layers' base weights are tiny,
    so the default budget (a quarter of the base weight's bytes) would keep none."""
    m = layer(**kw).eval()
    m.mixed_cache_fraction = float("inf")
    return m


@pytest.mark.parametrize(
    "lead,n_ids,kw",
    [
        ((1, 1), 1, {}),
        ((8, 1), 8, {}),
        ((5, 3), 5, {}),
        ((6,), 6, {}),
        ((6, 2), 3, {}),  # an expanded batch: each id covers two examples
        ((2, 3, 2), 2, {}),  # 4-D x
        ((5, 2), 5, dict(top_k=2, eval_mode="softmax", temperature=0.7)),
        ((5, 2), 5, dict(bias=False)),
    ],
)
def test_serving_with_mixed_adapters_matches_per_example_routing(lead, n_ids, kw):
    """Small serving calls run task_lora_linear on the kept mixed adapters: the float64 reference's
    values (to fp32 rounding, not the routed op's bits), and the general flow's to rounding."""
    bias = kw.pop("bias", True)
    m = mixed_layer(**kw)
    if not bias:
        m.base.bias = None
    x = torch.randn(*lead, 12)
    ids = torch.randint(0, 6, (n_ids,))
    with torch.no_grad():
        y = m(x, task_ids=ids)
        assert "_mhr_mixed" in m.__dict__, "the call did not keep the mixed adapters"
        general = general_path(m, x, ids)
    per_example = ids.repeat_interleave(lead[0] // n_ids)
    xs = x if x.dim() > 2 else x.unsqueeze(1)
    ref = per_example_reference(m, xs.reshape(lead[0], -1, 12), per_example, m.eval_mode).reshape(y.shape)
    assert y.shape == (*lead, 10)
    assert_close(y, ref, atol=1e-5, rtol=1e-5, what=f"mixed {lead}")
    assert_close(y, general, atol=1e-5, rtol=1e-5, what=f"mixed vs general {lead}")


def test_mixed_adapters_are_the_reference_mix_with_the_scale():
    m = mixed_layer()
    x, ids = torch.randn(3, 12), torch.tensor([4, 0, 4])
    with torch.no_grad():
        m(x, task_ids=ids)
    a, b = m.__dict__["_mhr_mixed"][2]
    ref_a, ref_b = reference.mixed_adapters(m.A, m.B, m.routing_weights(torch.arange(6)))
    assert a.dtype == b.dtype == torch.float32 and a.shape == (6, 12, 4) and b.shape == (6, 4, 10)
    assert_close(a, ref_a, atol=1e-6, rtol=1e-6, what="a")
    assert_close(b, m.scale * ref_b, atol=1e-6, rtol=1e-6, what="scale * b")


def test_mixed_adapters_follow_every_change():
    """The kept mixed adapters are recomputed after an optimizer step on A, B or the logits, a new
    scale, load_state_dict and .double(); train() drops them."""
    m = mixed_layer()
    x, ids = torch.randn(4, 1, 12), torch.tensor([0, 5, 2, 5])

    def serve():
        with torch.no_grad():
            y = m(x.to(m.A.dtype), task_ids=ids)
        assert_close(y, per_example_reference(m, x, ids, "sigmoid"), atol=1e-5, rtol=1e-5, what="after a change")
        return y

    before = serve()
    for name in ("A", "B", "logits"):
        p = getattr(m, name)
        opt = torch.optim.SGD([p], lr=0.5)
        p.grad = torch.ones_like(p)
        opt.step()
        after = serve()
        assert not torch.equal(after, before), name
        before = after
    m.scale *= 3
    assert not torch.equal(serve(), before)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    state["B"].normal_()
    m.load_state_dict(state)
    serve()
    m.double()
    assert serve().dtype == torch.float64 and m.__dict__["_mhr_mixed"][2][0].dtype == torch.float64
    m.train()
    assert "_mhr_mixed" not in m.__dict__


def test_mixed_cache_fraction_zero_drops_kept_adapters():
    """Setting mixed_cache_fraction to 0 after adapters were kept: the next call runs the routed op
    (bit for bit the general flow) and the kept adapters are released."""
    m = mixed_layer()
    x, ids = torch.randn(3, 1, 12), torch.tensor([2, 2, 0])
    with torch.no_grad():
        m(x, task_ids=ids)
        assert "_mhr_mixed" in m.__dict__
        m.mixed_cache_fraction = 0
        assert torch.equal(m(x, task_ids=ids), general_path(m, x, ids))
    assert "_mhr_mixed" not in m.__dict__


def test_mixed_adapters_kept_under_inference_mode_serve_later_calls():
    m = mixed_layer()
    x, ids = torch.randn(2, 1, 12), torch.tensor([3, 1])
    with torch.inference_mode():
        first = m(x, task_ids=ids)
    assert not m.__dict__["_mhr_mixed"][2][0].is_inference()
    with torch.no_grad():
        assert torch.equal(m(x, task_ids=ids), first)


def test_mixed_adapters_only_within_their_budget_and_for_small_calls():
    """The routed op (bit for bit the general flow) when the mixed adapters would exceed
    mixed_cache_fraction of the base weight's bytes, or for more than MIXED_MAX_ROWS rows."""
    x, ids = torch.randn(3, 2, 12), torch.tensor([1, 0, 5])
    m = layer().eval()  # 6 tasks x (12 + 10) x 4 fp32 = 2112 bytes > a quarter of 480
    for fraction in (0.25, 0.0):
        m.mixed_cache_fraction = fraction
        with torch.no_grad():
            assert torch.equal(m(x, task_ids=ids), general_path(m, x, ids))
        assert "_mhr_mixed" not in m.__dict__
    big = torch.nn.Linear(64, 64)  # 4 tasks x 128 x 2 x 4 bytes = 4 KB <= a quarter of 16 KB
    m = mhr_ops.nn.MHRLinear(big, r=2, n_skills=3, n_tasks=4, n_splits=2).eval()
    rows = mhr_ops.nn.MIXED_MAX_ROWS + 1
    x, ids = torch.randn(rows, 64), torch.randint(0, 4, (rows,))
    with torch.no_grad():
        assert torch.equal(m(x, task_ids=ids), general_path(m, x, ids))
        assert "_mhr_mixed" not in m.__dict__
        m(x[:5], task_ids=ids[:5])
        assert "_mhr_mixed" in m.__dict__


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_adapters_with_half_activations(dtype):
    """Half x and base with fp32 adapters (PEFT's layout): fp32 mixed adapters, the update rounded
    into the half output once more than the routed op does."""
    torch.manual_seed(0)
    base = torch.nn.Linear(64, 48).to(dtype)
    m = mhr_ops.nn.MHRLinear(base, r=4, n_skills=3, n_tasks=5, n_splits=4).eval()
    m.mixed_cache_fraction = float("inf")
    with torch.no_grad():
        m.B.normal_()
        m.logits.normal_()
    x, ids = torch.randn(6, 2, 64, dtype=dtype), torch.randint(0, 5, (6,))
    with torch.no_grad():
        y = m(x, task_ids=ids)
        routed = general_path(m, x, ids)
    assert "_mhr_mixed" in m.__dict__ and y.dtype == dtype
    ref = per_example_reference(m, x, ids, "sigmoid")
    tol = 2 * (routed.double() - ref).abs().max().item() + 1e-2
    assert_close(y, ref, atol=tol, rtol=0, what=f"{dtype}")


# ---- forward's hit path in C++ (mhr_ops._C.TaskServe, kept by _serve) ----


def no_python_serve(m):
    """Makes MHRLinear._serve raise: a call that returns took the C++ hit path."""

    def fail(*args, **kwargs):
        raise AssertionError("the call left the C++ hit path")

    object.__setattr__(m, "_serve", fail)  # not through MHRLinear.__setattr__, which drops the hit path


@pytest.mark.parametrize(
    "lead,n_ids,kw",
    [
        ((1, 1), 1, {}),
        ((8, 1), 8, {}),
        ((6, 2), 3, {}),  # an expanded batch
        ((2, 3, 2), 2, {}),  # 4-D x
        ((5, 2), 5, dict(top_k=2, eval_mode="softmax", temperature=0.7)),
        ((5, 2), 5, dict(bias=False)),
    ],
)
def test_hit_path_is_the_op_on_the_kept_adapters(lead, n_ids, kw):
    """After one serving call, the next ones take the C++ hit path: the bits of task_lora_linear on
    the kept mixed adapters (as _serve computes them), and the float64 reference to rounding."""
    bias = kw.pop("bias", True)
    m = mixed_layer(**kw)
    if not bias:
        m.base.bias = None
    x = torch.randn(*lead, 12)[..., ::1]
    ids = torch.randint(0, 6, (n_ids,))
    with torch.no_grad():
        first = m(x, task_ids=ids)
        assert "_mhr_fast" in m.__dict__
        a, b = m.__dict__["_mhr_mixed"][2]
        op = mhr_ops.lora.TASK_LORA_LINEAR_OP(x, m.base.weight, m.base.bias, a, b, ids, x[..., 0].numel() // n_ids)
        no_python_serve(m)
        y = m(x, task_ids=ids)
        x_strided = torch.randn(*lead, 24)[..., ::2]  # non-contiguous rows
        y_strided = m(x_strided, task_ids=ids)
    assert torch.equal(y, first) and torch.equal(y, op)
    mode = kw.get("eval_mode", "sigmoid")
    per_example = ids.repeat_interleave(lead[0] // n_ids)
    for xi, yi in ((x, y), (x_strided, y_strided)):
        assert_close(yi, per_example_reference(m, xi, per_example, mode), atol=1e-5, rtol=1e-5, what="hit path")


def test_hit_path_under_use_tasks_and_inference_mode():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 8), torch.nn.Linear(8, 8))
    mhr_ops.patch(model, ["0", "1"], r=2, n_skills=3, n_tasks=4).eval()
    for layer_ in model:
        layer_.mixed_cache_fraction = float("inf")
    x, ids = torch.randn(2, 3, 12), torch.tensor([3, 1])
    with torch.no_grad(), mhr_ops.use_tasks(model, ids):
        first = model(x)
    for layer_ in model:
        no_python_serve(layer_)
    with torch.inference_mode(), mhr_ops.use_tasks(model, ids):
        assert torch.equal(model(x), first)
        assert torch.equal(model(x.repeat_interleave(2, dim=0)), first.repeat_interleave(2, dim=0))


def test_hit_path_declines_calls_it_does_not_cover():
    """Each call the hit path does not cover goes to _serve or the general flow, with their result
    (gradients, errors, a dispatch mode's view of the op)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    m = mixed_layer()
    x, ids = torch.randn(3, 2, 12), torch.tensor([1, 0, 5])
    with torch.no_grad():
        m(x, task_ids=ids)
    taken = []
    serve = m._serve
    object.__setattr__(m, "_serve", lambda *a, **k: (taken.append(1), serve(*a, **k))[1])

    def runs_python(call):
        taken.clear()
        out = call()
        assert taken, "the C++ hit path took a call it should decline"
        return out

    with torch.no_grad():
        fresh = ids.clone()
        runs_python(lambda: m(x, task_ids=fresh))  # ids not yet seen: checked in Python, then noted
        taken.clear()
        m(x, task_ids=fresh)
        assert not taken
        with pytest.raises(ValueError, match=r"task_ids: expected task ids in \[0, 6\), got 6"):
            runs_python(lambda: m(x, task_ids=torch.tensor([0, 6, 1])))
        runs_python(lambda: m(x, task_ids=[1, 0, 5]))  # not a tensor
        with pytest.raises(ValueError, match="task_ids"):
            runs_python(lambda: m(x, task_ids=ids[:2]))  # two ids for three examples
        big = torch.randn(mhr_ops.nn.MIXED_MAX_ROWS + 1, 12)
        big_ids = torch.randint(0, 6, (big.shape[0],))
        assert torch.equal(runs_python(lambda: m(big, task_ids=big_ids)), general_path(m, big, big_ids))

        class Sub(torch.Tensor):
            pass

        runs_python(lambda: m(x.as_subclass(Sub), task_ids=ids))

        class Record(TorchDispatchMode):
            def __init__(self):
                super().__init__()
                self.ops = []

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                self.ops.append(str(func))
                return func(*args, **(kwargs or {}))

        with Record() as mode:
            runs_python(lambda: m(x, task_ids=ids))
        assert "mhr_ops.task_lora_linear.default" in mode.ops
    y = runs_python(lambda: m(x.requires_grad_(), task_ids=ids))  # autograd needed
    assert y.grad_fn is not None


def test_hit_path_follows_every_change():
    """An option set on the layer drops the hit path (__setattr__); a step on A / B / logits, a
    swapped base weight or adapter tensor, or a class-level mixed_cache_fraction make it decline.
    Each next call matches the general flow's routing after the change."""
    m = mixed_layer()
    x, ids = torch.randn(4, 1, 12), torch.tensor([0, 5, 2, 5])

    def serve(mode="sigmoid"):
        with torch.no_grad():
            y = m(x, task_ids=ids)
            again = m(x, task_ids=ids)  # the hit path, rebuilt by the first call
        assert "_mhr_fast" in m.__dict__ and torch.equal(y, again)
        assert_close(y, per_example_reference(m, x, ids, mode), atol=1e-5, rtol=1e-5, what="after a change")
        return y

    before = serve()
    for name in ("A", "B", "logits"):
        with torch.no_grad():
            getattr(m, name).add_(0.5)  # in place: the version, not the object, changes
        after = serve()
        assert not torch.equal(after, before), name
        before = after
    m.eval_mode, m.temperature = "softmax", 0.5
    assert "_mhr_fast" not in m.__dict__
    before = serve("softmax")
    with torch.no_grad():
        m.base.weight.data = 2 * m.base.weight.data  # new storage, same Parameter
    after = serve("softmax")
    assert not torch.equal(after, before)
    m.B = torch.nn.Parameter(m.B.detach() * 2)
    assert not torch.equal(serve("softmax"), after)
    mhr_ops.nn.MHRLinear.mixed_cache_fraction, saved = 0.0, mhr_ops.nn.MHRLinear.mixed_cache_fraction
    try:
        del m.mixed_cache_fraction  # the class's value now
        with torch.no_grad():
            y = m(x, task_ids=ids)
        assert "_mhr_fast" not in m.__dict__ and "_mhr_mixed" not in m.__dict__
        assert torch.equal(y, general_path(m, x, ids))
    finally:
        mhr_ops.nn.MHRLinear.mixed_cache_fraction = saved


def test_hit_path_and_merged_tasks():
    m = mixed_layer()
    x = torch.randn(3, 1, 12)
    with torch.no_grad():
        m(x, task_ids=torch.tensor([1, 1, 1]))
        served = m(x, task_ids=torch.tensor([1, 1, 1]))
    mhr_ops.merge_task(torch.nn.Sequential(m), 1)
    assert "_mhr_fast" not in m.__dict__
    with torch.no_grad():
        assert_close(m(x, task_ids=torch.tensor([1, 1, 1])), served, atol=1e-5, rtol=1e-5, what="merged")
        with pytest.raises(RuntimeError, match="merged"):
            m(x, task_ids=torch.tensor([0, 1, 1]))


def test_ids_checked_for_more_tasks_are_checked_again():
    """The hit path's registry of checked ids holds the task count they were checked against: ids
    valid for 6 tasks are checked again by a layer with 3."""
    ids = torch.tensor([5, 0])
    six, three = mixed_layer(T=6), mixed_layer(T=3)
    x = torch.randn(2, 12)
    with torch.no_grad():
        six(x, task_ids=ids)
        six(x, task_ids=ids)
        three(x, task_ids=torch.tensor([1, 2]))
        with pytest.raises(ValueError, match=r"task_ids: expected task ids in \[0, 3\), got 5"):
            three(x, task_ids=ids)


def test_served_layer_pickles_and_deep_copies():
    """copy.deepcopy and pickle (torch.save of a module) after serving calls: serving's kept state
    is left out and rebuilt."""
    import copy
    import io

    m = mixed_layer()
    x, ids = torch.randn(2, 1, 12), torch.tensor([3, 1])
    with torch.no_grad():
        y = m(x, task_ids=ids)
        m(x, task_ids=ids)
    buffer = io.BytesIO()
    torch.save(m, buffer)
    buffer.seek(0)
    for other in (copy.deepcopy(m), torch.load(buffer, weights_only=False)):
        assert "_mhr_fast" not in other.__dict__ and "_mhr_mixed" not in other.__dict__
        with torch.no_grad():
            assert torch.equal(other(x, task_ids=ids), y)


def test_compiled_layer_with_a_kept_hit_path():
    """torch.compile(fullgraph=True) of a layer that already keeps its C++ hit path: the compiled
    code takes the general flow (no graph break on the kept object), with changing shapes."""
    m = mixed_layer()
    x, ids = torch.randn(4, 12), torch.tensor([0, 3, 1, 4])
    with torch.no_grad():
        m(x, task_ids=ids)
        eager = m(x, task_ids=ids)
    assert "_mhr_fast" in m.__dict__
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager", dynamic=True)
    with torch.no_grad():
        assert_close(compiled(x, task_ids=ids), eager, atol=1e-5, rtol=1e-5, what="compiled")
        x7, ids7 = torch.randn(7, 12), torch.randint(0, 6, (7,))
        assert_close(compiled(x7, task_ids=ids7), general_path(m, x7, ids7), atol=0, rtol=0, what="7 rows")


def test_hit_path_is_not_kept_for_tensor_subclasses():
    """A Parameter subclass among the layer's tensors (a wrapper may hold no storage the hit path
    could watch): the calls stay in Python, with _serve's result."""

    class Tagged(torch.nn.Parameter):
        pass

    m = mixed_layer()
    m.base.weight = Tagged(m.base.weight.detach())
    x, ids = torch.randn(3, 1, 12), torch.tensor([4, 0, 2])
    with torch.no_grad():
        first = m(x, task_ids=ids)
        second = m(x, task_ids=ids)
        assert "_mhr_fast" not in m.__dict__
        assert torch.equal(second, first) and torch.equal(first, m._serve(x, ids))
