"""mhr_ops.peft on real model code: tiny T5 (encoder-decoder) and Llama (decoder) built from
transformers configs (nothing downloaded), with PEFT Poly/MHR on the attention projections.
PEFT vs accelerated: same logits, loss and gradients, train mode with the same seed, generate with
beams, save/load round trips, global enable/disable, MHR-z / MHR-mu / merge on PEFT layers."""

import copy

import pytest
import torch
from conftest import tiny_llama

import mhr_ops
import mhr_ops.peft as mpeft

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def tiny_t5():
    config = transformers.T5Config(
        vocab_size=64,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return transformers.T5ForConditionalGeneration(config), "SEQ_2_SEQ_LM", ["q", "v"]


def llama_for_poly():
    return tiny_llama(seed=None), "CAUSAL_LM", ["q_proj", "v_proj"]


MODELS = {"t5": tiny_t5, "llama": llama_for_poly}


def poly_model(kind, seed=0, n_tasks=5):
    torch.manual_seed(seed)
    base, task_type, targets = MODELS[kind]()
    config = peft.PolyConfig(task_type=task_type, r=4, n_tasks=n_tasks, n_skills=3, n_splits=2, target_modules=targets)
    model = peft.get_peft_model(base, config)
    with torch.no_grad():  # PEFT zero-inits B; make the adapters matter
        for name, p in model.named_parameters():
            if "poly_lora_B" in name or "module_logits" in name:
                p.normal_(0, 0.5)
    return model


def batch(kind, bs=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    inputs = dict(input_ids=torch.randint(3, 64, (bs, 9), generator=gen))
    inputs["labels"] = torch.randint(3, 64, (bs, 6 if kind == "t5" else 9), generator=gen)
    return inputs, torch.randint(0, 5, (bs,), generator=gen)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["t5", "llama"])
@pytest.mark.parametrize("train", [False, True])
def test_accelerated_matches_peft(kind, train):
    reference = poly_model(kind)
    ours = mpeft.accelerate(copy.deepcopy(reference))
    assert ours.state_dict().keys() == reference.state_dict().keys()
    inputs, task_ids = batch(kind)
    for m in (reference, ours):
        m.train(train)
        for mod in m.modules():  # no dropout, so the only randomness is the routing noise
            if isinstance(mod, torch.nn.Dropout):
                mod.p = 0.0
    torch.manual_seed(11)
    out_ref = reference(**inputs, task_ids=task_ids)
    out_ref.loss.backward()
    torch.manual_seed(11)
    out = ours(**inputs, task_ids=task_ids)
    out.loss.backward()
    torch.testing.assert_close(out.logits, out_ref.logits, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(out.loss, out_ref.loss, atol=2e-5, rtol=2e-5)
    g_ref, g = grads(reference), grads(ours)
    assert g.keys() == g_ref.keys() and any("poly_lora_A" in k for k in g)
    for k in g:
        torch.testing.assert_close(g[k], g_ref[k], atol=5e-5, rtol=5e-4, msg=k)


@pytest.mark.parametrize("kind", ["t5", "llama"])
def test_generate_with_beams(kind):
    model = mpeft.accelerate(poly_model(kind)).eval()
    inputs, task_ids = batch(kind, bs=2)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    out = model.generate(input_ids=inputs["input_ids"], task_ids=task_ids, num_beams=3, num_return_sequences=2, **kw)
    assert out.shape[0] == 4
    # each example decoded alone with its own task gives the same beams
    for i in range(2):
        single = model.generate(
            input_ids=inputs["input_ids"][i : i + 1],
            task_ids=task_ids[i : i + 1],
            num_beams=3,
            num_return_sequences=2,
            **kw,
        )
        torch.testing.assert_close(out[2 * i : 2 * i + 2, : single.shape[1]], single)
    # and with the task ids given once for the whole model
    with mhr_ops.use_tasks(model, task_ids):
        ctx = model.generate(input_ids=inputs["input_ids"], num_beams=3, num_return_sequences=2, **kw)
    torch.testing.assert_close(ctx, out)


@pytest.mark.parametrize("kind", ["t5", "llama"])
def test_save_load_round_trip(kind, tmp_path):
    model = poly_model(kind)
    inputs, task_ids = batch(kind)
    model.eval()
    expected = model(**inputs, task_ids=task_ids).logits
    model.save_pretrained(tmp_path / "peft")

    def same_base():  # the base model as poly_model built it (same seed); adapters come from disk
        torch.manual_seed(0)
        return MODELS[kind]()[0]

    loaded = peft.PeftModel.from_pretrained(same_base(), tmp_path / "peft").eval()
    mpeft.accelerate(loaded)
    torch.testing.assert_close(loaded(**inputs, task_ids=task_ids).logits, expected, atol=2e-5, rtol=2e-5)
    loaded.save_pretrained(tmp_path / "ours")  # back to PEFT: the same files, readable by plain PEFT
    back = peft.PeftModel.from_pretrained(same_base(), tmp_path / "ours").eval()
    assert all("forward" not in m.__dict__ for m in back.modules())  # PEFT's own forward
    torch.testing.assert_close(back(**inputs, task_ids=task_ids).logits, expected, atol=2e-5, rtol=2e-5)


def test_global_enable_disable():
    from peft.tuners.poly.layer import Linear as PolyLinear

    reference = poly_model("llama").eval()
    model = copy.deepcopy(reference)
    inputs, task_ids = batch("llama")
    original = PolyLinear.forward
    try:
        mpeft.enable()
        assert PolyLinear.forward is mpeft.accelerated_forward and mpeft.is_enabled()
        with mhr_ops.use_tasks(model, task_ids):  # use_tasks works on PEFT layers once enabled
            got = model(**inputs).logits
    finally:
        mpeft.disable()
    assert PolyLinear.forward is original and not mpeft.is_enabled()
    torch.testing.assert_close(got, reference(**inputs, task_ids=task_ids).logits, atol=2e-5, rtol=2e-5)


def test_routing_only_average_and_merge_on_peft_layers():
    model = mpeft.accelerate(poly_model("llama")).eval()
    inputs, task_ids = batch("llama")
    mhr_ops.routing_only(model, n_tasks=8)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("module_logits" in n for n in trainable)
    assert all(p.shape[0] == 8 for n, p in model.named_parameters() if "module_logits" in n)
    expected = model(**inputs, task_ids=torch.full((3,), 7)).logits
    mhr_ops.merge_task(model, 7)
    merged = model(**inputs, task_ids=torch.full((3,), 7)).logits
    torch.testing.assert_close(merged, expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(RuntimeError, match="task 7 is merged"):
        model(**inputs, task_ids=torch.tensor([7, 1, 7]))
    mhr_ops.unmerge(model)
    torch.testing.assert_close(model(**inputs, task_ids=torch.full((3,), 7)).logits, expected, atol=1e-5, rtol=1e-5)
    mhr_ops.average_skills(model)
    assert all(p.shape[1] == 1 for n, p in model.named_parameters() if "poly_lora_A" in n)
    model(**inputs, task_ids=task_ids).loss.backward()


def test_accelerate_needs_poly_layers():
    with pytest.raises(ValueError, match="no PEFT Poly layers"):
        mpeft.accelerate(torch.nn.Linear(2, 2))
