#!/usr/bin/env bash
# A GPU session's job, in calls of at most 10 minutes each (the device tool's per-command limit):
#   bash bench/gpu.sh tests   build fastalign._C with the CUDA kernels, run the GPU tests       (~5 min budget)
#   bash bench/gpu.sh bench   build (cached), run every benchmark with --device cuda          (~9 min budget)
#   bash bench/gpu.sh         both, for a machine without the 10-minute limit
# Logs and bench/results/*_cuda.{json,md,png} (as one tarball) land under $OUT. Carry .whl/ with peer wheels
# (Liger-Kernel, Cut Cross-Entropy, TRL) to include them in the comparison.
set -uo pipefail
phase=${1:-all}
OUT=${OUT:-/tmp/fastalign_gpu}
mkdir -p "$OUT/results"
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
{
  echo "== build"
  TORCH_CUDA_ARCH_LIST="9.0" python3 setup.py build_ext --inplace 2>&1 | grep -E "fastalign:|error|Error"
  python3 -m fastalign.env
} 2>&1 | tee "$OUT/build.log"
if [ "$phase" = tests ] || [ "$phase" = all ]; then
  echo "== GPU tests"
  FASTALIGN_TEST_DEVICE=cuda timeout 280 python3 -m pytest -m gpu -q --durations=15 2>&1 | tee "$OUT/gpu_tests.log" | tail -40
fi
if [ "$phase" = bench ] || [ "$phase" = all ]; then
  export FASTALIGN_BENCH_OUT=$OUT/results
  for bench in bench_logprobs bench_gae bench_dpo; do
    echo "== $bench"; timeout 170 python3 -m "bench.$bench" --device cuda 2>&1 | tail -60
  done 2>&1 | tee "$OUT/bench.log"
  tar czf "$OUT/results.tgz" -C "$OUT" results
fi
rm -rf "$OUT/results"
