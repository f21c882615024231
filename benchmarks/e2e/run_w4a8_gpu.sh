#!/usr/bin/env bash
# W4A8-INT8 on one GPU after the kernel sweep (benchmarks/kernels/run_w4a8.sh, which writes the device's table
# in this checkout): install the package with that table, check the plugin's W4A8 path inside vLLM against a
# float32 reference of the same numerics, then the end-to-end comparison. vLLM staged (../shared/gpu/stage.sh).
#   bash benchmarks/e2e/run_w4a8_gpu.sh check           # cuda_plugin_check --activations int8, then `make`
#   bash benchmarks/e2e/run_w4a8_gpu.sh bench CONFIG..  # e2e_h100.py bench (e.g. bf16 fp8 tq_r64 tq_r64_a8
#                                                       # tq_r64_f8; a _kv8 suffix adds --kv-cache-dtype fp8)
#   bash benchmarks/e2e/run_w4a8_gpu.sh checks ACT..    # cuda_plugin_check --activations ACT for each of
#                                                       # int8 fp8 int4 int4_sub128 (correctness only: no timing
#                                                       # is kept; _subS: a ResQ subspace of S channels)
#   bash benchmarks/e2e/run_w4a8_gpu.sh serve CONFIG..  # e2e_h100.py serve: `vllm serve` + `vllm bench serve`
#                                                       # at concurrency 1, 16, 64, 256 (e.g. bf16 fp8 tq_r64_f8)
# One lease, staging and measuring at once (vLLM's pieces staged between the first two steps):
#   kernels   in the background, no vLLM needed: wide_layer.py (timed), then tune.py sweep-w4a8 --act-quant int4
#             (a check, beside `make`); results under ~/lease
#   sweep     in the background, no vLLM needed: benchmarks/kernels/run_w4a8.sh (ACTS, default int8) in a copy of
#             the checkout (a later transfer replaces this one's files); its results and the device's table
#             under ~/lease/w4a8 (its bench finds vLLM in ~/vsite for the CUTLASS W4A8 column once installed);
#             then ncu_w4a8.sh (hardware counters of w4a8_ws and FP8 W8A8's GEMM, in ~/lease/w4a8/ncu; `make`
#             may run beside it, the timed steps not).
#             Every later step installs the package with that table.
#   wait      until the background work is done; its results into $OUT
#   make [ARGS..]   after the timed run: the package installed as vLLM finds it, the rank-64 checkpoints
#                   (ARGS go to e2e_h100.py make, e.g. --head-ranks 64 for tq_r64_h4)
#   bench CONFIG..  after the int4 check (timings alone on the GPU)
#   collect   ~/lease's results into $OUT
# More than 8 files in $OUT travel back as $OUT/results.tgz.
set -euo pipefail
cd "$(dirname "$0")/../.."
source .gpu-stage/remote.sh env
out=${OUT:-/tmp/w4a8-e2e}; mkdir -p "$out"
pack_out() {  # the device tool brings back at most 8 files: more than that travel as one archive
  if [ "$(find "$out" -type f | wc -l)" -gt 8 ]; then
    tar -C "$out" -czf /tmp/results.tgz . && find "$out" -mindepth 1 -delete && mv /tmp/results.tgz "$out/"
  fi
}
trap pack_out EXIT
work=$HOME/e2e-w4a8
res=$HOME/lease
install() {  # the package as vLLM finds it, with the device table a background `sweep` wrote (if one did)
  for t in "$res"/w4a8/*.json; do
    case $(basename "$t") in NVIDIA_*.json) cp "$t" csrc_triton/configs/ && echo "table: $(basename "$t")" ;; esac
  done
  python3 -m pip install -q --no-deps --no-build-isolation --target "$HOME/vsite" . 2>&1 | { grep -v WARNING || true; }
}
wait_kernels() {  # until the background `kernels` or `sweep` job (if one was started) is done
  while [ -f "$res/kernels.started" ] && [ ! -f "$res/kernels.done" ]; do sleep 2; done
}
plugin_checks() {  # cuda_plugin_check --activations ACT for each ACT, with the package installed as vLLM finds it
  install
  for act in "$@"; do  # int4_sub128: W4A4 with a ResQ subspace of 128 channels
    log="$out/cuda_plugin_check_$act.log"
    sub=0; case $act in *_sub*) sub=${act#*_sub} ;; esac
    rm -rf "$HOME/tqcheck-$act"  # a check starts from nothing (the quantizer refuses an existing output folder)
    if python3 benchmarks/e2e/cuda_plugin_check.py --workdir "$HOME/tqcheck-$act" --out "$out" \
      --activations "${act%%_sub*}" --subspace "$sub" > "$log" 2>&1; then
      echo "$act: passed"
    else echo "$act: FAILED"; tail -30 "$log"; fi
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
  kernels)
    mkdir -p "$res"; touch "$res/kernels.started"
    setsid nohup bash -c "python3 benchmarks/kernels/wide_layer.py --out $res > $res/wide_layer.log 2>&1; \
      touch $res/timed.done; python3 benchmarks/kernels/tune.py sweep-w4a8 --act-quant int4 --out $res \
      > $res/sweep_w4a8_int4.log 2>&1; touch $res/kernels.done" > /dev/null 2>&1 < /dev/null &
    echo "started: wide_layer.py, then tune.py sweep-w4a8 --act-quant int4 (in $res)" ;;
  sweep)
    mkdir -p "$res/w4a8"; touch "$res/kernels.started"; rm -rf "$HOME/kw"; cp -r . "$HOME/kw"
    setsid nohup env -u PYTHONPATH bash -c "cd $HOME/kw && OUT=$res/w4a8 ACTS='${ACTS:-int8}' \
      BENCH_PYTHONPATH=$HOME/vsite timeout 590 \
      bash benchmarks/kernels/run_w4a8.sh '' 560 > $res/w4a8/run_w4a8.log 2>&1; touch $res/timed.done; \
      OUT=$res/w4a8/ncu bash benchmarks/kernels/ncu_w4a8.sh > $res/w4a8/ncu_w4a8.log 2>&1; \
      touch $res/kernels.done" > /dev/null 2>&1 < /dev/null &
    echo "started: run_w4a8.sh (ACTS=${ACTS:-int8}), then ncu_w4a8.sh, in $HOME/kw; results in $res/w4a8" ;;
  wait)
    wait_kernels
    tail -5 "$res"/w4a8/run_w4a8.log 2>/dev/null || true
    cp -r "$res"/w4a8 "$out"/ 2>/dev/null || true; ls "$out" ;;
  make)
    shift
    while [ -f "$res/kernels.started" ] && [ ! -f "$res/timed.done" ]; do sleep 2; done
    install
    tail -3 "$res/wide_layer.log" 2>/dev/null || true
    python3 benchmarks/e2e/e2e_h100.py make --workdir "$work" --ranks 64 "$@" --out "$res" ;;
  bench)
    shift
    wait_kernels
    python3 benchmarks/e2e/e2e_h100.py bench --workdir "$work" --configs "$@" --out "$out" ;;
  serve)
    shift
    wait_kernels
    python3 benchmarks/e2e/e2e_h100.py serve --workdir "$work" --configs "$@" --out "$out" ;;
  collect)
    tail -4 "$res"/*.log; cp "$res"/*.json "$res"/*.log "$out"/ 2>/dev/null || true; ls "$out" ;;
  *) sed -n '2,17p' "$0"; exit 2 ;;
esac
