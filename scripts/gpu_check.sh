#!/usr/bin/env bash
# GPU check: build with CUDA, run the whole test suite on the GPU, run compute-sanitizer
# (memcheck, racecheck) over the CUDA tests, build and run the C++ kernel tests, run the
# benchmarks, and write a JSON record (commit, device, results) to OUTDIR, ready to commit
# (bench/results/gpu_check-<device>.json).
#
#   bash scripts/gpu_check.sh OUTDIR
#
# Budget: about 8-10 minutes on an H200 (one device-tool command). Each sanitizer tool gets
# SANITIZER_TIMEOUT seconds (default 120) over the CUDA tests, stopping at the first failure;
# a run cut short is recorded as exit 124. OUTDIR receives 8 files (the device tool's limit).
# Wheels the GPU machine lacks (nvidia-cutlass) may be placed in .whl/ and are installed first.
set -uo pipefail
OUT=${1:?usage: scripts/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 MHR_OPS_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
status=0
step() { echo "== $*"; }

python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible')" || exit 2
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile .whl/*.whl || status=1
fi

step "build (CUDA, $TORCH_CUDA_ARCH_LIST)"
python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 3; }
python3 scripts/check_cuda_build.py | tee -a "$OUT/build.log" || status=1

step "pytest (all tests, CUDA included)"
JUNIT=$(mktemp --suffix=.xml)
python3 -m pytest tests -q -ra --junitxml="$JUNIT" > "$OUT/pytest.log" 2>&1 || status=1
tail -5 "$OUT/pytest.log"

step "compute-sanitizer memcheck + racecheck over the CUDA tests (small shapes)"
: > "$OUT/sanitizer.log"
for tool in memcheck racecheck; do
  echo "### $tool" >> "$OUT/sanitizer.log"
  timeout "${SANITIZER_TIMEOUT:-120}" compute-sanitizer --tool "$tool" --error-exitcode 99 --target-processes all \
    python3 -m pytest tests -q -x -m cuda -k "not compile and not peft" >> "$OUT/sanitizer.log" 2>&1
  rc=$?
  echo "### $tool exit $rc" >> "$OUT/sanitizer.log"
  [ $rc -eq 0 ] || status=1
done
grep -E "^### |ERROR SUMMARY|RACECHECK SUMMARY" "$OUT/sanitizer.log"

step "C++ kernel tests (ctest, CUDA tests run on the GPU)"
{ cmake -S . -B build/gpu-cmake -DCMAKE_CUDA_ARCHITECTURES="${TORCH_CUDA_ARCH_LIST//./}" > /dev/null &&
  cmake --build build/gpu-cmake -j "$MAX_JOBS" > /dev/null &&
  ctest --test-dir build/gpu-cmake --output-on-failure; } > "$OUT/ctest.log" 2>&1 || status=1
tail -3 "$OUT/ctest.log"

step "benchmarks"
python3 -m mhr_ops bench --device cuda --json "$OUT/bench.json" --png "$OUT/bench.png" > "$OUT/bench.log" 2>&1 || status=1
cat "$OUT/bench.log"

python3 scripts/gpu_record.py "$OUT" --junit "$JUNIT" --status "$status" || status=1
exit $status
