"""Where should the down projection let the residual kernel start? (GPU, sm_90+)

    python3 benchmarks/kernels/bench_pdl.py --out DIR [--tag h200]

For the four Llama-3-8B layer shapes, M = 1-256 and ranks 32/64/128 it times the layer as the
plugin runs it (`tq_linear`, CUDA graphs over enough weight copies to overflow L2, as
bench_kernels.py) four ways in one run: rank 0 (no low-rank branch), no PDL (the down projection
and the residual kernel back to back), PDL with the residual kernel allowed to start when every
down-projection program has started (trigger 1) or finished its loads (trigger 2). Writes
pdl_TAG.json; `pdl_trigger` in csrc_triton/twinquant_gemm.py is set from it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from bench_kernels import (GROUP, SHAPES, check, flush_copies, graph_time_ms, layer_bytes, make_layer,  # noqa: E402
                           pdl_disabled)

from csrc_triton import twinquant_gemm as tg  # noqa: E402


def breakdown(args, gen):
    """At decode, rank r against rank 0 as dispatched, and two variants: `epilogue only` (t
    precomputed once, so the layer is the residual kernel with its low-rank epilogue and no down
    projection launch) and the down projection split over fewer K-slices (S = 4, 8: fewer
    partial slices for the epilogue to add up, a longer down projection for PDL to hide)."""
    recs = []
    real_down = tg.lowrank_down
    for (name, k, n), m in itertools.product(SHAPES, [1, 4, 16]):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
        for r in [0, 64, 128]:
            layers = [make_layer(k, n, r, torch.bfloat16, gen) for _ in range(flush_copies(layer_bytes(k, n, r)))]
            fns = [lambda L=L: tg.tq_linear(x, L[0], L[1], GROUP, L[2], L[3]) for L in layers]
            rec = {"name": name, "M": m, "K": k, "N": n, "rank": r, "ms": graph_time_ms(fns)}
            if r:
                cached = {}

                def precomputed(xx, down, num_splits=None, **kw):
                    key = (down.data_ptr(), kw.get("reduce"))
                    if key not in cached:
                        cached[key] = real_down(xx, down, num_splits, **kw)
                    return cached[key]
                tg.lowrank_down = precomputed
                for f in fns:  # the workspaces, computed outside the timed graph
                    f()
                torch.cuda.synchronize()
                rec["ms_epilogue_only"] = graph_time_ms(fns)
                for s_ in (4, 8):
                    tg.lowrank_down = lambda xx, down, num_splits=None, s_=s_, **kw: real_down(xx, down, s_, **kw)
                    rec[f"ms_splits{s_}"] = graph_time_ms(fns)
                tg.lowrank_down = real_down
            recs.append(rec)
            del layers
            print(json.dumps({k2: (round(v * 1e3, 1) if k2.startswith("ms") else v) for k2, v in rec.items()}), flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"pdl_breakdown_{args.tag}.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "command": " ".join(sys.argv), "records": recs}, f, indent=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--tag", default="h200")
    ap.add_argument("--ms", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256])
    ap.add_argument("--ranks", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--breakdown", action="store_true",
                    help="decode only: where the rest of the low-rank cost goes (see breakdown())")
    args = ap.parse_args()
    if not tg.pdl_usable(0):
        raise SystemExit("PDL is not in use on this device")
    gen = torch.Generator(device="cuda").manual_seed(0)
    if args.breakdown:
        return breakdown(args, gen)
    saved = tg.pdl_trigger
    worst = 0.0
    for trig in (1, 2):  # both trigger positions are correct first (the wait is in the residual kernel)
        tg.pdl_trigger = lambda m, n, k, r, t=trig: t
        for m, (name, k, n), r in itertools.product([1, 8, 64, 200], SHAPES, [64]):
            worst = max(worst, check(m, k, n, r, torch.bfloat16, gen, None))
    print(f"correctness (both triggers): max rel. error {worst:.2e}", flush=True)
    recs, t0 = [], time.time()
    for (name, k, n), m in itertools.product(SHAPES, args.ms):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
        for r in [0, *args.ranks]:
            layers = [make_layer(k, n, r, torch.bfloat16, gen) for _ in range(flush_copies(layer_bytes(k, n, r)))]
            fns = [lambda L=L: tg.tq_linear(x, L[0], L[1], GROUP, L[2], L[3]) for L in layers]
            rec = {"name": name, "M": m, "K": k, "N": n, "rank": r}
            if r == 0:
                rec["ms"] = graph_time_ms(fns)
            else:
                with pdl_disabled():
                    rec["ms_no_pdl"] = graph_time_ms(fns)
                for trig in (1, 2):
                    tg.pdl_trigger = lambda m, n, k, r, t=trig: t
                    rec[f"ms_trigger{trig}"] = graph_time_ms(fns)
            recs.append(rec)
            del layers
            print(json.dumps({k2: (round(v * 1e3, 1) if k2.startswith("ms") else v) for k2, v in rec.items()}), flush=True)
    tg.pdl_trigger = saved
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"pdl_{args.tag}.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "max_rel_err": worst, "seconds": time.time() - t0,
                   "command": " ".join(sys.argv), "records": recs}, f, indent=1)


if __name__ == "__main__":
    main()
