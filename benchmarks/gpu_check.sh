#!/usr/bin/env bash
# The GPU check, in one short call on a CUDA machine (e.g. the device tool's `run`):
#   1. the CUDA cases of the test suite (the case table runs every case on cuda when present;
#      the memory planner against torch.cuda.max_memory_allocated),
#   2. the quick benchmark on the GPU (`python -m funchess bench --device cuda --quick`),
#   3. the demo on the GPU.
# Each step has its own timeout; the whole script stays under ~5 minutes, so a 15-minute device
# budget leaves room for the machine's start and one rerun. Give the call a timeout of ~360 s.
# Output goes to $OUT (or ./funchess-gpu-check): gpu.txt, tests.txt, bench/results.{md,json},
# bench/bench.png, demo/*.png.
#
# Packages: funchess needs optree (and hypothesis/pytest for the tests, matplotlib/tqdm for the
# command line). On a machine without a package index, carry wheels in ./.whl (see
# /work/.library/device/README.md): they are installed to /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-funchess-gpu-check}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/gpu.txt"
python3 -c "import torch, optree; assert torch.cuda.is_available(), 'torch sees no GPU'; \
print('torch', torch.__version__, torch.cuda.get_device_name())" 2>&1 | tee -a "$out/gpu.txt" || exit 1

status=0
echo "== 1/3 CUDA tests"
timeout 120 python3 -m pytest -q -x -p no:cacheprovider -k "cuda" tests/test_cases.py tests/test_memory.py 2>&1 | tee "$out/tests.txt" \
    || status=1
echo "== 2/3 python -m funchess bench --device cuda --quick"
timeout 170 python3 -m funchess bench --device cuda --quick --no-progress --time-limit 20 --out "$out/bench" 2>&1 \
    | tee "$out/bench.txt" || status=1
echo "== 3/3 python -m funchess demo --device cuda --quick"
timeout 45 python3 -m funchess demo --device cuda --quick --no-progress --out "$out/demo" 2>&1 | tee "$out/demo.txt" \
    || status=1
echo "gpu_check: exit status $status"
exit $status
