"""The main job runs end to end: agreement with PEFT at the start, a falling loss."""

import torch

from mhr_ops import demo


def test_demo_runs_and_learns(capsys):
    assert demo.run(torch.device("cpu"), steps=40, seed=0, batch_size=32) == 0
    out = capsys.readouterr().out
    assert "(agree)" in out and "tokens/s" in out and "held-out token accuracy" in out
