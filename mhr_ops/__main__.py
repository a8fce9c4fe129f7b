"""Command line: ``python -m mhr_ops demo`` (the main job) and ``python -m mhr_ops bench``."""

from __future__ import annotations

import argparse
import json
import sys

import torch


def demo(args: argparse.Namespace) -> int:
    """Routes a PEFT Poly/MHR router's tasks with mhr_ops, checks the numbers against PEFT in eval
    and (same seed) train mode, and times both."""
    import mhr_ops
    from mhr_ops import benchmarks

    device = torch.device(args.device)
    print("mhr_ops", json.dumps(mhr_ops.build_info()))
    n_tasks, n_splits, n_skills, n_groups = 16, 8, 8, 64
    torch.manual_seed(args.seed)
    router = benchmarks._peft_router(n_tasks, n_splits, n_skills, device)
    with torch.no_grad():
        router.module_logits.normal_(0, 2)
    task_ids = torch.randint(0, n_tasks, (n_groups,), device=device)
    print(f"PEFT PolyRouter: {n_tasks} tasks, {n_splits} heads (n_splits) x {n_skills} skills, {n_groups} examples")

    router.eval()
    eval_diff = (mhr_ops.route(router.module_logits, task_ids, n_skills=n_skills) - router(task_ids, None)).abs().max()
    router.train()
    torch.manual_seed(args.seed + 1)
    peft_w = router(task_ids, None)
    torch.manual_seed(args.seed + 1)
    ours_w = mhr_ops.route(router.module_logits, task_ids, n_skills=n_skills, mode="relaxed_bernoulli")
    grad = torch.randn_like(peft_w)
    (g_peft,) = torch.autograd.grad(peft_w, router.module_logits, grad)
    (g_ours,) = torch.autograd.grad(ours_w, router.module_logits, grad)
    train_diff = (ours_w - peft_w).abs().max()
    grad_diff = (g_ours - g_peft).abs().max()
    print(f"  eval  (sigmoid)                  max |mhr_ops - PEFT| = {eval_diff:.2e}")
    print(f"  train (relaxed Bernoulli, seeded) max |mhr_ops - PEFT| = {train_diff:.2e}, d logits {grad_diff:.2e}")
    ok = max(eval_diff, train_diff) < 1e-5 and grad_diff < 1e-4
    print("  agreement with PEFT:", "OK" if ok else "MISMATCH")
    print()
    benchmarks.run(device, ["route"])
    return 0 if ok else 1


def bench(args: argparse.Namespace) -> int:
    from mhr_ops import benchmarks

    shapes = args.shapes.split(",") if args.shapes else None
    benchmarks.run(torch.device(args.device), shapes, json_path=args.json)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mhr_ops", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    p_demo = sub.add_parser("demo", help="check routing against PEFT and time it")
    p_demo.add_argument("--device", default=default_device)
    p_demo.add_argument("--seed", type=int, default=0)
    p_demo.set_defaults(func=demo)
    p_bench = sub.add_parser("bench", help="benchmark the ops against PEFT and the reference")
    p_bench.add_argument("--device", default=default_device)
    p_bench.add_argument("--shapes", default=None, help="comma-separated shape sets (default: the device's)")
    p_bench.add_argument("--json", default=None, help="write the results (commit, device, medians) here")
    p_bench.set_defaults(func=bench)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
