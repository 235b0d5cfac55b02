#!/usr/bin/env bash
# The CUDA verification and measurement for a lent GPU, within 5 minutes (DQA_GPU_DEADLINE_S,
# default 290 s), ordered by value, each step with its own timeout cut to what is left:
#   1. build for the GPU's arch only (ptxas's register and spill lines in the log); a failed
#      build ends the run;
#   2. at once: the kernels' own CUDA tests (tests/kernels/test_cuda_kernels.py, -x) and
#      compute-sanitizer memcheck and racecheck over every kernel path
#      (scripts/gpu_sanitize_paths.py; the fused finalize must show no race);
#   3. on the quiet GPU: device time of every op and its floors by CUDA-graph replay, and host
#      time per call (scripts/gpu_device_time.py);
#   4. Nsight Compute on the key case: time, DRAM, issue slots, thread instructions per element,
#      stall reasons (scripts/gpu_profile.py);
#   5. the ResNet-20 training step, eager, graphed and compiled, paired rounds, TF32 off
#      (scripts/gpu_train_step.py; written as it goes, so a cut run keeps what it measured);
#   6. with the time left: the other CUDA tests, initcheck and synccheck.
# Everything lands in ONE results folder of at most 6 files (a lent machine returns at most 8):
#   SUMMARY.md          each step's status and seconds, the environment, the tables of 3-5, and the
#                       tail of each failed step's log
#   device_time.json    every device- and host-time figure, the device and versions
#   train_step.json     the training-step rounds
#   logs.tar.gz         every step's full log (the build's ptxas lines), JUnit XML, nvidia-smi, the
#                       ncu CSV and its table
#   FAILED              the names of the failed steps (absent when all passed)
# Without a GPU (or with --dry-run) it runs the host steps, the measuring scripts' own dry runs
# (cases, byte counts, tables, the op calls on the CPU) and stops, saying so.
#
# Usage (from anywhere; runs in the repository root):
#   bash scripts/gpu_verify.sh [--dry-run] [RESULTS_DIR]   default: benchmarks/results/gpu-<UTC time>
#   PYTHON=python3            interpreter with a CUDA build of torch (default: python3)
#   TORCH_CUDA_ARCH_LIST=9.0  the archs to build (default: the visible GPU's, e.g. 9.0 on an H100)
# Wheels of missing test packages (pytest, hypothesis, pytest-benchmark and their needs) are
# installed from .whl/ when present (no network on a lent machine).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo="$PWD"
dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then
  dry_run=1
  shift
fi
py="${PYTHON:-python3}"
out="${1:-benchmarks/results/gpu-$(date -u +%Y%m%d-%H%M%S)}"
mkdir -p "$out/logs" || exit 1
out="$(cd "$out" && pwd)"
logs="$out/logs"
deadline_s="${DQA_GPU_DEADLINE_S:-290}"
started=$SECONDS
# Each step appends its row to steps.md (background steps too) and its name to failed.txt.
rows="$out/steps.md"
failed_list="$out/failed.txt"
tables="$out/tables.md"
: >"$rows"
: >"$failed_list"
: >"$tables"
record() {  # record NAME STATUS SECONDS
  echo "| $1 | $2 | $3 |" >>"$rows"
  [[ "$2" == ok ]] || echo "$1" >>"$failed_list"
}

# step NAME CAP_S CMD...: runs CMD under `timeout` (CAP_S, or what is left of the deadline minus
# 15 s for packing), stdout and stderr in logs/NAME.log; records status and seconds.
step() {
  local name="$1" cap="$2"
  shift 2
  local left=$((deadline_s - (SECONDS - started) - 15))
  local limit=$((cap < left ? cap : left))
  if ((limit < 10)); then
    echo "== $name: SKIPPED (out of time)"
    record "$name" "skipped: out of time" 0
    return 1
  fi
  echo "== $name (timeout ${limit}s): $*"
  local t0=$SECONDS rc=0
  timeout --kill-after=10 "$limit" "$@" >"$logs/$name.log" 2>&1 || rc=$?
  local dt=$((SECONDS - t0)) status="ok"
  if ((rc == 124 || rc == 137)); then
    status="TIMED OUT after ${limit}s"
  elif ((rc != 0)); then
    status="FAILED (rc=$rc)"
  fi
  echo "   $name: $status (${dt}s)"
  record "$name" "$status" "$dt"
  [[ "$status" == ok ]]
}

# table FILE TITLE: appends a step's markdown table to the summary's tables.
table() {
  [[ -s "$1" ]] || return 0
  { echo; echo "$2"; echo; cat "$1"; } >>"$tables"
}

finish() {
  local total=$((SECONDS - started))
  local failed=()
  mapfile -t failed <"$failed_list"
  {
    echo "# dqa_ext GPU verification"
    echo
    echo "result: $(if ((${#failed[@]})); then echo "FAILED: ${failed[*]}"; else echo "all steps passed"; fi)"
    echo "$1"
    echo
    echo "| step | status | seconds |"
    echo "| --- | --- | --- |"
    cat "$rows"
    echo
    echo "total: ${total}s"
    echo
    echo '## environment'
    echo '```'
    cat "$logs/environment.log" 2>/dev/null
    echo '```'
    cat "$tables"
    for name in "${failed[@]}"; do
      [[ -f "$logs/$name.log" ]] || continue
      echo
      echo "## $name: last 40 lines"
      echo '```'
      tail -n 40 "$logs/$name.log"
      echo '```'
    done
  } >"$out/SUMMARY.md"
  if ((${#failed[@]})); then printf '%s\n' "${failed[@]}" >"$out/FAILED"; else rm -f "$out/FAILED"; fi
  rm -f "$rows" "$failed_list" "$tables"
  tar -czf "$out/logs.tar.gz" -C "$out" logs && rm -rf "$logs"
  echo
  echo "results: $out ($(ls "$out" | tr '\n' ' '))"
  sed -n '1,/^total:/p' "$out/SUMMARY.md"
  ((${#failed[@]} == 0))
  exit $?
}

# ---- host steps: no GPU needed ----
environment() {
  echo "date_utc: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "host: $(hostname)  cpus: $(nproc)"
  echo "git: $(git rev-parse --verify -q HEAD || echo no-commit)" \
       "($(git status --porcelain 2>/dev/null | wc -l) changed files)"
  echo "nvcc: $("${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" --version 2>/dev/null | tail -n 1 || echo none)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem \
    --format=csv,noheader 2>/dev/null | sed 's/^/gpu: /' || echo "gpu: nvidia-smi not available"
  "$py" - <<'PY'
import platform, torch
print("python:", platform.python_version(), "torch:", torch.__version__, "cuda:", torch.version.cuda)
print("cuda_available:", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device:", p.name, "sm_%d%d" % (p.major, p.minor), "SMs:", p.multi_processor_count,
          "memory_GiB: %.1f" % (p.total_memory / 2**30), "L2_MiB:", getattr(p, "L2_cache_size", 0) // 2**20)
PY
}
export py
export -f environment
step environment 60 bash -c environment
nvidia-smi >"$logs/nvidia-smi.txt" 2>&1 || true

# Test packages: from .whl/ only when the interpreter lacks them (no network on a lent machine).
wheels() {
  if "$py" -c "import pytest, hypothesis, pytest_benchmark" 2>/dev/null; then
    echo "pytest, hypothesis and pytest-benchmark are installed"
    return 0
  fi
  compgen -G "$repo/.whl/*.whl" >/dev/null || { echo "missing test packages and no .whl/ folder"; return 1; }
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/dqa-site "$repo"/.whl/*.whl || return 1
  echo "installed into /tmp/dqa-site: $(ls "$repo"/.whl | tr '\n' ' ')"
}
export repo
export -f wheels
if step wheels 90 bash -c wheels && [[ -d /tmp/dqa-site ]]; then export PYTHONPATH="/tmp/dqa-site${PYTHONPATH:+:$PYTHONPATH}"; fi

# The kernel and module tests (the robustness suite's need ART and mlxtend); in them, every test
# marked cuda (the DEVICES-parametrised tests' cuda cases included).
kernel_tests=("$repo/tests/kernels" "$repo/tests/module")
# They import and collect (catches an import error before any GPU minute is spent).
step collect 60 "$py" -m pytest -q --collect-only -p no:cacheprovider -m cuda "${kernel_tests[@]}"
gpu=0
if ((dry_run == 0)) && "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  gpu=1
fi
if ((gpu == 0)); then
  # The measuring scripts' dry runs: cases, byte counts and tables, the op calls on the CPU.
  dry="$(mktemp -d)"
  step dry_device_time 120 "$py" "$repo/scripts/gpu_device_time.py" --dry-run --out "$dry"
  step dry_profile 30 "$py" "$repo/scripts/gpu_profile.py" kernels --dry-run --labels "$dry/labels.json"
  step dry_train_step 120 "$py" "$repo/scripts/gpu_train_step.py" --dry-run --out "$dry"
  rm -rf "$dry"
  why="no GPU"
  if ((dry_run)); then
    why="--dry-run"
  else
    record gpu "FAILED: torch sees no CUDA device: nothing verified" 0
  fi
  echo "== $why: stopping after the host steps (next: build, CUDA tests and sanitizers, device time, ncu, training step)"
  echo "| build, pytest_cuda, sanitizers, device_time, profile_ncu, train_step | not run: $why | 0 |" >>"$rows"
  finish "stopped after the host steps: $why"
fi

# ---- GPU steps ----
if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
  TORCH_CUDA_ARCH_LIST="$("$py" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')"
  export TORCH_CUDA_ARCH_LIST
fi
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
# Non-editable install, ptxas's resource lines in the log (nvcc reads NVCC_APPEND_FLAGS); Python
# then runs from outside the checkout so that the installed package (with its _C) is imported.
if ! step build 150 env NVCC_APPEND_FLAGS="-Xptxas -v" "$py" -m pip install -v --no-build-isolation --no-deps --no-index "$repo"; then
  echo "| everything after the build | not run: the build failed | 0 |" >>"$rows"
  finish "stopped: the build failed"
fi
# From a scratch folder: Python then imports the installed package (with its _C), not the source
# tree's dqa_ext/, and what the tools leave in their working folder (.hypothesis/) stays out of $out.
work="$(mktemp -d)"
cd "$work" || exit 1
# The installed package has CUDA kernels (else every CUDA test would skip and pass).
step backend_info 30 "$py" -c 'import json, dqa_ext
from dqa_ext import _backend
print(json.dumps(dqa_ext.backend_info(), indent=2, default=str))
assert _backend.BUILT_FOR["cuda"], "dqa_ext was built without its CUDA kernels"'

# At once, none of them timed: the kernels' own tests and two sanitizers (one GPU, three processes).
step pytest_cuda_kernels 90 "$py" -m pytest -q -x -rs -p no:cacheprovider \
  --junitxml="$logs/pytest_cuda_kernels.xml" "$repo/tests/kernels/test_cuda_kernels.py" &
san="${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer"
[[ -x "$san" ]] || san="$(command -v compute-sanitizer || true)"
sanitize() {  # sanitize TOOL CAP [--big]
  local tool="$1" cap="$2"
  shift 2
  # No caching allocator: memcheck then sees each tensor's own bounds.
  step "sanitizer_$tool" "$cap" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$san" --tool "$tool" \
    --error-exitcode 1 "$py" "$repo/scripts/gpu_sanitize_paths.py" "$@"
}
if [[ -z "$san" ]]; then
  record sanitizers "FAILED: compute-sanitizer not found" 0
else
  sanitize memcheck 90 --big &
  sanitize racecheck 90 &
fi
wait

# On the quiet GPU: the measurements.
if step device_time 75 "$py" -u "$repo/scripts/gpu_device_time.py" --out "$logs"; then
  table "$logs/device_time.md" "## Device and host time (scripts/gpu_device_time.py)"
fi
[[ -f "$logs/device_time.json" ]] && cp "$logs/device_time.json" "$out/"
ncu="$(command -v ncu || true)"
[[ -n "$ncu" ]] || ncu="${CUDA_HOME:-/usr/local/cuda}/bin/ncu"
if [[ -x "$ncu" ]]; then
  # Clocks left as they are (the device-time figures ran at the same clocks).
  if step profile_ncu 60 "$ncu" --profile-from-start off --clock-control none --csv --page raw \
      --log-file "$logs/ncu.csv" --metrics "$("$py" "$repo/scripts/gpu_profile.py" metrics)" \
      --section WarpStateStats "$py" "$repo/scripts/gpu_profile.py" kernels --labels "$logs/ncu_labels.json" &&
     step ncu_summary 30 "$py" "$repo/scripts/gpu_profile.py" summary "$logs/ncu.csv" \
      --labels "$logs/ncu_labels.json" --out "$logs/ncu_table.md"; then
    table "$logs/ncu_table.md" "## Nsight Compute, key case [32, 64, 56, 56] (scripts/gpu_profile.py)"
  fi
else
  record profile_ncu "FAILED: ncu not found" 0
fi
step train_step 80 "$py" -u "$repo/scripts/gpu_train_step.py" --out "$logs"
if [[ -f "$logs/train_step.md" ]]; then
  table "$logs/train_step.md" "## Training step (scripts/gpu_train_step.py)"
elif [[ -f "$logs/train_step.json" ]]; then  # cut short: the modes it finished
  { echo; echo "## Training step (cut short; the modes measured, from train_step.json)"; echo; echo '```'
    cat "$logs/train_step.json"; echo '```'; } >>"$tables"
fi
[[ -f "$logs/train_step.json" ]] && cp "$logs/train_step.json" "$out/"

# With the time left: the other CUDA tests, then the other two sanitizers.
step pytest_cuda_rest 120 "$py" -m pytest -q -rs -p no:cacheprovider --continue-on-collection-errors -m cuda \
  --deselect "$repo/tests/kernels/test_cuda_kernels.py" --junitxml="$logs/pytest_cuda_rest.xml" "${kernel_tests[@]}"
if [[ -n "$san" ]]; then
  sanitize initcheck 60 &
  sanitize synccheck 60 &
  wait
fi

finish "ran on the GPU"
