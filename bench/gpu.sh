#!/usr/bin/env bash
# The whole GPU job in one command of at most 8 minutes on a bare machine (its own torch, CUDA and Triton, no
# network): build fastalign._C for this GPU's architecture only, run the GPU tests, run the headline benchmarks.
#
#   bash bench/gpu.sh              # on the GPU machine; everything lands in $OUT (default /tmp/fastalign_gpu)
#   bash bench/gpu.sh --dry-run    # every step on the CPU at tiny shapes, in a copy of the checkout (a rehearsal)
#
# Peers join offline from .whl/ (made by bench/prepare_wheels.sh where there is network; carry .whl/ along).
# Each step has its own time limit and writes into $OUT as it goes, so a timeout still leaves what finished:
#   $OUT/steps.log (each step, its exit status and seconds), build.log, env.txt, gpu_tests.log, bench.log,
#   $OUT/results/{run,logprobs,gae,dpo}.{json,md,png}  (a benchmark cut short leaves a "partial" JSON).
# Budget (seconds): install 20, build 150, tests 100, logprobs 170, gae 30, dpo 60: 530 s < 8 minutes.
set -uo pipefail
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-/tmp/fastalign_gpu}
OUT=$(mkdir -p "$OUT" && cd "$OUT" && pwd)
mkdir -p "$OUT/results"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 FASTALIGN_BENCH_PROGRESS=0
T0=$SECONDS

SCALE=1  # the dry run's limits are 4x: it rehearses the steps on a slow 2-core CPU, its timing means nothing
[ $DRY = 1 ] && SCALE=4

step() {  # step NAME LIMIT LOG COMMAND...: run with a time limit, log its status and time
  local name=$1 limit=$(($2 * SCALE)) log=$3
  shift 3
  local t=$SECONDS
  echo "== $name (limit ${limit}s, at $((SECONDS - T0))s)" | tee -a "$OUT/steps.log"
  timeout --kill-after=10 "$limit" "$@" >>"$OUT/$log" 2>&1
  local rc=$?
  echo "   $name: exit $rc$([ $rc = 124 ] && echo ' (timed out)') in $((SECONDS - t))s" | tee -a "$OUT/steps.log"
  tail -n 4 "$OUT/$log"
  return 0
}

if [ $DRY = 1 ]; then
  # A fresh copy of the checkout (tracked and untracked files, no build outputs), as the GPU machine gets it.
  WORK=$(mktemp -d /tmp/fastalign-dry.XXXX)
  (cd "$REPO" && git ls-files -co --exclude-standard -z | xargs -0 cp --parents -t "$WORK" 2>/dev/null)
  [ -d "$REPO/.whl" ] && cp -r "$REPO/.whl" "$WORK/"
  cd "$WORK"
  DEVICE=cpu
  BENCH_FLAGS=(--dry-run)
  export FASTALIGN_NO_CUDA=1
  echo "dry run in $WORK" | tee -a "$OUT/steps.log"
else
  cd "$REPO"
  DEVICE=cuda
  BENCH_FLAGS=()
fi

# 1. peers, offline, into a private prefix that shadows nothing of torch/triton (the wheels hold neither)
if ls .whl/*.whl >/dev/null 2>&1; then
  step install 20 install.log "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/fastalign-peers \
    .whl/*.whl
  export PYTHONPATH=/tmp/fastalign-peers
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || echo "no nvidia-smi" >"$OUT/nvidia-smi.txt"

# 2. build for this machine's architecture only, all cores (ninja when present: bench/prepare_wheels.sh adds it)
ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability()) if torch.cuda.is_available() \
  else print('')" 2>/dev/null)
export TORCH_CUDA_ARCH_LIST=${ARCH:-9.0} MAX_JOBS=$(nproc)
step build 150 build.log "$PY" setup.py build_ext --inplace -j "$(nproc)"
grep -E "^fastalign:|error" "$OUT/build.log" | head -20
"$PY" -m fastalign.env >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# 3. the GPU tests (skipped, but collected, on the CPU)
export FASTALIGN_TEST_DEVICE=$DEVICE
step gpu-tests 100 gpu_tests.log "$PY" -m pytest -m gpu -q -p no:cacheprovider \
  --durations=10

# 4. the headline benchmarks, each its own process and limit: linear_logprobs at N=8192 D=4096 V=128256 and
#    D=2304 V=256000 softcap 30 (bf16), gae at B=512 T=4096 (--quick: the headline shape only), the fused DPO loss
#    at 8 pairs T=1024 D=4096 V=128256 (--quick: no T sweep)
step logprobs 170 bench.log "$PY" -m bench logprobs --device $DEVICE --out "$OUT/results" --no-progress \
  "${BENCH_FLAGS[@]}"
step gae 30 bench.log "$PY" -m bench gae --device $DEVICE --quick --out "$OUT/results" --no-progress "${BENCH_FLAGS[@]}"
step dpo 60 bench.log "$PY" -m bench dpo --device $DEVICE --quick --out "$OUT/results" --no-progress "${BENCH_FLAGS[@]}"
echo "== done in $((SECONDS - T0))s; results in $OUT/results" | tee -a "$OUT/steps.log"
ls "$OUT/results"
[ $DRY = 1 ] && rm -rf "$WORK"
exit 0
