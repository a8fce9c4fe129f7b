import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

# CPU always; CUDA cases are CUDA-only and run wherever a GPU is visible (the GPU check script).
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="CUDA-only")])]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close(actual, expected, *, atol, rtol, what=""):
    """Prints the max difference before asserting (causal-conv1d habit)."""
    print(f"{what} max diff {max_diff(actual, expected):.3e}")
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol)


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
