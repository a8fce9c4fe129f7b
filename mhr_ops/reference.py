"""Plain float64 PyTorch versions of the mhr_ops ops, written from their definitions in docs/API.md
(not from the kernels).
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
    """docs/API.md ``route`` in float64. ``noise`` is required for ``relaxed_bernoulli``. Its clamps use
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


def _row_groups(x: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """One group id per row of x.reshape(-1, d_in): ids given per row, or per leading element."""
    lead = x.shape[:-1]
    if tuple(group_ids.shape) == tuple(lead):
        return group_ids.reshape(-1).long()
    return group_ids.long().reshape(-1, *([1] * (len(lead) - 1))).expand(lead).reshape(-1)


def mixed_adapters(A: torch.Tensor, B: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group mixed adapters in float64: A_g [G, d_in, r] (head block k = sum_s w[g,k,s] A[k,s])
    and B_g [G, r, d_out] (head block k = sum_s w[g,k,s] B[k,s])."""
    w = weights.double()
    G, h = w.shape[:2]
    a = torch.einsum("gks,ksdr->gkdr", w, A.double()).reshape(G, -1, A.shape[-1])
    b = torch.einsum("gks,ksrd->gkrd", w, B.double()).transpose(1, 2).reshape(G, B.shape[2], -1)
    return a, b


def routed_lora(x, A, B, weights, group_ids, *, scale, out=None):
    """docs/API.md ``routed_lora`` in float64: ``y_row = scale * (x_row @ A_g) @ B_g`` (plus ``out`` if given)."""
    a, b = mixed_adapters(A, B, weights)
    rows = x.double().reshape(-1, x.shape[-1])
    groups = _row_groups(x, group_ids)
    y = rows.new_zeros(rows.shape[0], b.shape[-1])
    for g in groups.unique().tolist():
        sel = groups == g
        y[sel] = scale * (rows[sel] @ a[g]) @ b[g]
    y = y.reshape(*x.shape[:-1], b.shape[-1])
    return y if out is None else out.double() + y


def mhr_linear(x, weight, bias, A, B, weights, group_ids, *, scale):
    """docs/API.md ``mhr_linear``: ``F.linear(x, weight, bias) + routed_lora(...)`` in float64."""
    base = torch.nn.functional.linear(x.double(), weight.double(), None if bias is None else bias.double())
    return base + routed_lora(x, A, B, weights, group_ids, scale=scale)


def head_gates(routed_logits, *, top_k, shared_logits=None, stage_logits=None, n_shared=0, binary=False):
    """docs/API.md ``head_gates`` in float64."""
    lr = routed_logits.double()
    n_routed = lr.shape[-1]
    order = torch.sort(lr.detach(), dim=-1, descending=True, stable=True).indices[..., :top_k]
    keep = torch.zeros_like(lr, dtype=torch.bool).scatter_(-1, order, True)
    hs = shared_logits.shape[-1] if shared_logits is not None else n_shared
    if binary:
        return torch.cat([torch.ones(*lr.shape[:-1], hs, dtype=torch.float64, device=lr.device), keep.double()], -1)
    p = torch.softmax(lr, dim=-1)
    p = torch.where(keep, p, torch.zeros_like(p))
    g_r = top_k * p / p.sum(-1, keepdim=True)
    if shared_logits is not None and hs > 1:
        g_s = torch.softmax(shared_logits.double(), dim=-1) * hs
    else:
        g_s = torch.ones(*lr.shape[:-1], hs, dtype=torch.float64, device=lr.device)
    if stage_logits is not None:
        a = torch.softmax(stage_logits.double(), dim=-1) * 2
        g_s, g_r = a[..., :1] * g_s, a[..., 1:] * g_r
    assert g_r.shape[-1] == n_routed
    return torch.cat([g_s, g_r], dim=-1)


def gated_head_proj(o, gates, weight, bias=None):
    """docs/API.md ``gated_head_proj``: gate multiply, then the linear projection, in float64.
    A head whose gate is exactly 0 is closed: skipped, not multiplied by 0, so NaN or Inf in its
    ``o`` neither reaches ``y`` nor any gradient (o is masked before the multiply, so the
    gate's gradient is 0 times a finite number)."""
    g = gates.double().unsqueeze(-1)
    gated = (torch.where(g != 0, o.double(), 0.0) * g).flatten(-2)
    return torch.nn.functional.linear(gated, weight.double(), None if bias is None else bias.double())


def moe_lora(x, A, B, topk_weights, topk_ids, *, scale, out=None):
    """docs/API.md ``moe_lora`` in float64: ``y_n = scale * sum_j w_nj * (x_n @ A[e_nj]) @ B[e_nj]``
    (plus ``out`` if given). ``topk_ids`` / ``topk_weights`` are ``[..., k]`` (x's leading shape)
    or ``[N, k]``."""
    rows = x.double().reshape(-1, x.shape[-1])
    k = topk_ids.shape[-1]
    ids = topk_ids.reshape(-1, k).long()
    w = topk_weights.double().reshape(-1, k)
    y = rows.new_zeros(rows.shape[0], B.shape[-1])
    for j in range(k):
        z = torch.einsum("nd,ndr->nr", rows, A.double()[ids[:, j]])
        y = y + scale * w[:, j : j + 1] * torch.einsum("nr,nro->no", z, B.double()[ids[:, j]])
    y = y.reshape(*x.shape[:-1], B.shape[-1])
    return y if out is None else out.double() + y
