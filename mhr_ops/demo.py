"""``python -m mhr_ops demo``: multi-task MHR fine-tuning of a small transformer, end to end.

A tiny Llama (built from a config: nothing is downloaded) gets MHR adapters on every linear layer
of its blocks through ``mhr_ops.patch``. Four synthetic tasks share the same inputs and differ only
in their targets, so the model can only solve them through its routed adapters. The demo checks
that mhr_ops and PEFT's Poly layers agree on the same weights, times a training step of both side
by side with the same trainable parameters (the adapters: A, B and the routing logits, nothing
else), then trains with mhr_ops and prints the loss falling."""

from __future__ import annotations

import sys
import time

import torch

import mhr_ops

VOCAB, SEQ, N_TASKS = 32, 8, 4
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTER = dict(r=8, n_skills=4, n_splits=2, n_tasks=N_TASKS)


def make_batch(batch_size: int, gen: torch.Generator, device: torch.device):
    """Inputs are random digits; the target depends on the task: copy, reverse, +1, sort."""
    x = torch.randint(2, VOCAB, (batch_size, SEQ), generator=gen)
    task = torch.randint(0, N_TASKS, (batch_size,), generator=gen)
    y = torch.stack(
        [
            x,
            x.flip(-1),
            (x - 2 + 1) % (VOCAB - 2) + 2,
            x.sort(-1).values,
        ]
    )[task, torch.arange(batch_size)]
    sep = torch.ones(batch_size, 1, dtype=torch.long)  # token 1 separates input and target
    ids = torch.cat([x, sep, y], dim=1)
    labels = ids.clone()
    labels[:, : SEQ + 1] = -100  # loss on the target half only
    return ids.to(device), labels.to(device), task.to(device)


def tiny_llama(seed: int, device: torch.device, vocab: int = VOCAB, positions: int = 2 * SEQ + 1):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=positions,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).to(device)


def peft_twin(model, seed: int, device: torch.device):
    """The same base and adapter weights in PEFT's Poly layers (its own forward)."""
    import peft

    config = peft.PolyConfig(task_type="CAUSAL_LM", target_modules=TARGETS, **ADAPTER)
    twin = peft.get_peft_model(tiny_llama(seed, device), config)
    ours = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in twin.named_parameters():
            key = name.removeprefix("base_model.model.")
            for theirs, mine in (
                ("poly_lora_A.default", "A"),
                ("poly_lora_B.default", "B"),
                ("poly_router.default.module_logits", "logits"),
            ):
                key = key.replace(theirs, mine)
            key = key.replace("base_layer.", "base.")
            p.copy_(ours[key])
    return twin


def train_adapters_only(model) -> int:
    """Make the adapters (A, B and routing logits of every MHR or PEFT Poly layer) the only
    trainable parameters, whatever ``mhr_ops.patch`` or ``get_peft_model`` left trainable
    (embeddings, norms, lm_head); return their count."""
    from peft.tuners.poly.layer import PolyLayer

    model.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, mhr_ops.nn.MHRLinear):
            adapters = [module.A, module.B, module.logits]
        elif isinstance(module, PolyLayer):
            adapters = [*module.poly_lora_A.parameters(), *module.poly_lora_B.parameters()]
            adapters += list(module.poly_router.parameters())
        else:
            continue
        for p in adapters:
            p.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def tokens_per_second(step, batches, tokens_per_batch: int, device: torch.device) -> float:
    for b in batches[:2]:
        step(*b)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for b in batches:
        step(*b)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return tokens_per_batch * len(batches) / (time.perf_counter() - t0)


def run(device: torch.device, steps: int, seed: int, batch_size: int = 64) -> int:
    from tqdm import tqdm

    print("mhr_ops", mhr_ops.build_info())
    model = mhr_ops.patch(tiny_llama(seed, device), TARGETS, **ADAPTER)
    with torch.no_grad():  # a live adapter from the start (PEFT's default B = 0 is a no-op)
        for name, p in model.named_parameters():
            if name.endswith(".B"):
                p.normal_(0, 0.02)
    twin = peft_twin(model, seed, device)
    n_train, n_train_peft = train_adapters_only(model), train_adapters_only(twin)
    if n_train != n_train_peft:
        raise AssertionError(f"trainable parameters differ: mhr_ops {n_train:,}, PEFT {n_train_peft:,}")
    print(
        f"tiny Llama + MHR adapters on {len(TARGETS)} projections x 2 layers; trainable parameters "
        f"(adapters A, B and routing logits only): mhr_ops {n_train:,}, PEFT Poly {n_train_peft:,}"
    )

    gen = torch.Generator().manual_seed(seed)
    ids, labels, task = make_batch(batch_size, gen, device)
    model.eval(), twin.eval()
    with torch.no_grad(), mhr_ops.use_tasks(model, task):
        diff = (model(input_ids=ids).logits - twin(input_ids=ids, task_ids=task).logits).abs().max().item()
    agree = diff < 1e-4
    print(f"start: max |logits(mhr_ops) - logits(PEFT Poly)| = {diff:.2e} ({'agree' if agree else 'MISMATCH'})")

    def step_fn(m, opt, use_ctx):
        def step(ids, labels, task):
            if use_ctx:
                with mhr_ops.use_tasks(m, task):
                    loss = m(input_ids=ids, labels=labels).loss
            else:
                loss = m(input_ids=ids, labels=labels, task_ids=task).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss

        return step

    model.train(), twin.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    twin_opt = torch.optim.AdamW([p for p in twin.parameters() if p.requires_grad], lr=1e-2)
    timing_batches = [make_batch(batch_size, gen, device) for _ in range(6)]
    tokens = batch_size * (2 * SEQ + 1)
    tps_peft = tokens_per_second(step_fn(twin, twin_opt, False), timing_batches, tokens, device)
    tps_ours = tokens_per_second(step_fn(model, opt, True), timing_batches, tokens, device)
    print(
        f"training throughput (full steps: forward, backward and AdamW step, batch {batch_size} x "
        f"{2 * SEQ + 1} tokens, {len(timing_batches)} steps each): mhr_ops {tps_ours:,.0f} tokens/s, "
        f"PEFT Poly {tps_peft:,.0f} tokens/s ({tps_ours / tps_peft:.2f}x)"
    )

    step = step_fn(model, opt, True)
    first = last = None
    # A progress bar only on a terminal: in a log, its carriage-return redraws flood the file;
    # the periodic "step ... loss ..." lines below are printed either way.
    bar = tqdm(range(steps), desc="training (mhr_ops)", unit="step", disable=not sys.stderr.isatty())
    for i in bar:
        loss = step(*make_batch(batch_size, gen, device)).item()
        first = loss if first is None else first
        last = loss
        bar.set_postfix(loss=f"{loss:.3f}")
        if i % max(1, steps // 6) == 0 or i == steps - 1:
            tqdm.write(f"step {i:4d}  loss {loss:.3f}")
    model.eval()
    ids, labels, task = make_batch(256, gen, device)
    with torch.no_grad(), mhr_ops.use_tasks(model, task):
        pred = model(input_ids=ids).logits[:, SEQ:-1].argmax(-1)
    acc = (pred == ids[:, SEQ + 1 :]).float().mean(-1)
    per_task = ", ".join(
        f"{name} {acc[task == t].mean():.0%}" for t, name in enumerate(["copy", "reverse", "+1", "sort"])
    )
    print(f"loss {first:.3f} -> {last:.3f}; held-out token accuracy by task: {per_task}")
    return 0 if agree and last < first else 1
