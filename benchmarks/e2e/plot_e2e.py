"""Plot benchmarks/results/e2e_h100.json (needs matplotlib, which the project does not install):
    python benchmarks/e2e/plot_e2e.py [JSON] [PNG]"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

src = sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/e2e_h100.json"
dst = sys.argv[2] if len(sys.argv) > 2 else "benchmarks/results/e2e_h100.png"
recs = json.load(open(src))["records"]
names = {"bf16": "BF16", "fp8": "FP8\n(W8A8)", "gptq": "GPTQ\n(Machete)"}
labels = [names.get(r["config"], r["config"].replace("tq_r", "TQ\nr")) for r in recs]
fig, ax = plt.subplots(1, 3, figsize=(14, 3.9))
ax[0].bar(labels, [r["bs1_ms_per_token"] for r in recs], color="#4c72b0")
ax[0].set_ylabel("ms / output token (batch 1)")
ax[0].set_title("Offline decode latency, lower is better")
ax[1].bar(labels, [r["out_tok_s"] for r in recs], color="#dd8452")
ax[1].set_ylabel("output tokens / s")
ax[1].set_title("Offline throughput (512 x 512 in, 256 out)")
runs = [{x["concurrency"]: x["output_throughput"] for x in r.get("serve", {}).get("runs", [])} for r in recs]
levels = sorted({c for by_c in runs for c in by_c})  # every concurrency some config was served at
width = 0.8 / max(1, len(levels))
for j, c in enumerate(levels):
    ax[2].bar([i + (j - (len(levels) - 1) / 2) * width for i in range(len(recs))], [by_c.get(c, 0) for by_c in runs],
              width, label=f"concurrency {c}")
ax[2].set_xticks(range(len(recs)), labels)
ax[2].set_ylabel("output tokens / s")
ax[2].set_title("vllm serve + vllm bench serve")
ax[2].legend(fontsize=7)
for a in ax:
    a.tick_params(axis="x", labelsize=8)
fig.suptitle("vLLM 0.26, H100 80GB, Llama-3-8B shapes (random weights), TQ = TwinQuant W4A16 g128", fontsize=10)
fig.tight_layout()
fig.savefig(dst, dpi=100)
print("wrote", dst)
