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
