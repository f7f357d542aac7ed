#!/usr/bin/env bash
# Download the peers' wheels for the GPU machine into .whl/ (gitignored), so that bench/gpu.sh installs them there
# with no network: Liger-Kernel, Cut Cross-Entropy, TRL, transformers and everything they need, except torch,
# triton and the CUDA libraries (the GPU machine's own are used).
#
#   bash bench/prepare_wheels.sh            # for CPython 3.12 on x86_64 Linux (PYVER=3.11 etc. to change)
#   bash bench/prepare_wheels.sh --no-trl   # without TRL and its datasets/pandas/pyarrow (about 60 MiB less)
#
# How: pip resolves the whole set for the target (metadata only), the torch/triton/nvidia entries are dropped,
# and the rest is downloaded with --no-deps. Prints the total size: the device tool carries at most 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PYVER=${PYVER:-3.12}
PEERS=(liger-kernel cut-cross-entropy transformers ninja)
[ "${1:-}" = "--no-trl" ] || PEERS+=(trl)
TARGET=(--python-version "$PYVER" --implementation cp --abi "cp${PYVER/./}" --abi abi3 --abi none
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
        --platform linux_x86_64 --platform any --only-binary=:all:)
mkdir -p .whl
REPORT=$(mktemp)
"$PY" -m pip install -q --dry-run --ignore-installed --report "$REPORT" --target /tmp/unused-target "${TARGET[@]}" \
  "${PEERS[@]}"
mapfile -t WANT < <("$PY" - "$REPORT" <<'EOF'
import json, re, sys
skip = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*|setuptools|pip|wheel)$")
for item in json.load(open(sys.argv[1]))["install"]:
    name = item["metadata"]["name"].lower().replace("_", "-")
    if not skip.match(name):
        print(f"{name}=={item['metadata']['version']}")
EOF
)
rm -f "$REPORT"
echo "downloading ${#WANT[@]} wheels: ${WANT[*]}"
"$PY" -m pip download -q --no-deps --dest .whl "${TARGET[@]}" "${WANT[@]}"
du -sh .whl
MIB=$(du -sm .whl | cut -f1)
[ "$MIB" -le 64 ] || echo "warning: .whl/ is ${MIB} MiB, over the 64 MiB the device tool carries: try --no-trl"
