"""The large-M path (transient weights + one cuBLAS GEMM) with and without the low-rank fold. (GPU)

    python3 benchmarks/kernels/bench_large_m.py --out DIR [--tag h100] [--baseline FILE] [--ms 512 1024 4096]

For the four Llama-3-8B layer shapes it times, in one run (CUDA graphs over enough weight copies
to overflow L2, as bench_kernels.py):
  * `tq_linear` above its threshold (the plugin's path at these M): W = deq(R) + U D made by one
    `dequantize` pass, then x @ W^T;
  * with `--baseline FILE` (another copy of csrc_triton/twinquant_gemm.py, e.g. the previous
    commit's: `git show REV:csrc_triton/twinquant_gemm.py > FILE`) that module's `tq_linear`;
  * BF16 `torch.matmul` of the same shape;
  * the `dequantize` pass alone for a few fold tiles (BLOCK_N, BLOCK_K, warps), against rank 0's.
Every path is first checked against the float32 reference on the timed shape with the output
NaN-poisoned; a mismatch stops the run. Writes large_m_TAG.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from bench_gemv import load_baseline  # noqa: E402
from bench_kernels import (  # noqa: E402
    GROUP, SHAPES, flush_copies, graph_time_ms, layer_bytes, make_layer, reference, residual_weights,
)

from csrc_triton import twinquant_gemm as tg  # noqa: E402

FOLD_TILES = [(64, 128, 4), (128, 128, 8), (128, 256, 8)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--tag", default="h100")
    ap.add_argument("--ms", type=int, nargs="+", default=[512, 1024, 4096])
    ap.add_argument("--ranks", type=int, nargs="+", default=[0, 32, 64, 128, 256])
    ap.add_argument("--baseline", help="another twinquant_gemm.py whose tq_linear is timed in the same run")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    dtype, gen = torch.bfloat16, torch.Generator(device="cuda").manual_seed(0)
    base = load_baseline(args.baseline) if args.baseline else None
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": __import__("triton").__version__, "command": " ".join(sys.argv), "fold_tile": tg.FOLD_TILE,
              "dequant": [], "records": []}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"large_m_{args.tag}.json")
    t0 = time.time()
    for (name, k, n), r in [(s, r) for s in SHAPES for r in args.ranks]:
        layers = [make_layer(k, n, r, dtype, gen) for _ in range(flush_copies(layer_bytes(k, n, r), 16))]
        packed = [(tg.repack(L[0], GROUP), L[1], L[2], L[3]) for L in layers]
        orig = layers[0]  # checkpoint code layout, for the references
        del layers
        # the pass alone: fold tiles (rank 0: the plain dequantization's tile too)
        ref_w = None
        for tile in FOLD_TILES if r else [None]:
            L = packed[0]
            w = torch.full((n, k), float("nan"), device="cuda", dtype=dtype)
            tg.dequantize(L[0], L[1], GROUP, dtype, out=w, down=L[2], up=L[3], tile=tile)
            if ref_w is None:  # float32 effective weights deq(R) + U D, unpacked in plain torch
                ref_w = residual_weights(orig[0], orig[1])
                if r:
                    ref_w += orig[3].float() @ orig[2].float()
            err = ((w.float() - ref_w).norm() / ref_w.norm()).item()
            if not err <= 1e-2:
                raise SystemExit(f"MISMATCH dequantize {name} rank {r} tile {tile}: {err:.3e}")
            outs = [torch.empty((n, k), device="cuda", dtype=dtype) for _ in range(2)]
            ms = graph_time_ms([lambda L=L, i=i: tg.dequantize(L[0], L[1], GROUP, dtype, out=outs[i % 2], down=L[2],
                                                              up=L[3], tile=tile) for i, L in enumerate(packed)])
            del outs
            result["dequant"].append({"name": name, "K": k, "N": n, "rank": r, "tile": tile, "ms": ms, "rel_err": err})
            print(f"dequantize {name:8s} r{r:<3d} tile {tile}: {ms * 1e3:7.1f} us  ({n * k * 2.5 / ms / 1e6:6.0f} GB/s)",
                  flush=True)
        del ref_w
        for m in args.ms:
            x = torch.randn(m, k, device="cuda", dtype=dtype, generator=gen)
            ref = reference(x, *orig)
            rec = {"name": name, "K": k, "N": n, "M": m, "rank": r}
            paths = {"ms": tg} | ({"ms_baseline": base} if base is not None else {})
            for key, mod in paths.items():
                y = mod.tq_linear(x, *packed[0][:2], GROUP, packed[0][2], packed[0][3], large_m_threshold=0)
                err = ((y.float() - ref).norm() / ref.norm()).item()
                if not err <= 1e-2:
                    raise SystemExit(f"MISMATCH {key} {name} M={m} rank {r}: {err:.3e}")
                rec[key.replace("ms", "rel_err")] = err
                rec[key] = graph_time_ms([lambda L=L: mod.tq_linear(x, *L[:2], GROUP, L[2], L[3], large_m_threshold=0)
                                          for L in packed])
            dense = [torch.randn(n, k, device="cuda", dtype=dtype, generator=gen) for _ in range(flush_copies(n * k * 2, 8))]
            rec["ms_bf16"] = graph_time_ms([lambda w=w: torch.matmul(x, w.t()) for w in dense])
            del dense
            rec["speedup_vs_bf16"] = rec["ms_bf16"] / rec["ms"]
            result["records"].append(rec)
            print(f"M={m:5d} {name:8s} r{r:<3d} bf16 {rec['ms_bf16'] * 1e3:7.1f} us  now {rec['ms'] * 1e3:7.1f}"
                  + (f"  baseline {rec['ms_baseline'] * 1e3:7.1f}" if base is not None else "")
                  + f"  x{rec['speedup_vs_bf16']:.2f} vs bf16  ({time.time() - t0:.0f} s)", flush=True)
            with open(path, "w") as f:
                json.dump(result, f, indent=1)
        del packed, orig
    print(f"wrote {path} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
