"""Model-level API: ``patch`` (swap nn.Linear for MHRLinear), MHR-z (``routing_only``), MHR-mu
(``average_skills``) and ``merge_task`` / ``unmerge``. The last three work on MHRLinear layers
and on PEFT Poly layers alike, through the same Parameters."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from ._adapted import RoutedAdapter
from .nn import GatedOutputProjection, MHRLinear, MoELoRALinear, MoHGate
from .peft import _poly_adapters


def _matches(name: str, target_modules) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def patch(
    model: nn.Module,
    target_modules: str | Sequence[str],
    *,
    r: int,
    n_skills: int,
    n_splits: int = 1,
    n_tasks: int,
    modules_to_save: str | Sequence[str] | None = None,
    **kwargs,
) -> nn.Module:
    """Swaps every ``nn.Linear`` of ``model`` whose name matches ``target_modules`` for an
    :class:`~mhr_ops.nn.MHRLinear` around it, in place, and returns the model.

    ``target_modules``: a regex (full match on the module's dotted name) or a list of names, each
    matching a module whose name is that name or ends with ``.name`` (PEFT's rule). Other keyword
    arguments go to MHRLinear (``alpha``, ``train_mode``, ``eval_mode``, ``top_k``,
    ``freeze_base``, ...).

    Freezing follows PEFT's ``get_peft_model`` (``bias="none"``): afterwards, in the whole model,
    only adapter parameters (``A``, ``B``, ``logits`` of every MHRLinear, and of PEFT Poly layers
    if any) and the modules named in ``modules_to_save`` require grad; every other parameter,
    biases included, is frozen. Adapter parameters keep their own ``requires_grad`` (new ones are
    trainable, as in PEFT). ``freeze_base=False`` additionally keeps the swapped layers' base
    weights trainable.

    ``modules_to_save``: module names matched like ``target_modules`` (a regex, or a list of
    names); every parameter of a matching module stays trainable. Unlike PEFT's
    ``ModulesToSaveWrapper``, the module is not copied: it is trained in place, so the model's
    structure and state-dict keys do not change (and a weight tied to another module, e.g.
    ``lm_head`` tied to the embeddings, is trained in both). A name matching no module raises."""
    saved = _modules_to_save(model, modules_to_save)
    targets = _target_linears(model, target_modules)
    for name, module in targets:
        adapted = MHRLinear(module, r=r, n_skills=n_skills, n_splits=n_splits, n_tasks=n_tasks, **kwargs)
        _swap(model, name, adapted)
    _freeze_like_peft(model, targets, saved, kwargs.get("freeze_base", True))
    return model


def _modules_to_save(model: nn.Module, modules_to_save) -> list[nn.Module]:
    if isinstance(modules_to_save, str) and not modules_to_save:
        raise ValueError("modules_to_save: expected a regex or a list of module names, got ''")
    saved = []
    if modules_to_save is not None:
        saved = [m for n, m in model.named_modules() if n and _matches(n, modules_to_save)]
        if not saved:
            raise ValueError(f"modules_to_save: {modules_to_save!r} matches no module of the model")
    return saved


def _target_linears(model: nn.Module, target_modules) -> list[tuple[str, nn.Linear]]:
    if isinstance(target_modules, str) and not target_modules:
        raise ValueError("target_modules: expected a regex or a list of module names, got ''")
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if name and isinstance(module, nn.Linear) and _matches(name, target_modules)
    ]
    if not targets:
        linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(
            f"target_modules: {target_modules!r} matches no nn.Linear of the model; its linear layers are "
            f"{linear[:12]}{' ...' if len(linear) > 12 else ''}"
        )
    return targets


def _swap(model: nn.Module, name: str, adapted: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    adapted._mhr_name = name  # errors name the layer
    setattr(parent, child, adapted)


def _freeze_like_peft(model: nn.Module, targets, saved: list[nn.Module], freeze_base) -> None:
    """PEFT's freezing: only adapter parameters (MHRLinear / PEFT Poly: A, B, logits;
    MoELoRALinear: A, B, router), the swapped layers' base weights when ``freeze_base`` is False,
    and the modules to save keep requires_grad."""
    keep = {id(p) for view in adapted_layers(model) for p in (view.A, view.B, view.logits)}
    for module in model.modules():
        if isinstance(module, MoELoRALinear):
            keep.update(id(p) for p in (module.A, module.B, *module.router.parameters()))
    if freeze_base is False:
        keep.update(id(p) for _, module in targets for p in module.parameters())
    _freeze_all_but(model, keep)
    for module in saved:
        module.requires_grad_(True)


def patch_moe_lora(
    model: nn.Module,
    target_modules: str | Sequence[str],
    *,
    n_experts: int,
    r: int,
    top_k: int,
    modules_to_save: str | Sequence[str] | None = None,
    **kwargs,
) -> nn.Module:
    """Swaps every ``nn.Linear`` of ``model`` whose name matches ``target_modules`` (as in
    :func:`patch`) for an :class:`~mhr_ops.nn.MoELoRALinear` around it, in place, and returns the
    model. Other keyword arguments (``alpha``, ``router``, ``freeze_base``, ``adapter_dtype``) go
    to MoELoRALinear. Freezing as :func:`patch` (PEFT's ``get_peft_model``): afterwards only the
    adapter parameters (``A``, ``B`` and ``router.weight`` of every MoELoRALinear, and the
    adapters of MHR / PEFT Poly layers if any) and the modules named in ``modules_to_save``
    require grad, in the whole model."""
    saved = _modules_to_save(model, modules_to_save)
    targets = _target_linears(model, target_modules)
    for name, module in targets:
        _swap(model, name, MoELoRALinear(module, n_experts=n_experts, r=r, top_k=top_k, **kwargs))
    _freeze_like_peft(model, targets, saved, kwargs.get("freeze_base", True))
    return model


def moe_aux_loss(model: nn.Module) -> torch.Tensor:
    """The sum over ``model``'s MoELoRALinear layers of the load-balancing loss of their last
    forward (``last_aux_loss``); layers that have not run yet are skipped. Raises ValueError for a
    model without MoELoRALinear layers."""
    layers = [m for m in model.modules() if isinstance(m, MoELoRALinear)]
    if not layers:
        raise ValueError("model: no MoELoRALinear layers found (use mhr_ops.patch_moe_lora)")
    losses = [m.last_aux_loss for m in layers if m.last_aux_loss is not None]
    if not losses:
        return torch.zeros((), device=layers[0].A.device)
    return torch.stack([loss.float() for loss in losses]).sum()


def _freeze_all_but(model: nn.Module, keep: set[int]) -> None:
    """``requires_grad_(False)`` on every parameter of ``model`` whose id is not in ``keep``."""
    for param in model.parameters():
        if id(param) not in keep:
            param.requires_grad_(False)


def adapted_layers(model: nn.Module) -> Iterator[RoutedAdapter]:
    """A view onto every adapter of ``model``: MHRLinear modules, and the active adapters of PEFT
    Poly Linear layers."""
    peft_linear = None
    try:
        from peft.tuners.poly.layer import Linear as peft_linear
    except ImportError:
        pass
    for module in model.modules():
        if isinstance(module, MHRLinear):
            yield module._adapter()
        elif peft_linear is not None and isinstance(module, peft_linear):
            yield from _poly_adapters(module)


def _layers_or_raise(model: nn.Module) -> list[RoutedAdapter]:
    layers = list(adapted_layers(model))
    if not layers:
        raise ValueError("model: no adapted layers (MHRLinear or PEFT Poly) found")
    return layers


def routing_only(model: nn.Module, n_tasks: int | None = None) -> nn.Module:
    """MHR-z: afterwards only the routing logits require grad, in the whole model: the skills
    (A, B), the base weights and every other parameter (also PEFT ``modules_to_save`` copies and
    previously unfrozen modules) are frozen, for patched and PEFT models alike. With ``n_tasks``,
    every layer gets fresh logits for that many new tasks, uniform in +-1e-3 (mttl's init)."""
    if n_tasks is not None and (isinstance(n_tasks, bool) or not isinstance(n_tasks, int) or n_tasks < 1):
        raise ValueError(f"n_tasks: expected an int >= 1, got {n_tasks!r}")
    layers = _layers_or_raise(model)
    _freeze_all_but(model, set())
    for view in layers:
        logits = view.logits
        if n_tasks is not None:
            fresh = torch.empty(n_tasks, logits.shape[1], device=logits.device, dtype=logits.dtype)
            view.replace("logits", fresh.uniform_(-1e-3, 1e-3))
            view.set_counts(n_tasks=n_tasks)
        view.logits.requires_grad_(True)
    return model


@torch.no_grad()
def average_skills(model: nn.Module) -> nn.Module:
    """MHR-mu: collapse each inventory to its average adapter (one skill per head: the mean of A
    and of B over skills), to fine-tune as a single LoRA: A and B become trainable, the routing
    logits frozen. Routing becomes ``average`` (a constant 1 on the single skill) for MHRLinear;
    PEFT layers keep their router, whose normalized weight over one skill is 1 up to eps."""
    for view in _layers_or_raise(model):
        for what in ("A", "B"):
            view.replace(what, view.param(what).mean(dim=1, keepdim=True).contiguous())
            view.param(what).requires_grad_(True)
        logits = view.logits
        view.replace("logits", logits.new_zeros(logits.shape[0], view.A.shape[0]))
        view.logits.requires_grad_(False)
        view.set_counts(n_skills=1)
        view.use_average_routing()
    return model


def merge_task(model: nn.Module, task_id: int) -> nn.Module:
    """Folds task ``task_id``'s mixed adapter (eval-mode routing) into each adapted layer's base
    weight, for zero-overhead single-task inference. While merged, a layer runs only its base
    and raises if asked for another task. :func:`unmerge` restores the weights."""
    layers = _layers_or_raise(model)
    for view in layers:
        if view.merged_task is not None:
            raise RuntimeError("merge_task: a task is already merged; call mhr_ops.unmerge(model) first")
        n_tasks = view.logits.shape[0]
        if isinstance(task_id, bool) or not isinstance(task_id, int) or not 0 <= task_id < n_tasks:
            raise ValueError(f"task_id: expected an int in [0, {n_tasks}), got {task_id!r}")
    with torch.no_grad():
        for view in layers:
            weight = view.base_layer.weight
            weight.copy_((weight.float() + view.task_delta(task_id)).to(weight.dtype))
            view.merged_task = task_id
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undoes :func:`merge_task`: subtracts the merged task's adapter from each base weight (exact
    up to fp32 rounding; bf16 weights come back within bf16 rounding of the original)."""
    with torch.no_grad():
        for view in _layers_or_raise(model):
            task_id = view.merged_task
            if task_id is None:
                continue
            weight = view.base_layer.weight
            weight.copy_((weight.float() - view.task_delta(task_id)).to(weight.dtype))
            view.merged_task = None
    return model


def patch_moh(model: nn.Module, *, n_shared: int, top_k: int, router: str = "linear") -> nn.Module:
    """Turns the self-attention of a Llama-family model (modules with ``q_proj`` / ``o_proj`` and
    a ``head_dim``, as in transformers) into Mixture-of-Head attention, in place: each ``o_proj``
    becomes a :class:`~mhr_ops.nn.GatedOutputProjection` whose :class:`~mhr_ops.nn.MoHGate`
    reads the attention's input (``router="linear"``) or its query states (``"qnorm"``) through
    a hook on ``q_proj``. ``n_shared`` heads are always on; ``top_k`` of the others per token.
    With ``top_k`` = all routed heads and a fresh linear router whose routed weights are zeroed,
    every gate is 1 and the model computes what it did before."""
    patched = 0
    for module in list(model.modules()):
        if not all(hasattr(module, a) for a in ("q_proj", "o_proj", "head_dim")) or not isinstance(
            module.o_proj, nn.Linear
        ):
            continue
        n_heads = module.o_proj.in_features // module.head_dim
        d_model = module.q_proj.in_features
        ref = module.o_proj.weight
        gate = MoHGate(d_model, n_heads, n_shared=n_shared, top_k=top_k, router=router).to(ref.device, ref.dtype)
        proj = GatedOutputProjection(module.o_proj, gate, module.head_dim)
        module.o_proj = proj

        def hook(q_proj, inputs, output, proj=proj, qnorm=router == "qnorm"):
            proj.router_input = output.view(*output.shape[:-1], -1, proj.head_dim) if qnorm else inputs[0]

        module.q_proj.register_forward_hook(hook)
        patched += 1
    if not patched:
        raise ValueError("model: no attention modules with q_proj / o_proj / head_dim found to patch")
    return model
