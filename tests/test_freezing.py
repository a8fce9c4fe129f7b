"""Which parameters train after patch / routing_only: PEFT's get_peft_model rule (only adapter
parameters, plus modules_to_save, in the whole model), and MHR-z (only the routing logits)."""

import pytest
import torch
from conftest import tiny_llama
from torch import nn

import mhr_ops

peft = pytest.importorskip("peft")

# The README example's adapter config.
ADAPTER = dict(r=4, n_skills=8, n_splits=2, n_tasks=16)
TARGETS = ["q_proj", "v_proj"]


def peft_model(**config):
    return peft.get_peft_model(
        tiny_llama(), peft.PolyConfig(task_type="CAUSAL_LM", target_modules=TARGETS, **ADAPTER, **config)
    )


def n_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def trainable_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_patch_trains_what_get_peft_model_trains():
    model = mhr_ops.patch(tiny_llama(), TARGETS, **ADAPTER)
    expected = n_trainable(peft_model())
    print(f"trainable: mhr_ops {n_trainable(model)}, PEFT {expected}, of {sum(p.numel() for p in model.parameters())}")
    assert n_trainable(model) == expected
    names = trainable_names(model)
    assert names and all(n.endswith((".A", ".B", ".logits")) for n in names)
    assert len(names) == 3 * 2 * len(TARGETS)  # every adapted layer of the 2-layer model


def test_patch_freezes_biases_like_peft_bias_none():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 8), nn.Linear(8, 4))
    mhr_ops.patch(model, ["0"], r=2, n_skills=2, n_tasks=3)
    assert trainable_names(model) == {"0.A", "0.B", "0.logits"}
    assert not model[0].base.bias.requires_grad and not model[2].bias.requires_grad


def test_modules_to_save_stay_trainable_like_peft():
    model = mhr_ops.patch(tiny_llama(), TARGETS, **ADAPTER, modules_to_save=["lm_head"])
    reference = peft_model(modules_to_save=["lm_head"])
    assert n_trainable(model) == n_trainable(reference)
    assert model.lm_head.weight.requires_grad and isinstance(model.lm_head, nn.Linear)  # trained in place
    assert not model.model.embed_tokens.weight.requires_grad
    # A regex, as for target_modules.
    model = mhr_ops.patch(tiny_llama(), TARGETS, **ADAPTER, modules_to_save=r"model\.norm")
    assert trainable_names(model) - {n for n in trainable_names(model) if n.endswith((".A", ".B", ".logits"))} == {
        "model.norm.weight"
    }
    with pytest.raises(ValueError, match="modules_to_save: .* matches no module"):
        mhr_ops.patch(tiny_llama(), TARGETS, **ADAPTER, modules_to_save=["classifier"])


def test_patch_freeze_base_false_keeps_swapped_bases_trainable():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    mhr_ops.patch(model, ["0"], r=2, n_skills=2, n_tasks=3, freeze_base=False)
    assert trainable_names(model) == {"0.A", "0.B", "0.logits", "0.base.weight", "0.base.bias"}


def test_patch_keeps_adapter_flags_of_earlier_layers():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    mhr_ops.patch(model, ["0"], r=2, n_skills=2, n_tasks=3)
    mhr_ops.patch(model, ["1"], r=2, n_skills=2, n_tasks=3)
    assert trainable_names(model) == {f"{i}.{p}" for i in (0, 1) for p in ("A", "B", "logits")}


def test_routing_only_on_a_patched_model_trains_only_the_logits():
    model = mhr_ops.patch(tiny_llama(), TARGETS, **ADAPTER, modules_to_save=["lm_head"])
    model.model.norm.requires_grad_(True)  # unfrozen by hand afterwards: MHR-z freezes it again
    mhr_ops.routing_only(model, n_tasks=3)
    names = trainable_names(model)
    assert len(names) == 2 * len(TARGETS) and all(n.endswith(".logits") for n in names)
    ids = torch.randint(1, 64, (2, 5))
    with mhr_ops.use_tasks(model, torch.tensor([2, 0])):
        model(input_ids=ids, labels=ids).loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == names


@pytest.mark.parametrize("accelerated", [False, True])
def test_routing_only_on_a_peft_model_trains_only_the_logits(accelerated):
    model = peft_model(modules_to_save=["lm_head"])
    if accelerated:
        mhr_ops.peft.accelerate(model)
    assert any("modules_to_save" in n for n in trainable_names(model))
    mhr_ops.routing_only(model)
    names = trainable_names(model)
    assert len(names) == 2 * len(TARGETS) and all(n.endswith("poly_router.default.module_logits") for n in names)
    ids = torch.randint(1, 64, (2, 5))
    model(input_ids=ids, labels=ids, task_ids=torch.tensor([1, 15])).loss.backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == names
