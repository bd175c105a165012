#!/usr/bin/env bash
# One call on a two-GPU machine for issue 12: the decisive quality experiment (scripts/quality_experiment.py),
# the cost of combine="mass" (bench/bench_combine.py, on an idle GPU before the experiment's jobs reach it) and
# the GPU tests of the combine kernels. Everything lands in OUTDIR as it finishes:
#   results.tar (every result.json and log, results.md/json, bench and test logs), ckpt_<arm>.tar (seed 0 models)
#   bash bench/gpu_quality_run.sh OUTDIR
set -uo pipefail
out="${1:-${OUT:-runs/gpu_quality}}"
mkdir -p "$out"
work=/tmp/quality
mkdir -p "$work"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$work/gpus.txt"
budget="${SLA_EXPERIMENT_SECONDS:-430}"
# Both GPUs run the experiment, four jobs each, each job with its share of the CPU cores. The cost of
# combine="mass" and the GPU tests ran in the previous call of this script (bench/RESULTS.md); pass
# SLA_WITH_BENCH=1 to run them again first.
if [ -n "${SLA_WITH_BENCH:-}" ]; then
  CUDA_VISIBLE_DEVICES=1 timeout 120 python3 bench/bench_combine.py --out "$work/results_combine.json" \
      > "$work/bench_combine.log" 2>&1
  CUDA_VISIBLE_DEVICES=1 timeout 240 python3 -m pytest tests/gpu/test_triton_gpu.py -q -rfE -p no:cacheprovider \
      -k "mass or opcheck or all_critical or autocast or compile" > "$work/gpu_tests.log" 2>&1
fi
timeout "$budget" python3 scripts/quality_experiment.py run --out "$work/exp" --seeds 0 1 2 --gpus 0,1 \
    --jobs-per-gpu 4 > "$work/driver.log" 2>&1
python3 scripts/quality_experiment.py report "$work/exp" > "$work/report.log" 2>&1
cat "$work/report.log"
(cd "$work" && tar -cf "$out/results.tar" gpus.txt *.log results_combine.json exp/run.log exp/results.* \
    exp/*/seed*/result.json exp/*/seed*/job.log 2>/dev/null)
for arm in sla_mass sparse_only sla_paper; do
  [ -d "$work/exp/$arm/seed0/train/final" ] && tar -C "$work/exp/$arm/seed0/train" -cf "$out/ckpt_$arm.tar" final
done
ls -la "$out"
