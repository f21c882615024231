"""Batch-1 decode and batched throughput through vLLM on the GPU, BF16 vs TwinQuant, on a Llama
with Llama-3-8B layer shapes but only --layers blocks (random bf16 weights made on the GPU).
A partial stand-in for the full 32-block comparison of issue 4, run when device time is short.

    python benchmarks/e2e/decode_partial.py --stage make  --workdir W --layers 8 --rank 64
    python benchmarks/e2e/decode_partial.py --stage bench --workdir W --which dense|tq --out DIR
"""

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", choices=("make", "bench"), required=True)
    ap.add_argument("--workdir", default="/tmp/tqe2e")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--which", choices=("dense", "tq"))
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--profile", action="store_true", help="torch.profiler table of 64 batch-1 decode steps")
    a = ap.parse_args()
    dense, tq = os.path.join(a.workdir, "dense"), os.path.join(a.workdir, "tq")
    if a.stage == "make":
        from cuda_plugin_check import make_model  # noqa: E402

        t0 = time.time()
        make_model(dense, a.layers, 0)
        t1 = time.time()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "offline_quantizer.cli",
                "--model",
                dense,
                "--output",
                tq,
                "--calib",
                "random",
                "--recipe",
                "svd-split",
                "--nsamples",
                "32",
                "--seqlen",
                "256",
                "--group-size",
                "128",
                "--max-kl",
                "inf",
                "--rank",
                str(a.rank),
                "--device",
                "cuda",
            ],
            check=True,
        )
        print(json.dumps({"make_s": round(t1 - t0, 1), "quantize_s": round(time.time() - t1, 1)}))
        return
    import torch
    from e2e_h100 import bs1_ms_per_token, decode_profile_table, offline_throughput, random_prompts
    from vllm import LLM

    t0 = time.time()
    kw = {"quantization": "twinquant"} if a.which == "tq" else {}
    llm = LLM(model=tq if a.which == "tq" else dense, dtype="bfloat16", max_model_len=1024,
              gpu_memory_utilization=0.6, skip_tokenizer_init=True, **kw)
    rec = {"config": a.which, "layers": a.layers, "rank": a.rank if a.which == "tq" else None,
           "startup_s": round(time.time() - t0, 1)}
    g = torch.Generator().manual_seed(0)
    p1 = random_prompts(g, 1, 32)[0]
    rec["bs1_ms_per_token"] = bs1_ms_per_token(llm, p1)
    if a.profile:
        table = decode_profile_table(llm, p1, row_limit=30, width=70)
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, f"profile_decode_{a.which}.txt"), "w") as f:
            f.write(table)
        print(table[:6000])
        return
    rec.update(
        offline_throughput(llm, random_prompts(g, 128, 512)), throughput_workload="128 prompts x 512 in, 256 out"
    )
    print(json.dumps(rec))
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, f"decode_partial_{a.which}.json"), "w") as f:
        json.dump(rec, f)


if __name__ == "__main__":
    main()
