"""Run with the CUDA-built mhr_ops installed (no GPU needed): fails unless the CUDA kernels are
compiled in and registered for the CUDA dispatch key of every op."""

import json
import sys

import torch

import mhr_ops

info = mhr_ops.build_info()
print(json.dumps(info))
ops = [name for name in torch._C._dispatch_get_all_op_names() if name.startswith("mhr_ops::")]
# An op is served on CUDA by a CUDA kernel, or by a composite kernel built on ops that have one.
COVERING_KEYS = ("CUDA", "CompositeExplicitAutograd", "CompositeImplicitAutograd")
missing = [op for op in ops if not any(torch._C._dispatch_has_kernel_for_dispatch_key(op, k) for k in COVERING_KEYS)]
cuda_kernels = [op for op in ops if torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")]
print(f"mhr_ops ops: {sorted(ops)}")
print(f"ops with a CUDA kernel: {sorted(cuda_kernels)}")
if not info["cuda"] or not info["cuda_kernels_registered"] or missing or not cuda_kernels:
    sys.exit(f"CUDA build check failed: cuda={info['cuda']}, ops without a CUDA kernel: {missing}")
print(
    f"all {len(ops)} mhr_ops ops are served on CUDA (archs {info['cuda_archs']}); "
    f"torch {torch.__version__}, CUDA {torch.version.cuda}, device visible: {torch.cuda.is_available()}"
)
