"""The layer's time under two versions of the kernels, on one GPU: the A/B of a change to csrc_triton.

    PYTHONPATH=OLD_ROOT python benchmarks/kernels/compare.py --tag old --out DIR   # a checkout of the baseline
    python benchmarks/kernels/compare.py --tag new --out DIR                         # this tree
    python benchmarks/kernels/compare.py --merge DIR/ab_old.json DIR/ab_new.json --out DIR

Each run times the layer as the plugin calls it (`linear`, or `tq_linear` in versions before the
plan) for Llama-3-8B's four shapes, M in 1..4096 and ranks 0 and 64, on the same random layers
(seeded), next to BF16 cuBLAS timed twice: the spread of those two is the noise of the run. The
merge writes ab_<card>.json: per case the new/old time ratio, and the noise bound it is judged
against (the larger BF16 spread of the two runs, at least 2%).
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

MS = [1, 4, 16, 64, 128, 256, 1024, 4096]
RANKS = [0, 64]


def run(tag: str, out: str) -> None:
    from common import GROUP, SHAPES, flush_copies, graph_time_ms, layer_bytes, make_layer

    ct = importlib.import_module("csrc_triton")
    linear = getattr(ct, "linear", None) or ct.tq_linear
    repack = getattr(ct, "repack", None) or importlib.import_module("csrc_triton.twinquant_gemm").repack
    recs = []
    for (name, k, n), m, r in itertools.product(SHAPES, MS, RANKS):
        gen = torch.Generator(device="cuda").manual_seed(sum(map(ord, name)) * 100003 + m * 131 + r)
        layers = [make_layer(k, n, r, torch.bfloat16, gen) for _ in range(flush_copies(layer_bytes(k, n, r)))]
        layers = [(repack(L[0], GROUP), *L[1:]) for L in layers]
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
        ms = graph_time_ms([lambda L=L, x=x: linear(x, L[0], L[1], GROUP, L[2], L[3]) for L in layers])
        del layers
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen)
              for _ in range(flush_copies(n * k * 2, 16))]
        bf16 = [graph_time_ms([lambda w=w, x=x: x @ w.t() for w in ws]) for _ in range(2)]
        del ws
        recs.append({"name": name, "M": m, "rank": r, "ms": ms, "ms_bf16": bf16})
        print(f"{tag} {name:8s} M={m:5d} r={r:3d} {ms * 1e3:8.1f} us  bf16 {bf16[0] * 1e3:.1f} / {bf16[1] * 1e3:.1f}",
              flush=True)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"ab_{tag}.json"), "w") as f:
        json.dump({"tag": tag, "device": torch.cuda.get_device_name(), "package": os.path.dirname(ct.__file__),
                   "torch": torch.__version__, "records": recs}, f, indent=1)


def merge(old_path: str, new_path: str, out: str) -> dict:
    old, new = (json.load(open(p)) for p in (old_path, new_path))
    if old["device"] != new["device"]:
        raise SystemExit(f"the two runs used different devices: {old['device']} / {new['device']}")
    key = lambda r: (r["name"], r["M"], r["rank"])  # noqa: E731
    base = {key(r): r for r in old["records"]}
    rows, noise = [], 0.0
    for r in new["records"]:
        o = base[key(r)]
        for pair in (o["ms_bf16"], r["ms_bf16"]):
            noise = max(noise, abs(pair[0] - pair[1]) / min(pair))
        rows.append({"name": r["name"], "M": r["M"], "rank": r["rank"], "ms_old": o["ms"], "ms_new": r["ms"],
                     "ratio": r["ms"] / o["ms"]})
    bound = max(noise, 0.02)
    slower = [x for x in rows if x["ratio"] > 1 + bound]
    result = {"device": new["device"], "noise_bf16_spread": noise, "bound": bound, "records": rows,
              "slower_beyond_noise": slower, "worst_ratio": max(x["ratio"] for x in rows),
              "median_ratio": sorted(x["ratio"] for x in rows)[len(rows) // 2]}
    card = new["device"].split()[1].lower() if len(new["device"].split()) > 1 else "gpu"
    with open(os.path.join(out, f"ab_{card}.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"{len(rows)} cases: median new/old {result['median_ratio']:.3f}, worst {result['worst_ratio']:.3f}; "
          f"noise (BF16 spread) {noise:.3f}; slower beyond max(noise, 2%): {len(slower)}")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tag", default="new")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--merge", nargs=2, metavar=("OLD", "NEW"))
    args = ap.parse_args()
    if args.merge:
        merge(*args.merge, args.out)
    else:
        run(args.tag, args.out)


if __name__ == "__main__":
    main()
