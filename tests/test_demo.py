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


def test_moe_demo_agrees_with_gather_bmm_and_learns(capsys):
    from mhr_ops import demo_moe

    assert demo_moe.run(torch.device("cpu"), steps=40, seed=0, batch_size=32) == 0
    out = capsys.readouterr().out
    assert "(agree)" in out and "gather + bmm" in out and "tokens/s" in out
    assert "per-expert load" in out and "held-out token accuracy" in out
    loads = re.findall(r"model\.layers\.\d\.\S+ +((?:[\d.]+ ?){8})$", out, flags=re.M)
    assert len(loads) == 14  # every patched layer reports its 8 experts' load, summing to 1
    for line in loads:
        assert abs(sum(float(v) for v in line.split()) - 1.0) < 0.05


def test_moe_demo_gather_bmm_matches_the_layer():
    from mhr_ops import demo_moe
    from mhr_ops.nn import MoELoRALinear

    torch.manual_seed(0)
    layer = MoELoRALinear(torch.nn.Linear(24, 20), n_experts=5, r=3, top_k=2)
    with torch.no_grad():
        layer.B.normal_()
    x = torch.randn(2, 7, 24)
    torch.testing.assert_close(demo_moe.gather_bmm_forward(layer, x), layer(x), rtol=1e-5, atol=1e-5)
