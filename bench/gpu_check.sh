#!/usr/bin/env bash
# One command for the GPU machine: the kernel tests (bf16/fp16/fp32), then the kernel benchmark.
# Usage (repo root, CUDA machine):  bash bench/gpu_check.sh [OUTDIR]
# Writes OUTDIR/gpu_tests.log, OUTDIR/bench.log, OUTDIR/results_kernels.json and .md (OUTDIR default: $OUT or .).
# On a machine that received a copy of the tree (stale or no .git), name the commit: SLA_COMMIT=abc1234 bash ...
set -o pipefail
out="${1:-${OUT:-.}}"
shift || true
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
if ! python3 -c "import pytest" 2>/dev/null; then
    # No pytest on the machine: wheels carried in .whl (see .library/device/README.md).
    python3 -m pip install -q --no-index --no-deps --target /tmp/sla_site .whl/pytest-*.whl .whl/pluggy-*.whl \
        .whl/iniconfig-*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/sla_site"
fi
per_test=""
python3 -c "import pytest_timeout" 2>/dev/null && per_test="--timeout ${SLA_PER_TEST_TIMEOUT:-45}"
timeout "${SLA_TEST_TIMEOUT:-240}" python3 -m pytest tests/gpu/test_triton_gpu.py -q -rfE -p no:cacheprovider $per_test \
    2>&1 | tee "$out/gpu_tests.log" | tail -40
echo "gpu tests exit: ${PIPESTATUS[0]}"
[ -n "${SLA_SKIP_BENCH:-}" ] && exit 0
timeout "${SLA_BENCH_TIMEOUT:-360}" python3 bench/bench_kernels.py --out "$out/results_kernels.json" \
    --md "$out/results_kernels.md" "$@" 2>&1 | tee "$out/bench.log" | tail -60
