"""Markdown tables from the committed result files.

    python benchmarks/make_tables.py kernels [benchmarks/results/kernels_h100.json]
    python benchmarks/make_tables.py accuracy [benchmarks/results/accuracy_smollm2.jsonl]
"""

import json
import sys


def kernels(path="benchmarks/results/kernels_h100.json", ms=None, ranks=None):
    d = json.load(open(path))
    m = d["meta"]
    print(f"{m['device']}, torch {m['torch']}, Triton {m['triton']}; measured copy {m['copy_gbps']:.0f} GB/s, "
          f"BF16 matmul {m['bf16_peak_tflops']:.0f} TFLOP/s; large-M threshold {m['large_m_threshold']}; "
          f"max rel. error {m['max_rel_err']:.1e}\n")
    print("| layer (K→N) | M | rank | TwinQuant µs | fused kernel µs | dequant+cuBLAS µs | unfused µs | BF16 µs "
          "| × vs BF16 | × vs unfused | GB/s | % of floor |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in d["records"]:
        if (ms and r["M"] not in ms) or (ranks is not None and r["rank"] not in ranks):
            continue
        print(f"| {r['name']} ({r['K']}→{r['N']}) | {r['M']} | {r['rank']} | {r['ms']*1e3:.1f} | "
              f"{r['ms_fused_kernel']*1e3:.1f} | {r['ms_dequant_cublas']*1e3:.1f} | {r['ms_unfused']*1e3:.1f} | "
              f"{r['ms_bf16']*1e3:.1f} | {r['speedup_vs_bf16']:.2f} | {r['speedup_vs_unfused']:.2f} | "
              f"{r['gbps']:.0f} | {r['pct_of_floor']:.0f} |")


def accuracy(path="benchmarks/results/accuracy_smollm2.jsonl"):
    rows = [json.loads(l) for l in open(path) if l.strip()]
    base = next((r["ppl"] for r in rows if r["recipe"] == "dense"), None)
    print("| method | group | rank | effective bits/weight | perplexity | vs dense |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        rel = f"{100 * (r['ppl'] / base - 1):+.1f}%" if base and r["recipe"] != "dense" else ""
        print(f"| {r['label']} | {r['group_size'] or ''} | {r['rank'] if r['rank'] is not None else ''} | "
              f"{r['effective_bits']:.2f} | {r['ppl']:.2f} | {rel} |")


if __name__ == "__main__":
    what = sys.argv[1]
    args = sys.argv[2:]
    if what == "kernels":
        kernels(*args)
    elif what == "kernels-short":
        kernels(*args, ms=[1, 16, 64, 256, 4096], ranks=[0, 64])
    else:
        accuracy(*args)
