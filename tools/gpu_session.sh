#!/usr/bin/env bash
# Everything a session with a lent GPU machine runs, in one call from the repository root:
#   tools/gpu_session.sh
# builds the CUDA extension, runs tests/test_cuda.py, the rest of the test suite (slow tests
# included), then the benchmark, and writes every log to $OUT (./gpu-session-logs without $OUT).
#
# The machine is fresh (torch with CUDA, nvcc, ninja, pytest; no network), and a call there may
# last 600 s, so each stage runs under a deadline and the logs are written as they grow: a stage
# that runs out of time leaves its partial log. SESSION_BUDGET_S (default 570) is the whole budget;
# BUILD_S, CUDA_TESTS_S and TESTS_S cap the first three stages and the benchmark gets the rest.
set -uo pipefail
cd "$(dirname "$0")/.."

LOGS="${OUT:-$PWD/gpu-session-logs}"
mkdir -p "$LOGS"
BUDGET="${SESSION_BUDGET_S:-570}"
declare -A STATUS

# stage NAME CAP_S COMMAND...: runs COMMAND with its output in $LOGS/NAME.log, for at most CAP_S
# seconds and never past the session budget; records its exit status (124: out of time).
stage() {
  local name="$1" cap="$2"
  shift 2
  local left=$((BUDGET - SECONDS))
  local limit=$((cap < left ? cap : left))
  if ((left <= 5)); then
    echo "== $name: skipped, the session budget is spent"
    STATUS[$name]="skipped"
    return
  fi
  echo "== $name (at most ${limit} s): $*"
  timeout --kill-after=10 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  STATUS[$name]="exit $rc$([[ $rc == 124 ]] && echo ' (out of time)')"
  echo "== $name: ${STATUS[$name]} after $SECONDS s in all; last lines:"
  tail -n 15 "$LOGS/$name.log"
}

{
  echo "== machine"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  nvcc --version | tail -n 2 || true
  python - <<'EOF'
import importlib.util, os, sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| GPU", torch.cuda.get_device_name() if torch.cuda.is_available() else None,
      "| capability", torch.cuda.get_device_capability() if torch.cuda.is_available() else None)
missing = [m for m in ("numpy", "pytest", "setuptools", "ninja") if importlib.util.find_spec(m) is None]
print("missing modules:", ", ".join(missing) or "none")
print("TORCH_CUDA_ARCH_LIST:", os.environ.get("TORCH_CUDA_ARCH_LIST", "(unset: the visible GPU's)"))
EOF
} 2>&1 | tee "$LOGS/machine.log"

{
  stage build "${BUILD_S:-240}" \
    env MAX_JOBS=16 python -m pip install --no-build-isolation --no-deps -v -e .
  stage registrations 30 python -c \
    "import fused_opt; assert fused_opt.built_with_cuda(), 'no CUDA kernels registered'; print('CUDA kernels registered')"
  stage cuda_tests "${CUDA_TESTS_S:-180}" \
    python -m pytest tests/test_cuda.py -v -rs --durations=15 --junitxml="$LOGS/cuda_tests.xml"
  stage tests "${TESTS_S:-200}" \
    python -m pytest tests -q -rs --durations=15 --ignore=tests/test_cuda.py \
    --junitxml="$LOGS/tests.xml"
  stage bench "$BUDGET" python -m fused_opt.bench --output "$LOGS/bench"

  echo "== summary after $SECONDS s"
  for name in build registrations cuda_tests tests bench; do
    echo "$name: ${STATUS[$name]:-not run}"
  done
} 2>&1 | tee "$LOGS/session.log"
