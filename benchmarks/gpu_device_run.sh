#!/usr/bin/env bash
# One call on a lent GPU machine (H100/H200): build the extension against the machine's torch, run the
# CUDA tests (tests/backends/cuda/test_device.py), then the benchmark (benchmarks/gpu_speed.py, which appends its
# table to benchmarks/RESULTS.md). Logs and results go to $OUT (default ./gpu_out). Each stage has its own
# time limit, so one slow stage cannot eat the whole device lease:
#   BUILD_SECONDS (180), TEST_SECONDS (150), BENCH_SECONDS (300), BENCH_MAX (timing budget passed to
#   gpu_speed.py --max-seconds, 150). Extra arguments go to gpu_speed.py.
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 MAX_JOBS=${MAX_JOBS:-16}
PY=${PY:-python3}
T0=$(date +%s)
stamp() { echo "== $1 at $(( $(date +%s) - T0 )) s"; }

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/env.txt"
$PY -c "import torch, triton, numpy; print('torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/env.txt"

timeout "${BUILD_SECONDS:-180}" $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
stamp "build done"

timeout "${TEST_SECONDS:-150}" $PY -m pytest -q -p no:cacheprovider -rs --durations=6 tests/backends/cuda/test_device.py \
    > "$OUT/cuda_tests.log" 2>&1
echo "tests exit $?"; grep -E "passed|failed|error|^FAILED|^ERROR|SKIPPED" "$OUT/cuda_tests.log" | tail -25
stamp "tests done"

timeout "${BENCH_SECONDS:-300}" $PY benchmarks/gpu_speed.py --no-progress --max-seconds "${BENCH_MAX:-150}" "$@" \
    > "$OUT/gpu_speed.log" 2>&1
echo "benchmark exit $?"; tail -45 "$OUT/gpu_speed.log"
cp benchmarks/RESULTS.md benchmarks/gpu_speed.png "$OUT/" 2>/dev/null
stamp "all done"

if [ "${SWEEP:-1}" = 1 ]; then
    timeout "${SWEEP_SECONDS:-90}" $PY benchmarks/gpu_level_sweep.py > "$OUT/level_sweep.log" 2>&1
    echo "sweep exit $?"; cat "$OUT/level_sweep.log" | tail -60
    stamp "sweep done"
fi
