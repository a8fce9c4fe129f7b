"""Argument validation shared by the public functions: every error names the argument, what was
expected and what came (docs/API.md, Errors)."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the ops compute and accumulate in for data of ``dtype``: fp32, fp64 for fp64 (the C++
    side of the rule: csrc/torch/torch_to_kernel.h, csrc/kernels/common.h)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


INDEX_DTYPES = (torch.int32, torch.int64)


def check_tensor(t, name: str, *, ndim: int | None = None, dtypes=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name}: expected dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")


def check_same_device(t: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name}: expected a tensor on {ref.device} (the device of {ref_name}), got {t.device}")


def check_int(value, name: str, *, low: int | None = None, high: int | None = None, what: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name}: expected {bounds}{what}, got {value}")
    return value


def check_scale(scale) -> float:
    """A Python number (the ops take ``scale`` as a float)."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale: expected a float, got {type(scale).__name__}")
    return float(scale)


def as_index_tensor(ids, name: str, device: torch.device) -> torch.Tensor:
    """A tensor of ids (int32/int64) as given, or a Python sequence of ints moved to `device`."""
    if not isinstance(ids, torch.Tensor):
        try:
            ids = torch.as_tensor(ids, dtype=torch.int64, device=device)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"{name}: expected an int tensor or a sequence of ints, got {type(ids).__name__}") from exc
    check_tensor(ids, name, dtypes=INDEX_DTYPES)
    return ids


def check_id_range(ids: torch.Tensor, name: str, upper: int, what: str) -> None:
    """Raises when an id is outside [0, upper). Synchronizes with the device (one .item() pair),
    so callers that check once per forward pass `check_ids=False` to the per-layer ops; under
    torch.compile the check is skipped (the kernels guard every index)."""
    if ids.numel() == 0 or torch.compiler.is_compiling():
        return
    lo, hi = torch.aminmax(ids)
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= upper:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name}: expected {what} ids in [0, {upper}), got {bad}")


def check_out(out: torch.Tensor, shape: tuple, x: torch.Tensor) -> None:
    """An ``out=`` tensor of an op that adds into it: the op's output shape, x's dtype and device."""
    check_tensor(out, "out")
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"out: expected shape {tuple(shape)}, got {tuple(out.shape)}")
    if out.dtype != x.dtype:
        raise ValueError(f"out: expected dtype {x.dtype} (x's dtype), got {out.dtype}")
    check_same_device(out, "out", x, "x")
