"""Kernel benchmark of the TwinQuant dual-component linear layer on one CUDA GPU.

For Llama-3-8B shapes, token counts M and ranks r it measures, in one run and on the same
random data (never zeros):
  * the TwinQuant layer as the plugin runs it (`tq_linear`: fused kernel, or dequant+cuBLAS
    above the large-M threshold), and the fused kernel alone at every M;
  * the unfused version: residual kernel, then x@D^T and (x@D^T)@U^T as separate cuBLAS calls;
  * dense BF16 torch.matmul of the same shape;
  * with a low-rank branch, the layer again without programmatic dependent launch (`ms_no_pdl`:
    the down projection and the residual kernel strictly back to back, as before v10);
  * copy bandwidth and BF16 matmul peak of this GPU, for the floor of each case.
Every timed call is captured in a CUDA graph that cycles through enough weight copies to
overflow L2, so the numbers are device time with weights streamed from HBM, as in decode.
Correctness: every case is checked against a float32 reference (TF32 off) on fresh random
data with the output poisoned first; a mismatch aborts the run.

    python benchmarks/kernels/bench_kernels.py --out DIR [--quick] [--sweep] [--int8-factors]

--int8-factors adds a comparison of int8 low-rank factors (format lowrank_dtype "int8": codes
plus one fp32 scale per row) with bf16 factors of the same rank, as the plugin dispatches them,
written to kernels_h100_int8_factors.json.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import platform
import sys
import time

import torch
import triton
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from csrc_triton import twinquant_gemm as tg  # noqa: E402
from vllm_twinquant.format import int8_rows  # noqa: E402

SHAPES = [  # (name, K, N)
    ("qkv", 4096, 6144),
    ("o", 4096, 4096),
    ("gate_up", 4096, 28672),
    ("down", 14336, 4096),
]
MS = [1, 4, 16, 64, 128, 256, 1024, 4096]
RANKS = [0, 32, 64, 128]
GROUP = 128
L2_FLUSH_BYTES = 200 << 20


def graph_time_ms(fns, reps: int = 50) -> float:
    """Median device time of one call, from CUDA-graph replays of all `fns` in turn."""
    for f in fns:
        f()
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    ms = do_bench(g.replay, warmup=25, rep=reps, return_mode="median")
    del g
    return ms / len(fns)


def measure_peaks():
    n = 1 << 28  # 512 MiB of bf16
    a = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a), warmup=25, rep=100, return_mode="median")
    copy_gbps = 2 * a.numel() * 2 / ms / 1e6
    del a, b
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = do_bench(lambda: x @ y, warmup=25, rep=100, return_mode="median")
    tflops = 2 * 8192**3 / ms / 1e9
    return copy_gbps, tflops


def make_layer(k, n, r, dtype, gen, group=GROUP, slots=1):
    """Random codes (every int32 is a valid word in either code layout), scales and factors."""
    qw = torch.randint(-(2**31), 2**31 - 1, (n, k // 8), device="cuda", dtype=torch.int32, generator=gen)
    sc = (torch.rand(n, k // group, device="cuda", generator=gen) * 0.01 + 0.002).half()
    down = (torch.randn(slots * r, k, device="cuda", generator=gen) * 0.02).to(dtype) if r else None
    up = (torch.randn(n, r, device="cuda", generator=gen) * 0.02).to(dtype) if r else None
    return qw, sc, down, up


def residual_weights(qw, sc, group=GROUP):
    """deq(R) in float32 from the checkpoint's code layout, unpacked in plain torch (no Triton)."""
    n, k = qw.shape[0], qw.shape[1] * 8
    codes = ((qw[:, :, None] >> (4 * torch.arange(8, device=qw.device, dtype=torch.int32))) & 0xF) - 8
    return (codes.reshape(n, k // group, group).float() * sc.float()[:, :, None]).reshape(n, k)


def reference(x, qw, sc, down, up, group=GROUP, bounds=()):
    """float32 reference (TF32 off); the residual is unpacked in plain torch, independently of Triton."""
    y = x.float() @ residual_weights(qw, sc, group).t()
    if down is not None:
        r = up.shape[1]
        edges = (0, *bounds, y.shape[1])
        t = x.float() @ down.float().t()
        for s in range(len(edges) - 1):
            a, b = edges[s], edges[s + 1]
            y[:, a:b] += t[:, s * r : (s + 1) * r] @ up[a:b].float().t()
    return y


def fresh_case(m, k, n, r, dtype, gen, group=GROUP, bounds=(), int8=False, bias=False):
    """A fresh random layer and input with its float32 reference: (x, repacked codes, scales,
    down, up, bias, factor-scale kwargs, ref); int8: factors as int8 codes + row scales."""
    qw, sc, down, up = make_layer(k, n, r, dtype, gen, group, len(bounds) + 1)
    x = torch.randn(m, k, device="cuda", dtype=dtype, generator=gen)
    scales = {}
    if int8 and r:
        (down, ds), (up, us) = int8_rows(down), int8_rows(up)
        scales = {"down_scale": ds, "up_scale": us}
        ref = reference(x, qw, sc, down.float() * ds[:, None], up.float() * us[:, None], group, bounds)
    else:
        ref = reference(x, qw, sc, down, up, group, bounds)
    b = torch.randn(n, device="cuda", dtype=dtype, generator=gen) if bias else None
    if bias:
        ref += b.float()
    qw = tg.repack(qw, group)  # the layout the plugin builds at load; the reference read the original
    return x, qw, sc, down, up, b, scales, ref


def check(m, k, n, r, dtype, gen, large_thr, group=GROUP, bounds=(), config=None, int8=False, bias=False):
    """One fresh random case through tq_gemm (`config`, or the dispatch's) and tq_linear against
    the float32 reference, NaN-poisoned output; int8: factors as int8 codes + row scales."""
    x, qw, sc, down, up, b, scales, ref = fresh_case(m, k, n, r, dtype, gen, group, bounds, int8, bias)
    out = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
    tg.tq_gemm(x, qw, sc, group, down, up, b, slot_bounds=bounds, out=out, config=config, **scales)
    e1 = ((out.float() - ref).norm() / ref.norm()).item()
    y = tg.tq_linear(x, qw, sc, group, down, up, b, slot_bounds=bounds, large_m_threshold=large_thr, **scales)
    e2 = ((y.float() - ref).norm() / ref.norm()).item()
    bad = torch.isnan(out).any().item() or torch.isnan(y).any().item()
    if bad or not (e1 <= 1e-2 and e2 <= 1e-2):
        raise SystemExit(f"MISMATCH M={m} K={k} N={n} r={r}: fused {e1:.2e}, dispatch {e2:.2e}, nan={bad}")
    return max(e1, e2)


@contextlib.contextmanager
def pdl_disabled():
    """The dispatch as it ran before PDL: the down projection and the residual kernel back to back."""
    saved = tg.pdl_usable
    tg.pdl_usable = lambda device_index: False
    try:
        yield
    finally:
        tg.pdl_usable = saved


def layer_bytes(k, n, r):
    """Bytes of one TwinQuant layer's weights: 4-bit codes, fp16 group scales, bf16 factors."""
    return n * k // 2 + n * (k // GROUP) * 2 + r * (k + n) * 2


def flush_copies(nbytes, cap=64):
    """How many copies of an `nbytes` operand a timed graph cycles through to overflow L2."""
    return max(1, min(cap, math.ceil(L2_FLUSH_BYTES / nbytes)))


def bench_case(name, k, n, m, r, dtype, gen, copy_gbps, peak_tflops, large_thr):
    bytes_w = layer_bytes(k, n, r)
    bytes_io = m * k * 2 + m * n * 2
    flops = 2 * m * n * k + 2 * m * r * (k + n)
    copies = flush_copies(bytes_w)
    layers = [make_layer(k, n, r, dtype, gen) for _ in range(copies)]
    x = torch.randn(m, k, device="cuda", dtype=dtype, generator=gen)
    rec = {"name": name, "M": m, "K": k, "N": n, "rank": r, "group_size": GROUP, "weight_copies": copies}

    rec["ms"] = graph_time_ms([lambda L=L: tg.tq_linear(x, L[0], L[1], GROUP, L[2], L[3], large_m_threshold=large_thr) for L in layers])
    rec["ms_fused_kernel"] = graph_time_ms([lambda L=L: tg.tq_gemm(x, L[0], L[1], GROUP, L[2], L[3]) for L in layers])
    rec["ms_dequant_cublas"] = graph_time_ms([lambda L=L: tg.tq_linear(x, L[0], L[1], GROUP, L[2], L[3], large_m_threshold=0) for L in layers])
    if r:
        with pdl_disabled():
            rec["ms_no_pdl"] = graph_time_ms([lambda L=L: tg.tq_linear(x, L[0], L[1], GROUP, L[2], L[3], large_m_threshold=large_thr) for L in layers])

        def unfused(L):
            y = tg.tq_gemm(x, L[0], L[1], GROUP)
            t = x @ L[2].t()
            y += t @ L[3].t()
            return y
        rec["ms_unfused"] = graph_time_ms([lambda L=L: unfused(L) for L in layers])
    else:
        rec["ms_unfused"] = rec["ms_fused_kernel"]
    del layers
    dense_copies = flush_copies(n * k * 2, 16)
    ws = [torch.randn(n, k, device="cuda", dtype=dtype, generator=gen) for _ in range(dense_copies)]
    rec["ms_bf16"] = graph_time_ms([lambda w=w: torch.matmul(x, w.t()) for w in ws])
    del ws

    floor_ms = max((bytes_w + bytes_io) / copy_gbps / 1e6, flops / peak_tflops / 1e9)
    rec["bytes"] = bytes_w + bytes_io
    rec["flops"] = flops
    rec["gbps"] = rec["bytes"] / rec["ms"] / 1e6
    rec["tflops"] = flops / rec["ms"] / 1e9
    rec["floor_ms"] = floor_ms
    rec["pct_of_floor"] = 100.0 * floor_ms / rec["ms"]
    rec["speedup_vs_bf16"] = rec["ms_bf16"] / rec["ms"]
    rec["speedup_vs_unfused"] = rec["ms_unfused"] / rec["ms"]
    return rec


def bench_int8_factors(dtype, gen, ms=(1, 4, 16, 64, 256, 1024), rank=64):
    """tq_linear with int8 factors vs bf16 factors of the same rank (and rank 0), same residual;
    int8 output checked against a float32 reference of the dequantized factors."""
    out = []
    for (name, k, n), m in itertools.product(SHAPES, ms):
        copies = max(1, min(64, math.ceil(L2_FLUSH_BYTES / (n * k // 2))))
        layers = []
        for _ in range(copies):
            qw, sc, down, up = make_layer(k, n, rank, dtype, gen)
            (qd, ds), (qu, us) = int8_rows(down), int8_rows(up)  # the format's rows, unbalanced (random factors)
            layers.append((tg.repack(qw, GROUP), sc, down, up, qd, ds, qu, us))
        x = torch.randn(m, k, device="cuda", dtype=dtype, generator=gen)
        L = layers[0]
        ref = reference(x, tg.unrepack(L[0], GROUP), L[1], (L[4].float() * L[5][:, None]), (L[6].float() * L[7][:, None]))
        y = tg.tq_linear(x, L[0], L[1], GROUP, L[4], L[6], down_scale=L[5], up_scale=L[7])
        err = ((y.float() - ref).norm() / ref.norm()).item()
        if torch.isnan(y).any().item() or err > 1e-2:
            raise SystemExit(f"MISMATCH int8 factors {name} M={m}: rel err {err:.2e}")
        rec = {"name": name, "M": m, "K": k, "N": n, "rank": rank, "group_size": GROUP, "rel_err": err}
        rec["ms_r0"] = graph_time_ms([lambda L=L: tg.tq_linear(x, L[0], L[1], GROUP) for L in layers])
        rec["ms_bf16_factors"] = graph_time_ms([lambda L=L: tg.tq_linear(x, L[0], L[1], GROUP, L[2], L[3]) for L in layers])
        rec["ms_int8_factors"] = graph_time_ms([lambda L=L: tg.tq_linear(x, L[0], L[1], GROUP, L[4], L[6], down_scale=L[5], up_scale=L[7]) for L in layers])
        rec["bytes_bf16_factors"] = rank * (k + n) * 2
        rec["bytes_int8_factors"] = rank * (k + n) + 4 * (rank + n)
        out.append(rec)
        print(f"int8 factors {name:8s} M={m:5d} r={rank}: r0 {rec['ms_r0']*1e3:7.1f} us  bf16 factors "
              f"{rec['ms_bf16_factors']*1e3:7.1f}  int8 factors {rec['ms_int8_factors']*1e3:7.1f}  err {err:.1e}", flush=True)
        del layers
    return out


def mma_available() -> bool:
    return tg.mma_usable(torch.device("cuda", 0), torch.bfloat16, 128, 4096)


def mode8_available() -> bool:
    try:
        from csrc_triton import twinquant_wgmma  # noqa: F401
    except Exception:  # noqa: BLE001 -- no Gluon in this Triton
        return False
    return torch.cuda.get_device_capability() == (9, 0)


def tile_candidates(m, modes=(4, 7)):
    """Tile-kernel launch configurations tried at M: (BM, BN, BK, warps, stages, SPLIT_K, MODE).
    (Earlier sweeps also tried MODE 0-3, 5, 6 and BLOCK_K 256/512; see the README.)"""
    out = []
    if 4 in modes and m <= 64:
        if m <= 16:
            grid = itertools.product([16], [64, 128], [128], [4], [3, 4], [1, 2, 4, 8])
        else:
            grid = itertools.product([16, 32, 64], [64, 128], [128], [4, 8], [3], [1, 2, 4])
        out += [(*c, 4) for c in grid]
    if 7 in modes and m > 16:  # (BM is the MMA's M side: 64 rows per warpgroup)
        if m <= 256:
            grid = [(bm, bn, bk, w, 4 if bk == 64 else 3, sp) for bm in (64, 128, 256) for bn in (64, 128, 256)
                    for bk in (64, 128) for w in (4, 8) for sp in (1, 2, 4)]
        else:
            grid = [(bm, bn, bk, w, 4 if bk == 64 else 3, 1) for bm in (128, 256) for bn in (128, 256)
                    for bk in (64, 128) for w in (4, 8)]
        out += [(*c, 7) for c in grid if c[0] * c[1] <= 256 * 128 and c[0] <= 64 * c[3] // 4 * 2
                and not (c[0] > 64 and c[3] == 4 and c[1] > 128)]
    if 8 in modes and m > 16:  # Gluon wgmma kernel: BK 64, one warp per 16 rows of BM
        grid = [(bm, bn, 64, 4 if bm == 64 else 8, st, sp) for bm in (64, 128, 256) for bn in (64, 128, 256)
                for st in (2, 3, 4) for sp in ((1, 2, 4) if m <= 256 else (1,))]
        out += [(*c, 8) for c in grid if c[0] * c[1] <= 256 * 128 and (m > 64 or c[0] <= 128)]
    if 9 in modes and m > 16:  # ... swapped: BM is the MMA's N (16..256), BN its M (16 rows per warp)
        grid = [(bm, bn, 64, w, st, sp) for bm in (32, 64, 128, 256) for bn, w in ((64, 4), (128, 4), (128, 8), (256, 8))
                for st in (3, 4) for sp in ((1, 2, 4) if m <= 256 else (1,))]
        out += [(*c, 9) for c in grid if c[0] * c[1] <= 256 * 128 and c[0] <= max(32, triton.next_power_of_2(m))]
    return out


def _compile_worker(args):
    cfgs, dtype_name = args
    dtype = getattr(torch, dtype_name)
    gen = torch.Generator(device="cuda").manual_seed(1)
    qw, sc, _, _ = make_layer(1024, 1024, 0, dtype, gen)
    x = torch.randn(16, 1024, device="cuda", dtype=dtype, generator=gen)
    failed = []
    for cfg in cfgs:
        try:
            tg.tq_gemm(x, qw, sc, GROUP, config=cfg)
        except Exception as e:  # noqa: BLE001 -- reported, and the config is skipped
            failed.append((cfg, f"{type(e).__name__}: {str(e)[:200]}"))
    torch.cuda.synchronize()
    return failed


def precompile(cfgs, dtype, workers: int = 12):
    """Compile tile configs in parallel processes sharing Triton's on-disk cache, so the sweep
    itself only loads binaries. Returns {config: error} for configs that failed."""
    import multiprocessing as mp
    cfgs = sorted(set(cfgs))
    parts = [(cfgs[i::workers], str(dtype).split(".")[-1]) for i in range(workers)]
    with mp.get_context("spawn").Pool(workers) as pool:
        failed = [f for part in pool.map(_compile_worker, parts) for f in part]
    return dict(failed)


def sweep(dtype, gen, out_path, ms=(4, 16, 64, 256), modes=(4, 7)):
    """Tile-kernel launch configurations per shape and M (informs _CONFIGS), next to BF16, the
    current dispatch (`tq_linear`) and dequant+cuBLAS. Every config's output is checked against
    a float32 reference on the timed shape first (a mismatch is recorded and the config dropped).
    Written to out_path after every case, so a run cut short keeps what it measured."""
    out = []
    t0 = time.time()
    failed = precompile([c for m in ms for c in tile_candidates(m, modes)], dtype)
    print(f"precompiled in {time.time() - t0:.0f} s; failed: {failed}", flush=True)
    for m, (name, k, n) in itertools.product(ms, SHAPES):
        copies = max(1, math.ceil(L2_FLUSH_BYTES / (n * k // 2)))
        layers = [make_layer(k, n, 64, dtype, gen) for _ in range(min(copies, 32))]
        x = torch.randn(m, k, device="cuda", dtype=dtype, generator=gen)
        qw0, sc0, d0, u0 = layers[0]
        w0 = tg.dequantize(qw0, sc0, GROUP, torch.float32)
        ref = x.float() @ w0.t()
        ref_lr = ref + (x.float() @ d0.float().t()) @ u0.float().t()
        del w0
        dense = [torch.randn(n, k, device="cuda", dtype=dtype, generator=gen) for _ in range(max(1, min(8, math.ceil(L2_FLUSH_BYTES / (n * k * 2)))))]
        bf16 = graph_time_ms([lambda w=w: torch.matmul(x, w.t()) for w in dense], reps=20)
        del dense
        base = {}
        for r in (0, 64):
            base[f"ms_dispatch_r{r}"] = graph_time_ms([lambda L=L: tg.tq_linear(x, L[0], L[1], GROUP, *((L[2], L[3]) if r else ())) for L in layers], reps=20)
            base[f"ms_dequant_cublas_r{r}"] = graph_time_ms([lambda L=L: tg.tq_linear(x, L[0], L[1], GROUP, *((L[2], L[3]) if r else ()), large_m_threshold=0) for L in layers], reps=20)
        def rel_err(cfg, rank):
            """The config's output on layers[0] against the float32 reference; a mismatch is
            recorded and printed, and the config is then skipped (None)."""
            y = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
            tg.tq_gemm(x, qw0, sc0, GROUP, *((d0, u0) if rank else ()), config=cfg, out=y)
            want = ref_lr if rank else ref
            err = ((y.float() - want).norm() / want.norm()).item()
            if err <= 1e-2:
                return err
            print(f"  MISMATCH rank {rank} {name} M={m} {cfg}: rel err {err:.3e}", flush=True)
            out.append({"name": name, "M": m, "rank": rank, "config": cfg, "mismatch": err})
            return None

        ranked = []
        for cfg in tile_candidates(m, modes):
            if cfg in failed:
                continue
            if cfg[5] > 1 and (k // (cfg[5] * cfg[2]) < 2 or triton.cdiv(m, cfg[0]) * triton.cdiv(n, cfg[1]) >= 264):
                continue
            try:
                err = rel_err(cfg, 0)
                if err is None:
                    continue
                ms_ = graph_time_ms([lambda L=L: tg.tq_gemm(x, L[0], L[1], GROUP, config=cfg) for L in layers], reps=20)
            except Exception as e:  # noqa: BLE001 -- out of shared memory etc.
                print(f"  {cfg}: {type(e).__name__}", flush=True)
                continue
            out.append({"name": name, "K": k, "N": n, "M": m, "rank": 0, "config": cfg, "ms": ms_, "ms_bf16": bf16, "rel_err": err, **base})
            ranked.append((ms_, cfg))
        ranked.sort()
        for _, cfg in ranked[:3]:  # rank 64 for the three fastest
            err = rel_err(cfg, 64)
            if err is None:
                continue
            ms_ = graph_time_ms([lambda L=L: tg.tq_gemm(x, L[0], L[1], GROUP, L[2], L[3], config=cfg) for L in layers], reps=20)
            out.append({"name": name, "K": k, "N": n, "M": m, "rank": 64, "config": cfg, "ms": ms_, "ms_bf16": bf16, "rel_err": err, **base})
        print(f"sweep {name} M={m}: bf16 {bf16 * 1e3:.1f} us; dispatch r0 {base['ms_dispatch_r0'] * 1e3:.1f} "
              f"r64 {base['ms_dispatch_r64'] * 1e3:.1f}; deq+cuBLAS {base['ms_dequant_cublas_r0'] * 1e3:.1f}; best " +
              ", ".join(f"{c} {t * 1e3:.1f} us" for t, c in ranked[:4]), flush=True)
        del layers
        with open(out_path, "w") as f:
            json.dump(out, f)
    return out


DECODE_MS = (1, 2, 3, 4, 8)


def decode_candidates(m):
    """Vector decode kernel configs tried at M: (BLOCK_M, BLOCK_N, BLOCK_W, warps, UNPACK)."""
    if m == 1:
        return [(1, bn, bw, w, 1) for bn, bw, w in ((2, 512, 4), (4, 512, 4), (8, 512, 4), (4, 256, 2), (8, 256, 2),
                                                      (8, 128, 1), (4, 128, 1))] + [(1, 4, 512, 4, 0), (1, 8, 128, 1, 0)]
    return [(2, bn, bw, w, 1) for bn, bw, w in ((2, 512, 4), (4, 512, 4), (4, 256, 2), (8, 128, 1))] + \
        ([(1, 4, 512, 4, 1), (1, 8, 128, 1, 1)] if m == 2 else [])


def decode_sweep(dtype, gen, out_path):
    """The vector decode kernel's configs at M in DECODE_MS on every shape (rank 0), next to
    what the dispatch runs now and BF16 (the first H200 run compared with the row decode kernel
    it replaced, kernels_h200_decode_sweep.json).
    Each config is checked against a float32 reference on the timed shape first. Returns
    {(name, M): (ms, config)} of the fastest vector config and writes every record."""
    out, best = [], {}
    t0 = time.time()
    cfgs = sorted({c for m in DECODE_MS for c in decode_candidates(m)})
    for k in sorted({k for _, k, _ in SHAPES}):  # compile each (config, EVEN) once before timing
        qw, sc, _, _ = make_layer(k, 64, 0, dtype, gen)
        for c in cfgs:
            tg.tq_gemm(torch.randn(c[0], k, device="cuda", dtype=dtype, generator=gen), qw, sc, GROUP, config=c)
    torch.cuda.synchronize()
    print(f"decode sweep: compiled {len(cfgs)} configs in {time.time() - t0:.0f} s", flush=True)
    for (name, k, n), m in itertools.product(SHAPES, DECODE_MS):
        copies = max(1, min(64, math.ceil(L2_FLUSH_BYTES / (n * k // 2))))
        layers = [make_layer(k, n, 0, dtype, gen) for _ in range(copies)]
        x = torch.randn(m, k, device="cuda", dtype=dtype, generator=gen)
        qw0, sc0 = layers[0][0], layers[0][1]
        ref = reference(x, qw0, sc0, None, None)
        layers = [(tg.repack(L[0], GROUP), L[1]) for L in layers]
        dense = [torch.randn(n, k, device="cuda", dtype=dtype, generator=gen) for _ in range(max(1, min(16, math.ceil(L2_FLUSH_BYTES / (n * k * 2)))))]
        bf16 = graph_time_ms([lambda w=w: torch.matmul(x, w.t()) for w in dense])
        del dense
        before = graph_time_ms([lambda L=L: tg.tq_gemm(x, L[0], L[1], GROUP) for L in layers])
        cfg_before = tg.pick_gemv_config(m, n, k) if m <= tg.GEMV_MAX_M else None
        rec = {"name": name, "K": k, "N": n, "M": m, "ms_bf16": bf16, "ms_before": before,
               "config_before": list(cfg_before or tg.pick_config(m, n, k, 256, GROUP, tg.wgmma_usable(0))),
               "configs": []}
        for cfg in decode_candidates(m):
            y = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
            tg.tq_gemm(x, layers[0][0], layers[0][1], GROUP, config=cfg, out=y)
            err = ((y.float() - ref).norm() / ref.norm()).item()
            if not err <= 1e-2:
                raise SystemExit(f"MISMATCH decode sweep {name} M={m} {cfg}: rel err {err:.3e}")
            ms_ = graph_time_ms([lambda L=L: tg.tq_gemm(x, L[0], L[1], GROUP, config=cfg) for L in layers])
            rec["configs"].append({"config": list(cfg), "ms": ms_, "rel_err": err})
            if (name, m) not in best or ms_ < best[(name, m)][0]:
                best[(name, m)] = (ms_, cfg)
        out.append(rec)
        t, c = best[(name, m)]
        print(f"decode {name:8s} M={m}: bf16 {bf16 * 1e3:6.1f} us  before {before * 1e3:6.1f}  best vector {t * 1e3:6.1f} {c}",
              flush=True)
        del layers
        with open(out_path, "w") as f:
            json.dump(out, f, indent=1)
    return best, out


def apply_decode_sweep(best, recs):
    """The dispatch the sweep implies, installed in tg for the rest of the run: for each M up
    to the largest one where the vector kernel beat what ran before on at least one shape (and
    on one at every smaller M), each layer shape (down: N <= 4096, K >= 8192; o: N <= 4096;
    qkv: N <= 8192; gate_up: wider) gets its fastest vector config where that was faster, else
    what ran before (None where that was the tile kernel). Returns (GEMV_MAX_M, GEMV_CONFIGS)."""
    before = {(r["name"], r["M"]): (r["ms_before"], tuple(r["config_before"])) for r in recs}
    rules = {"down": (4096, 8192), "o": (4096, 0), "qkv": (8192, 0), "gate_up": (1 << 62, 0)}
    table, max_m = [], 0
    for m in DECODE_MS:
        if not any(best[(name, m)][0] < before[(name, m)][0] for name in rules):
            break
        max_m = m
        for name, (max_n, min_k) in rules.items():
            t, cfg = best[(name, m)]
            prev = before[(name, m)][1]
            table.append((m, max_n, min_k, tuple(cfg) if t < before[(name, m)][0] else (prev if len(prev) in (5, 6) else None)))
    if max_m:
        tg.GEMV_MAX_M, tg.GEMV_CONFIGS = max(max_m, tg.GEMV_MAX_M), table + tg.GEMV_CONFIGS
    return tg.GEMV_MAX_M, tg.GEMV_CONFIGS


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--sweep-only", action="store_true", help="sweep, write it, stop")
    ap.add_argument("--large-m-threshold", type=int, default=None)
    ap.add_argument("--sweep-ms", type=int, nargs="+", default=[4, 16, 64, 256])
    ap.add_argument("--no-check", action="store_true", help="skip the correctness pass (sweeps only)")
    ap.add_argument("--sweep-modes", type=int, nargs="+", default=[4, 7])
    ap.add_argument("--int8-factors", action="store_true", help="also compare int8 with bf16 low-rank factors")
    ap.add_argument("--int8-only", action="store_true", help="only the int8-factor comparison")
    ap.add_argument("--check-only", action="store_true", help="the correctness pass, then stop")
    ap.add_argument("--decode-sweep", action="store_true",
                    help="time the vector decode kernel's configs at M 1-8 first and run the table with the "
                         "dispatch they imply (printed and stored in the output's meta)")
    ap.add_argument("--tag", default="h100", help="file name tag of the outputs (kernels_TAG.json)")
    ap.add_argument("--ms", type=int, nargs="+", default=None, help="token counts of the table (default: all)")
    ap.add_argument("--time-limit", type=float, default=0, help="stop the table after this many seconds (0: none)")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    dtype = torch.bfloat16
    gen = torch.Generator(device="cuda").manual_seed(0)
    dev = torch.cuda.get_device_properties(0)
    thr = args.large_m_threshold  # None: the plugin's per-layer-size threshold (tg.dequant_threshold)
    meta = {"device": dev.name, "sms": dev.multi_processor_count, "torch": torch.__version__,
            "triton": triton.__version__, "python": platform.python_version(), "large_m_threshold": thr or tg.DEQUANT_ABOVE,
            "command": " ".join(sys.argv)}
    t0 = time.time()
    copy_gbps, peak = measure_peaks()
    meta.update(copy_gbps=copy_gbps, bf16_peak_tflops=peak, pdl=tg.pdl_usable(0))
    print(f"{dev.name}: copy {copy_gbps:.0f} GB/s, bf16 matmul {peak:.0f} TFLOP/s", flush=True)

    ms_list = args.ms or ([1, 4, 16, 64, 128, 256, 4096] if args.quick else MS)
    ranks = [0, 64] if args.quick else RANKS
    worst = 0.0
    checks = [] if args.no_check else list(itertools.product(SHAPES, [1, 16, 256, 4096], [0, 64, 128]))
    for (name, k, n), m, r in checks:
        worst = max(worst, check(m, k, n, r, dtype, gen, thr))
    for m, r in itertools.product([1, 3, 17, 300, 1500] if checks else [], [0, 32]):  # odd M, K % BLOCK_K != 0, 576-wide
        for k, n, g in [(576, 1536, 64), (1536, 576, 32), (4224, 1088, 128)]:
            worst = max(worst, check(m, k, n, r, dtype, gen, thr, g))
        worst = max(worst, check(m, 4096, 6144, r or 16, dtype, gen, thr, 128, (4096, 5120)))  # merged q/k/v
        worst = max(worst, check(m, 576, 960, r or 16, dtype, gen, thr, 64, (576, 768)))  # SmolLM2 q/k/v
    worst = max(worst, check(5, 4096, 4096, 0, torch.float16, gen, thr))
    for m, cfg in itertools.product([1, 2, 3, 7] if checks else [], [(1, 4, 512, 4, 1), (2, 8, 128, 1, 1), (1, 8, 128, 1, 0), (2, 4, 256, 2, 1)]):  # decode kernel
        worst = max(worst, check(m, 4224, 1088, 32, dtype, gen, thr, 128, config=cfg))  # masked steps
        worst = max(worst, check(m, 576, 960, 16, dtype, gen, thr, 64, (576, 768), config=cfg))
        worst = max(worst, check(m, 4096, 4096, 0, torch.float16, gen, thr, 128, config=cfg))
        worst = max(worst, check(m, 4096, 6144, 64, dtype, gen, thr, 128, (4096, 5120), config=cfg, int8=True, bias=True))
    if checks and mma_available():  # tensor-core decode kernel (csrc_triton/twinquant_mma.py)
        mma_cases = list(itertools.product([2, 5, 16], [(1, 8, 8), (2, 4, 2), (1, 1, 3)]))
        mma_cases += list(itertools.product([24, 64, 100], [(1, 8, 8, 32), (2, 4, 4, 64), (1, 4, 2, 32)]))
        for m, cfg in mma_cases:
            worst = max(worst, check(m, 4224, 1088, 32, dtype, gen, thr, 128, config=cfg))
            worst = max(worst, check(m, 576, 960, 16, dtype, gen, thr, 64, (576, 768), config=cfg))
            worst = max(worst, check(m, 4096, 4096, 0, torch.float16, gen, thr, 128, config=cfg))
            worst = max(worst, check(m, 4096, 6144, 64, dtype, gen, thr, 128, (4096, 5120), config=cfg, int8=True,
                                     bias=True))
    tile_cfgs = [(16, 64, 128, 4, 3, 4, 4), (32, 64, 128, 4, 3, 3, 4), (128, 128, 128, 8, 3, 1, 4),
                 (16, 64, 64, 4, 4, 3, 7), (64, 64, 64, 4, 4, 2, 7), (64, 64, 128, 8, 3, 4, 7), (128, 128, 64, 8, 4, 1, 7),
                 (128, 64, 128, 8, 3, 1, 7)]
    if mode8_available():  # the Gluon wgmma kernel (Hopper), MODE 9 = swapped
        tile_cfgs += [(64, 128, 64, 4, 3, 1, 8), (128, 128, 64, 8, 4, 1, 8), (128, 64, 64, 8, 3, 2, 8),
                      (256, 128, 64, 8, 3, 1, 8), (128, 256, 64, 8, 2, 4, 8),
                      (32, 64, 64, 4, 3, 1, 9), (64, 128, 64, 4, 4, 2, 9), (128, 128, 64, 8, 4, 1, 9),
                      (256, 128, 64, 8, 3, 1, 9), (256, 256, 64, 8, 3, 4, 9)]
    for m, cfg in itertools.product([7, 100, 300] if checks else [], tile_cfgs):  # tile kernel modes, split-K
        if m == 300 and cfg[6] < 8:
            continue
        worst = max(worst, check(m, 4224, 1088, 32, dtype, gen, thr, 128, config=cfg))
        if cfg[6] in (7, 8, 9) and cfg[2] <= 64:  # group 64 (MODE 4 steps over whole 128-column groups)
            worst = max(worst, check(m, 576, 960, 16, dtype, gen, thr, 64, (576, 768), config=cfg))
        if cfg[6] in (7, 8, 9):
            worst = max(worst, check(m, 4096, 4096, 32, torch.float16, gen, thr, 128, config=cfg))
        if cfg[6] in (8, 9):  # int8 factors, bias, rank 128, merged q/k/v
            worst = max(worst, check(m, 4096, 6144, 64, dtype, gen, thr, 128, (4096, 5120), config=cfg, int8=True, bias=True))
            worst = max(worst, check(m, 1536, 576, 128, dtype, gen, thr, 64, config=cfg))
    meta["max_rel_err"] = worst
    if checks:
        print(f"correctness: max ||out-ref||/||ref|| = {worst:.2e} over all checked cases", flush=True)
    if args.check_only:
        return

    os.makedirs(args.out, exist_ok=True)
    if args.int8_factors or args.int8_only:
        recs = bench_int8_factors(dtype, gen)
        with open(os.path.join(args.out, f"kernels_{args.tag}_int8_factors.json"), "w") as f:
            json.dump({"meta": meta, "records": recs}, f, indent=1)
    if args.int8_only:
        return
    if args.sweep or args.sweep_only:
        with open(os.path.join(args.out, f"kernels_{args.tag}_sweep_meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
        sweep(dtype, gen, os.path.join(args.out, f"kernels_{args.tag}_sweep.json"), args.sweep_ms, tuple(args.sweep_modes))
    if args.sweep_only:
        return
    if args.decode_sweep:
        best, drecs = decode_sweep(dtype, gen, os.path.join(args.out, f"kernels_{args.tag}_decode_sweep.json"))
        max_m, table = apply_decode_sweep(best, drecs)
        meta["decode_dispatch"] = {"GEMV_MAX_M": max_m, "GEMV_CONFIGS": table}
        print(f"decode dispatch for the table: GEMV_MAX_M = {max_m}, GEMV_CONFIGS = {table}", flush=True)
        for (name, k, n), m in itertools.product(SHAPES, [m for m in DECODE_MS if m <= max_m]):  # the new
            for r, int8 in ((64, False), (128, True)):  # dispatch with factors, as the table will run it
                worst = max(worst, check(m, k, n, r, dtype, gen, thr, int8=int8, bias=int8))
        meta["max_rel_err"] = worst
        print(f"correctness with the decode dispatch: max ||out-ref||/||ref|| = {worst:.2e}", flush=True)
    recs = []
    for (name, k, n), m, r in itertools.product(SHAPES, ms_list, ranks):
        if args.time_limit and time.time() - t0 > args.time_limit:
            print(f"time limit: stopped before {name} M={m} r={r}", flush=True)
            meta["stopped_early"] = f"before {name} M={m} r={r}"
            break
        rec = bench_case(name, k, n, m, r, dtype, gen, copy_gbps, peak, thr)
        recs.append(rec)
        print(f"{name:8s} M={m:5d} r={r:3d}  {rec['ms']*1e3:8.1f} us  fused {rec['ms_fused_kernel']*1e3:8.1f}  "
              f"deq+cublas {rec['ms_dequant_cublas']*1e3:8.1f}  unfused {rec['ms_unfused']*1e3:8.1f}  "
              f"no-pdl {rec.get('ms_no_pdl', rec['ms'])*1e3:8.1f}  "
              f"bf16 {rec['ms_bf16']*1e3:8.1f}  x{rec['speedup_vs_bf16']:.2f} vs bf16  "
              f"{rec['pct_of_floor']:5.1f}% of floor", flush=True)
        with open(os.path.join(args.out, f"kernels_{args.tag}.partial.json"), "w") as f:  # kept if the run is cut short
            json.dump({"meta": meta, "records": recs}, f)
    meta["seconds"] = time.time() - t0
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"kernels_{args.tag}.json"), "w") as f:
        json.dump({"meta": meta, "records": recs}, f, indent=1)
    print(f"wrote {args.out}/kernels_{args.tag}.json in {meta['seconds']:.0f} s")


if __name__ == "__main__":
    main()
