#!/usr/bin/env bash
# Issue 31's per-step profile of batch-1 decode on one GPU (vLLM staged with ../shared/gpu/stage.sh): the
# Llama-3-8B-shaped checkpoints of e2e_h100.py, then decode_breakdown.py for each config, one engine per process.
#   bash benchmarks/e2e/run_decode_breakdown.sh make                 # bf16 dense + TwinQuant rank 64 (and 0 with RANKS)
#   bash benchmarks/e2e/run_decode_breakdown.sh profile CONFIG...    # bf16, fp8, tq_r<R>, tq_r<R>_a8
# Results: $OUT/decode_breakdown_<config>.json (+ decode_kernels_<config>.json.gz, the raw kernel list).
set -euo pipefail
cd "$(dirname "$0")/../.."
source .gpu-stage/remote.sh env
out=${OUT:-/tmp/decode-breakdown}; mkdir -p "$out"
work=$HOME/e2e
case "${1:-}" in
  make)
    python3 -m pip install -q --no-deps --no-build-isolation --target "$HOME/vsite" . 2>&1 | grep -v WARNING || true
    python3 benchmarks/e2e/e2e_h100.py make --workdir "$work" --ranks ${RANKS:-64} --out "$out" ;;
  profile)
    shift
    for cfg in "$@"; do
      case $cfg in
        bf16) args=(--model "$work/bf16") ;;
        fp8) args=(--model "$work/bf16" --quantization fp8) ;;
        tq_r*_a8) python3 -c "import sys; sys.path.insert(0, 'benchmarks/e2e'); import e2e_h100 as e; \
e.engine_args('$work', '$cfg')"; args=(--model "$work/$cfg" --quantization twinquant) ;;
        tq_r*) args=(--model "$work/$cfg" --quantization twinquant) ;;
        *) echo "unknown config $cfg (bf16, fp8, tq_r<R>, tq_r<R>_a8)" >&2; exit 2 ;;
      esac
      python3 benchmarks/e2e/decode_breakdown.py "${args[@]}" --label "$cfg" --out "$out" \
        > "$out/decode_breakdown_$cfg.log" 2>&1 || { tail -25 "$out/decode_breakdown_$cfg.log"; continue; }
      python3 -c "import json; r = json.load(open('$out/decode_breakdown_$cfg.json')); \
print('$cfg', r['bs1_ms_per_token_profiled'], 'ms/token;', {k: v for k, v in r.items() if k.endswith('_us')}); \
print(' ', r['buckets']); print(' ', r['twinquant_by_kind'])"
    done ;;
  *) sed -n '2,6p' "$0"; exit 2 ;;
esac
