#!/usr/bin/env bash
# Table 1 of the SLA paper in miniature: every attention variant fine-tuned from the same shipped
# checkpoint with the same data and budget, then evaluated together.
#   STEPS=60 BATCH=2 SEEDS="0" VARIANTS="full sla ..." OUT=runs/t1 bash scripts/table1_mini.sh
# GPU sizes (run on an H200 in fp32, docs/results.md): STEPS=600 BATCH=8 LR=1e-4 SEEDS="0 1" SAMPLES=64 CLIPS=64 SAMPLE_STEPS=25
# (EXTRA="--bf16" failed for the SLA-family rows at f5165ed: bf16 autocast; fixed in e9478b9, not yet re-run on a GPU.)
set -euo pipefail
STEPS=${STEPS:-60}; BATCH=${BATCH:-2}; LR=${LR:-3e-4}; SEEDS=${SEEDS:-0}; OUT=${OUT:-runs/t1}; EXTRA=${EXTRA:-}
SAMPLES=${SAMPLES:-8}; CLIPS=${CLIPS:-8}; SAMPLE_STEPS=${SAMPLE_STEPS:-12}
VARIANTS=${VARIANTS:-"full sla sparse_only_95 sparse_only_85 linear_only sum_no_proj sla_noncritical sla_all"}
declare -A ARGS=(
  [full]="--attention full"
  [sla]="--attention sla"
  [sparse_only_95]="--attention sparse_only"
  [sparse_only_85]="--attention sparse_only --critical 0.15"
  [linear_only]="--attention linear_only"
  [sum_no_proj]="--attention sum_no_proj --linear-scope all"
  [sla_noncritical]="--attention sla --linear-scope noncritical"
  [sla_all]="--attention sla --linear-scope all"
)
for seed in $SEEDS; do
  models=()
  mkdir -p "$OUT/seed$seed"
  for v in $VARIANTS; do
    dir="$OUT/seed$seed/$v"
    if [ ! -f "$dir/final/finetune_info.json" ]; then
      sla finetune ${ARGS[$v]} --steps "$STEPS" --batch-size "$BATCH" --lr "$LR" --warmup-steps 3 --seed "$seed" \
        --save-every 0 --no-progress $EXTRA --output-dir "$dir" > "$dir.log" 2>&1
    fi
    models+=("$dir/final")
  done
  sla eval --model "${models[@]}" --name $VARIANTS --clips "$CLIPS" --samples "$SAMPLES" --steps "$SAMPLE_STEPS" \
    --out "$OUT/seed$seed/eval"
done
