#!/usr/bin/env bash
# A second compiler's warnings on the CUDA sources: clang-19 parses every csrc/kernels/*.cu and
# tests/cpp/test_*_cuda.cu as CUDA for sm_80 and sm_90a (-fsyntax-only -Wall -Wextra -Werror).
# clang-19 cannot parse the CUDA 13 headers, so it reads the CUDA 12.4 headers of the PyPI wheels
# (runtime + nvcc + cccl), plus two things those wheels lack: CCCL's nv/target from the installed
# toolkit and an empty curand_mtgp32_kernel.h (clang's CUDA wrapper includes it; no kernel here
# uses curand). Everything is cached under ~/.cache/mhr_ops/cuda124. Needs no GPU and no nvcc.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${MHR_OPS_CLANG_CUDA_CACHE:-$HOME/.cache/mhr_ops/cuda124}
ROOT=$CACHE/root
STUB=$CACHE/stub

if ! command -v clang++-19 > /dev/null; then
  echo "clang_cuda_check: installing clang-19"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q clang-19 > /dev/null
fi

if [ ! -f "$ROOT/include/cuda_runtime.h" ] || [ ! -f "$ROOT/nvvm/libdevice/libdevice.10.bc" ]; then
  echo "clang_cuda_check: fetching the CUDA 12.4 header wheels"
  rm -rf "$CACHE/wheels" "$CACHE/ex" "$ROOT"
  python3 -m pip download -q --no-deps -d "$CACHE/wheels" nvidia-cuda-runtime-cu12==12.4.127 \
    nvidia-cuda-nvcc-cu12==12.4.131 nvidia-cuda-cccl-cu12==12.4.127
  for w in "$CACHE"/wheels/*.whl; do python3 -m zipfile -e "$w" "$CACHE/ex/"; done
  mkdir -p "$ROOT/include" "$ROOT/bin" "$ROOT/nvvm"
  for pkg in cuda_runtime cuda_cccl cuda_nvcc; do cp -r "$CACHE/ex/nvidia/$pkg/include/." "$ROOT/include/"; done
  cp -r "$CACHE/ex/nvidia/cuda_nvcc/nvvm/." "$ROOT/nvvm/"
  cp -r "$CACHE/ex/nvidia/cuda_nvcc/bin/." "$ROOT/bin/"
fi

if [ ! -d "$STUB/nv" ]; then
  nv_target=$(find "${CUDA_HOME:-/usr/local/cuda}/include" /usr/local/cuda-*/include -path '*nv/target' 2>/dev/null | head -1)
  [ -n "$nv_target" ] || { echo "clang_cuda_check: no CCCL nv/target found (set CUDA_HOME)"; exit 1; }
  mkdir -p "$STUB/nv"
  cp -r "$(dirname "$nv_target")/." "$STUB/nv/"
  echo "// empty: included by clang's CUDA wrapper; nothing here uses curand" > "$STUB/curand_mtgp32_kernel.h"
fi

status=0
for arch in sm_80 sm_90a; do
  for f in csrc/kernels/*.cu tests/cpp/test_*_cuda.cu; do
    if ! clang++-19 -x cuda --cuda-path="$ROOT" --cuda-gpu-arch=$arch -fsyntax-only -std=c++17 \
      -Wall -Wextra -Werror -Wno-unknown-cuda-version -DMHR_OPS_WITH_CUDA \
      -I"$STUB" -Icsrc/kernels -Itests/cpp "$f"; then
      echo "clang_cuda_check: $f ($arch) has warnings or errors"
      status=1
    fi
  done
done
[ $status -eq 0 ] && echo "clang_cuda_check: clean (clang-19, -Wall -Wextra, sm_80 and sm_90a)"
exit $status
