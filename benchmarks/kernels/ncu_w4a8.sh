#!/usr/bin/env bash
# Hardware counters of one W4A8-INT8 layer on the GPU (Nsight Compute): w4a8_ws with each conversion of the group
# sums (cvt: I2F; bias: integer add and float subtract), beside FP8 W8A8's GEMM (torch._scaled_mm) of the same
# shape, to say what bounds the kernel: tensor-pipe activity, the conversion (XU), ALU and FMA pipes, issue slots.
#   [N=4096 K=14336 M=4096 RANK=64] [WS="tokens=128 stages=6 persistent=1"] bash benchmarks/kernels/ncu_w4a8.sh
# Results: $OUT/ncu_w4a8_<label>.csv (ncu's raw page: every metric of the sections below for the second launch of
# each kernel) and ncu_w4a8.txt, a few of them per kernel. Clocks are left alone (--clock-control none).
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
import csv, glob, os, sys

out, n, k, m = sys.argv[1], *map(int, sys.argv[2:])
want = ["gpu__time_duration.sum", "sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active",
        "sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active",
        "sm__inst_executed_pipe_alu.avg.pct_of_peak_sustained_active",
        "sm__inst_executed_pipe_fma.avg.pct_of_peak_sustained_active",
        "smsp__issue_active.avg.pct_of_peak_sustained_active",
        "dram__throughput.avg.pct_of_peak_sustained_elapsed", "sm__warps_active.avg.pct_of_peak_sustained_active"]
print(f"ncu, layer N={n} K={k}, {m} tokens (the second launch of each kernel)")
for path in sorted(glob.glob(os.path.join(out, "ncu_w4a8_*.csv"))):
    lines = open(path).read().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        print(os.path.basename(path), "no kernel profiled")
        continue
    units, *rows = list(csv.DictReader(lines[start:]))  # the row after the header holds the units
    for name in sorted({r["Kernel Name"] for r in rows}):
        mine = [r for r in rows if r["Kernel Name"] == name]
        vals = {}
        for w in want:
            got = sorted(float(r[w].replace(",", "")) for r in mine if r.get(w, "") not in ("", "n/a"))
            vals[w.split(".")[0].replace("sm__", "").replace("smsp__", "")] = got[len(got) // 2] if got else None
        print(os.path.basename(path)[9:-4], name[:60], f"time in {units.get(want[0])}", vals)
PY
