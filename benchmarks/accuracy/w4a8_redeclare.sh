#!/usr/bin/env bash
# One TwinQuant checkpoint as W4A16, W4A8-FP8 and W4A8-INT8: the same codes and factors, re-declared by
# config alone (quantization_config.activation_bits / activation_type), each scored through vLLM + the
# plugin on the held-out Wikipedia text (the torch path on the CPU: the format's per-token activation codes).
#   bash benchmarks/accuracy/w4a8_redeclare.sh CKPT [RESULTS_JSONL]
set -euo pipefail
cd "$(dirname "$0")/../.."
src=${1:?usage: w4a8_redeclare.sh CKPT [RESULTS_JSONL]}
out=${2:-benchmarks/results/accuracy_w4a8_smollm2.jsonl}
work=runs/w4a8-redeclare
mkdir -p "$work" "$(dirname "$out")"
for decl in "16 int W4A16" "8 float W4A8-FP8" "8 int W4A8-INT8"; do
  read -r bits kind name <<<"$decl"
  dir="$work/$(basename "$src")-$name"
  rm -rf "$dir" && cp -r "$src" "$dir"
  python3 -c 'import sys; from vllm_twinquant.format import declare_activations as declare
declare(sys.argv[1], int(sys.argv[2]), sys.argv[3])' "$dir" "$bits" "$kind"
  twinquant-eval "$dir" --json "$out" --label "$(basename "$src") as $name"
done
