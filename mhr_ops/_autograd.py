"""Autograd helpers shared by the op registrations."""

import torch


def register_no_double_backward(op: str, name: str) -> None:
    """Registers an autograd formula for a backward op that raises a clear error if someone
    differentiates through it (double backward is not implemented)."""

    def backward(ctx, *grads):
        raise RuntimeError(f"mhr_ops.{name}: double backward (gradient of the gradient) is not supported")

    torch.library.register_autograd(op, backward, setup_context=lambda ctx, inputs, output: None)


def needed_grads(grads, mask) -> list:
    """A backward op's outputs with None where ``mask`` says the gradient was not asked for (the op
    returns an empty tensor there)."""
    return [g if needed else None for g, needed in zip(grads, mask, strict=True)]


def register_bottleneck_autograd(op: str, backward_op, n_tensors: int, n_grads: int) -> None:
    """Autograd for an op ``(*tensors, *options) -> (y, z)`` whose rank bottleneck ``z`` the
    backward reuses: ``z`` is saved (and not differentiable), and the backward calls
    ``backward_op(grad_y, *tensors, *options, z, output_mask)`` for the first ``n_grads`` inputs
    (the rest get no gradient)."""

    def setup_context(ctx, inputs, output):
        ctx.options = inputs[n_tensors:]
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(*inputs[:n_tensors], output[1])

    def backward(ctx, grad_y, grad_z):
        mask = ctx.needs_input_grad[:n_grads]
        rest = [None] * (n_tensors + len(ctx.options) - n_grads)
        if not any(mask):
            return (*[None] * n_grads, *rest)
        *tensors, z = ctx.saved_tensors
        grads = backward_op(grad_y, *tensors, *ctx.options, z, list(mask))
        return (*needed_grads(grads, mask), *rest)

    torch.library.register_autograd(op, backward, setup_context=setup_context)


def needs_autograd(*tensors) -> bool:
    """Whether a call must go through the ops' autograd kernels: grad mode is on and some input
    requires grad, or torch.compile is tracing (it needs the registered autograd to build the
    backward graph)."""
    if torch.compiler.is_compiling():
        return True
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def call_op(op, args: tuple, grad_inputs: tuple):
    """Calls the op packet ``op`` on ``args``. When no autograd is needed (see
    :func:`needs_autograd` over ``grad_inputs``) the call goes past the Autograd dispatch key,
    straight to the backend kernel: it skips the autograd kernel (for the ops whose autograd is
    Python, ``torch.library.register_autograd``'s, about 13 us a call on the CPU), which would do
    exactly this after deciding there is nothing to record."""
    if needs_autograd(*grad_inputs):
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op.default(*args)
