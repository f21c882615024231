"""The kernel table of the TwinQuant layer on one CUDA GPU (what README's per-layer numbers are).

For Llama-3-8B shapes, token counts M and ranks r it measures, in one run and on the same
random data (never zeros):
  * the layer as the plugin runs it (`csrc_triton.linear`, the plan's kernel for that M), and the
    fused kernels alone at every M (`gemm`: no large-M path);
  * the unfused version: residual kernel, then x@D^T and (x@D^T)@U^T as separate cuBLAS calls;
  * dense BF16 torch.matmul of the same shape, twice (the spread is the run's noise);
  * with a low-rank branch, the layer again without programmatic dependent launch (`ms_no_pdl`);
  * copy bandwidth and BF16 matmul peak of this GPU, for the floor of each case.
Timed in CUDA graphs over enough weight copies to overflow L2 (common.graph_time_ms).
Correctness first: every plan the table uses and a set of odd shapes and forced configs against a
float32 reference on fresh random data, output NaN-poisoned; a mismatch aborts the run.

    python benchmarks/kernels/bench_kernels.py --out DIR --tag h100 [--quick] [--ms 1 16 ...] [--time-limit S]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import platform
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    GROUP,
    MS,
    RANKS,
    SHAPES,
    flush_copies,
    fresh_case,
    graph_time_ms,
    layer_bytes,
    make_layer,
    measure_peaks,
    save_records,
)

import csrc_triton as ct  # noqa: E402
from csrc_triton.kernels.gemv import GemvConfig  # noqa: E402
from csrc_triton.kernels.mma_decode import MmaConfig  # noqa: E402
from csrc_triton.kernels.tile import TileConfig  # noqa: E402
from csrc_triton.kernels.wgmma_rs import RsConfig  # noqa: E402


def check(m, k, n, r, dtype, gen, group=GROUP, bounds=(), config=None, int8=False, bias=False):
    """One fresh random case through `gemm` (`config`, or the plan's) and `linear` against the
    float32 reference, NaN-poisoned output."""
    x, qw, sc, down, up, b, scales, ref = fresh_case(m, k, n, r, dtype, gen, group, bounds, int8, bias)
    out = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
    ct.gemm(x, qw, sc, group, down, up, b, slot_bounds=bounds, out=out, config=config, **scales)
    e1 = ((out.float() - ref).norm() / ref.norm()).item()
    y = ct.linear(x, qw, sc, group, down, up, b, slot_bounds=bounds, **scales)
    e2 = ((y.float() - ref).norm() / ref.norm()).item()
    bad = torch.isnan(out).any().item() or torch.isnan(y).any().item()
    if bad or not (e1 <= 1e-2 and e2 <= 1e-2):
        raise SystemExit(f"MISMATCH M={m} K={k} N={n} r={r} {config}: fused {e1:.2e}, plan {e2:.2e}, nan={bad}")
    return max(e1, e2)


@contextlib.contextmanager
def pdl_disabled():
    """The plan without programmatic dependent launch: down projection and residual kernel back to back."""
    saved = os.environ.get("TWINQUANT_DISABLED_KERNELS")
    os.environ["TWINQUANT_DISABLED_KERNELS"] = ",".join(filter(None, [saved, "pdl"]))
    ct.dispatch.cached_plan.cache_clear()
    try:
        yield
    finally:
        if saved is None:
            del os.environ["TWINQUANT_DISABLED_KERNELS"]
        else:
            os.environ["TWINQUANT_DISABLED_KERNELS"] = saved
        ct.dispatch.cached_plan.cache_clear()


def bench_case(name, k, n, m, r, dtype, gen, copy_gbps, peak_tflops):
    bytes_w = layer_bytes(k, n, r)
    bytes_io = m * k * 2 + m * n * 2
    flops = 2 * m * n * k + 2 * m * r * (k + n)
    copies = flush_copies(bytes_w)
    layers = [make_layer(k, n, r, dtype, gen) for _ in range(copies)]
    x = torch.randn(m, k, device="cuda", dtype=dtype, generator=gen)
    p = ct.plan(ct.LayerShape(n, k, GROUP, r, (), dtype), m, ct.Device.of(x.device))
    rec = {"name": name, "M": m, "K": k, "N": n, "rank": r, "group_size": GROUP, "weight_copies": copies,
           "kernel": p.kernel, "config": vars(p.config)}
    rec["ms"] = graph_time_ms([lambda L=L: ct.linear(x, L[0], L[1], GROUP, L[2], L[3]) for L in layers])
    rec["ms_fused_kernel"] = graph_time_ms([lambda L=L: ct.gemm(x, L[0], L[1], GROUP, L[2], L[3]) for L in layers])
    rec["ms_dequant_cublas"] = graph_time_ms([lambda L=L: ct.linear(x, L[0], L[1], GROUP, L[2], L[3],
                                                                    large_m_threshold=0) for L in layers])
    if r:
        with pdl_disabled():
            rec["ms_no_pdl"] = graph_time_ms([lambda L=L: ct.linear(x, L[0], L[1], GROUP, L[2], L[3]) for L in layers])

        def unfused(L):
            y = ct.gemm(x, L[0], L[1], GROUP)
            y += (x @ L[2].t()) @ L[3].t()
            return y
        rec["ms_unfused"] = graph_time_ms([lambda L=L: unfused(L) for L in layers])
    else:
        rec["ms_unfused"] = rec["ms_fused_kernel"]
    del layers
    ws = [torch.randn(n, k, device="cuda", dtype=dtype, generator=gen) for _ in range(flush_copies(n * k * 2, 16))]
    rec["ms_bf16"] = graph_time_ms([lambda w=w: torch.matmul(x, w.t()) for w in ws])
    rec["ms_bf16_repeat"] = graph_time_ms([lambda w=w: torch.matmul(x, w.t()) for w in ws])
    del ws
    floor_ms = max((bytes_w + bytes_io) / copy_gbps / 1e6, flops / peak_tflops / 1e9)
    rec.update(bytes=bytes_w + bytes_io, flops=flops, gbps=(bytes_w + bytes_io) / rec["ms"] / 1e6,
               tflops=flops / rec["ms"] / 1e9, floor_ms=floor_ms, pct_of_floor=100.0 * floor_ms / rec["ms"],
               speedup_vs_bf16=rec["ms_bf16"] / rec["ms"], speedup_vs_unfused=rec["ms_unfused"] / rec["ms"])
    return rec


def correctness(dtype, gen) -> float:
    """The plan at the table's shapes, odd shapes (M 1, 3, 17, 300; K not a multiple of the block;
    576-wide layers; merged slots) and each kernel forced with int8 factors and bias."""
    worst = 0.0
    for (_, k, n), m, r in itertools.product(SHAPES, [1, 16, 256, 4096], [0, 64, 128]):
        worst = max(worst, check(m, k, n, r, dtype, gen))
    for m, r in itertools.product([1, 3, 17, 300, 1500], [0, 32]):
        for k, n, g in [(576, 1536, 64), (1536, 576, 32), (4224, 1088, 128)]:
            worst = max(worst, check(m, k, n, r, dtype, gen, g))
        worst = max(worst, check(m, 4096, 6144, r or 16, dtype, gen, 128, (4096, 5120)))  # merged q/k/v
        worst = max(worst, check(m, 576, 960, r or 16, dtype, gen, 64, (576, 768)))  # SmolLM2 q/k/v
    worst = max(worst, check(5, 4096, 4096, 0, torch.float16, gen))
    forced = [(m, c) for m in (1, 2, 3, 7) for c in (GemvConfig(1, 4, 512, 4, 1), GemvConfig(2, 8, 128, 1, 1),
                                                      GemvConfig(1, 8, 128, 1, 0), GemvConfig(1, 4, 256, 2, 2, 1))]
    device = ct.Device.of(torch.device("cuda"))
    gluon = {name: ct.dispatch.kernels()[name].can_implement(ct.LayerShape(4096, 4096, 128), device)[0]
             for name in ("mma_decode", "wgmma_rs")}
    if gluon["mma_decode"]:
        forced += [(m, c) for m in (2, 5, 16) for c in (MmaConfig(1, 8, 8), MmaConfig(2, 4, 2), MmaConfig(1, 1, 3))]
        forced += [(m, c) for m in (24, 64, 100) for c in (MmaConfig(1, 8, 8, 32), MmaConfig(2, 4, 4, 64))]
    if gluon["wgmma_rs"]:
        forced += [(m, c) for m in (17, 100, 256) for c in (RsConfig(64, 64, 4, 4, 4), RsConfig(128, 128, 8, 4, 1),
                                                            RsConfig(256, 128, 8, 4, 4))]
    forced += [
        (m, c)
        for m in (7, 100)
        for c in (
            TileConfig(16, 64, 128, 4, 3, 4, 4),
            TileConfig(64, 64, 64, 4, 4, 2, 7),
            TileConfig(128, 128, 64, 8, 4, 1, 7),
        )
    ]
    for m, cfg in forced:
        worst = max(worst, check(m, 4224, 1088, 32, dtype, gen, 128, config=cfg))  # masked steps
        worst = max(worst, check(m, 4096, 6144, 64, dtype, gen, 128, (4096, 5120), config=cfg, int8=True, bias=True))
        if not isinstance(cfg, TileConfig) or cfg.mode == 7:
            worst = max(worst, check(m, 4096, 4096, 0, torch.float16, gen, 128, config=cfg))
    return worst


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--tag", default="h100", help="file name tag of the output (kernels_TAG.json)")
    ap.add_argument("--quick", action="store_true", help="M 1, 4, 16, 64, 128, 256, 4096 and ranks 0, 64")
    ap.add_argument("--ms", type=int, nargs="+", default=None, help="token counts of the table (default: all)")
    ap.add_argument("--ranks", type=int, nargs="+", default=None)
    ap.add_argument("--no-check", action="store_true", help="skip the correctness pass")
    ap.add_argument("--check-only", action="store_true", help="the correctness pass, then stop")
    ap.add_argument("--time-limit", type=float, default=0, help="stop the table after this many seconds (0: none)")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    dtype = torch.bfloat16
    gen = torch.Generator(device="cuda").manual_seed(0)
    dev = torch.cuda.get_device_properties(0)
    device = ct.Device.of(torch.device("cuda"))
    tables = ct.tables_for(device.name, device.capability)
    meta = {"device": dev.name, "sms": dev.multi_processor_count, "torch": torch.__version__,
            "triton": triton.__version__, "python": platform.python_version(), "launch_table": tables.path,
            "command": " ".join(sys.argv)}
    t0 = time.time()
    meta["copy_gbps"], meta["bf16_peak_tflops"] = measure_peaks()
    print(
        f"{dev.name}: copy {meta['copy_gbps']:.0f} GB/s, bf16 matmul {meta['bf16_peak_tflops']:.0f} TFLOP/s", flush=True
    )
    meta["max_rel_err"] = 0.0 if args.no_check else correctness(dtype, gen)
    print(f"correctness: max ||out-ref||/||ref|| = {meta['max_rel_err']:.2e}", flush=True)
    if args.check_only:
        return
    ms_list = args.ms or ([1, 4, 16, 64, 128, 256, 4096] if args.quick else MS)
    ranks = args.ranks or ([0, 64] if args.quick else RANKS)
    os.makedirs(args.out, exist_ok=True)
    recs = []
    for (name, k, n), m, r in itertools.product(SHAPES, ms_list, ranks):
        if args.time_limit and time.time() - t0 > args.time_limit:
            meta["stopped_early"] = f"before {name} M={m} r={r}"
            print(f"time limit: stopped {meta['stopped_early']}", flush=True)
            break
        rec = bench_case(name, k, n, m, r, dtype, gen, meta["copy_gbps"], meta["bf16_peak_tflops"])
        recs.append(rec)
        print(f"{name:8s} M={m:5d} r={r:3d} {rec['kernel']:14s} {rec['ms']*1e3:8.1f} us  fused "
              f"{rec['ms_fused_kernel']*1e3:8.1f}  deq+cublas {rec['ms_dequant_cublas']*1e3:8.1f}  "
              f"no-pdl {rec.get('ms_no_pdl', rec['ms'])*1e3:8.1f}  bf16 {rec['ms_bf16']*1e3:8.1f} "
              f"({rec['ms_bf16_repeat']*1e3:.1f})  x{rec['speedup_vs_bf16']:.2f}", flush=True)
        save_records(args.out, f"kernels_{args.tag}", meta, recs)
    print(f"wrote {save_records(args.out, f'kernels_{args.tag}', meta, recs, t0)} in {meta['seconds']:.0f} s")


if __name__ == "__main__":
    main()
