"""Plain float64 PyTorch versions of the mhr_ops ops, written from SPEC.md (not from the kernels).
They are the oracle for the tests and the baseline of the benchmarks; they favour clarity over
speed and differentiate through ordinary autograd."""

from __future__ import annotations

import torch


def _clamp_probs(p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    eps = torch.finfo(dtype).eps
    return p.clamp(min=eps, max=1 - eps)


def route(
    logits: torch.Tensor,
    task_ids: torch.Tensor,
    *,
    n_skills: int,
    mode: str = "sigmoid",
    temperature: float = 1.0,
    top_k: int | None = None,
    eps: float = 1e-12,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """SPEC section 2 in float64. ``noise`` is required for ``relaxed_bernoulli``. Its clamps use
    ``torch.finfo`` of the logits' own dtype, as PEFT's computation in that dtype does."""
    in_dtype = logits.dtype
    n_heads = logits.shape[1] // n_skills
    lg = logits.double()[task_ids.long()].view(-1, n_heads, n_skills)
    if mode == "sigmoid":
        p = torch.sigmoid(lg)
    elif mode == "relaxed_bernoulli":
        # torch.distributions.RelaxedBernoulli(temperature, logits=l).rsample() with the given uniforms.
        probs = _clamp_probs(torch.sigmoid(lg), in_dtype)
        u = _clamp_probs(noise.double(), in_dtype)
        z = (torch.log(u) - torch.log1p(-u) + torch.log(probs) - torch.log1p(-probs)) / temperature
        finfo = torch.finfo(in_dtype)
        p = torch.sigmoid(z).clamp(min=finfo.tiny, max=1.0 - finfo.eps)
    elif mode == "softmax":
        p = torch.softmax(lg / temperature, dim=-1)
    elif mode == "average":
        p = torch.full_like(lg, 1.0 / n_skills)
    else:
        raise ValueError(f"mode: unknown {mode!r}")
    if top_k is not None:
        # Stable descending sort: among equal values the lower skill index comes first.
        order = torch.sort(p.detach(), dim=-1, descending=True, stable=True).indices[..., :top_k]
        keep = torch.zeros_like(p, dtype=torch.bool).scatter_(-1, order, True)
        p = torch.where(keep, p, torch.zeros_like(p))
    return p / (p.sum(dim=-1, keepdim=True) + eps)
