"""Autograd helpers shared by the op registrations."""

import torch


def register_no_double_backward(op: str, name: str) -> None:
    """Registers an autograd formula for a backward op that raises a clear error if someone
    differentiates through it (double backward is not implemented)."""

    def backward(ctx, *grads):
        raise RuntimeError(f"mhr_ops.{name}: double backward (gradient of the gradient) is not supported")

    torch.library.register_autograd(op, backward, setup_context=lambda ctx, inputs, output: None)
