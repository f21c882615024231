"""The M = 1 decode kernel: launch configs with and without prefetch, against BF16. (GPU)

    python3 benchmarks/kernels/bench_gemv.py --out DIR [--tag h200] [--baseline FILE] [--ranks 0 64]

For the four Llama-3-8B layer shapes at one token it times `_tq_gemv_vec_kernel`
(`tq_gemm` with a forced 5- or 6-field config, PDL where the dispatch uses it) over a set of
(BLOCK_M, BLOCK_N, BLOCK_W, warps, UNPACK, PREFETCH) configs, next to BF16 `torch.matmul` and
what the dispatch runs, in one run (CUDA graphs over enough weight copies to overflow L2, as
bench_kernels.py). Every config is first checked on the timed shape against the float32
reference, output NaN-poisoned; a mismatch stops the run. `--baseline FILE`: also time the
dispatch of another copy of csrc_triton/twinquant_gemm.py (e.g. the previous commit's, written
with `git show REV:csrc_triton/twinquant_gemm.py > FILE`), so before and after share the run.
Writes gemv_TAG.json. (`../results/gemv_h200.json` was measured at commit cde0625, whose
twinquant_gemm also had two launch switches, timed as extra variants: `_GEMV_CHAIN`, rank 0
launched with PDL itself, and `_GEMV_U_EARLY`, U loaded before the main loop; both were dropped.)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from bench_kernels import GROUP, SHAPES, flush_copies, graph_time_ms, layer_bytes, make_layer, reference  # noqa: E402

from csrc_triton import twinquant_gemm as tg  # noqa: E402

# (BLOCK_N, BLOCK_W, warps): the fastest of the v7 decode sweep (kernels_h200_decode_sweep.json)
# and of this script's first run (gemv_h200_first.json)
SHAPES_OF_PROGRAM = [(8, 256, 2), (4, 256, 2), (8, 128, 1), (4, 128, 1), (8, 512, 4)]


def candidates():
    return [(1, bn, bw, w, unpack, pf) for bn, bw, w in SHAPES_OF_PROGRAM for unpack in (1, 2) for pf in (0, 1)]


def load_baseline(path):
    spec = importlib.util.spec_from_file_location("twinquant_gemm_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--tag", default="h200")
    ap.add_argument("--ranks", type=int, nargs="+", default=[0, 64])
    ap.add_argument("--baseline", help="another twinquant_gemm.py whose dispatch is timed in the same run")
    args = ap.parse_args()
    dtype, gen = torch.bfloat16, torch.Generator(device="cuda").manual_seed(0)
    base = load_baseline(args.baseline) if args.baseline else None
    recs, t0 = [], time.time()
    for (name, k, n), r in [(s, r) for s in SHAPES for r in args.ranks]:
        layers = [make_layer(k, n, r, dtype, gen) for _ in range(flush_copies(layer_bytes(k, n, r)))]
        x = torch.randn(1, k, device="cuda", dtype=dtype, generator=gen)
        ref = reference(x, *layers[0])
        packed = [(tg.repack(L[0], GROUP), L[1], L[2], L[3]) for L in layers]
        dense = [torch.randn(n, k, device="cuda", dtype=dtype, generator=gen) for _ in range(flush_copies(n * k * 2, 16))]
        rec = {"name": name, "K": k, "N": n, "M": 1, "rank": r,
               "ms_bf16": graph_time_ms([lambda w=w: torch.matmul(x, w.t()) for w in dense]),
               "dispatch_config": list(tg.pick_gemv_config(1, n, k)), "configs": []}
        del dense
        rec["ms_dispatch"] = graph_time_ms([lambda L=L: tg.tq_gemm(x, *L[:2], GROUP, L[2], L[3]) for L in packed])

        def checked(module, cfg, what, L=packed[0]):
            """module.tq_gemm with `cfg` on the first copy, NaN-poisoned output, against float32."""
            y = torch.full((1, n), float("nan"), device="cuda", dtype=dtype)
            module.tq_gemm(x, *L[:2], GROUP, L[2], L[3], config=cfg, out=y)
            err = ((y.float() - ref).norm() / ref.norm()).item()
            if not err <= 1e-2:
                raise SystemExit(f"MISMATCH {what} {name} rank {r}: rel err {err:.3e}")
            return err

        if base is not None:
            checked(base, None, "baseline")
            rec["ms_baseline"] = graph_time_ms([lambda L=L: base.tq_gemm(x, *L[:2], GROUP, L[2], L[3]) for L in packed])
        for cfg in candidates():
            err = checked(tg, cfg, str(cfg))
            ms = graph_time_ms([lambda L=L: tg.tq_gemm(x, *L[:2], GROUP, L[2], L[3], config=cfg) for L in packed])
            rec["configs"].append({"config": list(cfg), "ms": ms, "rel_err": err})
        best = min(rec["configs"], key=lambda c: c["ms"])
        recs.append(rec)
        print(f"{name:8s} r{r:<3d} bf16 {rec['ms_bf16'] * 1e3:6.1f} us  dispatch {rec['ms_dispatch'] * 1e3:6.1f}"
              + (f"  baseline {rec['ms_baseline'] * 1e3:6.1f}" if base is not None else "")
              + f"  best {best['ms'] * 1e3:6.1f} {tuple(best['config'])}  ({time.time() - t0:.0f} s)", flush=True)
        for c in rec["configs"]:
            print(f"   {tuple(c['config'])} {c['ms'] * 1e3:.1f}", flush=True)
        del layers, packed
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"gemv_{args.tag}.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "triton": __import__("triton").__version__, "command": " ".join(sys.argv), "records": recs}, f,
                  indent=1)


if __name__ == "__main__":
    main()
