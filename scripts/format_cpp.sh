#!/usr/bin/env bash
# Formats every tracked C++ / CUDA file of csrc/ and tests/cpp/ in place with .clang-format (clang-format 19: pip install clang-format==19.1.7).
cd "$(dirname "$0")/.." && git ls-files -z 'csrc/*.h' 'csrc/*.cpp' 'csrc/*.cu' 'csrc/*.cuh' 'tests/cpp/*.h' 'tests/cpp/*.cpp' 'tests/cpp/*.cu' 'tests/cpp/*.cuh' | xargs -0 clang-format -i
