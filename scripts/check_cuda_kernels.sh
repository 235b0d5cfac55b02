#!/usr/bin/env bash
# CPU-side checks of the CUDA kernels, no GPU needed:
#  1. the host planner and counter slots (csrc/cuda/dqa_plan.cpp, dqa_counters.cpp) compiled
#     alone with the C++ compiler, their unit tests (csrc/cuda/tests/plan_test.cpp), the
#     emulation of the kernels' index arithmetic over many shapes, alignments, dtypes, SM counts
#     and block arrival orders (emulate_test.cpp), and the proof of the kernels' fast exact
#     division (divide_test.cpp); then the same programs built with -fsanitize=undefined, and the
#     planner tests with -fsanitize=address too;
#  2. every csrc/cuda/*.cu compiled alone with nvcc (no torch) with the flags torch's build uses,
#     for sm_80 and sm_90, by scripts/sass_report.py: registers, spills and the SASS
#     instructions per element of every kernel's main loop, against the budgets there (fails on
#     a spill or an exceeded budget). Without nvdisasm/cuobjdump it compiles with nvcc alone and
#     checks spills only.
#
# Usage (from anywhere):  bash scripts/check_cuda_kernels.sh
#   CXX=g++                     host C++ compiler (default: g++, else c++)
#   NVCC=/path/to/nvcc          nvcc to use (default: $CUDA_HOME/bin/nvcc, else nvcc on PATH)
#   PYTHON=python               runs the SASS report and reads torch's nvcc flags; nvdisasm and
#                               cuobjdump come from its site-packages (pip install
#                               nvidia-cuda-nvdisasm nvidia-cuda-cuobjdump) or PATH
#   DQA_EXT_REQUIRE_NVCC=1      fail instead of skipping step 2 when nvcc, nvdisasm or
#                               cuobjdump is missing (CI sets it)
#   DQA_EMULATE_CASES=N         random emulation cases (default 3000)
#   DQA_SASS_REPORT=FILE        also write the SASS report (markdown) there
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
# Builds the planner, the counter slots and the three test programs with the given flags into
# $tmp/NAME and runs them: host_programs NAME EMULATION_CASES SAMPLED_DIVISORS FLAGS...
host_programs() {
  local out="$tmp/$1" cases="$2" divisors="$3"
  shift 3
  mkdir -p "$out"
  if "$cxx" "$@" -c csrc/cuda/dqa_plan.cpp -o "$out/dqa_plan.o" &&
     "$cxx" "$@" -c csrc/cuda/dqa_counters.cpp -o "$out/dqa_counters.o" &&
     "$cxx" "$@" csrc/cuda/tests/plan_test.cpp "$out/dqa_plan.o" "$out/dqa_counters.o" \
       -pthread -o "$out/plan_test" &&
     "$cxx" "$@" csrc/cuda/tests/emulate_test.cpp "$out/dqa_plan.o" -o "$out/emulate_test" &&
     "$cxx" "$@" -ffp-contract=off csrc/cuda/tests/divide_test.cpp -o "$out/divide_test"; then
    "$out/plan_test" || { echo "check_cuda_kernels: planner tests FAILED ($1)" >&2; status=1; }
    "$out/emulate_test" "$cases" || { echo "check_cuda_kernels: emulation FAILED ($1)" >&2; status=1; }
    "$out/divide_test" "$divisors" || { echo "check_cuda_kernels: division proof FAILED ($1)" >&2; status=1; }
  else
    echo "check_cuda_kernels: FAILED to compile the planner or its tests ($1)" >&2
    status=1
  fi
}
echo "== host planner, emulation, division proof ($("$cxx" --version | head -n 1))"
host_programs plain "${DQA_EMULATE_CASES:-3000}" 24 "${host_flags[@]}"
# The same programs under UBSan (signed overflow in the index arithmetic aborts them), with
# fewer random cases and sampled divisors (about 15 s), and the planner tests under ASan too
# (the counter slots' table must survive static destruction: a CUDA thread may release a slot
# while the process exits). The emulation under ASan would take a minute: not here.
sanitized=("${host_flags[@]/-O2/-O1}" -g -fno-sanitize-recover=all)
probe() { "$cxx" "$@" -x c++ - -o "$tmp/probe" <<<'int main() { return 0; }' 2>/dev/null; }
if probe -fsanitize=undefined; then
  echo "== the same under -fsanitize=undefined"
  host_programs ubsan 400 1 "${sanitized[@]}" -fsanitize=undefined
else
  echo "check_cuda_kernels: $cxx cannot link -fsanitize=undefined here: the UBSan run is skipped"
fi
if probe -fsanitize=address,undefined; then
  if "$cxx" "${sanitized[@]}" -fsanitize=address,undefined csrc/cuda/dqa_plan.cpp csrc/cuda/dqa_counters.cpp \
       csrc/cuda/tests/plan_test.cpp -pthread -o "$tmp/plan_test_asan"; then
    "$tmp/plan_test_asan" || { echo "check_cuda_kernels: planner tests FAILED (asan)" >&2; status=1; }
  else
    echo "check_cuda_kernels: FAILED to compile the planner tests (asan)" >&2
    status=1
  fi
else
  echo "check_cuda_kernels: $cxx cannot link -fsanitize=address here: the ASan run is skipped"
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

py="${PYTHON:-python3}"
echo "== nvcc: $("$nvcc" --version | tail -n 1)"
report_args=(--check --nvcc "$nvcc")
[[ -n "${DQA_SASS_REPORT:-}" ]] && report_args+=(--out "$DQA_SASS_REPORT")
rc=0
kernels="kernels within the SASS budgets, without spills, fenced arrivals, IEEE arithmetic"
"$py" scripts/sass_report.py "${report_args[@]}" >"$tmp/sass.md" 2>"$tmp/sass.err" || rc=$?
if [[ $rc -eq 0 || $rc -eq 1 ]]; then
  # The table, then the verdict (the report's last lines).
  sed -n '/^| arch/,$p' "$tmp/sass.md"
  cat "$tmp/sass.err" >&2
  if [[ $rc -ne 0 ]]; then
    echo "check_cuda_kernels: SASS report FAILED (spills, budgets, arrivals or arithmetic, above)" >&2
    status=1
  fi
elif [[ $rc -eq 2 ]]; then
  # nvdisasm or cuobjdump missing: compile with nvcc alone and check spills.
  cat "$tmp/sass.err" >&2
  if [[ "${DQA_EXT_REQUIRE_NVCC:-0}" == "1" ]]; then
    echo "check_cuda_kernels: SASS budget check needs nvdisasm and cuobjdump and DQA_EXT_REQUIRE_NVCC=1" >&2
    exit 1
  fi
  echo "check_cuda_kernels: SASS budget check skipped (pip install nvidia-cuda-nvdisasm nvidia-cuda-cuobjdump); checking spills with nvcc alone"
  kernels="kernels compiled without spills, SASS budgets NOT checked"
  torch_flags="$("$py" -c 'import torch.utils.cpp_extension as c; print(" ".join(c.COMMON_NVCC_FLAGS))' 2>/dev/null || true)"
  if [[ -z "$torch_flags" ]]; then
    torch_flags="-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr"
  fi
  read -r -a nvcc_flags <<<"$torch_flags"
  nvcc_flags+=(-std=c++17 -Xcompiler -fPIC -O3 -lineinfo -Icsrc -Xptxas -v
               -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90)
  shopt -s nullglob
  for src in csrc/cuda/*.cu; do
    log="$tmp/$(basename "$src").log"
    echo "== $src"
    if ! "$nvcc" "${nvcc_flags[@]}" -c "$src" -o "$tmp/$(basename "$src").o" >"$log" 2>&1; then
      cat "$log" >&2
      echo "check_cuda_kernels: FAILED to compile $src" >&2
      status=1
      continue
    fi
    if grep -E "bytes spill (stores|loads)" "$log" | grep -Eqv "\b0 bytes spill stores, 0 bytes spill loads"; then
      echo "check_cuda_kernels: SPILLS in $src" >&2
      status=1
    fi
  done
else
  cat "$tmp/sass.err" >&2
  echo "check_cuda_kernels: SASS report FAILED to run (rc=$rc)" >&2
  status=1
fi

if [[ $status -ne 0 ]]; then
  echo "check_cuda_kernels: FAILED" >&2
else
  echo "check_cuda_kernels: OK (planner tests, emulation, division proof, also under sanitizers; $kernels)"
fi
exit $status
