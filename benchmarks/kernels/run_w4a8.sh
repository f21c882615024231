#!/usr/bin/env bash
# The W4A8 kernel on a GPU, in one device call: sweep its launch configs and write the device's w4a8 rows
# (tune.py sweep-w4a8 / table-w4a8, into csrc_triton/configs/<device>.json and a copy under $OUT), then the
# kernel table against BF16, FP8 W8A8 and W4A16 with that table (bench_w4a8.py -> $OUT/w4a8_<tag>.json).
#   [ACTS="fp8 int8"] [BENCH_MS="1 16 ..."] [BENCH_RANKS="0 64"] bash benchmarks/kernels/run_w4a8.sh [TAG] [SECONDS]
# TAG: h100 or h200 (default: from the device's name); the bench stops its table SECONDS after the start (540);
# ACTS: the activation precisions swept (the others' rows stay as they are); BENCH_MS, BENCH_RANKS: the bench's
# token counts and ranks (default 1 16 128 256 512 1024 4096; 0 64); BENCH_PYTHONPATH: where the bench finds vLLM
# for its CUTLASS W4A8 column (without it the column is left out).
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-/tmp/w4a8-out}; mkdir -p "$out"
tag=${1:-$(python3 -c 'import torch; n = torch.cuda.get_device_name(); print("h200" if "H200" in n else "h100")')}
export PYTHONUNBUFFERED=1
start=$(date +%s)
table=$(python3 -c 'import torch; from csrc_triton.dispatch import table_file; print(table_file(torch.cuda.get_device_name()))')
[ -f "$table" ] || cp csrc_triton/configs/NVIDIA_H100_80GB_HBM3.json "$table"
case " ${ACTS:-fp8 int8} " in *" int8 "*)
  # the warp-specialized kernel alone first, under a time limit: one that hangs (a barrier never completed) is
  # left out of the sweep rather than stopping it; its overlap configs first, then without them
  if ! timeout 240 python3 benchmarks/kernels/tune.py sweep-w4a8 --act-quant int8 --ms 256 --only w4a8_ws \
      --out "$out/ws_first" > "$out/ws_first.log" 2>&1; then
    if timeout 240 python3 benchmarks/kernels/tune.py sweep-w4a8 --act-quant int8 --ms 256 --only w4a8_ws \
        --no-ws-overlap --out "$out/ws_first" > "$out/ws_first_no_overlap.log" 2>&1; then
      echo "w4a8_ws: its overlap configs failed or hung (log: ws_first.log); swept without them"
      ws_flags=--no-ws-overlap
    else
      echo "w4a8_ws: its first sweep failed or hung (log: ws_first.log); swept without it"
      export TWINQUANT_DISABLED_KERNELS=w4a8_ws
    fi
  fi
  rm -rf "$out/ws_first" ;;
esac
for aq in ${ACTS:-fp8 int8}; do
  python3 benchmarks/kernels/tune.py sweep-w4a8 --act-quant $aq ${ws_flags:-} --out "$out" \
    | tee "$out/sweep_w4a8_$aq.log"
  python3 benchmarks/kernels/tune.py table-w4a8 --sweep "$(tail -1 "$out/sweep_w4a8_$aq.log")" --write "$table"
  rm -f "$out/sweep_w4a8_$aq.partial.json"
done
cp "$table" "$out/"
PYTHONPATH=${BENCH_PYTHONPATH:+$BENCH_PYTHONPATH:}${PYTHONPATH:-} \
  python3 benchmarks/kernels/bench_w4a8.py --out "$out" --tag "$tag" --ms ${BENCH_MS:-1 16 128 256 512 1024 4096} \
  --ranks ${BENCH_RANKS:-0 64} \
  --time-limit $(( ${2:-540} - $(date +%s) + start ))
