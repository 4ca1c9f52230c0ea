#!/usr/bin/env bash
# The GPU checks, in one run on a lent CUDA machine (see the README, "Development"):
# the CUDA test set, the collector benchmark, then the race tests under the CUDA sanitizer.
# Everything it prints and measures lands in $OUT (default ./gpu-out).
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
else
  echo "no .whl/: build the wheels first (README, Development)" >&2; exit 2
fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import sys, torch; print(sys.version.split()[0], torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))"
} 2>&1 | tee "$OUT/device.txt"
timeout "${TEST_S:-180}" python3 -P -m pytest -q -ra -p no:cacheprovider tests/collector/test_cuda.py 2>&1 | tail -40 | tee "$OUT/cuda-tests.txt"
timeout "${PROF_S:-60}" python3 bench/profile_capture.py 2>&1 | head -45 | tee "$OUT/profile.txt"
timeout "${BENCH_S:-240}" python3 bench/collector_overhead.py --results "$OUT/RESULTS.md" --json "$OUT/collector.json" 2>&1 | tail -50 | tee "$OUT/bench.txt"
TORCH_CUDA_SANITIZER=1 timeout "${SAN_S:-90}" python3 -P -m pytest -q -ra -p no:cacheprovider tests/collector/test_cuda.py \
  -k "reads_gradients and eager and tables or staging" 2>&1 | tail -25 | tee "$OUT/sanitizer.txt"
