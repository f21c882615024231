#!/usr/bin/env bash
# Perplexity table of README (CPU): quantize SmolLM2-135M-Instruct several ways and score each
# checkpoint through vLLM + the plugin on the held-out Wikipedia split.
#   bash benchmarks/accuracy/smollm2_table.sh [RESULTS_JSONL]
#   bash benchmarks/accuracy/smollm2_table.sh --recipes    # each quantized row's recipe as YAML; nothing is run
set -euo pipefail
cd "$(dirname "$0")/../.."
recipes_only=false
if [ "${1:-}" = --recipes ]; then recipes_only=true; shift; fi
out=${1:-benchmarks/results/accuracy_smollm2.jsonl}
model=models/smollm2-135m-instruct
calib=models/data/calib.jsonl
runs=runs/table
if ! $recipes_only; then
  mkdir -p "$runs" "$(dirname "$out")"
  : > "$out"
  twinquant-eval "$model" --json "$out" --label "dense (fp32 compute)"
fi
q() {  # label, recipe and overrides (64 windows unless a row says otherwise; ablation rows are measured, not
       # gated: --max-kl inf)
  local label=$1; shift
  local dir="$runs/$label"
  if $recipes_only; then
    echo "--- # $label"; twinquant-quantize --nsamples 64 --seqlen 256 "$@" --print-recipe; return
  fi
  [ -d "$dir" ] || twinquant-quantize --model "$model" --output "$dir" --calib "$calib" --nsamples 64 --seqlen 256 \
    --max-kl inf "$@"
  twinquant-eval "$dir" --json "$out" --label "$label"
}
# the transforms and split of docs/method.md, each on its own
rot=(--set rotation.kind=learned --set rotation.steps=30)  # learned residual-stream rotation (Stiefel)
smooth=(--set smoothing.steps=60)                          # learned diagonal smoothing (GL)
refined=(--set split.method=refined)                       # refined split: GPTQ residual / low-rank refit
tq=("${rot[@]}" "${smooth[@]}" "${refined[@]}")          # TwinQuant: all three
q rtn-g32 --recipe rtn --group-size 32
q rtn-g64 --recipe rtn --group-size 64
q gptq-g64 --recipe gptq --group-size 64
q svd8-gptq-g64 --recipe svd-split --rank 8 --group-size 64
q svd16-gptq-g64 --recipe svd-split --rank 16 --group-size 64
q svd32-gptq-g64 --recipe svd-split --rank 32 --group-size 64
# TwinQuant (docs/method.md) and its ablations
q svd4-gptq-g64 --recipe svd-split --rank 4 --group-size 64
q twinquant-r0-g64 --recipe gptq --group-size 64 "${rot[@]}" "${smooth[@]}"
q twinquant-r4-g64 --recipe svd-split --rank 4 --group-size 64 "${tq[@]}"
q twinquant-r8-g64 --recipe svd-split --rank 8 --group-size 64 "${tq[@]}"
q split-only-r8-g64 --recipe svd-split --rank 8 --group-size 64 "${refined[@]}"
q rot-random-r0-g64 --recipe gptq --group-size 64 --set rotation.kind=random
# each transform with the split, and both transforms with the SVD split
q rot-split-r4-g64 --recipe svd-split --rank 4 --group-size 64 "${rot[@]}" "${refined[@]}"
q smooth-split-r4-g64 --recipe svd-split --rank 4 --group-size 64 "${smooth[@]}" "${refined[@]}"
q rot-smooth-svd-r4-g64 --recipe svd-split --rank 4 --group-size 64 "${rot[@]}" "${smooth[@]}"
# calibration size (default 64 windows of 256 tokens)
q rot-smooth-svd-r4-g64-calib128 --recipe svd-split --rank 4 --group-size 64 "${rot[@]}" "${smooth[@]}" --nsamples 128
q twinquant-r4-g64-calib16 --recipe svd-split --rank 4 --group-size 64 "${tq[@]}" --nsamples 16
# attention-aware v_proj statistic, then block tuning on top (docs/method.md sections 4-5): twinquant-w4a16
q tq-attn-r4-g64-c128 --recipe svd-split --rank 4 --group-size 64 "${rot[@]}" "${smooth[@]}" --nsamples 128 \
  --set residual.attention_aware=true
q tq-attn-tune4-r4-g64-c128 --recipe twinquant-w4a16 --nsamples 128
# W4A4: per-token 4-bit inputs of the residual product, online Hadamard before o_proj/down_proj
q twinquant-r4-g64-w4a4 --recipe svd-split --rank 4 --group-size 64 "${tq[@]}" --set activations.bits=4
q gptq-g64-w4a4 --recipe gptq --group-size 64 --set activations.bits=4
q tq-attn-tune4-r4-g64-c128-w4a4 --recipe twinquant-w4a4-resq --nsamples 128 --set activations.clip=1.0 \
  --set activations.subspace=0
# ... the same checkpoint served with activation clipping 0.8 (ratio chosen on calibration text, docs/method.md)
if ! $recipes_only; then
  clip=$runs/tq-attn-tune4-r4-g64-c128-w4a4-clip0.8serve
  [ -d "$clip" ] || { cp -r "$runs/tq-attn-tune4-r4-g64-c128-w4a4" "$clip" && python3 - "$clip/config.json" <<'PY'
import json, sys
cfg = json.load(open(sys.argv[1])); q = cfg["quantization_config"]
q["activation_clip_ratio"] = 0.8; q["recipe"] += "+clip0.8-at-serve"
json.dump(cfg, open(sys.argv[1], "w"), indent=1)
PY
  }
  twinquant-eval "$clip" --json "$out" --label tq-attn-tune4-r4-g64-c128-w4a4-clip0.8serve
fi
# ... and quantized with the clip inside the tuning loop (twinquant-w4a4-resq without its 8-bit subspace)
q tq-attn-tune4-clip0.8-r4-g64-c128-w4a4 --recipe twinquant-w4a4-resq --nsamples 128 --set activations.subspace=0
# int8 low-rank factors: rank 8 at about the bits of bf16 rank 4
q tq-attn-tune4-r8i8-g64-c128 --recipe twinquant-w4a16 --nsamples 128 --rank 8 --set split.lowrank_dtype=int8
# block tuning with the per-token loss instead of the whole-tensor one (docs/method.md section 4)
q tq-attn-tunetok4-r4-g64-c128 --recipe twinquant-w4a16 --nsamples 128 --set block_tuning.loss=token
$recipes_only && exit 0
# end-to-end tuning of block-tuned checkpoints against the dense model (section 6)
e2e() {  # label, source checkpoint's label, extra args
  local label=$1 src=$2; shift 2
  [ -d "$runs/$label" ] || twinquant-finetune "$runs/$src" --dense "$model" --output "$runs/$label" --calib "$calib" "$@"
  twinquant-eval "$runs/$label" --json "$out" --label "$label"
}
e2e tq-attn-tune4-r4-g64-c128-e2e2 tq-attn-tune4-r4-g64-c128 --nsamples 128 --epochs 2 --lr 5e-4
e2e tq-attn-tune4-r4-g64-c128-e2e4-lr1e-3 tq-attn-tune4-r4-g64-c128 --nsamples 128 --epochs 4 --lr 1e-3
e2e tq-attn-tune4-r4-g64-c128-e2e4-n256-lr1e-3 tq-attn-tune4-r4-g64-c128 --nsamples 256 --epochs 4 --lr 1e-3
# ... a second round from that checkpoint on other windows (seed 1), at half the rate
e2e tq-attn-tune4-r4-g64-c128-e2e4-n256-lr1e-3-e2e4-lr5e-4 tq-attn-tune4-r4-g64-c128-e2e4-n256-lr1e-3 --nsamples 256 --epochs 4 --lr 5e-4 --seed 1
# ... and a third round from that one (seed 2)
e2e tq-attn-tune4-r4-g64-c128-e2e4-n256-lr1e-3-e2e4-lr5e-4-e2e4-lr5e-4s2 tq-attn-tune4-r4-g64-c128-e2e4-n256-lr1e-3-e2e4-lr5e-4 --nsamples 256 --epochs 4 --lr 5e-4 --seed 2
# a fourth round that may also move the 4-bit codes (--code-lr, straight-through; at 1e-2 it moved 0.0007% of them)
e2e tq-attn-tune4-r4-g64-c128-e2e4-n256-lr1e-3-e2e4-lr5e-4-e2e4-lr5e-4s2-e2e4-codes1e-2s3 tq-attn-tune4-r4-g64-c128-e2e4-n256-lr1e-3-e2e4-lr5e-4-e2e4-lr5e-4s2 --nsamples 256 --epochs 4 --lr 5e-4 --seed 3 --code-lr 1e-2
e2e tq-attn-tune4-r4-g64-c128-e2e4-n256-lr1e-3-e2e4-lr5e-4-e2e4-lr5e-4s2-e2e4-codes1e-2s3-e2e4-n128s4 tq-attn-tune4-r4-g64-c128-e2e4-n256-lr1e-3-e2e4-lr5e-4-e2e4-lr5e-4s2-e2e4-codes1e-2s3 --nsamples 128 --epochs 4 --lr 5e-4 --seed 4
e2e tq-attn-tune4-clip0.8-r4-g64-c128-w4a4-e2e2 tq-attn-tune4-clip0.8-r4-g64-c128-w4a4 --nsamples 128 --epochs 2 --lr 5e-4
e2e tq-attn-tune4-clip0.8-r4-g64-c128-w4a4-e2e4-n256-lr1e-3 tq-attn-tune4-clip0.8-r4-g64-c128-w4a4 --nsamples 256 --epochs 4 --lr 1e-3
e2e tq-attn-tune4-clip0.8-r4-g64-c128-w4a4-e2e4-n256-lr1e-3-e2e4-lr5e-4 tq-attn-tune4-clip0.8-r4-g64-c128-w4a4-e2e4-n256-lr1e-3 --nsamples 256 --epochs 4 --lr 5e-4 --seed 1
e2e tq-attn-tune4-r8i8-g64-c128-e2e2 tq-attn-tune4-r8i8-g64-c128 --nsamples 128 --epochs 2 --lr 5e-4
python3 benchmarks/make_tables.py accuracy-json "$out" "${out%.jsonl}.json"
