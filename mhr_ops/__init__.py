"""mhr_ops: fused kernels for routed adapters (Poly / MHR LoRA, mixture-of-LoRA experts, sparse
head gating). Ops are registered under ``torch.ops.mhr_ops``; see SPEC.md for their contract."""

from __future__ import annotations

import torch

from . import (
    _C,
    reference,  # noqa: F401
)
from .lora import mhr_linear, routed_lora
from .routing import route

__all__ = ["build_info", "mhr_linear", "reference", "route", "routed_lora"]
__version__ = _C.build_info()["version"]


def build_info() -> dict:
    """How this copy was built: version, torch versions (built against, running), whether CUDA
    kernels are compiled in and for which architectures, the CUTLASS version used (or None), and
    whether the CUDA kernels are registered for the CUDA dispatch key."""
    info = dict(_C.build_info())
    info["torch_version"] = torch.__version__
    info["cuda_kernels_registered"] = torch._C._dispatch_has_kernel_for_dispatch_key("mhr_ops::route", "CUDA")
    return info
