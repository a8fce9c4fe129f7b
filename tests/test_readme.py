"""The README's usage example runs as written."""

import pathlib
import re

import torch

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs():
    text = README.read_text()
    match = re.search(r"<!-- readme-example -->\n```python\n(.*?)```", text, re.S)
    assert match, "README.md lost its <!-- readme-example --> block"
    namespace: dict = {}
    exec(compile(match.group(1), "README.md example", "exec"), namespace)
    q_proj = namespace["model"].model.layers[0].self_attn.q_proj
    assert torch.isfinite(namespace["loss"]) and q_proj.A.grad is not None  # the backward reached the skills
    assert q_proj.logits.shape == (4, 16) and q_proj.merged_task is None  # routing_only, then unmerge
    assert namespace["out"].shape[0] == 2 and namespace["out"].shape[1] > 10  # generated tokens
