#!/usr/bin/env bash
# CPU-side checks of the CUDA kernels, no GPU needed:
#  1. the host planner (csrc/cuda/dqa_plan.cpp) compiled alone with the C++ compiler, its unit
#     tests (csrc/cuda/tests/plan_test.cpp) and the emulation of the kernels' index arithmetic
#     over many shapes, alignments, dtypes and SM counts (csrc/cuda/tests/emulate_test.cpp);
#  2. every csrc/cuda/*.cu compiled alone with nvcc (no torch) with the flags torch's build uses,
#     for sm_80 and sm_90, printing each kernel's registers and spills; fails on any spill.
#
# Usage (from anywhere):  bash scripts/check_cuda_kernels.sh
#   CXX=g++                     host C++ compiler (default: g++, else c++)
#   NVCC=/path/to/nvcc          nvcc to use (default: $CUDA_HOME/bin/nvcc, else nvcc on PATH)
#   PYTHON=python               reads torch's nvcc flags (torch.utils.cpp_extension); without
#                               torch the copy below is used
#   DQA_EXT_REQUIRE_NVCC=1      fail instead of skipping step 2 when no nvcc is found
#   DQA_EMULATE_CASES=N         random emulation cases (default 3000)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
status=0

# ---- 1. host planner, its tests, the emulation ----
cxx="${CXX:-}"
if [[ -z "$cxx" ]]; then
  if command -v g++ >/dev/null 2>&1; then cxx=g++; else cxx=c++; fi
fi
if ! command -v "$cxx" >/dev/null 2>&1; then
  echo "check_cuda_kernels: no C++ compiler ($cxx) for the planner tests" >&2
  exit 1
fi
host_flags=(-std=c++17 -O2 -Wall -Wextra -Werror -Icsrc)
echo "== host planner and emulation ($("$cxx" --version | head -n 1))"
if "$cxx" "${host_flags[@]}" -c csrc/cuda/dqa_plan.cpp -o "$tmp/dqa_plan.o" &&
   "$cxx" "${host_flags[@]}" csrc/cuda/tests/plan_test.cpp "$tmp/dqa_plan.o" -o "$tmp/plan_test" &&
   "$cxx" "${host_flags[@]}" csrc/cuda/tests/emulate_test.cpp "$tmp/dqa_plan.o" -o "$tmp/emulate_test"; then
  "$tmp/plan_test" || { echo "check_cuda_kernels: planner tests FAILED" >&2; status=1; }
  "$tmp/emulate_test" "${DQA_EMULATE_CASES:-3000}" ||
    { echo "check_cuda_kernels: emulation FAILED" >&2; status=1; }
else
  echo "check_cuda_kernels: FAILED to compile the planner or its tests" >&2
  status=1
fi

# ---- 2. the kernel units with nvcc ----
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
  echo "check_cuda_kernels: nvcc not found, kernel compilation skipped"
  exit $status
fi

# torch's nvcc flags (no half/bfloat16 operators or conversions, relaxed constexpr), read from
# the installed torch when it imports, plus setup.py's own.
torch_flags="$("${PYTHON:-python3}" -c \
  'import torch.utils.cpp_extension as c; print(" ".join(c.COMMON_NVCC_FLAGS))' 2>/dev/null || true)"
if [[ -z "$torch_flags" ]]; then
  torch_flags="-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr"
  echo "check_cuda_kernels: torch not importable, using a copy of its nvcc flags"
fi
read -r -a nvcc_flags <<<"$torch_flags"
nvcc_flags+=(-std=c++17 -Xcompiler -fPIC -O3 -lineinfo -Icsrc -Xptxas -v
             -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90)

demangle() { if command -v c++filt >/dev/null 2>&1; then c++filt; else cat; fi; }

echo "== nvcc: $("$nvcc" --version | tail -n 1)"
echo "   flags: ${nvcc_flags[*]}"
shopt -s nullglob
sources=(csrc/cuda/*.cu)
if [[ ${#sources[@]} -eq 0 ]]; then
  echo "check_cuda_kernels: no csrc/cuda/*.cu found" >&2
  exit 1
fi

for src in "${sources[@]}"; do
  log="$tmp/$(basename "$src").log"
  echo "== $src"
  if ! "$nvcc" "${nvcc_flags[@]}" -c "$src" -o "$tmp/$(basename "$src").o" >"$log" 2>&1; then
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
  ' "$log" | demangle | sed -e 's/(anonymous namespace):://g' -e 's/(.*$//' | sort
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
  echo "check_cuda_kernels: OK (planner tests, emulation, kernels compiled without spills)"
fi
exit $status
