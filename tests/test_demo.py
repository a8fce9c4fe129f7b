"""The main job runs end to end: agreement with PEFT at the start, equal trainable parameters on
both sides of the throughput comparison, a falling loss, and plain lines (no progress-bar
redraws) when the output is not a terminal."""

import re

import torch

import mhr_ops
from mhr_ops import demo


def test_demo_runs_and_learns(capsys):
    assert demo.run(torch.device("cpu"), steps=40, seed=0, batch_size=32) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "(agree)" in out and "tokens/s" in out and "held-out token accuracy" in out
    assert "forward, backward and AdamW step" in out
    counts = re.search(r"mhr_ops ([\d,]+), PEFT Poly ([\d,]+)", out)
    assert counts and counts.group(1) == counts.group(2), out
    # captured output is not a TTY: no tqdm bar, whose carriage returns would flood a log
    assert "\r" not in out and "\r" not in captured.err
    assert re.search(r"step +39 +loss", out)


def test_demo_trains_the_same_adapters_as_peft():
    model = mhr_ops.patch(demo.tiny_llama(0, torch.device("cpu")), demo.TARGETS, **demo.ADAPTER)
    twin = demo.peft_twin(model, 0, torch.device("cpu"))
    n_ours, n_peft = demo.train_adapters_only(model), demo.train_adapters_only(twin)
    assert n_ours == n_peft
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"A", "B", "logits"}
    assert all(p.requires_grad == ("poly_" in n) for n, p in twin.named_parameters())
