"""mhr_ops: fused kernels for routed adapters (Poly / MHR LoRA, mixture-of-LoRA experts, sparse
head gating). Ops are registered under ``torch.ops.mhr_ops``; see docs/API.md for their contract."""

from __future__ import annotations

import torch

from . import _C, nn, peft, reference
from ._tasks import use_tasks
from .lora import mhr_linear, routed_lora
from .moe import moe_lora, moe_lora_linear
from .moh import gated_head_proj, head_gates, load_balance_loss
from .patching import (
    average_skills,
    merge_task,
    moe_aux_loss,
    patch,
    patch_moe_lora,
    patch_moh,
    routing_only,
    unmerge,
)
from .routing import route

__all__ = [
    "average_skills",
    "build_info",
    "gated_head_proj",
    "head_gates",
    "load_balance_loss",
    "merge_task",
    "mhr_linear",
    "moe_aux_loss",
    "moe_lora",
    "moe_lora_linear",
    "nn",
    "patch",
    "patch_moe_lora",
    "patch_moh",
    "peft",
    "reference",
    "route",
    "routed_lora",
    "routing_only",
    "unmerge",
    "use_tasks",
]
__version__ = _C.build_info()["version"]


def build_info() -> dict:
    """How this copy was built: version, torch versions (built against, running), whether CUDA
    kernels are compiled in and for which architectures, the CUTLASS version used (or None),
    whether the C++ code was built with OpenMP (its parallel loops use threads), and whether the
    CUDA kernels are registered for the CUDA dispatch key; ``commit``: the git commit of the source
    tree it was built from (``-dirty`` appended, uncommitted changes) as setup.py stamped it in
    ``mhr_ops/_build_meta.py``, or a sentence saying why it is unknown."""
    info = dict(_C.build_info())
    try:
        from . import _build_meta
    except ImportError:
        info["commit"] = "unknown (mhr_ops/_build_meta.py is missing: built without setup.py)"
    else:
        info["commit"] = _build_meta.COMMIT + ("-dirty" if _build_meta.DIRTY else "")
    info["torch_version"] = torch.__version__
    info["cuda_kernels_registered"] = torch._C._dispatch_has_kernel_for_dispatch_key("mhr_ops::route", "CUDA")
    return info
