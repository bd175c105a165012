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
budget="${SLA_EXPERIMENT_SECONDS:-460}"
# GPU 0 starts the experiment at once; GPU 1 first times the op alone, then runs the tests beside its own jobs.
timeout "$budget" python3 scripts/quality_experiment.py run --out "$work/exp" --seeds 0 1 2 --gpus 0 \
    --jobs-per-gpu 3 --arms full sparse_only sparse_only_flops sla_paper_plain > "$work/driver0.log" 2>&1 &
d0=$!
CUDA_VISIBLE_DEVICES=1 timeout 120 python3 bench/bench_combine.py --out "$work/results_combine.json" \
    > "$work/bench_combine.log" 2>&1
timeout "$((budget - 60))" python3 scripts/quality_experiment.py run --out "$work/exp" --seeds 0 1 2 --gpus 1 \
    --jobs-per-gpu 3 --arms sla_paper sla_mass sla_mass_plain > "$work/driver1.log" 2>&1 &
d1=$!
CUDA_VISIBLE_DEVICES=1 timeout 200 python3 -m pytest tests/gpu/test_triton_gpu.py -q -rfE -p no:cacheprovider \
    -k "mass or opcheck or all_critical or autocast or compile" > "$work/gpu_tests.log" 2>&1
echo "gpu tests exit $?" >> "$work/gpu_tests.log"
wait $d0 $d1
python3 scripts/quality_experiment.py report "$work/exp" > "$work/report.log" 2>&1
cat "$work/bench_combine.log" "$work/report.log"; tail -5 "$work/gpu_tests.log"
(cd "$work" && tar -cf "$out/results.tar" gpus.txt *.log results_combine.json exp/run.log exp/results.* \
    exp/*/seed*/result.json exp/*/seed*/job.log 2>/dev/null)
for arm in sla_mass sparse_only sla_paper; do
  [ -d "$work/exp/$arm/seed0/train/final" ] && tar -C "$work/exp/$arm/seed0/train" -cf "$out/ckpt_$arm.tar" final
done
ls -la "$out"
