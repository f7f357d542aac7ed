#!/usr/bin/env bash
# One GPU session's whole job, in one call of the device tool (see README "GPU runs"):
# build fastalign._C with the CUDA kernels, run the GPU tests, run every benchmark on the GPU, and leave
# the logs plus bench/results/*_cuda.{json,md,png} (as one tarball) under $OUT.
#   run: bash bench/gpu.sh            (carry .whl with peer wheels to include Liger / CCE / TRL)
set -uo pipefail
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
  echo "== build"; TORCH_CUDA_ARCH_LIST="9.0" python3 setup.py build_ext --inplace 2>&1 | grep -E "fastalign:|error|Error" 
  python3 -m fastalign.env
  echo "== GPU tests"; FASTALIGN_TEST_DEVICE=cuda timeout 240 python3 -m pytest -m gpu -q -x --durations=15 2>&1 | tail -40
} 2>&1 | tee "$OUT/build_and_tests.log"
export FASTALIGN_BENCH_OUT=$OUT/results
for bench in bench_logprobs bench_gae bench_dpo; do
  [ -f "bench/$bench.py" ] || continue
  echo "== $bench"; timeout 300 python3 -m "bench.$bench" --device cuda 2>&1 | tail -60
done 2>&1 | tee "$OUT/bench.log"
tar czf "$OUT/results.tgz" -C "$OUT" results && rm -rf "$OUT/results"
