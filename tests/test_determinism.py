"""The determinism claim of docs/API.md on the CPU: the same inputs and thread count give bitwise
the same forward outputs and gradients of every op, eagerly and under torch.compile (AOT)."""

import pytest
import torch

import mhr_ops


def inputs():
    gen = torch.Generator().manual_seed(0)
    G, h, S, r, d_in, d_out, N = 5, 4, 6, 8, 64, 96, 700  # N spans several threads' pieces

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    return dict(
        logits=randn(7, h * S),
        task_ids=torch.randint(0, 7, (G,), generator=gen),
        noise=torch.rand(G, h, S, generator=gen),
        x=randn(N, d_in),
        A=randn(h, S, d_in // h, r),
        B=randn(h, S, r, d_out // h),
        weight=randn(d_out, d_in),
        bias=randn(d_out),
        group_ids=torch.randint(0, G, (N,), generator=gen),
        o=randn(N, 8, 16),
        routed=randn(N, 6),
        shared=randn(N, 2),
        stage=randn(N, 2),
        o_weight=randn(32, 128),
    )


def every_op(logits, task_ids, noise, x, A, B, weight, bias, group_ids, o, routed, shared, stage, o_weight):
    w = mhr_ops.route(logits, task_ids, n_skills=6, mode="relaxed_bernoulli", noise=noise, top_k=3)
    w_soft = mhr_ops.route(logits, task_ids, n_skills=6, mode="softmax", temperature=0.7)
    y = mhr_ops.routed_lora(x, A, B, w, group_ids, scale=0.25)
    y_lin = mhr_ops.mhr_linear(x, weight, bias, A, B, w_soft, group_ids, scale=0.5)
    gates = mhr_ops.head_gates(routed, top_k=3, shared_logits=shared, stage_logits=stage)
    proj = mhr_ops.gated_head_proj(o, gates, o_weight)
    return [w, w_soft, y, y_lin, gates, proj]


def outputs_and_grads(fn):
    args = inputs()
    for name, t in args.items():
        if t.is_floating_point() and name != "noise":
            t.requires_grad_()
    outs = fn(**args)
    loss = sum((out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum() for out in outs)
    loss.backward()
    return [out.detach() for out in outs] + [t.grad for t in args.values() if t.grad is not None]


@pytest.mark.parametrize("compiled", [False, True])
def test_cpu_ops_are_bitwise_deterministic(compiled):
    fn = torch.compile(every_op, backend="aot_eager", fullgraph=True) if compiled else every_op
    first, second = outputs_and_grads(fn), outputs_and_grads(fn)
    assert len(first) == 6 + 11  # outputs, then the gradients of the 11 float inputs
    for i, (a, b) in enumerate(zip(first, second, strict=True)):
        assert torch.equal(a, b), f"result {i} differs between two identical runs"
