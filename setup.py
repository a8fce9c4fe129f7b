"""Builds mhr_ops._C: the CPU kernels always, the CUDA kernels when torch is a CUDA build and a
CUDA toolkit is found (no GPU needed).

Environment:
  MHR_OPS_FORCE_CPU=1    build the CPU kernels only
  MHR_OPS_FORCE_CUDA=1   build the CUDA kernels too, or fail saying why not
  MHR_OPS_EMULATED_CUDA=1  also build the test module mhr_ops._emulated_cuda: the CUDA bindings
                         and kernels compiled with the host compiler through the SIMT emulation
                         (csrc/emulation), registered for CPU tensors when imported (README,
                         "Testing the CUDA kernels without a GPU"); needs the CUDA toolkit headers
  TORCH_CUDA_ARCH_LIST   CUDA architectures (default "8.0+PTX;9.0a;12.0+PTX")
  CUDA_HOME              CUDA toolkit root (default: found from `nvcc --dryrun`)
  CUTLASS_PATH           CUTLASS checkout root (default: the nvidia-cutlass package's headers)
  MAX_JOBS               parallel compile jobs for ninja
"""

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

VERSION = "0.1.0"
ROOT = os.path.dirname(os.path.abspath(__file__))
# Machine code for A100 (8.0, also runs on 8.6 / 8.9) and H100 (9.0a), machine code and PTX for
# the newest architecture nvcc 13 targets (12.0, also runs on 12.1; its PTX JIT-compiles on
# anything newer), and PTX for 8.0: PTX only JIT-compiles on GPUs at or above its target, so
# without it Blackwell data-center GPUs (10.x) and Thor (11.0) would have no loadable code.
DEFAULT_ARCHS = "8.0+PTX;9.0a;12.0+PTX"


def env_flag(name):
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def find_cuda_home():
    """Toolkit root from `nvcc --dryrun` (its TOP= line); the nvcc on PATH may be a wrapper script
    outside the toolkit, where torch's own guess looks."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run(
            [nvcc, "--dryrun", "-c", "-x", "cu", os.devnull], capture_output=True, text=True, timeout=120
        )
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"TOP=(\S+)", out.stdout + out.stderr)
    if match is None:
        return None
    root = os.path.realpath(match.group(1))
    return root if os.path.exists(os.path.join(root, "bin", "nvcc")) else None


# torch.utils.cpp_extension reads CUDA_HOME once, at import.
if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")):
    detected = find_cuda_home()
    if detected:
        os.environ["CUDA_HOME"] = detected

import torch  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def want_cuda():
    if env_flag("MHR_OPS_FORCE_CPU"):
        return False
    if env_flag("MHR_OPS_FORCE_CUDA"):
        if torch.version.cuda is None:
            raise RuntimeError(
                f"MHR_OPS_FORCE_CUDA=1, but the installed torch {torch.__version__} is a CPU build; "
                "install a CUDA build of torch"
            )
        if CUDA_HOME is None:
            raise RuntimeError("MHR_OPS_FORCE_CUDA=1, but no CUDA toolkit was found: set CUDA_HOME")
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


def cuda_library_includes():
    """Header folders of the pip CUDA packages (nvidia/cu13/include, ...): ATen/cuda headers need
    cuBLAS/cuSPARSE headers that a bare toolkit may lack."""
    try:
        import nvidia
    except ImportError:
        return []
    found = []
    for base in getattr(nvidia, "__path__", []):
        for inc in sorted(glob.glob(os.path.join(base, "*", "include"))):
            if os.path.exists(os.path.join(inc, "cublas_v2.h")):
                found.append(inc)
    return found


def find_cutlass():
    """(include dir, version) of CUTLASS/CuTe headers, or (None, None)."""
    roots = []
    if os.environ.get("CUTLASS_PATH"):
        roots.append(os.path.join(os.environ["CUTLASS_PATH"], "include"))
    try:
        import cutlass_library

        roots.append(os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include"))
    except ImportError:
        pass
    for inc in roots:
        version_h = os.path.join(inc, "cutlass", "version.h")
        if os.path.exists(version_h):
            text = open(version_h).read()
            parts = [re.search(rf"#define CUTLASS_{p} (\d+)", text) for p in ("MAJOR", "MINOR", "PATCH")]
            version = ".".join(m.group(1) for m in parts) if all(parts) else "unknown"
            return inc, version
    return None, None


def cutlass_used():
    """Whether any kernel source includes CUTLASS or CuTe headers (none does yet: the tensor-core
    kernels of issue 14 will). build_info() says "found" apart from "used"."""
    pattern = re.compile(r'#\s*include\s*[<"](cutlass|cute)/')
    for path in glob.glob(os.path.join(ROOT, "csrc", "**", "*.*"), recursive=True):
        if path.endswith((".cu", ".cuh", ".h", ".cpp")) and pattern.search(open(path).read()):
            return True
    return False


def write_build_config(with_cuda, archs, cutlass_version):
    """A generated header for build_info(): strings that would not survive a -D flag in ninja."""
    out_dir = os.path.join(ROOT, "build", "generated")
    os.makedirs(out_dir, exist_ok=True)
    lines = [
        "// Generated by setup.py; do not edit.",
        "#pragma once",
        f'#define MHR_OPS_VERSION "{VERSION}"',
        f'#define MHR_OPS_TORCH_VERSION "{torch.__version__}"',
        f'#define MHR_OPS_CUDA_ARCHS "{archs if with_cuda else ""}"',
        f'#define MHR_OPS_CUTLASS_VERSION "{cutlass_version or ""}"',
        f"#define MHR_OPS_CUTLASS_USED {int(bool(cutlass_version) and cutlass_used())}",
    ]
    path = os.path.join(out_dir, "mhr_ops_build_config.h")
    text = "\n".join(lines) + "\n"
    if not os.path.exists(path) or open(path).read() != text:
        with open(path, "w") as f:
            f.write(text)
    return out_dir


def source_commit(root=ROOT):
    """The commit of the source tree at ``root`` (with "-dirty" if it has uncommitted changes), or
    a sentence saying there is none."""
    try:
        git = ["git", "-C", root]
        commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout
        status = subprocess.run([*git, "status", "--porcelain"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not built from a git checkout)", False
    return commit.strip(), bool(status.strip())


def write_build_meta(root=ROOT):
    """mhr_ops/_build_meta.py (git-ignored): the commit the package is built from, for
    mhr_ops.build_info() and the bench record. Written at every build, editable or not."""
    commit, dirty = source_commit(root)
    path = os.path.join(root, "mhr_ops", "_build_meta.py")
    if commit.startswith("unknown") and os.path.exists(path):
        return path  # an sdist carries the stamp of the checkout it was made from
    text = f'"""Generated by setup.py at build time; do not edit."""\n\nCOMMIT = {commit!r}\nDIRTY = {dirty!r}\n'
    with open(path, "w") as f:
        f.write(text)
    return path


def rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def openmp_backend():
    """Whether this torch runs at::parallel_for on OpenMP (Linux builds do) with a GCC-style
    compiler that takes -fopenmp."""
    return sys.platform.startswith("linux") and "parallel backend: OpenMP" in torch.__config__.parallel_info()


KERNELS = os.path.join(ROOT, "csrc", "kernels")
BINDING = os.path.join(ROOT, "csrc", "torch")


def binding_sources(*folders):
    """The binding layer's C++ sources in these folders of csrc/torch ("" is its root: schemas and
    build info; args/: each op's argument contract; cpu/, cuda/: one backend's registrations;
    composite/: kernels written over other ops, for every backend)."""
    return sorted(p for folder in folders for p in glob.glob(os.path.join(BINDING, folder, "*.cpp")))


def make_extension():
    with_cuda = want_cuda()
    sources = glob.glob(os.path.join(KERNELS, "*.cpp"))
    sources += binding_sources("", "args", "cpu", "composite")
    cxx_flags = ["-O3", "-DMHR_OPS_BUILD_CONFIG"]
    link_flags = []
    if openmp_backend():
        # at::parallel_for is a header template: without -fopenmp its `#pragma omp parallel` is
        # dropped and every parallel loop of ours runs on one thread. The soname libgomp.so.1
        # resolves to the copy torch already loaded, so there is one OpenMP runtime.
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    include_dirs = []
    archs = ""
    cutlass_version = None
    if with_cuda:
        archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
        sources += glob.glob(os.path.join(KERNELS, "*.cu"))
        sources += binding_sources("cuda")
        cxx_flags.append("-DMHR_OPS_WITH_CUDA")
        include_dirs += cuda_library_includes()
        cutlass_inc, cutlass_version = find_cutlass()
        if cutlass_inc:
            include_dirs.append(cutlass_inc)
    include_dirs.append(write_build_config(with_cuda, archs, cutlass_version))
    print(f"mhr_ops: building {'CPU + CUDA (' + archs + ')' if with_cuda else 'CPU only'} kernels")
    if with_cuda:
        nvcc_flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-DMHR_OPS_WITH_CUDA", "-std=c++17"]
        return CUDAExtension(
            "mhr_ops._C",
            rel(sources),
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=link_flags,
        )
    return CppExtension(
        "mhr_ops._C",
        rel(sources),
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags,
    )


def find_cuda_include():
    """The CUDA toolkit's include folder (cuda_runtime.h, cuda_fp16.h, cuda_bf16.h), or None."""
    candidates = [os.path.join(CUDA_HOME, "include")] if CUDA_HOME else []
    candidates += ["/usr/local/cuda/include", *sorted(glob.glob("/usr/local/cuda-*/include"), reverse=True)]
    return next((inc for inc in candidates if os.path.exists(os.path.join(inc, "cuda_fp16.h"))), None)


def make_emulated_extension():
    """mhr_ops._emulated_cuda: the CUDA registrations (csrc/torch/cuda/, with the argument checks
    of csrc/torch/args/ and the composites that stand in for a CPU kernel) and kernels
    (csrc/kernels/*.cu) compiled as C++ through the SIMT emulation, against this (CPU) torch.
    Importing it registers the CUDA code for the CPU dispatch key, over the CPU kernels
    (csrc/torch/cuda/cuda_context.h). Test builds only.

    Every shared source is compiled through a one-line wrapper under build/emulated/, so that its
    object (other flags) never shares a path with mhr_ops._C's."""
    cuda_include = find_cuda_include()
    if cuda_include is None:
        raise RuntimeError("MHR_OPS_EMULATED_CUDA=1 needs the CUDA toolkit headers (cuda_fp16.h): set CUDA_HOME")
    emulation = os.path.join(ROOT, "csrc", "emulation")
    shared = sorted(glob.glob(os.path.join(KERNELS, "*.cu")))
    shared += binding_sources("cuda", "args")
    # The composites the CPU backend overrides with kernels of its own: under emulation they
    # register for the CPU key, as CUDA tensors take them.
    shared += [
        os.path.join(BINDING, "composite", f) for f in ("mhr_linear.cpp", "moe_lora_linear.cpp", "task_lora_linear.cpp")
    ]
    wrapper_dir = os.path.join(ROOT, "build", "emulated")
    os.makedirs(wrapper_dir, exist_ok=True)
    sources = [os.path.join(emulation, "simt.cpp"), os.path.join(emulation, "torch_module.cpp")]
    for path in shared:
        name = os.path.basename(path).replace(".", "_") + ".cpp"  # route_cuda.cu -> route_cuda_cu.cpp
        wrapper = os.path.join(wrapper_dir, name)
        origin = os.path.relpath(path, ROOT)
        text = f'// Generated by setup.py: {origin} for mhr_ops._emulated_cuda.\n#include "{path}"\n'
        if not os.path.exists(wrapper) or open(wrapper).read() != text:
            with open(wrapper, "w") as f:
                f.write(text)
        sources.append(wrapper)
    flags = ["-O2", "-Wno-unknown-pragmas", "-DMHR_OPS_CUDA_EMULATION", "-DMHR_OPS_WITH_CUDA", "-std=c++20", "-pthread"]
    return CppExtension(
        "mhr_ops._emulated_cuda",
        rel(sources),
        include_dirs=[emulation, cuda_include],
        extra_compile_args={"cxx": flags},
        extra_link_args=["-pthread"],
    )


if __name__ == "__main__":  # setuptools runs this file as __main__; importing it builds nothing
    write_build_meta()
    extensions = [make_extension()]
    if env_flag("MHR_OPS_EMULATED_CUDA"):
        extensions.append(make_emulated_extension())
    setup(
        name="mhr-ops",
        version=VERSION,
        packages=find_packages(include=["mhr_ops", "mhr_ops.*"]),
        ext_modules=extensions,
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    )
