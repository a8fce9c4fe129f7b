"""torch.compile with changing shapes: a user compiles once and trains on batches of several
sizes (recompiling with symbolic sizes, or with ``dynamic=True``), and what seeded runs promise
under compile (README / docs: the relaxed-Bernoulli noise is eager's stream under AOT backends
and under inductor with ``fallback_random=True``; inductor's own RNG otherwise)."""

import pytest
import torch
from conftest import assert_close, tiny_llama

import mhr_ops


@pytest.mark.parametrize("dynamic", [None, True])
def test_compiled_training_with_changing_batch_sizes(dynamic):
    """fullgraph training under use_tasks on batches of 2, 3 and 5 examples: the compiled model
    gives the eager model's loss and gradients with the same noise stream."""
    eager = mhr_ops.patch(tiny_llama(seed=0), ["q_proj", "v_proj"], r=4, n_skills=8, n_splits=2, n_tasks=16)
    model = mhr_ops.patch(tiny_llama(seed=0), ["q_proj", "v_proj"], r=4, n_skills=8, n_splits=2, n_tasks=16)
    model.load_state_dict(eager.state_dict())
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    for bs in (2, 3, 5):
        ids = torch.randint(1, 64, (bs, 10), generator=gen)
        tasks = torch.randint(0, 16, (bs,), generator=gen)
        losses = []
        for m, fn in ((eager, eager), (model, compiled)):
            m.zero_grad()
            torch.manual_seed(bs)  # the same relaxed-Bernoulli draws on both sides
            with mhr_ops.use_tasks(m, tasks):
                loss = fn(input_ids=ids, labels=ids).loss
            loss.backward()
            losses.append(loss.detach())
        assert_close(losses[1], losses[0], atol=1e-6, rtol=1e-6, what=f"loss at batch {bs}")
        for (name, p), q in zip(eager.named_parameters(), model.parameters(), strict=True):
            if p.requires_grad:
                assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-5, what=f"{name} grad at batch {bs}")


def test_route_noise_under_inductor_fallback_random_matches_eager():
    """With inductor, ``torch._inductor.config.fallback_random = True`` keeps eager's random
    stream: a seeded compiled route draws what the seeded eager route draws."""
    pytest.importorskip("torch._inductor")
    logits = torch.randn(6, 2 * 4)

    def f(ids):
        return mhr_ops.route(logits, ids, n_skills=4, mode="relaxed_bernoulli", check_ids=False)

    ids = torch.tensor([0, 5, 2])
    torch.manual_seed(7)
    expected = f(ids)
    torch._dynamo.reset()
    with torch._inductor.config.patch(fallback_random=True):
        compiled = torch.compile(f, fullgraph=True)
        torch.manual_seed(7)
        got = compiled(ids)
    torch.testing.assert_close(got, expected)
