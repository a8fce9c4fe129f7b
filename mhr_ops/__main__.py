"""Command line: ``python -m mhr_ops demo`` (the main job) and ``python -m mhr_ops bench``."""

from __future__ import annotations

import argparse
import sys

import torch


def demo(args: argparse.Namespace) -> int:
    from mhr_ops import demo as demo_module

    return demo_module.run(torch.device(args.device), steps=args.steps, seed=args.seed)


def bench(args: argparse.Namespace) -> int:
    from mhr_ops import benchmarks

    shapes = args.shapes.split(",") if args.shapes else None
    device = torch.device(args.device)
    json_path = args.json or f"mhr_ops-bench-{device.type}.json"
    png_path = args.png or f"mhr_ops-bench-{device.type}.png"
    benchmarks.run(device, shapes, json_path=json_path, png_path=png_path)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mhr_ops", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    p_demo = sub.add_parser("demo", help="multi-task MHR fine-tuning of a small transformer, vs PEFT")
    p_demo.add_argument("--device", default=default_device)
    p_demo.add_argument("--steps", type=int, default=150)
    p_demo.add_argument("--seed", type=int, default=0)
    p_demo.set_defaults(func=demo)
    p_bench = sub.add_parser("bench", help="benchmark the ops against PEFT and the reference")
    p_bench.add_argument("--device", default=default_device)
    p_bench.add_argument("--shapes", default=None, help="comma-separated shape sets (default: the device's)")
    p_bench.add_argument(
        "--json", default=None, help="results (commit, device, medians); default mhr_ops-bench-DEVICE.json"
    )
    p_bench.add_argument(
        "--png", default=None, help="plot of the ratios (needs matplotlib); default mhr_ops-bench-DEVICE.png"
    )
    p_bench.set_defaults(func=bench)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
