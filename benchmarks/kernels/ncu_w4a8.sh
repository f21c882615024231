#!/usr/bin/env bash
# Hardware counters of one W4A8-INT8 layer on the GPU (Nsight Compute): w4a8_ws with each conversion of the group
# sums (cvt: I2F; bias: integer add and float subtract), beside FP8 W8A8's GEMM (torch._scaled_mm) of the same
# shape, to say what bounds the kernel: tensor-pipe activity, the conversion (XU), ALU and FMA pipes, issue slots.
#   [N=4096 K=14336 M=4096 RANK=64] [WS="tokens=128 stages=6 persistent=1"] bash benchmarks/kernels/ncu_w4a8.sh
# Results: $OUT/ncu_w4a8_<label>.csv (ncu's raw page: every metric of the sections below for the second launch of
# each kernel), and ncu_w4a8.json / .txt: a few of them per kernel, the top stall reasons. Clocks are left alone
# (--clock-control none).
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-/tmp/ncu-w4a8}; mkdir -p "$out"
n=${N:-4096}; k=${K:-14336}; m=${M:-4096}; rank=${RANK:-64}
ws=${WS:-tokens=128 stages=6 persistent=1}
sections=(--section SpeedOfLight --section ComputeWorkloadAnalysis --section WarpStateStats --section Occupancy)
run() {  # label, kernel-name regex, profile_kernels.py arguments...
  local label=$1 names=$2; shift 2
  timeout 180 ncu --clock-control none --kernel-name "regex:$names" --launch-skip 1 --launch-count 1 \
    "${sections[@]}" --page raw --csv \
    python3 benchmarks/kernels/profile_kernels.py --n "$n" --k "$k" --ms "$m" --rank "$rank" --calls 1 "$@" \
    > "$out/ncu_w4a8_$label.csv" 2> "$out/ncu_w4a8_$label.log" || echo "$label: ncu failed (see its log)"
}
run ws_cvt "_tq_w4a8_ws_kernel" --act-quant int8 --ws $ws convert=cvt
run ws_bias "_tq_w4a8_ws_kernel" --act-quant int8 --ws $ws convert=bias
run fp8_mm "gemm|GEMM|sm90|cutlass|nvjet" --fp8 --no-layer
python3 - "$out" "$n" "$k" "$m" <<'PY' | tee "$out/ncu_w4a8.txt"
import csv, glob, json, os, sys

out, n, k, m = sys.argv[1], *map(int, sys.argv[2:])
# (short name, ncu metric): pipes as % of the SM's active cycles, issue slots and DRAM as % of elapsed ones
WANT = [("us", "gpu__time_duration.sum"),
        ("tensor_pipe_pct", "sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active"),
        ("alu_pipe_pct", "sm__inst_executed_pipe_alu.avg.pct_of_peak_sustained_active"),
        ("fma_pipe_pct", "sm__inst_executed_pipe_fma.avg.pct_of_peak_sustained_active"),
        ("xu_pipe_pct", "sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active"),
        ("issue_active_pct", "sm__issue_active.avg.pct_of_peak_sustained_elapsed"),
        ("dram_pct", "gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed"),
        ("registers", "launch__registers_per_thread"), ("grid", "launch__grid_size")]
STALL = "smsp__average_warps_issue_stalled_"
recs = []
for path in sorted(glob.glob(os.path.join(out, "ncu_w4a8_*.csv"))):
    lines = open(path).read().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    label = os.path.basename(path)[len("ncu_w4a8_"):-len(".csv")]
    if start is None:
        print(label, "no kernel profiled")
        continue
    units, *rows = list(csv.DictReader(lines[start:]))  # the row after the header holds the units
    for r in rows:
        num = lambda v: float(v.replace(",", "")) if v not in ("", "n/a") else None  # noqa: E731
        rec = {"label": label, "kernel": r["Kernel Name"][:80]}
        for short, metric in WANT:
            rec[short] = num(r.get(metric, ""))
        scale = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}
        if rec["us"] is not None:
            rec["us"] = round(rec["us"] * scale[units[WANT[0][1]]], 2)
        stalls = {key[len(STALL):].replace("_per_issue_active.ratio", ""): num(v) for key, v in r.items()
                  if key.startswith(STALL) and key.endswith("_per_issue_active.ratio") and num(v)}
        rec["top_stalls_per_issue"] = dict(sorted(stalls.items(), key=lambda kv: -kv[1])[:5])
        recs.append(rec)
        print(json.dumps(rec))
with open(os.path.join(out, "ncu_w4a8.json"), "w") as f:
    json.dump({"layer": {"N": n, "K": k, "M": m}, "records": recs}, f, indent=1)
PY
