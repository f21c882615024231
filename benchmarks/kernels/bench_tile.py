"""MODE 10 (the Hopper kernel with the weights as wgmma's register operand) against BF16. (GPU)

    python3 benchmarks/kernels/bench_tile.py --out DIR [--tag h200] [--ms 32 64 128 256] [--ranks 0 64]

First a correctness pass on odd cases (M = 1 and M not a multiple of the token tile, 576-wide
K with G = 64, merged slots, fp16, int8 factors, bias, split-K): each against the float32
reference with the output NaN-poisoned; a mismatch stops the run. Then, for the four
Llama-3-8B layer shapes at each M, it times a set of MODE 10 launch configs
(TOK, BLOCK_N, 64, warps, stages, SPLIT_K, 10) next to BF16 `torch.matmul` and what the
dispatch runs now (`tq_gemm` without a config) and the plugin's path (`tq_linear`), in one run (CUDA graphs over enough weight
copies to overflow L2, as bench_kernels.py). Every config is first checked on the timed shape
(NaN-poisoned output, float32 reference); a mismatch is recorded and the config not timed.
At rank > 0 only the `--lr-best` fastest rank-0 configs of that case are timed. The kernels
are compiled first in parallel processes. Writes tile_TAG.json after every case.
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

from bench_kernels import (  # noqa: E402
    GROUP, SHAPES, flush_copies, fresh_case, graph_time_ms, layer_bytes, make_layer, reference,
)

from csrc_triton import twinquant_gemm as tg  # noqa: E402

# (MT, warps): BLOCK_N = 16 * MT * warps weight rows per program
PROGRAM_SHAPES = [(1, 4), (1, 8), (2, 4)]  # (2, 8), BLOCK_N 256, never won in the first sweeps


def candidates(m):
    """MODE 10 configs tried at M: token tiles from M/2 (M/4 above 128) to M (32..256), accumulators of at most
    128 fp32 registers per thread (MT * TOK / 2)."""
    toks = [t for t in (32, 64, 128, 256) if t <= max(32, m) and (4 if m > 128 else 2) * t >= m]
    return [(tok, 16 * mt * w, 64, w, st, sp, 10) for tok in toks for mt, w in PROGRAM_SHAPES if mt * tok <= 256
            for st in (3, 4) for sp in (1, 2, 4)]


def _compile_worker(args):
    cfgs, r = args
    gen = torch.Generator(device="cuda").manual_seed(1)
    x, qw, sc, down, up, _, _, _ = fresh_case(64, 2048, 1024, r, torch.bfloat16, gen)
    failed = []
    for cfg in cfgs:
        try:
            tg.tq_gemm(x, qw, sc, GROUP, down, up, config=cfg)
        except Exception as e:  # noqa: BLE001 -- reported; the sweep then reports it again
            failed.append((cfg, r, f"{type(e).__name__}: {str(e)[:300]}"))
    torch.cuda.synchronize()
    return failed


def precompile(cfgs, ranks, workers=14):
    """Compile every (config, rank > 0) kernel variant in parallel processes sharing Triton's
    on-disk cache (one config per SPLIT_K > 1 is enough: SPLIT is a flag)."""
    import multiprocessing as mp

    keys = sorted({(c[0], c[1], c[3], c[4], min(c[5], 2)) for c in cfgs})
    cfgs = [(tok, bn, 64, w, st, sp, 10) for tok, bn, w, st, sp in keys]
    jobs = [(cfgs[i::workers], r) for r in sorted({min(r, 64) for r in ranks}) for i in range(workers)]
    with mp.get_context("spawn").Pool(workers) as pool:
        return [f for part in pool.map(_compile_worker, jobs) for f in part]


SMOKE = [  # (M, K, N, rank, group, slot bounds, dtype, int8, bias, config)
    (1, 4096, 4096, 64, 128, (), torch.bfloat16, False, False, (64, 128, 64, 8, 4, 1, 10)),
    (40, 576, 192, 16, 64, (64, 128), torch.bfloat16, False, True, (64, 64, 64, 4, 3, 1, 10)),
    (40, 576, 192, 16, 64, (64, 128), torch.float16, True, False, (32, 64, 64, 4, 4, 3, 10)),
    (77, 4096, 6144, 64, 128, (4096, 5120), torch.bfloat16, False, False, (64, 128, 64, 8, 4, 4, 10)),
    (200, 14336, 4096, 128, 128, (), torch.float16, False, True, (256, 64, 64, 4, 4, 1, 10)),
    (130, 1536, 576, 32, 64, (), torch.bfloat16, True, True, (128, 64, 64, 4, 3, 2, 10)),
    (256, 4096, 28672, 0, 128, (14336,), torch.bfloat16, False, False, (128, 256, 64, 8, 4, 1, 10)),
]


def smoke(gen):
    out = []
    for m, k, n, r, g, bounds, dtype, int8, bias, cfg in SMOKE:
        x, qw, sc, down, up, b, scales, ref = fresh_case(m, k, n, r, dtype, gen, g, bounds, int8, bias)
        y = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
        tg.tq_gemm(x, qw, sc, g, down, up, b, slot_bounds=bounds, config=cfg, out=y, **scales)
        err = ((y.float() - ref).norm() / ref.norm()).item()
        rec = dict(M=m, K=k, N=n, rank=r, group_size=g, bounds=list(bounds), dtype=str(dtype), int8=int8, bias=bias,
                   config=list(cfg), rel_err=err)
        print(f"smoke {rec}", flush=True)
        if not err <= 1e-2:  # NaN fails too
            raise SystemExit(f"MISMATCH smoke case {rec}")
        out.append(rec)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--tag", default="h200")
    ap.add_argument("--ms", type=int, nargs="+", default=[32, 64, 128, 256])
    ap.add_argument("--ranks", type=int, nargs="+", default=[0, 64])
    ap.add_argument("--lr-best", type=int, default=4)
    ap.add_argument("--shapes", nargs="+", default=[s[0] for s in SHAPES])
    args = ap.parse_args()
    dtype, gen = torch.bfloat16, torch.Generator(device="cuda").manual_seed(0)
    t0 = time.time()
    failed = precompile([c for m in args.ms for c in candidates(m)], args.ranks)
    print(f"precompiled in {time.time() - t0:.0f} s; failed: {failed}", flush=True)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": __import__("triton").__version__, "command": " ".join(sys.argv), "compile_failed": failed,
              "smoke": smoke(gen), "records": []}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"tile_{args.tag}.json")
    for m in args.ms:
        for name, k, n in [s for s in SHAPES if s[0] in args.shapes]:
            x = torch.randn(m, k, device="cuda", dtype=dtype, generator=gen)
            dense = [torch.randn(n, k, device="cuda", dtype=dtype, generator=gen)
                     for _ in range(flush_copies(n * k * 2, 16))]
            ms_bf16 = graph_time_ms([lambda w=w: torch.matmul(x, w.t()) for w in dense])
            del dense
            rank0 = []
            for r in args.ranks:
                layers = [make_layer(k, n, r, dtype, gen) for _ in range(flush_copies(layer_bytes(k, n, r)))]
                ref = reference(x, *layers[0])
                packed = [(tg.repack(L[0], GROUP), L[1], L[2], L[3]) for L in layers]
                del layers
                rec = {"name": name, "K": k, "N": n, "M": m, "rank": r, "ms_bf16": ms_bf16, "configs": []}

                def run(cfg, L):
                    return tg.tq_gemm(x, L[0], L[1], GROUP, L[2], L[3], config=cfg)

                def check(cfg):
                    y = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
                    L = packed[0]
                    tg.tq_gemm(x, L[0], L[1], GROUP, L[2], L[3], config=cfg, out=y)
                    return ((y.float() - ref).norm() / ref.norm()).item()

                rec["dispatch_err"] = check(None)
                if not rec["dispatch_err"] <= 1e-2:
                    raise SystemExit(f"MISMATCH dispatch {name} M={m} rank {r}: {rec['dispatch_err']}")
                rec["ms_dispatch"] = graph_time_ms([lambda L=L: run(None, L) for L in packed])
                # the plugin's path (tq_linear: above its threshold, dequantization + cuBLAS)
                rec["ms_linear"] = graph_time_ms([lambda L=L: tg.tq_linear(x, *L[:2], GROUP, L[2], L[3]) for L in packed])
                cands = candidates(m) if r == 0 or not rank0 else rank0[: args.lr_best]
                for cfg in cands:
                    try:
                        err = check(cfg)
                    except Exception as e:  # noqa: BLE001 -- recorded (e.g. a config too large for the device)
                        rec["configs"].append({"config": list(cfg), "error": f"{type(e).__name__}: {str(e)[:200]}"})
                        continue
                    if not err <= 1e-2:
                        rec["configs"].append({"config": list(cfg), "rel_err": err, "error": "MISMATCH"})
                        print(f"   MISMATCH {cfg}: {err}", flush=True)
                        continue
                    ms = graph_time_ms([lambda L=L: run(cfg, L) for L in packed])
                    rec["configs"].append({"config": list(cfg), "ms": ms, "rel_err": err})
                timed = sorted([c for c in rec["configs"] if "ms" in c], key=lambda c: c["ms"])
                if r == 0:
                    rank0 = [tuple(c["config"]) for c in timed]
                best = timed[0] if timed else None
                rec["best"] = best
                result["records"].append(rec)
                print(f"M={m:4d} {name:8s} r{r:<3d} bf16 {ms_bf16 * 1e3:6.1f} us  dispatch {rec['ms_dispatch'] * 1e3:6.1f}"
                      f"  linear {rec['ms_linear'] * 1e3:6.1f}"
                      + (f"  best {best['ms'] * 1e3:6.1f} {tuple(best['config'])}" if best else "  (none)")
                      + f"  ({time.time() - t0:.0f} s)", flush=True)
                for c in timed[:6]:
                    print(f"   {tuple(c['config'])} {c['ms'] * 1e3:.1f}", flush=True)
                with open(path, "w") as f:
                    json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
