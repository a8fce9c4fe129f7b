"""Collects a GPU check's outputs (scripts/gpu_check.sh) into OUTDIR/gpu_check.json: commit,
device, build info, pass/fail counts, sanitizer and ctest outcomes, benchmark results."""

import argparse
import json
import os
import re
import subprocess
import xml.etree.ElementTree as ET

import torch

import mhr_ops


def read(path):
    return open(path).read() if os.path.exists(path) else ""


def pytest_counts(xml_path):
    if not os.path.exists(xml_path):
        return None
    root = ET.parse(xml_path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("outdir")
    parser.add_argument("--junit", required=True, help="pytest's junit XML (kept out of OUTDIR)")
    parser.add_argument("--status", type=int, default=0)
    args = parser.parse_args()
    out = args.outdir
    sanitizer = read(os.path.join(out, "sanitizer.log"))
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True).stdout.strip())
    record = {
        "commit": commit,
        "worktree_dirty": dirty,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "build": mhr_ops.build_info(),
        "pytest": pytest_counts(args.junit),
        "sanitizer": {
            tool: int(m.group(1)) if (m := re.search(rf"### {tool} exit (\d+)", sanitizer)) else None
            for tool in ("memcheck", "racecheck")
        },
        "sanitizer_summaries": re.findall(r"(?:ERROR|RACECHECK) SUMMARY: .*", sanitizer),
        "ctest": (re.findall(r"\d+% tests passed.*", read(os.path.join(out, "ctest.log"))) or [None])[-1],
        "bench": json.loads(read(os.path.join(out, "bench.json")) or "null"),
        "status": "pass" if args.status == 0 else "fail",
    }
    path = os.path.join(out, "gpu_check.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    print(f"wrote {path}: status {record['status']}, pytest {record['pytest']}, sanitizer {record['sanitizer']}")


if __name__ == "__main__":
    main()
