#!/usr/bin/env bash
# Issue 31's per-step profile of batch-1 decode on one GPU (vLLM staged with ../shared/gpu/stage.sh): the
# Llama-3-8B-shaped checkpoints of e2e_h100.py, then decode_breakdown.py for each config, one engine per process.
#   bash benchmarks/e2e/run_decode_breakdown.sh make                 # bf16 dense + TwinQuant rank 64 (and 0 with RANKS);
#                                                                    # HEAD_RANKS=64: also tq_r64_h4 (4-bit lm_head)
#   bash benchmarks/e2e/run_decode_breakdown.sh profile CONFIG...    # bf16, fp8, tq_r<R>, tq_r<R>_a8, tq_r<R>_h4
#   T_SPLITS='[[null, 8, 16]]' bash ... profile tq_r64  # an A/B of the launch table's gemv_t_splits rows
#       ([max K or null, K-slices of t, rows of D per program or null, in_kernel (optional)]): a copy of the
#       device's table with these rows, the results labelled <config>_tsplits-<slices>[r<rows>][i]... (i: t made
#       in the gemv launch itself)
# Results: $OUT/decode_breakdown_<label>.json (+ decode_kernels_<label>.json.gz, the raw kernel list).
set -euo pipefail
cd "$(dirname "$0")/../.."
source .gpu-stage/remote.sh env
out=${OUT:-/tmp/decode-breakdown}; mkdir -p "$out"
work=$HOME/e2e
case "${1:-}" in
  make)
    python3 -m pip install -q --no-deps --no-build-isolation --target "$HOME/vsite" . 2>&1 | grep -v WARNING || true
    python3 benchmarks/e2e/e2e_h100.py make --workdir "$work" --ranks ${RANKS:-64} \
      --head-ranks ${HEAD_RANKS:-} --out "$out" ;;
  profile)
    shift
    suffix=""
    if [ -n "${T_SPLITS:-}" ]; then  # the device's table with other gemv_t_splits rows, in a folder of its own
      export TWINQUANT_CONFIG_DIR=$HOME/tables-tsplits
      suffix=$(python3 - "$T_SPLITS" <<'PY'
import json, os, sys

import torch

rows = json.loads(sys.argv[1])
name = torch.cuda.get_device_name().replace(" ", "_") + ".json"
src = os.path.join("csrc_triton", "configs", name)  # this checkout's table (the export points elsewhere)
dst = os.path.join(os.environ["TWINQUANT_CONFIG_DIR"], name)
os.makedirs(os.path.dirname(dst), exist_ok=True)
with open(src) as f:
    table = json.load(f)
table["gemv_t_splits"] = [{"max_k": r[0], "splits": r[1], "block_r": r[2] if len(r) > 2 else None,
                           "in_kernel": len(r) > 3 and bool(r[3])} for r in rows]
with open(dst, "w") as f:
    json.dump(table, f, indent=1)
print("_tsplits-" + "-".join(f"{r[1]}" + (f"r{r[2]}" if len(r) > 2 and r[2] else "")
                             + ("i" if len(r) > 3 and r[3] else "") for r in rows))
PY
)
    fi
    for cfg in "$@"; do
      case $cfg in
        bf16) args=(--model "$work/bf16") ;;
        fp8) args=(--model "$work/bf16" --quantization fp8) ;;
        tq_r*_a8) python3 -c "import sys; sys.path.insert(0, 'benchmarks/e2e'); import e2e_h100 as e; \
e.engine_args('$work', '$cfg')"; args=(--model "$work/$cfg" --quantization twinquant) ;;
        tq_r*) args=(--model "$work/$cfg" --quantization twinquant) ;;
        *) echo "unknown config $cfg (bf16, fp8, tq_r<R>, tq_r<R>_a8, tq_r<R>_h4)" >&2; exit 2 ;;
      esac
      label=$cfg$suffix
      python3 benchmarks/e2e/decode_breakdown.py "${args[@]}" --label "$label" --out "$out" \
        > "$out/decode_breakdown_$label.log" 2>&1 || { tail -25 "$out/decode_breakdown_$label.log"; continue; }
      python3 -c "import json; r = json.load(open('$out/decode_breakdown_$label.json')); \
print('$label', r['bs1_ms_per_token_profiled'], 'ms/token;', {k: v for k, v in r.items() if k.endswith('_us')}); \
print(' ', r['buckets']); print(' ', r['lowrank_down_by_kind'], r['after_down_by_kind'])"
    done ;;
  *) sed -n '2,6p' "$0"; exit 2 ;;
esac
