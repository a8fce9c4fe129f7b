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
    w = reference.route(m.logits, task_ids, n_skills=m.A.shape[1], mode=mode, top_k=m.top_k)
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


def test_missing_task_ids_error_names_the_layer():
    from conftest import tiny_llama

    model = mhr_ops.patch(tiny_llama(), ["q_proj"], r=2, n_skills=2, n_tasks=3)
    with pytest.raises(ValueError, match=r"layer MHRLinear 'model\.layers\.0\.self_attn\.q_proj' needs task ids"):
        model(input_ids=torch.tensor([[1, 2, 3]]))
