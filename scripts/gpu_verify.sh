#!/usr/bin/env bash
# Full CUDA verification for a machine with an NVIDIA GPU: builds and installs dqa_ext, runs the
# tests and benchmarks, runs compute-sanitizer (memcheck, racecheck) over one forward and one
# backward of every kernel path, and keeps every log with the machine's description.
#
# Usage (from anywhere; runs in the repository root):
#   bash scripts/gpu_verify.sh [RESULTS_DIR]     default: benchmarks/results/gpu-<UTC date-time>
#   PYTHON=/path/to/python                        interpreter with torch (CUDA build) installed
# Every step runs even if an earlier one failed; the exit status is non-zero if any failed.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
py="${PYTHON:-python}"
out="${1:-benchmarks/results/gpu-$(date -u +%Y%m%d-%H%M%S)}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
failed=()

# step NAME CMD...: runs CMD with stdout and stderr in $out/NAME.log, records a failure.
step() {
  local name="$1"
  shift
  echo "== $name: $*"
  if "$@" >"$out/$name.log" 2>&1; then
    echo "   ok"
  else
    echo "   FAILED (rc=$?), see $out/$name.log"
    failed+=("$name")
  fi
}

{
  echo "date_utc: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "host: $(hostname)"
  echo "git: $(git rev-parse --verify -q HEAD || echo no-commit) $(git status --porcelain 2>/dev/null | wc -l) changed files"
  echo "nvcc: $("${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" --version 2>/dev/null | tail -n 1 || echo none)"
} >"$out/environment.txt"
nvidia-smi >"$out/nvidia-smi.txt" 2>&1 || failed+=("nvidia-smi")
"$py" - >>"$out/environment.txt" 2>&1 <<'PY' || failed+=("torch-info")
import platform, torch
print("python:", platform.python_version())
print("torch:", torch.__version__, "cuda:", torch.version.cuda, "cudnn:", torch.backends.cudnn.version())
print("cuda_available:", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device:", p.name, "sm_%d%d" % (p.major, p.minor), "SMs:", p.multi_processor_count,
          "memory_GiB: %.1f" % (p.total_memory / 2**30))
PY

step check_cuda_kernels env DQA_EXT_REQUIRE_NVCC=1 bash scripts/check_cuda_kernels.sh
step build "$py" -m pip install -v --no-build-isolation --no-deps .
# Python runs from outside the checkout so that the installed package (with its _C) is the one
# imported, not the source tree's dqa_ext/.
step backend_info bash -c "cd '$out' && '$py' -c 'import dqa_ext, json; print(json.dumps(dqa_ext.backend_info(), indent=2, default=str))'"
step pytest bash -c "cd '$out' && '$py' -m pytest -v -rs '$PWD/tests' '$PWD/benchmarks'"

# One forward and one backward (with and without the step gradient) per kernel path, small
# sizes: compute-sanitizer is slow. The caching allocator is off so memcheck sees real bounds.
cat >"$out/sanitize_paths.py" <<'PY'
import torch
import dqa_ext  # noqa: F401  (loads the ops)

ops = torch.ops.dqa_ext
dev = "cuda"
torch.manual_seed(0)

def case(name, x, step, channel_dim, qmin=0, qmax=3):
    y = ops.fake_quantize(x, step, qmin, qmax, channel_dim)
    gy = torch.randn_like(x)
    gx, gs = ops.fake_quantize_backward(gy, x, step, qmin, qmax, channel_dim, 0.5, True)
    gx2, gs2 = ops.fake_quantize_backward(gy, x, step, qmin, qmax, channel_dim, 0.5, False)
    torch.cuda.synchronize()
    assert torch.equal(gx, gx2) and gs2.numel() == 0, name
    print(f"{name}: y {tuple(y.shape)} {y.dtype}, grad_step {tuple(gs.shape)}")

def steps(c):
    return torch.rand(c, device=dev) * 0.4 + 0.05

for dt in (torch.float32, torch.float16, torch.bfloat16):
    x = torch.randn(2, 8, 7, 7, device=dev, dtype=dt) * 2
    case(f"nchw per-channel odd inner {dt}", x, steps(8), 1)
    x = torch.randn(2, 16, 16, 16, device=dev, dtype=dt) * 2
    case(f"nchw per-channel long rows {dt}", x, steps(16), 1)
    case(f"channels_last {dt}", x.contiguous(memory_format=torch.channels_last), steps(16), 1)
    case(f"(N, C) {dt}", torch.randn(33, 24, device=dev, dtype=dt), steps(24), 1)
    case(f"per-tensor odd numel {dt}", torch.randn(3, 5, 7, 11, device=dev, dtype=dt),
         steps(1), 1)
    case(f"per-tensor {dt}", x, steps(1), 1, -4, 3)
    flat = torch.randn(1 + 4 * 8 * 5 * 5, device=dev, dtype=dt)
    case(f"misaligned view {dt}", flat[1:].view(4, 8, 5, 5), steps(8), 1)
bad = steps(8)
bad[3] = float("nan")
bad[5] = -1.0
case("non-finite / negative steps", torch.randn(2, 8, 9, 9, device=dev), bad, 1)
PY
san="${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer"
if [[ ! -x "$san" ]]; then san="$(command -v compute-sanitizer || true)"; fi
if [[ -z "$san" ]]; then
  echo "== compute-sanitizer not found"
  failed+=("compute-sanitizer-missing")
else
  for tool in memcheck racecheck; do
    step "sanitizer_$tool" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
      "$san" --tool "$tool" --error-exitcode 1 "$py" "$out/sanitize_paths.py"
  done
fi

echo
echo "logs: $out"
if [[ ${#failed[@]} -gt 0 ]]; then
  echo "FAILED: ${failed[*]}"
  echo "FAILED: ${failed[*]}" >"$out/FAILED"
  exit 1
fi
echo "all steps passed"
