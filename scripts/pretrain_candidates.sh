#!/usr/bin/env bash
# The testbed search of issue 12 on a two-GPU machine: four candidate 8,192-token models pretrained with full
# attention at the same time (two per GPU, the same wall-clock budget each), each then measured by the premise
# gate (scripts/pretrain_small.py --gate), plus the evaluation feature network for the textured clips.
#   SECONDS_PER_MODEL=390 bash scripts/pretrain_candidates.sh OUTDIR
# Writes OUTDIR/cand_<name>.tar (model folder + gate analysis + log), OUTDIR/feature_net_wan8k.tar, OUTDIR/log.txt.
set -uo pipefail
out="${1:-${OUT:-runs/candidates}}"
mkdir -p "$out"
work=/tmp/candidates
mkdir -p "$work"
export PYTHONUNBUFFERED=1
secs="${SECONDS_PER_MODEL:-390}"
common=(--seconds "$secs" --batch-size 32 --lr 8e-4 --warmup 100 --workers 6 --save-dtype bfloat16 --gate)
declare -A GPU=([wan8k]=0 [d128]=0 [gradient]=1 [static]=1)
declare -A EXTRA=(
  [wan8k]=""
  [d128]='--model-overrides {"num_attention_heads":2,"attention_head_dim":128,"ffn_dim":1024}'
  [gradient]='--data-overrides {"background":"gradient","pan_speed":0.0}'
  [static]='--data-overrides {"pan_speed":0.0}'
)
pids=()
for name in wan8k d128 gradient static; do
  # shellcheck disable=SC2086
  CUDA_VISIBLE_DEVICES=${GPU[$name]} python3 scripts/pretrain_small.py --preset wan8k "${common[@]}" ${EXTRA[$name]} \
      --out "$work/$name" > "$work/$name.log" 2>&1 &
  pids+=($!)
done
CUDA_VISIBLE_DEVICES=1 python3 scripts/train_feature_net.py --data wan8k --steps 1500 --batch-size 64 --workers 4 \
    --seconds 240 --out "$work/feature_net_wan8k.safetensors" > "$work/feature_net.log" 2>&1 &
pids+=($!)
for p in "${pids[@]}"; do wait "$p"; done
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  for name in wan8k d128 gradient static; do
    echo "== $name"; grep -E "parameters|held-out|premise gate|Error|error" "$work/$name.log" | tail -6
  done
  echo "== feature net"; tail -2 "$work/feature_net.log"
} | tee "$out/log.txt"
for name in wan8k d128 gradient static; do
  cp "$work/$name.log" "$work/$name/" 2>/dev/null
  tar -C "$work" -cf "$out/cand_$name.tar" "$name" "${name}_analysis" 2>/dev/null
done
tar -C "$work" -cf "$out/feature_net_wan8k.tar" feature_net_wan8k.safetensors feature_net.log 2>/dev/null
ls -la "$out"
