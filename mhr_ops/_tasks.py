"""Task ids for adapted layers: given per call, or for every layer of a model at once with
``use_tasks``. Ids are range-checked once per tensor (so once per forward, not once per layer) and
follow batch expansion (``generate`` with beams / ``num_return_sequences`` repeats each example)."""

from __future__ import annotations

import contextlib
import weakref

import torch

from ._checks import INDEX_DTYPES, as_index_tensor, check_id_range

# Ids tensors already range-checked against a task count: id(tensor) -> (weakref, n_tasks).
_checked: dict[int, tuple[weakref.ref, int]] = {}


def _check_once(ids: torch.Tensor, n_tasks: int) -> None:
    entry = _checked.get(id(ids))
    if entry is not None and entry[0]() is ids and entry[1] <= n_tasks:
        return
    check_id_range(ids, "task_ids", n_tasks, "task")
    if not torch.compiler.is_compiling():
        key = id(ids)
        _checked[key] = (weakref.ref(ids, lambda _, key=key: _checked.pop(key, None)), n_tasks)


def ids_checked_once(ids: torch.Tensor, n_tasks: int) -> bool:
    """For a layer's serving fast path: ``ids`` (a 1-D tensor) range-checked against ``n_tasks``,
    once per tensor as :func:`resolve_task_ids` does; on the common hit, one dict lookup and no
    other work. False for a tensor that is not an index tensor: the caller's general path then
    raises the error that names ``task_ids``."""
    entry = _checked.get(id(ids))
    if entry is not None and entry[0]() is ids and entry[1] <= n_tasks:
        return True
    if ids.dtype not in INDEX_DTYPES:
        return False
    _check_once(ids, n_tasks)
    return True


_merged_checked: dict[tuple[int, int], weakref.ref] = {}


def check_merged_task_once(ids: torch.Tensor, merged_task: int, layer: str) -> None:
    """Raises unless every id is the merged task; once per ids tensor (one device read-back)."""
    key = (id(ids), merged_task)
    ref = _merged_checked.get(key)
    if (ref is not None and ref() is ids) or torch.compiler.is_compiling():
        return
    if bool((ids != merged_task).any()):
        raise RuntimeError(
            f"{layer}: task {merged_task} is merged into the base weight; call mhr_ops.unmerge(model) "
            "before running other tasks"
        )
    _merged_checked[key] = weakref.ref(ids, lambda _, key=key: _merged_checked.pop(key, None))


def resolve_task_ids(module: torch.nn.Module, task_ids, x: torch.Tensor, n_tasks: int) -> torch.Tensor:
    """The ids an adapted layer uses for input ``x``: the explicit ``task_ids``, else the ones set
    by ``use_tasks``; one per example (``x.shape[0]``), repeated when the batch was expanded."""
    if task_ids is None:
        task_ids = getattr(module, "_mhr_task_ids", None)
    if task_ids is None:
        name = module.__dict__.get("_mhr_name")
        layer = f"{type(module).__name__} {name!r}" if name else type(module).__name__
        raise ValueError(
            f"task_ids: layer {layer} needs task ids: pass task_ids=... or run the model inside "
            "`with mhr_ops.use_tasks(model, task_ids):`"
        )
    ids = as_index_tensor(task_ids, "task_ids", x.device)
    if ids.dim() != 1:
        raise ValueError(f"task_ids: expected a 1-D tensor with one id per example, got shape {tuple(ids.shape)}")
    _check_once(ids, n_tasks)
    if ids.device != x.device:
        ids = ids.to(x.device, non_blocking=True)
    batch = x.shape[0] if x.dim() > 1 else 1
    if ids.shape[0] != batch:
        if ids.shape[0] == 0 or batch % ids.shape[0] != 0:
            raise ValueError(
                f"task_ids: expected one id per example ({batch}) or a divisor of it (expanded batches), "
                f"got {ids.shape[0]} ids"
            )
        ids = ids.repeat_interleave(batch // ids.shape[0])
    return ids


@contextlib.contextmanager
def use_tasks(model: torch.nn.Module, task_ids):
    """Within the block, every adapted layer of ``model`` (MHRLinear, and PEFT Poly layers that
    mhr_ops accelerates) uses ``task_ids`` (one per example) unless a call passes its own.

    The ids are range-checked here once, against the smallest task count among the layers.
    Works for ``forward`` and ``generate``: beams and ``num_return_sequences`` expand the batch
    by repeating each example, and the ids follow."""
    layers = [m for m in model.modules() if hasattr(m, "_mhr_n_tasks")]
    if not layers:
        raise ValueError("model: no mhr_ops-adapted layers found (use mhr_ops.patch or mhr_ops.peft.accelerate)")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    ids = as_index_tensor(task_ids, "task_ids", device)
    _check_once(ids, min(m._mhr_n_tasks() for m in layers))
    previous = [getattr(m, "_mhr_task_ids", None) for m in layers]
    for m in layers:
        m._mhr_task_ids = ids
    try:
        yield model
    finally:
        for m, prev in zip(layers, previous, strict=True):
            m._mhr_task_ids = prev
