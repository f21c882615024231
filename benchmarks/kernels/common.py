"""What every kernel benchmark here shares: the Llama-3-8B layer shapes, random layers (never
zeros), the float32 reference, and device time from CUDA-graph replays that stream the weights
from HBM (enough copies to overflow L2), as in decode."""

from __future__ import annotations

import functools
import math
import os
import sys
import time

import torch
from triton.testing import do_bench

sys.path.append(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
)  # after PYTHONPATH: compare.py runs a baseline from there

import csrc_triton as ct  # noqa: E402
from vllm_twinquant.format import int8_rows, per_token_codes  # noqa: E402

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



def save_records(out: str, stem: str, meta: dict, recs: list, t0: float | None = None) -> str:
    """Write {"meta", "records"} to OUT/STEM.json; with t0 (the run's start), the finished file with
    meta["seconds"], else the partial one a stopped run leaves (OUT/STEM.partial.json)."""
    import json

    if t0 is not None:
        meta["seconds"] = time.time() - t0
    path = os.path.join(out, f"{stem}.json" if t0 is not None else f"{stem}.partial.json")
    with open(path, "w") as f:
        json.dump({"meta": meta, "records": recs}, f, indent=1 if t0 is not None else None)
    return path


def measure_peaks():
    n = 1 << 28  # 512 MiB of bf16
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    copy = functools.partial(torch.empty_like(src).copy_, src)
    ms = do_bench(copy, warmup=25, rep=100, return_mode="median")
    copy_gbps = 2 * n * 2 / ms / 1e6
    del src, copy
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



def reference(x, qw, sc, down, up, group=GROUP, bounds=(), act_quant="none", act_clip=1.0):
    """float32 reference (TF32 off); the residual is unpacked in plain torch, independently of Triton.
    act_quant "fp8"/"int8": the residual product reads the format's per-token codes of x (W4A8); "int4":
    W4A4's 4-bit codes at scale act_clip * max|x| / 7."""
    xr = x.float()
    if act_quant != "none":
        bits, kind = {"fp8": (8, "float"), "int8": (8, "int"), "int4": (4, "int")}[act_quant]
        q, s = per_token_codes(x, bits, kind, act_clip)
        xr = q * s
    y = xr @ residual_weights(qw, sc, group).t()
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
    qw = ct.repack(qw, group)  # the layout the plugin builds at load; the reference read the original
    return x, qw, sc, down, up, b, scales, ref



def layer_bytes(k, n, r):
    """Bytes of one TwinQuant layer's weights: 4-bit codes, fp16 group scales, bf16 factors."""
    return n * k // 2 + n * (k // GROUP) * 2 + r * (k + n) * 2



def flush_copies(nbytes, cap=64):
    """How many copies of an `nbytes` operand a timed graph cycles through to overflow L2."""
    return max(1, min(cap, math.ceil(L2_FLUSH_BYTES / nbytes)))

