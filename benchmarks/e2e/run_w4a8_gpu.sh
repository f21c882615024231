#!/usr/bin/env bash
# W4A8-INT8 on one GPU after the kernel sweep (benchmarks/kernels/run_w4a8.sh, which writes the device's table
# in this checkout): install the package with that table, check the plugin's W4A8 path inside vLLM against a
# float32 reference of the same numerics, then the end-to-end comparison. vLLM staged (../shared/gpu/stage.sh).
#   bash benchmarks/e2e/run_w4a8_gpu.sh check           # cuda_plugin_check --activations int8, then `make`
#   bash benchmarks/e2e/run_w4a8_gpu.sh bench CONFIG..  # e2e_h100.py bench (e.g. bf16 fp8 tq_r64 tq_r64_a8
#                                                       # tq_r64_f8; a _kv8 suffix adds --kv-cache-dtype fp8)
#   bash benchmarks/e2e/run_w4a8_gpu.sh checks ACT..    # cuda_plugin_check --activations ACT for each of
#                                                       # int8 fp8 int4 (correctness only: no timing is kept)
set -euo pipefail
cd "$(dirname "$0")/../.."
source .gpu-stage/remote.sh env
out=${OUT:-/tmp/w4a8-e2e}; mkdir -p "$out"
work=$HOME/e2e-w4a8
plugin_checks() {  # cuda_plugin_check --activations ACT for each ACT, with the package installed as vLLM finds it
  python3 -m pip install -q --no-deps --no-build-isolation --target "$HOME/vsite" . 2>&1 | { grep -v WARNING || true; }
  for act in "$@"; do
    log="$out/cuda_plugin_check_$act.log"
    if python3 benchmarks/e2e/cuda_plugin_check.py --workdir "$HOME/tqcheck-$act" --out "$out" --activations "$act" \
      > "$log" 2>&1; then echo "$act: passed"; else echo "$act: FAILED"; tail -30 "$log"; fi
    grep -E '"(max_abs_logprob_diff|greedy_agreement|pass_.*|plan_gate_up)"' "$log" || true
  done
}
case "${1:-}" in
  check)
    plugin_checks int8
    python3 benchmarks/e2e/e2e_h100.py make --workdir "$work" --ranks 64 --out "$out" ;;
  checks)
    shift
    plugin_checks "$@" ;;
  bench)
    shift
    python3 benchmarks/e2e/e2e_h100.py bench --workdir "$work" --configs "$@" --out "$out" ;;
  *) sed -n '2,8p' "$0"; exit 2 ;;
esac
