"""The named shape sets of ``python -m mhr_ops bench --shapes NAME``. Each has a kind (which case
family runs it), a one-line description (shown by ``bench --help``) and its sizes."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ShapeSet:
    name: str
    kind: str  # "linear", "route", "moh", "moe" or "serve"
    description: str
    params: dict = field(default_factory=dict)


_SETS = [
    # Linear cases: x [bs, L, d_in] -> d_out, r, S skills, h heads, T tasks.
    ShapeSet(
        "cpu-small",
        "linear",
        "one adapted layer, x [8, 256, 1024] -> 1024, r 8, S 8, h 8, fp32: eval fwd and train fwd+bwd",
        dict(bs=8, L=256, d_in=1024, d_out=1024, r=8, S=8, h=8, T=16, dtype="float32"),
    ),
    ShapeSet(
        "serve",
        "serve",
        "CPU serving latency: eval layer d 1024, r 8, S 8, h 8, N = 1 / 8 / 64 rows, 4096 rows over 16 tasks; "
        "plus the train-mode overhead per layer at N 8",
        dict(d=1024, r=8, S=8, h=8, T=16, dtype="float32", rows=(1, 8, 64, 4096), train_rows=8),
    ),
    ShapeSet(
        "gpu-train",
        "linear",
        "one adapted layer, x [16, 512, 4096] -> 4096, r 16, S 8, h 8, bf16 (plus the adapter roofline)",
        dict(bs=16, L=512, d_in=4096, d_out=4096, r=16, S=8, h=8, T=16, dtype="bfloat16"),
    ),
    ShapeSet(
        "gpu-decode",
        "linear",
        "decode: 256 single-token rows over 64 tasks, d 4096, r 16, bf16",
        dict(bs=256, L=1, d_in=4096, d_out=4096, r=16, S=8, h=8, T=64, dtype="bfloat16"),
    ),
    ShapeSet(
        "t0-mhr",
        "linear",
        "the MHR paper's T0 recipe: rank 1, 64 heads, 8 skills, x [8, 512, 2048], bf16",
        dict(bs=8, L=512, d_in=2048, d_out=2048, r=1, S=8, h=64, T=16, dtype="bfloat16"),
    ),
    ShapeSet(
        "route",
        "route",
        "the routing op alone vs PEFT's PolyRouter: T 64, h 8, S 8, 256 groups",
        dict(T=64, h=8, S=8, G=256),
    ),
    ShapeSet(
        "moh",
        "moh",
        "Mixture-of-Head output projection, N 8192, 32 heads of 128 (16 shared + top-8 of 16), bf16",
        dict(N=8192, H=32, Dh=128, D=4096, n_shared=16, top_k=8, dtype="bfloat16"),
    ),
    ShapeSet(
        "moh-cpu",
        "moh",
        "Mixture-of-Head output projection, N 1024, 16 heads of 64 (8 shared + top-4 of 8), fp32",
        dict(N=1024, H=16, Dh=64, D=1024, n_shared=8, top_k=4, dtype="float32"),
    ),
    ShapeSet(
        "moe",
        "moe",
        "mixture of LoRA experts, N 2048, d 1024 -> 1024, E 8, top-2, r 8, fp32: base + moe_lora vs gather + bmm "
        "vs dense einsum + mask, fwd and fwd+bwd",
        dict(N=2048, d_in=1024, d_out=1024, E=8, k=2, r=8, dtype="float32"),
    ),
    ShapeSet(
        "gpu-moe",
        "moe",
        "mixture of LoRA experts on GPU, N 8192 (gpu-train's 16 x 512 tokens), d 4096 -> 4096 (a 7B model's "
        "projection), E 8, top-2, r 16 (MixLoRA-sized experts), bf16",
        dict(N=8192, d_in=4096, d_out=4096, E=8, k=2, r=16, dtype="bfloat16"),
    ),
    ShapeSet(
        "moe-small",
        "moe",
        "mixture of LoRA experts, N 256, d 512 -> 512, E 8, top-2, r 8, fp32 (decode-sized batches)",
        dict(N=256, d_in=512, d_out=512, E=8, k=2, r=8, dtype="float32"),
    ),
]
SHAPE_SETS: dict[str, ShapeSet] = {s.name: s for s in _SETS}
DEFAULT_SHAPES: dict[str, list[str]] = {
    "cpu": ["cpu-small", "serve", "route", "moh-cpu"],
    "cuda": ["gpu-train", "gpu-decode", "t0-mhr", "route", "moh", "gpu-moe"],
}


def resolve(names: list[str] | None, device_type: str) -> list[ShapeSet]:
    """The shape sets to run: ``names``, or the device's default. Raises ValueError naming the
    unknown ones."""
    names = names or DEFAULT_SHAPES.get(device_type, DEFAULT_SHAPES["cpu"])
    unknown = [n for n in names if n not in SHAPE_SETS]
    if unknown:
        raise ValueError(f"unknown shape set(s) {', '.join(unknown)}; known: {', '.join(SHAPE_SETS)}")
    return [SHAPE_SETS[n] for n in names]
