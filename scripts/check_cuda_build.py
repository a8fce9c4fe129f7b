"""Run with the CUDA-built mhr_ops installed (no GPU needed): fails unless the CUDA kernels are
compiled in and registered for the CUDA dispatch key of every op, and (where cuobjdump is found)
unless the library holds machine code for every entry of build_info()["cuda_archs"] and PTX for
its "+PTX" entries."""

import glob
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import torch

import mhr_ops

info = mhr_ops.build_info()
print(json.dumps(info))
ops = [name for name in torch._C._dispatch_get_all_op_names() if name.startswith("mhr_ops::")]
# An op is served on CUDA by a CUDA kernel, or by a composite kernel built on ops that have one.
COVERING_KEYS = ("CUDA", "CompositeExplicitAutograd", "CompositeImplicitAutograd")
# Ops with no CUDA kernel, by decision (README status table): none today. Exactly these may be
# missing; one that gains a kernel must leave this set.
CPU_ONLY: set[str] = set()
uncovered = {op for op in ops if not any(torch._C._dispatch_has_kernel_for_dispatch_key(op, k) for k in COVERING_KEYS)}
missing = sorted(uncovered - CPU_ONLY)
if uncovered != CPU_ONLY:
    missing += [f"{op} (listed as CPU-only but now has a CUDA kernel)" for op in sorted(CPU_ONLY - uncovered)]
cuda_kernels = [op for op in ops if torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")]
print(f"mhr_ops ops: {sorted(ops)}")
print(f"ops with a CUDA kernel: {sorted(cuda_kernels)}")
if not info["cuda"] or not info["cuda_kernels_registered"] or missing or not cuda_kernels:
    sys.exit(f"CUDA build check failed: cuda={info['cuda']}, ops without a CUDA kernel: {missing}")
print(
    f"{len(ops) - len(CPU_ONLY)} of {len(ops)} mhr_ops ops are served on CUDA (CPU-only: {sorted(CPU_ONLY)}; "
    f"archs {info['cuda_archs']}); "
    f"torch {torch.__version__}, CUDA {torch.version.cuda}, device visible: {torch.cuda.is_available()}"
)


def cuobjdump():
    candidates = [shutil.which("cuobjdump")]
    candidates += [
        os.path.join(os.environ[v], "bin", "cuobjdump") for v in ("CUDA_HOME", "CUDA_PATH") if v in os.environ
    ]
    candidates += sorted(glob.glob("/usr/local/cuda*/bin/cuobjdump"), reverse=True)
    triton = importlib.util.find_spec("triton")  # CUDA torch wheels bring triton, which ships one
    for root in (triton.submodule_search_locations or []) if triton else []:
        candidates.append(os.path.join(root, "backends", "nvidia", "bin", "cuobjdump"))
    return next((c for c in candidates if c and os.path.exists(c)), None)


tool = cuobjdump()
if tool is None:
    print("cuobjdump not found: the architectures in the library are not checked")
else:
    lib = mhr_ops._C.__file__
    listed = {}
    for kind in ("elf", "ptx"):
        out = subprocess.run([tool, f"--list-{kind}", lib], capture_output=True, text=True, check=True).stdout
        listed[kind] = set(re.findall(r"\.sm_(\d+)a?\.", out))  # cuobjdump names 9.0a code sm_90
    want_elf, want_ptx = set(), set()
    for entry in info["cuda_archs"].split(";"):
        arch = entry.removesuffix("+PTX").removesuffix("a").replace(".", "")
        want_elf.add(arch)
        if entry.endswith("+PTX"):
            want_ptx.add(arch)
    print(f"machine code in {os.path.basename(lib)}: {sorted(listed['elf'])}; PTX: {sorted(listed['ptx'])}")
    if not want_elf <= listed["elf"] or not want_ptx <= listed["ptx"]:
        sys.exit(f"CUDA build check failed: expected machine code {sorted(want_elf)} and PTX {sorted(want_ptx)}")
