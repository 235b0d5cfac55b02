#!/usr/bin/env bash
# Compiles every csrc/cuda/*.cu alone with nvcc (no torch) for sm_80 and sm_90, prints each
# kernel's register and spill lines from ptxas, and fails on a compile error or on any spill.
#
# Usage (from the repository root):  bash scripts/check_cuda_kernels.sh
#   NVCC=/path/to/nvcc          nvcc to use (default: $CUDA_HOME/bin/nvcc, else nvcc on PATH)
#   DQA_EXT_REQUIRE_NVCC=1      fail instead of skipping when no nvcc is found (CI with CUDA)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

nvcc="${NVCC:-}"
if [[ -z "$nvcc" ]]; then
  if [[ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]]; then
    nvcc="${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"
  elif command -v nvcc >/dev/null 2>&1; then
    nvcc="$(command -v nvcc)"
  fi
fi
if [[ -z "$nvcc" ]]; then
  if [[ "${DQA_EXT_REQUIRE_NVCC:-0}" == "1" ]]; then
    echo "check_cuda_kernels: nvcc not found and DQA_EXT_REQUIRE_NVCC=1" >&2
    exit 1
  fi
  echo "check_cuda_kernels: nvcc not found, skipped"
  exit 0
fi

demangle() { if command -v c++filt >/dev/null 2>&1; then c++filt; else cat; fi; }

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

echo "check_cuda_kernels: $("$nvcc" --version | tail -n 1)"
shopt -s nullglob
sources=(csrc/cuda/*.cu)
if [[ ${#sources[@]} -eq 0 ]]; then
  echo "check_cuda_kernels: no csrc/cuda/*.cu found" >&2
  exit 1
fi

status=0
for src in "${sources[@]}"; do
  log="$tmp/$(basename "$src").log"
  echo "== $src"
  if ! "$nvcc" -std=c++17 -O3 -Icsrc -Xptxas -v \
      -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
      -c "$src" -o "$tmp/$(basename "$src").o" >"$log" 2>&1; then
    cat "$log" >&2
    echo "check_cuda_kernels: FAILED to compile $src" >&2
    status=1
    continue
  fi
  # ptxas prints, per kernel and arch: "Compiling entry function 'NAME' for 'sm_XX'", then
  # "N bytes stack frame, S bytes spill stores, L bytes spill loads" and "Used R registers".
  awk '
    /Compiling entry function/ { match($0, /\x27[^\x27]+\x27 for \x27sm_[0-9]+\x27/);
                                 s = substr($0, RSTART, RLENGTH); gsub(/\x27/, "", s);
                                 split(s, a, " for "); name = a[1]; arch = a[2]; next }
    /bytes spill stores/       { spill = $0; sub(/^[ \t]+/, "", spill); next }
    /Used [0-9]+ registers/    { match($0, /Used [0-9]+ registers/);
                                 regs = substr($0, RSTART + 5, RLENGTH - 15);
                                 printf "%s  regs=%-3s %s  %s\n", arch, regs, spill, name;
                                 spill = "" }
  ' "$log" | demangle | sed -e 's/(anonymous namespace):://g' | sort
  if grep -E "bytes spill (stores|loads)" "$log" | grep -Eqv "\b0 bytes spill stores, 0 bytes spill loads"; then
    echo "check_cuda_kernels: SPILLS in $src (see above)" >&2
    status=1
  fi
  if grep -Ei "warning" "$log" >/dev/null; then
    grep -Ei "warning" "$log" >&2
  fi
done

if [[ $status -ne 0 ]]; then
  echo "check_cuda_kernels: FAILED" >&2
else
  echo "check_cuda_kernels: OK (no spills)"
fi
exit $status
