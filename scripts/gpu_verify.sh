#!/usr/bin/env bash
# The CUDA verification for a lent GPU (sized for one H200 and a 10-minute command): builds
# dqa_ext for the GPU's arch only; then at once the CUDA tests, compute-sanitizer (memcheck,
# racecheck, initcheck, synccheck) over every kernel path and, when the robustness extras' wheels
# are in .whl/robust/, `dqa reproduce` on the GPU; then, on a quiet GPU, the CUDA benchmarks
# against the peers (kernels and training steps) and the profiles behind the targets (ncu on the
# kernels, torch.profiler on a ResNet-20 step). Everything lands in ONE results folder of at most
# 6 files (a lent machine returns at most 8):
#   SUMMARY.md          each step: status, seconds, the tail of its log when it failed; environment
#   logs.tar.gz         every step's full log, the JUnit XML of the tests, nvidia-smi, the profiles,
#                       the benchmark tables of torch.compile (bench_compile/) and of the other
#                       activation shapes (bench_more/)
#   bench/*.md|json     the benchmark tables and record (benchmarks/conftest.py writes them)
#   reproduce.tar.gz    dqa reproduce's report, results and per-model evaluations (no checkpoints)
#   FAILED              the names of the failed steps (absent when all passed)
# A failed build ends the run (nothing after it could pass); any other failure is recorded and the
# next step runs; each step has its own timeout, cut to what is left of the overall deadline
# (DQA_GPU_DEADLINE_S, default 540 s).
# Without a GPU (or with --dry-run) it runs the host steps and stops before the first step that
# needs one, saying so.
#
# Usage (from anywhere; runs in the repository root):
#   bash scripts/gpu_verify.sh [--dry-run] [RESULTS_DIR]   default: benchmarks/results/gpu-<UTC time>
#   PYTHON=python3            interpreter with a CUDA build of torch (default: python3)
#   TORCH_CUDA_ARCH_LIST=9.0  the archs to build (default: the visible GPU's, e.g. 9.0 on an H200)
# Wheels of missing test packages (pytest, hypothesis, pytest-benchmark and their needs) are
# installed from .whl/ when present: see README's "CUDA verification on a lent GPU".
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
deadline_s="${DQA_GPU_DEADLINE_S:-540}"
started=$SECONDS
# Each step appends its row to steps.md (background steps too) and its name to failed.txt.
rows="$out/steps.md"
failed_list="$out/failed.txt"
: >"$rows"
: >"$failed_list"
record() {  # record NAME STATUS SECONDS
  echo "| $1 | $2 | $3 |" >>"$rows"
  [[ "$2" == ok ]] || echo "$1" >>"$failed_list"
}

# step NAME CAP_S CMD...: runs CMD under `timeout` (CAP_S, or what is left of the deadline minus
# 20 s for packing), stdout and stderr in logs/NAME.log; records status and seconds.
step() {
  local name="$1" cap="$2"
  shift 2
  local left=$((deadline_s - (SECONDS - started) - 20))
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
  rm -f "$rows" "$failed_list"
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
          "memory_GiB: %.1f" % (p.total_memory / 2**30))
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

# The robustness extras (ART, mlxtend; absent on a lent machine) from .whl/robust/, for
# `dqa reproduce` on the GPU.
robust() {
  compgen -G "$repo/.whl/robust/*.whl" >/dev/null || { echo "no .whl/robust/: dqa reproduce will not run"; return 1; }
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/dqa-robust "$repo"/.whl/robust/*.whl || return 1
  echo "installed into /tmp/dqa-robust: $(ls "$repo"/.whl/robust | tr '\n' ' ')"
}
export -f robust
have_robust=0
if ((dry_run == 0)) && compgen -G "$repo/.whl/robust/*.whl" >/dev/null && step robust 60 bash -c robust; then
  have_robust=1
  export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}/tmp/dqa-robust"
fi

# The kernel test files and convert's (the robustness suite's need ART and mlxtend); in them,
# every test whose id or file names cuda (DEVICES-parametrised tests included).
kernel_tests=()
for f in test_cuda_kernels test_layouts test_math test_module test_compile test_errors test_convert; do
  kernel_tests+=("$repo/tests/$f.py")
done
# They import and collect (catches an import error before any GPU minute is spent).
step collect 60 "$py" -m pytest -q --collect-only -p no:cacheprovider -k cuda "${kernel_tests[@]}"

gpu=0
if ((dry_run == 0)) && "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  gpu=1
fi
if ((gpu == 0)); then
  why="no GPU"
  if ((dry_run)); then
    why="--dry-run"
  else
    record gpu "FAILED: torch sees no CUDA device: nothing verified" 0
  fi
  echo "== $why: stopping after the host steps (next: build for the GPU's arch, CUDA tests, sanitizers, benchmarks)"
  echo "| build, pytest_cuda, sanitizers, bench_cuda | not run: $why | 0 |" >>"$rows"
  finish "stopped after the host steps: $why"
fi

# ---- GPU steps ----
if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
  TORCH_CUDA_ARCH_LIST="$("$py" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')"
  export TORCH_CUDA_ARCH_LIST
fi
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
# Non-editable install; Python then runs from outside the checkout so that the installed package
# (with its _C) is the one imported, not the source tree's dqa_ext/.
if ! step build 300 "$py" -m pip install -v --no-build-isolation --no-deps --no-index "$repo"; then
  echo "| everything after the build | not run: the build failed | 0 |" >>"$rows"
  finish "stopped: the build failed"
fi
# From a scratch folder: Python then imports the installed package (with its _C), not the source
# tree's dqa_ext/, and what the tools leave in their working folder (.hypothesis/) stays out of $out.
work="$(mktemp -d)"
cd "$work" || exit 1
# The installed package has CUDA kernels (else every CUDA test would skip and pass).
step backend_info 60 "$py" -c 'import json, dqa_ext
from dqa_ext import _backend
print(json.dumps(dqa_ext.backend_info(), indent=2, default=str))
assert _backend.BUILT_FOR["cuda"], "dqa_ext was built without its CUDA kernels"'

# At once, none of them timed: the CUDA tests, the four sanitizers (one GPU, four processes) and
# dqa reproduce. The benchmarks wait for all of them.
step pytest_cuda 200 "$py" -m pytest -q -rs -p no:cacheprovider --continue-on-collection-errors -k cuda \
  --junitxml="$logs/pytest_cuda.xml" "${kernel_tests[@]}" &
if ((have_robust)); then
  # The default preset on the GPU (bf16 autocast in training); its timing is shared with the
  # tests and sanitizers running beside it. Checkpoints stay behind (they are reproducible).
  step reproduce 210 env OMP_NUM_THREADS=4 "$py" -u -m dqa_ext reproduce --out "$out/reproduce" --device cuda &
fi

# compute-sanitizer, the four tools at once (one GPU, four processes): small cases of every path.
san="${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer"
[[ -x "$san" ]] || san="$(command -v compute-sanitizer || true)"
if [[ -z "$san" ]]; then
  record sanitizers "FAILED: compute-sanitizer not found" 0
else
  for tool in memcheck racecheck initcheck synccheck; do
    extra=()
    [[ "$tool" == memcheck ]] && extra=(--big)
    # No caching allocator: memcheck then sees each tensor's own bounds.
    step "sanitizer_$tool" 150 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$san" --tool "$tool" \
      --error-exitcode 1 "$py" "$repo/scripts/gpu_sanitize_paths.py" "${extra[@]}" &
  done
fi
wait
if [[ -d "$out/reproduce" ]]; then  # what it wrote, finished or not (per-model evaluations resume)
  tar -czf "$out/reproduce.tar.gz" -C "$out" --exclude=reproduce/models reproduce && rm -rf "$out/reproduce"
fi

# The CUDA benchmarks against the peers, short: the key shape [32,64,56,56] and ResNet-20's last
# stage, every dtype, layout and granularity, without torch.compile (seconds per graph), and the
# training steps (ResNet-20 at batch 256); torch.compile against ext on the key case, apart, so
# that a slow compile cannot cost the first table; the profiles; then the other activation
# shapes (ResNet-50 with 256 channels, ResNet-20's first stage) into the logs.
step bench_cuda 150 env DQA_BENCH_COMPILE=0 "$py" -m pytest -q -p no:cacheprovider \
  "$repo/benchmarks/test_bench_ops.py" "$repo/benchmarks/test_bench_training.py" \
  -k "cuda and (r50a or r20c or resnet20 or mnist_cnn)" \
  --bench-budget 0.05 --bench-write --bench-results "$out/bench"
step bench_cuda_compile 90 env DQA_BENCH_COMPILE=key "$py" -m pytest -q -p no:cacheprovider \
  "$repo/benchmarks/test_bench_ops.py" -k "cuda and r50a and pc and nchw and (ext or compile)" \
  --bench-budget 0.05 --bench-write --bench-results "$logs/bench_compile"
step profile_training 60 "$py" "$repo/scripts/gpu_profile.py" training
ncu="$(command -v ncu || true)"
[[ -n "$ncu" ]] || ncu="${CUDA_HOME:-/usr/local/cuda}/bin/ncu"
if [[ -x "$ncu" ]]; then
  # Each dqa_ext kernel of the key case: duration, DRAM bytes and throughput against the peak,
  # occupancy. Clocks left as they are (the benchmarks ran at the same clocks).
  step profile_ncu 90 "$ncu" --clock-control none --kernel-name-base demangled -k regex:dqa_cuda \
    --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__throughput.avg.pct_of_peak_sustained_elapsed,sm__warps_active.avg.pct_of_peak_sustained_active,launch__grid_size,launch__block_size,launch__registers_per_thread \
    --csv --print-units base "$py" "$repo/scripts/gpu_profile.py" kernels
else
  record profile_ncu "FAILED: ncu not found" 0
fi
step bench_cuda_more 90 env DQA_BENCH_COMPILE=0 "$py" -m pytest -q -p no:cacheprovider \
  "$repo/benchmarks/test_bench_ops.py" -k "cuda and (r50b or r20a)" \
  --bench-budget 0.05 --bench-write --bench-results "$logs/bench_more"

finish "ran on the GPU"
