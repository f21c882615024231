"""CPU serving speed of a TwinQuant checkpoint against its dense model, through vLLM's CPU build.

Each configuration (model x activation dtype) runs in its own process (a dtype this CPU cannot
run dies alone): vLLM's offline engine, eager mode, one prompt of 32 random tokens decoding
64 tokens (batch-1 ms per output token, from the difference of a 64- and a 1-token run, median
of 3) and 16 such prompts decoded together (output tokens per second). Random prompt tokens,
ignore_eos, temperature 0.

    python benchmarks/cpu/bench_cpu.py --dense models/smollm2-135m-instruct --twinquant runs/tq \\
        --dtypes float32 float16 bfloat16 --out benchmarks/results/cpu_<machine>.json

The record names the CPU (lscpu model name and flags that matter), the thread count and the
command; `--table` prints README's table from a result file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time

WORKER = r"""
import json, os, statistics, sys, time
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
model, dtype, quant = sys.argv[1], sys.argv[2], sys.argv[3] or None
import random
rng = random.Random(0)
t0 = time.time()
llm = LLM(model=model, dtype=dtype, quantization=quant, max_model_len=512, enforce_eager=True,
          gpu_memory_utilization=0.3, seed=0, skip_tokenizer_init=True)
startup = time.time() - t0
vocab = llm.llm_engine.model_config.get_vocab_size()
def prompts(n):
    return [TokensPrompt(prompt_token_ids=[rng.randrange(10, vocab) for _ in range(32)]) for _ in range(n)]
def run(n, tokens):
    p = SamplingParams(max_tokens=tokens, ignore_eos=True, temperature=0.0, detokenize=False)
    batch = prompts(n)
    t = time.perf_counter()
    outs = llm.generate(batch, p, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == tokens for o in outs)
    return time.perf_counter() - t
run(1, 8)
ms = []
for _ in range(3):
    ms.append((run(1, 64) - run(1, 1)) / 63 * 1e3)
t16 = statistics.median(run(16, 64) for _ in range(2))
print("RESULT " + json.dumps({"bs1_ms_per_token": round(statistics.median(ms), 2),
                              "bs1_runs_ms": [round(m, 2) for m in ms],
                              "bs16_out_tok_s": round(16 * 64 / t16, 1), "startup_s": round(startup, 1)}))
"""


def cpu_info() -> dict:
    info = {"machine": platform.machine(), "threads": os.cpu_count()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                info["cpu"] = line.split(":", 1)[1].strip()
        flags = open("/proc/cpuinfo").read()
        info["isa"] = sorted({f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16")
                              if f" {f}" in flags})
    except OSError:
        pass
    return info


def measure(model: str, dtype: str, quant: str | None, timeout: int) -> dict:
    t = time.time()
    proc = subprocess.run([sys.executable, "-c", WORKER, model, dtype, quant or ""], capture_output=True, text=True,
                          timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        tail = (proc.stderr or proc.stdout)[-600:].replace("\n", " | ")
        return {"error": f"exit {proc.returncode}: {tail}", "seconds": round(time.time() - t, 1)}
    return json.loads(lines[-1][len("RESULT "):])


def table(path: str) -> str:
    with open(path) as f:
        data = json.load(f)
    rows = ["| model | dtype | batch-1 ms/token | batch-16 out tok/s | × dense (batch 1 / batch 16) |",
            "|---|---|---|---|---|"]
    dense = {r["dtype"]: r for r in data["records"] if r["config"] == "dense" and "error" not in r}
    best = min((r for r in dense.values()), key=lambda r: r["bs1_ms_per_token"], default=None)
    for r in data["records"]:
        if "error" in r:
            rows.append(f"| {r['model']} | {r['dtype']} | fails: {r['error'][:60]} | | |")
            continue
        ratio = ""
        if best is not None:
            ratio = (f"{best['bs1_ms_per_token'] / r['bs1_ms_per_token']:.2f} / "
                     f"{r['bs16_out_tok_s'] / max(d['bs16_out_tok_s'] for d in dense.values()):.2f}")
        rows.append(
            f"| {r['model']} | {r['dtype']} | {r['bs1_ms_per_token']:.1f} | {r['bs16_out_tok_s']:.0f} | {ratio} |"
        )
    return "\n".join(rows)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dense", help="dense checkpoint folder")
    ap.add_argument("--twinquant", nargs="*", default=[], help="TwinQuant checkpoint folders")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "float16", "bfloat16"])
    ap.add_argument("--out", help="write the records here (JSON)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per configuration")
    ap.add_argument("--table", metavar="RESULT_JSON", help="print the markdown table of a result file and exit")
    args = ap.parse_args(argv)
    if args.table:
        print(table(args.table))
        return
    records = []
    for config, model, quant in [("dense", args.dense, None)] + [("twinquant", t, "twinquant") for t in args.twinquant]:
        if not model:
            continue
        for dtype in args.dtypes:
            rec = {"config": config, "model": os.path.basename(os.path.normpath(model)), "dtype": dtype}
            rec.update(measure(model, dtype, quant, args.timeout))
            print(json.dumps(rec), flush=True)
            records.append(rec)
    result = {"command": "python " + shlex.join(sys.argv), "cpu": cpu_info(), "records": records,
              "method": "vLLM offline engine, eager, 32 random prompt tokens, 64 output tokens, ignore_eos"}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
