"""Command line of mhr_ops: ``python -m mhr_ops demo`` and ``python -m mhr_ops bench``."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap

import torch

DESCRIPTION = """\
mhr_ops: fused kernels for routed LoRA adapters (Poly / MHR LoRA).

commands:
  demo    fine-tune a tiny Llama on four synthetic tasks with MHR adapters, after checking
          that mhr_ops and PEFT's Poly layers agree and timing a training step of both
  bench   time the ops and layers against the bare layer, PEFT and the float64 reference,
          print tables, write a JSON record and a PNG

Run 'python -m mhr_ops COMMAND --help' for a command's options."""


def _shape_set_epilog() -> str:
    from mhr_ops.benchmarking import DEFAULT_SHAPES, SHAPE_SETS

    width = max(len(name) for name in SHAPE_SETS)
    lines = ["shape sets (--shapes):"]
    for s in SHAPE_SETS.values():
        wrapped = textwrap.wrap(s.description, 96 - width)
        lines.append(f"  {s.name.ljust(width)}  {wrapped[0]}")
        lines += [" " * (width + 4) + more for more in wrapped[1:]]
    lines.append("defaults:")
    lines += [f"  {device.ljust(width)}  {','.join(names)}" for device, names in DEFAULT_SHAPES.items()]
    lines.append(
        "\nEach shape set prints one table of times (median [q1 - q3] over interleaved reps) and one of\n"
        "ratios against the bare layer (lower is better) with the targets the team tracks."
    )
    return "\n".join(lines)


def _device(parser: argparse.ArgumentParser, name: str) -> torch.device:
    """The --device value as a torch.device, or an argparse error saying why it cannot run here."""
    try:
        device = torch.device(name)
    except RuntimeError as e:
        parser.error(f"--device {name}: {e}")
    if device.type == "cuda":
        if torch.version.cuda is None:
            parser.error(f"--device {name}: this torch ({torch.__version__}) has no CUDA support")
        if not torch.cuda.is_available():
            parser.error(f"--device {name}: torch {torch.__version__} finds no CUDA device here")
    elif device.type != "cpu":
        parser.error(f"--device {name}: expected cpu or cuda[:N], got {device.type}")
    return device


def demo(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from mhr_ops import demo as demo_module

    if args.steps < 1:
        parser.error(f"--steps: expected >= 1, got {args.steps}")
    device = _device(parser, args.device)
    if args.moe:
        from mhr_ops import demo_moe

        return demo_moe.run(device, steps=args.steps, seed=args.seed)
    return demo_module.run(device, steps=args.steps, seed=args.seed)


def bench(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from mhr_ops import benchmarking

    if args.emulated:
        return bench_emulated(parser, args)
    if args.merge:
        parser.error("--merge merges an --emulated run into a record; add --emulated")
    device = _device(parser, args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shapes = [s for s in args.shapes.split(",") if s] if args.shapes else None
    try:
        benchmarking.resolve(shapes, device.type)
    except ValueError as e:
        parser.error(f"--shapes: {e}")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads: expected >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    json_path = args.json or f"mhr_ops-bench-{device.type}.json"
    png_path = args.png or f"mhr_ops-bench-{device.type}.png"
    benchmarking.run(device, shapes, json_path=json_path, png_path=png_path)
    return 0


def bench_emulated(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from mhr_ops.benchmarking import emulated

    if args.device not in (None, "cpu"):
        parser.error(f"--emulated runs the CUDA kernels on the CPU through the emulation; got --device {args.device}")
    if args.png is not None:
        parser.error("--emulated writes no plot; drop --png")
    if args.merge and not (args.json and os.path.exists(args.json)):
        parser.error(f"--merge: expected --json to name an existing record, got {args.json}")
    shapes = [s for s in args.shapes.split(",") if s] if args.shapes else None
    unknown = [s for s in shapes or [] if s not in emulated.EMULATED_SIZES]
    if unknown:
        parser.error(
            f"--shapes: no emulated cases for {', '.join(unknown)}; emulated: {', '.join(emulated.EMULATED_SIZES)}"
        )
    try:
        emulated.run(shapes, json_path=args.json or "mhr_ops-bench-emulated.json", merge=args.merge)
    except emulated.EmulationMissing as e:
        parser.error(f"--emulated: {e}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="python -m mhr_ops", description=DESCRIPTION, formatter_class=fmt)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    default_device = "cuda" if torch.cuda.is_available() else "cpu"

    p_demo = sub.add_parser(
        "demo",
        help="fine-tune a tiny Llama on four tasks with MHR adapters, vs PEFT",
        description="Multi-task MHR fine-tuning of a tiny Llama (built from a config, nothing downloaded): "
        "checks that mhr_ops and PEFT's Poly layers give the same logits, times a training step of "
        "both with the same trainable parameters, trains with mhr_ops and prints the loss and the "
        "held-out accuracy per task. Exit status 0 when the two agree and the loss falls.",
    )
    p_demo.add_argument("--device", default=default_device, help=f"cpu or cuda[:N] (default: {default_device})")
    p_demo.add_argument("--steps", type=int, default=150, help="training steps after the comparison (default: 150)")
    p_demo.add_argument("--seed", type=int, default=0, help="seed of the model init and the data (default: 0)")
    p_demo.add_argument(
        "--moe",
        action="store_true",
        help="mixture of LoRA experts instead: a tiny Llama with per-token routed LoRA experts "
        "(patch_moe_lora) learns the four tasks from a task token; checks the layers against gather + bmm, "
        "times a training step of both, prints the loss, the per-expert load and the accuracy per task",
    )
    p_demo.set_defaults(func=demo, parser=p_demo)

    p_bench = sub.add_parser(
        "bench",
        help="time the ops against the bare layer, PEFT and the reference",
        description="Time every case of the chosen shape sets side by side in one process and print the\n"
        "tables; write the JSON record (every sample, the commit mhr_ops was built from) and a PNG.",
        epilog=_shape_set_epilog(),
        formatter_class=fmt,
    )
    p_bench.add_argument("--device", default=None, help=f"cpu or cuda[:N] (default: {default_device})")
    p_bench.add_argument(
        "--shapes", default=None, metavar="SET[,SET...]", help="comma-separated shape sets (listed below)"
    )
    p_bench.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help=f"CPU threads for torch and the kernels (default: torch's, here {torch.get_num_threads()}); "
        "on a shared machine, fewer threads than busy cores avoids waiting on descheduled threads",
    )
    p_bench.add_argument(
        "--json", default=None, metavar="PATH", help="the JSON record (default: mhr_ops-bench-DEVICE.json)"
    )
    p_bench.add_argument(
        "--png",
        default=None,
        metavar="PATH",
        help="the plot: times with spread, ratios to the bare layer, roofline on CUDA; needs matplotlib "
        "(default: mhr_ops-bench-DEVICE.png)",
    )
    p_bench.add_argument(
        "--emulated",
        action="store_true",
        help="instead of timing: run the GPU cases (gpu-train, gpu-decode, t0-mhr, moh, gpu-moe) through the CUDA "
        "kernels' SIMT emulation with counted memory traffic and write modeled times (an estimate, not a "
        "measurement; bench/NOTES.md) to --json (default: mhr_ops-bench-emulated.json); needs the module "
        "built by MHR_OPS_EMULATED_CUDA=1 python setup.py build_ext --inplace",
    )
    p_bench.add_argument(
        "--merge",
        action="store_true",
        help="with --emulated: replace only the --shapes sets' cases in the record --json names, keeping "
        "the others (bench/results/emulated.json one set at a time)",
    )
    p_bench.set_defaults(func=bench, parser=p_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args.parser, args)


if __name__ == "__main__":
    sys.exit(main())
