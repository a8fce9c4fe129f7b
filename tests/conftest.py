import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

# MHR_OPS_EMULATED_CUDA=1: the CUDA binding layer and kernels, built for the host through the SIMT
# emulation (setup.py with MHR_OPS_EMULATED_CUDA=1), stand in for the CPU kernels of every op in
# this process, so the "cpu" cases run the CUDA code (README, "Testing the CUDA kernels without a
# GPU"). Tests of the CPU kernels themselves carry @pytest.mark.cpu_kernels("why") and are
# deselected then.
EMULATED_CUDA = os.environ.get("MHR_OPS_EMULATED_CUDA", "").strip().lower() not in ("", "0", "false", "no", "off")
if EMULATED_CUDA:
    import mhr_ops  # the CPU registrations first: the emulated ones override them

    try:
        import mhr_ops._emulated_cuda  # noqa: F401
    except ImportError as e:
        raise pytest.UsageError(
            "MHR_OPS_EMULATED_CUDA=1, but mhr_ops._emulated_cuda is not built: run "
            "MHR_OPS_EMULATED_CUDA=1 python setup.py build_ext --inplace"
        ) from e
    # Every op with a CUDA registration must now run it for CPU tensors (mhr_linear: the composite
    # CUDA tensors take), or the run would test the CPU kernels under another name.
    for op in (
        "route",
        "route_backward",
        "routed_lora",
        "routed_lora_add_",
        "routed_lora_backward",
        "mhr_linear",
        "mhr_linear_backward",
        "head_gates",
        "head_gates_backward",
        "gated_head_proj",
        "moe_lora",
        "moe_lora_add_",
        "moe_lora_backward",
        "task_lora_linear",
    ):
        cpu = [line for line in torch._C._dispatch_dump_table(f"mhr_ops::{op}").splitlines() if line.startswith("CPU:")]
        if not cpu or not any(f in cpu[0] for f in ("_cuda.cpp", "mhr_linear.cpp", "task_lora_linear.cpp")):
            raise pytest.UsageError(
                f"MHR_OPS_EMULATED_CUDA=1: mhr_ops::{op} on CPU is not the emulated CUDA kernel: {cpu}"
            )


def pytest_collection_modifyitems(config, items):
    if not EMULATED_CUDA:
        return
    deselected = [item for item in items if item.get_closest_marker("cpu_kernels")]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if not item.get_closest_marker("cpu_kernels")]
        reasons = sorted({item.get_closest_marker("cpu_kernels").args[0] for item in deselected})
        config._mhr_ops_deselected = (len(deselected), reasons)


def pytest_report_header(config):
    if EMULATED_CUDA:
        return "mhr_ops: CPU tensors run the emulated CUDA kernels (MHR_OPS_EMULATED_CUDA=1)"
    return None


def pytest_terminal_summary(terminalreporter, config):
    found = getattr(config, "_mhr_ops_deselected", None)
    if found:
        terminalreporter.write_line(f"mhr_ops: {found[0]} tests of the CPU kernels deselected under the emulation:")
        for reason in found[1]:
            terminalreporter.write_line(f"  - {reason}")


# CPU always; CUDA cases are CUDA-only and run wherever a GPU is visible (the GPU check script).
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="CUDA-only")])]


# (x dtype, adapter dtype): every pairing the adapter ops (routed_lora, mhr_linear, moe_lora) take.
ADAPTER_DTYPES = [
    (torch.float32, torch.float32),
    (torch.float64, torch.float64),
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float16),
    (torch.float16, torch.float32),
]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close(actual, expected, *, atol, rtol, what=""):
    """Prints the max difference before asserting (causal-conv1d habit)."""
    print(f"{what} max diff {max_diff(actual, expected):.3e}")
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol)


def assert_backward_close(y, ref, inputs, ref_inputs, *, tol: float, what: str):
    """Backpropagates one random float64 grad_y through ``y`` (in its dtype) and its float64
    reference ``ref``; each input's grad must match its reference's within ``tol``, relative to the
    reference grad's scale."""
    gy = torch.randn_like(ref)
    y.backward(gy.to(y.dtype))
    ref.backward(gy)
    for a, r in zip(inputs, ref_inputs, strict=True):
        assert_close(a.grad, r.grad, atol=tol * max(1.0, r.grad.abs().max().item()), rtol=tol, what=f"{what} grad")


def scale_and_out_errors(out_shape: tuple) -> list:
    """``bad_input_test`` cases every adapter op shares: a non-number scale, and an ``out`` of the
    wrong last dim or dtype (the right shape is ``out_shape``, fp32)."""
    shown = ", ".join(map(str, out_shape))
    return [
        (dict(scale="0.5"), TypeError, "scale: expected a float"),
        (dict(out=torch.zeros(*out_shape[:-1], out_shape[-1] - 1)), ValueError, rf"out: expected shape \({shown}\)"),
        (dict(out=torch.zeros(*out_shape, dtype=torch.float64)), ValueError, "out: expected dtype"),
    ]


def bad_input_test(fn, good, positional: tuple, cases: list):
    """A test over ``cases`` (``(override, exception, match)``): ``fn`` on ``good()`` with the
    override applied (the names in ``positional`` passed by position, the rest by keyword, ``scale``
    0.5 unless given) must raise the exception, its message matching."""

    @pytest.mark.parametrize("override,exc,match", cases)
    def test(override, exc, match):
        kw = {**good(), **override}
        kw.setdefault("scale", 0.5)
        args = [kw.pop(k) for k in positional]
        with pytest.raises(exc, match=match):
            fn(*args, **kw)

    return test


def tiny_llama(seed: int | None = 0):
    """A 2-layer Llama built from a config (nothing downloaded); seeded when seed is not None."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if seed is not None:
        torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config)
