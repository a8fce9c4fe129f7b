"""task_lora_linear, the serving op of MHRLinear's kept mixed adapters (tests/test_serving.py covers
the module): F.linear(x, weight, bias) + (x @ A[t]) @ B[t] per row, against a float64 loop; opcheck;
errors naming the argument. Under MHR_OPS_EMULATED_CUDA=1 the CPU runs the composite the CUDA
backend takes (F.linear, then the emulated moe_lora_add_ kernel)."""

import pytest
import torch
from conftest import assert_close

import mhr_ops  # noqa: F401  (registers the ops)


def task_lora_reference(x, W, b, A, B, ids, rows_per_id):
    """float64: F.linear(x, W, b) + (x @ A[t]) @ B[t] per row; NaN rows for ids outside [0, T)."""
    rows = x.double().reshape(-1, x.shape[-1])
    per_row = ids.long().repeat_interleave(rows_per_id)
    y = rows @ W.double().T + (0 if b is None else b.double())
    for n, t in enumerate(per_row.tolist()):
        if 0 <= t < A.shape[0]:
            y[n] += (rows[n] @ A[t].double()) @ B[t].double()
        else:
            y[n] = float("nan")
    return y.reshape(*x.shape[:-1], W.shape[0])


@pytest.mark.parametrize(
    "lead,n_ids,dtype,bias,index",
    [
        ((1,), 1, torch.float32, True, torch.int64),
        ((9,), 9, torch.float32, True, torch.int32),
        ((40,), 20, torch.float32, False, torch.int64),
        ((3, 7), 3, torch.float64, True, torch.int64),
        ((2, 3, 5), 2, torch.float32, True, torch.int64),
        ((0,), 0, torch.float32, True, torch.int64),
        ((11,), 11, torch.bfloat16, True, torch.int64),
    ],
)
def test_task_lora_linear_matches_its_reference(lead, n_ids, dtype, bias, index):
    """The op on odd sizes, a non-contiguous x, int32 ids, repeated rows per id, leading dims,
    no rows, fp64, and half x (the composite path); out-of-range ids give NaN rows, only those."""
    torch.manual_seed(1)
    T, d_in, d_out, r = 5, 37, 29, 3
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    x = torch.randn(*lead, d_in * 2, dtype=dtype)[..., ::2]  # non-contiguous rows
    W, b = torch.randn(d_out, d_in, dtype=dtype), torch.randn(d_out, dtype=dtype) if bias else None
    A, B = torch.randn(T, d_in, r, dtype=ct), torch.randn(T, r, d_out, dtype=ct)
    ids = torch.randint(0, T, (n_ids,), dtype=index)
    if n_ids > 2:
        ids[1], ids[2] = T, -1
    rows_per_id = max(1, x.numel() // d_in // max(n_ids, 1)) if n_ids else 1
    y = torch.ops.mhr_ops.task_lora_linear(x, W, b, A, B, ids, rows_per_id)
    ref = task_lora_reference(x, W, b, A, B, ids, rows_per_id)
    assert y.shape == ref.shape and y.dtype == dtype
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(y), nan)
    tol = 5e-2 if dtype == torch.bfloat16 else 1e-4 if dtype == torch.float32 else 1e-10
    assert_close(y[~nan], ref[~nan], atol=tol, rtol=tol, what=f"task_lora_linear {lead} {dtype}")


def test_task_lora_linear_opcheck():
    torch.manual_seed(2)
    x, W, b = torch.randn(6, 2, 16), torch.randn(12, 16), torch.randn(12)
    A, B, ids = torch.randn(4, 16, 3), torch.randn(4, 3, 12), torch.tensor([3, 0, 1, 3, 2, 0])
    torch.library.opcheck(torch.ops.mhr_ops.task_lora_linear, (x, W, b, A, B, ids, 2))
    torch.library.opcheck(torch.ops.mhr_ops.task_lora_linear, (x[:, 0], W, None, A, B, ids, 1))


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(A=torch.randn(4, 16, 3, dtype=torch.float64)), r"A: expected dtype torch\.float32"),
        (dict(A=torch.randn(4, 15, 3)), r"A: expected shape \(T, 16, r\)"),
        (dict(B=torch.randn(4, 2, 12)), r"B: expected shape \(4, 3, d_out\)"),
        (dict(ids=torch.tensor([0, 1, 2])), r"task_ids: expected 6 / 1 ids for 6 rows, got 3"),
        (dict(ids=torch.zeros(6)), r"task_ids"),
        (dict(rows_per_id=0), r"rows_per_task_id: expected >= 1"),
        (dict(W=torch.randn(12, 17)), r"weight: expected shape \(12, 16\)"),
        (dict(x=torch.randn(16)), r"x: expected a 2-D tensor"),
    ],
)
def test_task_lora_linear_errors_name_the_argument(change, match):
    args = dict(x=torch.randn(6, 16), W=torch.randn(12, 16), b=torch.randn(12), A=torch.randn(4, 16, 3))
    args.update(B=torch.randn(4, 3, 12), ids=torch.tensor([3, 0, 1, 3, 2, 0]), rows_per_id=1)
    args.update(change)
    with pytest.raises(ValueError, match=match):
        torch.ops.mhr_ops.task_lora_linear(*args.values())


def test_task_lora_linear_is_bitwise_repeatable_and_compiles():
    """docs/API.md, Determinism: the same inputs give the same bits, called again and through
    torch.compile (aot_eager, dynamic shapes: the fake kernel's shapes) alike."""
    torch.manual_seed(3)
    W, b = torch.randn(24, 40), torch.randn(24)
    A, B = torch.randn(6, 40, 4), torch.randn(6, 4, 24)

    def fn(x, ids):
        return torch.ops.mhr_ops.task_lora_linear(x, W, b, A, B, ids, 1)

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True, dynamic=True)
    for n in (5, 33, 7):
        x, ids = torch.randn(n, 40), torch.randint(0, 6, (n,))
        eager = fn(x, ids)
        assert torch.equal(eager, fn(x, ids))
        assert torch.equal(eager, compiled(x, ids))
