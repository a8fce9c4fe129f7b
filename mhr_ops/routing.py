"""`route`: routing weights over a skill inventory (docs/API.md), with its fake kernel and
autograd registration for torch.ops.mhr_ops.route."""

from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loads the op registrations)
from ._autograd import call_op, register_no_double_backward
from ._checks import FLOAT_DTYPES, as_index_tensor, check_id_range, check_int, check_same_device, check_tensor


def route(
    logits: torch.Tensor,
    task_ids,
    *,
    n_skills: int,
    mode: str = "sigmoid",
    temperature: float = 1.0,
    top_k: int | None = None,
    eps: float = 1e-12,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    check_ids: bool = True,
) -> torch.Tensor:
    """Routing weights ``[G, h, S]`` for groups that use tasks ``task_ids``.

    Row ``g`` uses ``logits[task_ids[g]].view(h, S)`` with ``h = logits.shape[1] // n_skills``;
    per (g, head) the mode turns logits into probabilities ``p``, ``top_k`` (if set) keeps the
    ``top_k`` largest (ties to the lower skill index), and ``weights = p / (sum p + eps)``.

    Args:
        logits: ``[T, h * S]`` float tensor (PEFT's ``poly_router.module_logits``).
        task_ids: ``[G]`` int32/int64 tensor (or a sequence of ints) of tasks in ``[0, T)``.
        n_skills: ``S``, the inventory size.
        mode: ``"sigmoid"`` (PEFT eval), ``"relaxed_bernoulli"`` (PEFT train),
            ``"softmax"`` (MoE routers) or ``"average"`` (``1/S``, no gradient).
        temperature: divides the relaxed-Bernoulli and softmax logits; a number > 0, or a 0-d
            tensor holding one (read once, constant: no gradient flows to it).
        top_k: keep this many skills per (group, head), ``1 <= top_k <= S``; ``None`` keeps all.
        eps: added to the normalizer; 1e-12 as PEFT (mttl uses 1e-8).
        noise: ``[G, h, S]`` uniforms for ``"relaxed_bernoulli"``, in the logits dtype. When
            ``None`` the op draws exactly one ``torch.rand((G, h, S), dtype=logits.dtype,
            device=logits.device, generator=generator)``, so a run seeded like a PEFT run
            consumes the random stream the same way and gives the same numbers. Under
            ``torch.compile`` the draw is eager's with the AOT backends (``aot_eager``) and with
            inductor when ``torch._inductor.config.fallback_random = True``; plain inductor draws
            from its own generator (seeded runs repeat themselves, but do not match eager/PEFT).
        generator: random generator for that draw.
        check_ids: raise if a task id is outside ``[0, T)``. This reads two numbers back from
            the device (a host sync on CUDA); callers that validate ids once per forward pass
            ``False``. Unchecked out-of-range ids are never dereferenced: their rows come out NaN.

    Returns:
        ``[G, h, S]`` weights in the logits dtype, computed in fp32 (fp64 for fp64 logits).
        Gradients flow to ``logits`` through kept entries (none for ``"average"``).
    """
    check_tensor(logits, "logits", ndim=2, dtypes=FLOAT_DTYPES)
    n_skills = check_int(n_skills, "n_skills", low=1)
    if logits.shape[1] % n_skills != 0:
        raise ValueError(
            f"logits: expected shape[1] (n_splits * n_skills) divisible by n_skills={n_skills}, "
            f"got shape {tuple(logits.shape)}"
        )
    task_ids = as_index_tensor(task_ids, "task_ids", logits.device)
    if task_ids.dim() != 1:
        raise ValueError(f"task_ids: expected a 1-D tensor [G], got shape {tuple(task_ids.shape)}")
    check_same_device(task_ids, "task_ids", logits, "logits")
    # The mode, top_k's range, temperature > 0, eps >= 0 and noise are the op's contract
    # (csrc/torch/args/route_args.cpp, ValueError naming the argument). Python checks the types the
    # schema cannot take, and the logits / n_skills / task_ids shapes its noise draw needs.
    temperature = _as_number(temperature, "temperature")
    eps = _as_number(eps, "eps")
    if top_k is not None:
        check_int(top_k, "top_k")
    if noise is not None:
        check_tensor(noise, "noise")
    elif mode == "relaxed_bernoulli":
        # Under torch.compile with dynamic shapes, torch.rand's generator overload takes no
        # symbolic sizes: pass generator only when there is one (the same draw either way).
        extra = {} if generator is None else {"generator": generator}
        shape = (task_ids.shape[0], logits.shape[1] // n_skills, n_skills)
        noise = torch.rand(shape, dtype=logits.dtype, device=logits.device, **extra)
    if check_ids:
        check_id_range(task_ids, "task_ids", logits.shape[0], "task")
    args = (logits, task_ids, noise, n_skills, mode, temperature, top_k, eps)
    return call_op(torch.ops.mhr_ops.route, args, (logits,))


def check_route_options(logits, *, n_skills: int, mode: str, top_k, temperature, eps, name: str = "mode") -> None:
    """Asks the op, which owns these rules, whether it takes these routing options, by routing no
    group (a module checks its options when it is built, not at its first forward). ``name``
    names the option in the message (a module's ``train_mode`` / ``eval_mode``)."""
    ids = torch.empty(0, dtype=torch.long, device=logits.device)
    noise = None
    if mode == "relaxed_bernoulli":  # an empty draw all the same: no random number is taken
        noise = logits.new_empty((0, logits.shape[1] // n_skills, n_skills))
    try:
        with torch.no_grad():
            route(logits, ids, n_skills=n_skills, mode=mode, temperature=temperature, top_k=top_k, eps=eps, noise=noise)
    except ValueError as e:
        message = str(e)
        if message.startswith("mode:") and name != "mode":
            raise ValueError(name + message[len("mode") :]) from None
        raise


def _as_number(value, name: str) -> float:
    """A Python number, or a 0-d tensor read once (``.item()``; constant, no gradient)."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.is_complex():
            shape = tuple(value.shape)
            raise TypeError(f"{name}: expected a number or a 0-d real tensor, got a tensor of shape {shape}")
        if value.requires_grad:
            raise ValueError(f"{name}: expected a constant, got a tensor that requires grad (it is not learnable)")
        return float(value.item())
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    return float(value)


@torch.library.register_fake("mhr_ops::route")
def _route_fake(logits, task_ids, noise, n_skills, mode, temperature, top_k, eps):
    return logits.new_empty((task_ids.shape[0], logits.shape[1] // n_skills, n_skills))


@torch.library.register_fake("mhr_ops::route_backward")
def _route_backward_fake(grad_weights, logits, task_ids, noise, n_skills, mode, temperature, top_k, eps):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


# autograd of route: C++ (csrc/torch/autograd.cpp); its backward op refuses double backward
register_no_double_backward("mhr_ops::route_backward", "route")
