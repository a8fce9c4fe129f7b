"""``python -m mhr_ops demo --moe``: mixture-of-LoRA-experts fine-tuning of a small transformer.

A tiny Llama (built from a config: nothing is downloaded) gets LoRA experts with a per-token router
on the projections of its blocks through ``mhr_ops.patch_moe_lora``; only the experts and the
routers train. Four synthetic tasks (copy, reverse, +1, sort) share the same digits and differ in
their targets; a task token opens each sequence, so the routers can send each task's tokens to
their own experts. The demo checks the patched layer against plain PyTorch (gather the selected
experts, ``bmm``) on the same weights, times a training step of both side by side, then trains with
the Switch load-balancing loss added and prints the loss, the per-expert load of every layer and
the held-out accuracy per task."""

from __future__ import annotations

import sys

import torch

import mhr_ops
from mhr_ops.demo import SEQ, TARGETS, tiny_llama, tokens_per_second
from mhr_ops.nn import MoELoRALinear

DIGITS, N_TASKS = 32, 4  # tokens 2..DIGITS-1 are digits; the task tokens follow them
VOCAB = DIGITS + N_TASKS
EXPERTS = dict(n_experts=8, r=8, top_k=2, alpha=16.0)
AUX_WEIGHT = 0.01
LR = 1e-2
TASK_NAMES = ["copy", "reverse", "+1", "sort"]


def make_batch(batch_size: int, gen: torch.Generator, device: torch.device):
    """[task token, digits, separator, target]; the loss is on the target only."""
    x = torch.randint(2, DIGITS, (batch_size, SEQ), generator=gen)
    task = torch.randint(0, N_TASKS, (batch_size,), generator=gen)
    y = torch.stack([x, x.flip(-1), (x - 2 + 1) % (DIGITS - 2) + 2, x.sort(-1).values])[task, torch.arange(batch_size)]
    sep = torch.ones(batch_size, 1, dtype=torch.long)
    ids = torch.cat([(DIGITS + task)[:, None], x, sep, y], dim=1)
    labels = ids.clone()
    labels[:, : SEQ + 2] = -100
    return ids.to(device), labels.to(device), task.to(device)


def gather_bmm_forward(layer: MoELoRALinear, x: torch.Tensor) -> torch.Tensor:
    """The same layer in plain PyTorch, as MeteoRA-style code writes it: route, gather each token's
    experts' A and B, two bmm."""
    from mhr_ops.moe import switch_balance_loss

    x2 = x.reshape(-1, x.shape[-1])
    w, ids, probs = layer.route(x2)  # the same router, so the balance loss is the same too
    layer.last_aux_loss, layer.last_expert_load = switch_balance_loss(probs, ids, layer.n_experts)
    w = w.to(x.dtype)
    z = torch.einsum("nd,nkdr->nkr", x2, layer.A[ids])
    delta = torch.einsum("nk,nkr,nkro->no", w, z, layer.B[ids]) * layer.scale
    return (layer.base(x2) + delta).reshape(*x.shape[:-1], -1)


class GatherBmm(torch.nn.Module):
    """Wraps a patched layer so that it runs gather_bmm_forward on the same parameters."""

    def __init__(self, layer: MoELoRALinear):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return gather_bmm_forward(self.layer, x)


def swap_to_gather_bmm(model) -> list[tuple[torch.nn.Module, str, MoELoRALinear]]:
    swapped = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, MoELoRALinear):
                setattr(parent, name, GatherBmm(child))
                swapped.append((parent, name, child))
    return swapped


def restore(swapped) -> None:
    for parent, name, layer in swapped:
        setattr(parent, name, layer)


def run(device: torch.device, steps: int, seed: int, batch_size: int = 64) -> int:
    from tqdm import tqdm

    print("mhr_ops", mhr_ops.build_info())
    model = mhr_ops.patch_moe_lora(tiny_llama(seed, device, VOCAB, 2 * SEQ + 2), TARGETS, **EXPERTS)
    with torch.no_grad():  # live experts from the start (B = 0 would make the check trivial)
        for name, p in model.named_parameters():
            if name.endswith(".B"):
                p.normal_(0, 0.02)
    layers = [m for m in model.modules() if isinstance(m, MoELoRALinear)]
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(
        f"tiny Llama + {EXPERTS['n_experts']} LoRA experts (r {EXPERTS['r']}, top-{EXPERTS['top_k']}) on "
        f"{len(TARGETS)} projections x 2 layers = {len(layers)} layers; trainable parameters (experts and "
        f"routers only): {n_train:,}"
    )

    gen = torch.Generator().manual_seed(seed)
    ids, labels, _ = make_batch(batch_size, gen, device)
    model.eval()
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        swapped = swap_to_gather_bmm(model)
        plain = model(input_ids=ids).logits
        restore(swapped)
    diff = (ours - plain).abs().max().item()
    agree = diff < 1e-4
    print(f"start: max |logits(mhr_ops) - logits(gather + bmm)| = {diff:.2e} ({'agree' if agree else 'MISMATCH'})")

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR)

    def step(ids, labels, _task):
        loss = model(input_ids=ids, labels=labels).loss + AUX_WEIGHT * mhr_ops.moe_aux_loss(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    model.train()
    timing_batches = [make_batch(batch_size, gen, device) for _ in range(6)]
    tokens = batch_size * (2 * SEQ + 2)
    snapshot = [p.detach().clone() for p in params]
    swapped = swap_to_gather_bmm(model)
    tps_plain = tokens_per_second(step, timing_batches, tokens, device)
    restore(swapped)
    with torch.no_grad():  # both timings start from the same weights
        for p, s in zip(params, snapshot, strict=True):
            p.copy_(s)
    opt = torch.optim.AdamW(params, lr=LR)
    tps_ours = tokens_per_second(step, timing_batches, tokens, device)
    print(
        f"training throughput (forward, backward and AdamW step, batch {batch_size} x {2 * SEQ + 2} tokens, "
        f"{len(timing_batches)} steps each): mhr_ops {tps_ours:,.0f} tokens/s, gather + bmm {tps_plain:,.0f} "
        f"tokens/s ({tps_ours / tps_plain:.2f}x)"
    )

    losses = []
    bar = tqdm(range(steps), desc="training (mhr_ops moe_lora)", unit="step", disable=not sys.stderr.isatty())
    for i in bar:
        ids, labels, task = make_batch(batch_size, gen, device)
        loss = model(input_ids=ids, labels=labels).loss
        balance = mhr_ops.moe_aux_loss(model)
        opt.zero_grad(set_to_none=True)
        (loss + AUX_WEIGHT * balance).backward()
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if i % max(1, steps // 6) == 0 or i == steps - 1:
            tqdm.write(f"step {i:4d}  loss {losses[-1]:.3f}  balance loss {balance.item() / len(layers):.3f} per layer")
    window = max(1, min(5, steps // 4))  # single steps are noisy: compare the first and last few
    first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window

    names = {m: n for n, m in model.named_modules()}
    print("per-expert load of the last step (fraction of token slots):")
    for layer in layers:
        load = " ".join(f"{v:.2f}" for v in layer.last_expert_load.tolist())
        print(f"  {names[layer]:<40} {load}")
    model.eval()
    ids, labels, task = make_batch(256, gen, device)
    with torch.no_grad():
        pred = model(input_ids=ids).logits[:, SEQ + 1 : -1].argmax(-1)
    acc = (pred == ids[:, SEQ + 2 :]).float().mean(-1)
    per_task = ", ".join(f"{name} {acc[task == t].mean():.0%}" for t, name in enumerate(TASK_NAMES))
    print(f"loss (mean of {window} steps) {first:.3f} -> {last:.3f}; held-out token accuracy by task: {per_task}")
    return 0 if agree and last < first else 1
