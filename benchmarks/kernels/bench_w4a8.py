"""W4A8 against the 16-bit and FP8 products, per Llama-3-8B layer, on the GPU: one table, one run.

    python benchmarks/kernels/bench_w4a8.py --out DIR [--ms ...] [--ranks 0 64]   -> DIR/w4a8_<tag>.json

First a correctness pass: `quantize_rows` against `format.per_token_codes` bit for bit, and the
W4A8 layer (ranks 0/64, merged slots, bias, every token count of the table, as planned for the
precisions in `w4a8.CHECKED_ON_GPU`; forced configs for FP8 and INT8) against a float32 reference
of the same numerics, output poisoned with NaN first. Then, for
every shape, M and rank, the device time of (CUDA-graph replays over enough weight copies to
stream them from HBM, `common.graph_time_ms`):

* bf16        cuBLAS BF16, x @ W^T (timed twice, first and last: the spread is the run's noise)
* fp8         FP8 W8A8 as vLLM's `--quantization fp8` runs it: x quantized per token to e4m3
              (this package's `quantize_rows`), then `torch._scaled_mm` against e4m3 weights with a
              scale per output channel; `fp8_mm` is the `_scaled_mm` alone
* w4a16       the TwinQuant layer as a W4A16 checkpoint runs it (`csrc_triton.linear`)
* w4a8_fp8    the same layer declared W4A8-FP8 as the plan runs it (`kernel` says which): quantize_rows,
              the low-rank down projection and the Triton W4A8 kernel, or at large M cuBLAS's
              block-scaled FP8 GEMM (`fp8_cublas`); below the table's first W4A8 M, as W4A16
* w4a8_int8   ... declared W4A8-INT8: the Gluon INT8 kernels (`w4a8_ws`, `w4a8_rs`, Hopper) or the Triton one, as
              the table says
* cutlass_w4a8  vLLM's CUTLASS W4A8 GEMM (`cutlass_w4a8_mm`: int4 weights, e4m3 activations, e4m3 scales of
              128-wide groups and fp32 channel scales, prepared as vLLM's `CutlassW4A8LinearKernel` prepares
              them) after `quantize_rows`; `cutlass_w4a8_mm` is the GEMM alone. Only where vLLM imports and has
              the op (Hopper), checked first against a float32 reference on operands it computes exactly;
              else `meta.unusable` says why

The low-rank columns (rank > 0) cost the same in every TwinQuant column; bf16 and fp8 have none.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    GROUP,
    SHAPES,
    flush_copies,
    graph_time_ms,
    layer_bytes,
    make_layer,
    reference,
    save_records,
)

import csrc_triton as ct  # noqa: E402
from csrc_triton.dispatch import W4A8_PRIORITY  # noqa: E402
from csrc_triton.kernels.fp8_cublas import Fp8CublasConfig  # noqa: E402
from csrc_triton.kernels.w4a8 import CHECKED_ON_GPU, W4a8Config, quantize_rows  # noqa: E402
from vllm_twinquant.format import per_token_codes  # noqa: E402

MS = [1, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]


def usable(aq: str) -> str | None:
    """None if the W4A8 kernel compiles and runs for `aq` here, else the error (printed in full)."""
    import traceback

    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    qw, sc, _, _ = make_layer(256, 128, 0, torch.bfloat16, torch.Generator(device="cuda").manual_seed(1))
    try:
        ct.gemm(x, ct.repack(qw, GROUP), sc, GROUP, config=W4a8Config(64, 64, 4, 3), act_quant=aq)
        torch.cuda.synchronize()
        return None
    except Exception as e:  # noqa: BLE001 -- reported, and that precision's columns are left out
        traceback.print_exc()
        return f"{type(e).__name__}: {e}"[:2000]


def correctness(gen, aqs) -> float:
    worst = 0.0
    x = torch.randn(37, 14336, device="cuda", dtype=torch.bfloat16, generator=gen) * 3
    x[5] = 0
    for aq, kind in (("fp8", "float"), ("int8", "int")):
        q, s, _ = quantize_rows(x, aq)
        q_ref, s_ref = per_token_codes(x, 8, kind)
        if not (torch.equal(s, s_ref[:, 0]) and torch.equal(q.float(), q_ref)):
            bad = (q.float() != q_ref).nonzero()[:4].tolist()
            raise SystemExit(f"quantize_rows({aq}) differs from format.per_token_codes: scales equal "
                             f"{torch.equal(s, s_ref[:, 0])}, codes at {bad}: "
                             f"{[(q[i, j].float().item(), q_ref[i, j].item()) for i, j in bad]}")
    cases = [(m, 4096, 6144, r, (4096, 5120)) for m in MS for r in (0, 64)]
    cases += [(m, 14336, 4096, 64, ()) for m in (17, 300, 1500)] + [(200, 4224, 1088, 32, ())]
    forced = [(W4a8Config(128, 64, 4, 4, 2), aq) for aq in aqs]  # split-K
    forced += [(W4a8Config(128, 128, 8, 4, 1, dense=True), aq) for aq in aqs]  # the 8-bit copy
    forced += [(Fp8CublasConfig(), "fp8")] if "fp8" in aqs else []  # cuBLAS's block-scaled GEMM
    for cfg, aq in forced:
        qw, sc, down, up = make_layer(4096, 6144, 64, torch.bfloat16, gen, slots=3)
        xc = torch.randn(301, 4096, device="cuda", dtype=torch.bfloat16, generator=gen)  # odd: cuBLAS's alignment
        ref = reference(xc, qw, sc, down, up, GROUP, (4096, 5120), act_quant=aq)
        y = torch.full((301, 6144), float("nan"), device="cuda", dtype=torch.bfloat16)
        ct.gemm(xc, ct.repack(qw, GROUP), sc, GROUP, down, up, None, (4096, 5120), config=cfg, out=y, act_quant=aq)
        err = ((y.float() - ref).norm() / ref.norm()).item()
        if not err <= 1e-2:
            raise SystemExit(f"W4A8 {aq} {cfg}: rel. error {err:.2e}")
        worst = max(worst, err)
    for (m, k, n, r, bounds), aq in itertools.product(cases, [aq for aq in aqs if aq in CHECKED_ON_GPU]):
        qw, sc, down, up = make_layer(k, n, r, torch.bfloat16, gen, slots=len(bounds) + 1)
        xc = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
        bias = torch.randn(n, device="cuda", dtype=torch.bfloat16, generator=gen)
        p = ct.plan(ct.LayerShape(n, k, GROUP, r, bounds, torch.bfloat16, act_quant=aq), m,
                    ct.Device.of(xc.device))
        # the W4A8 kernels compute the W4A8 numerics; below their first M the plan runs the W4A16 kernels
        ref = reference(xc, qw, sc, down, up, GROUP, bounds, act_quant=aq if p.kernel in W4A8_PRIORITY else "none")
        ref += bias.float()
        y = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
        ct.linear(xc, ct.repack(qw, GROUP), sc, GROUP, down, up, bias, bounds, out=y, act_quant=aq)
        err = ((y.float() - ref).norm() / ref.norm()).item()
        if not err <= 1e-2:
            raise SystemExit(f"W4A8 {aq} M={m} K={k} N={n} r={r} {p.kernel}: rel. error {err:.2e}")
        worst = max(worst, err)
    return worst


def pack_int4_along_k(q: torch.Tensor) -> torch.Tensor:
    """Codes q [N, K] in -8..7 -> int32 [N, K / 8]: column 8 w + j of a row in bits 4j..4j+3 of its word w, two's
    complement (vLLM's signed int4 checkpoint layout, packed along the input dimension)."""
    n, k = q.shape
    nib = (q.to(torch.int32) & 0xF).view(n, k // 8, 8)
    packed = torch.zeros((n, k // 8), device=q.device, dtype=torch.int32)
    for j in range(8):
        packed |= nib[:, :, j] << (4 * j)
    return packed


def cutlass_w4a8_weights(k: int, n: int, gen, scales=None, dequantized: bool = False):
    """Random int4 weights [N, K] with e4m3 scales per 128-wide group and fp32 channel scales, prepared for
    `cutlass_w4a8_mm` as vLLM's `CutlassW4A8LinearKernel` prepares a checkpoint's: its three operands, and with
    `dequantized` also the weights they stand for ([N, K] fp32). `scales`: the group scales' values ([K / 128,
    N], any float), else random."""
    from vllm import _custom_ops as ops

    q = torch.randint(-8, 8, (n, k), device="cuda", dtype=torch.int32, generator=gen)
    packed = pack_int4_along_k(q)
    if scales is None:
        scales = torch.rand((k // GROUP, n), device="cuda", generator=gen) + 0.5
    gs = scales.to(torch.float8_e4m3fn).contiguous()
    chan = (torch.rand((n, 1), device="cuda", generator=gen) * 0.01 + 0.005).contiguous()
    operands = (ops.cutlass_encode_and_reorder_int4b(packed.t()), ops.cutlass_pack_scale_fp8(gs), chan)
    if not dequantized:
        return operands
    return operands, q.float() * gs.float().repeat_interleave(GROUP, 0).t() * chan


def cutlass_w4a8_mm(xq, xs, operands):
    from vllm import _custom_ops as ops

    b_q, b_gs, chan = operands
    return ops.cutlass_w4a8_mm(a=xq, b_q=b_q, b_group_scales=b_gs, b_group_size=GROUP, b_channel_scales=chan,
                               a_token_scales=xs[:, None].contiguous())


def cutlass_w4a8_unusable(gen) -> str | None:
    """None if vLLM's CUTLASS W4A8 GEMM runs here and matches a float32 reference, else why not. The group
    scales are powers of two, so each code times its scale is exact in e4m3 whatever the kernel rounds to."""
    import traceback

    try:
        import vllm._custom_ops  # noqa: F401
    except Exception as e:  # noqa: BLE001 -- no vLLM in this environment: the column is left out
        return f"vLLM not importable: {type(e).__name__}: {e}"[:300]
    if not hasattr(torch.ops._C, "cutlass_w4a8_mm"):
        return "this vLLM build has no cutlass_w4a8_mm"
    try:
        k, n = 4096, 6144
        pow2 = 2.0 ** torch.randint(-1, 2, (k // GROUP, n), device="cuda", generator=gen).float()
        operands, w = cutlass_w4a8_weights(k, n, gen, pow2, dequantized=True)
        x = torch.randn(301, k, device="cuda", dtype=torch.bfloat16, generator=gen)
        xq, xs, _ = quantize_rows(x, "fp8")
        y = cutlass_w4a8_mm(xq, xs, operands).float()
        ref = (xq.float() @ w.t()) * xs[:, None]
        err = ((y - ref).norm() / ref.norm()).item()
        return None if err <= 1e-2 else f"rel. error {err:.2e} against the float32 reference"
    except Exception as e:  # noqa: BLE001 -- reported, and the column is left out
        traceback.print_exc()
        return f"{type(e).__name__}: {e}"[:2000]


def fp8_weights(k, n, gen):
    w = torch.randn(n, k, device="cuda", generator=gen)
    scale = w.abs().amax(1) / 448.0
    return (w / scale[:, None]).to(torch.float8_e4m3fn), scale[None, :].float().contiguous()


def bench_case(name, k, n, m, r, gen, aqs, cutlass: bool = False) -> dict:
    dtype = torch.bfloat16
    x = torch.randn(m, k, device="cuda", dtype=dtype, generator=gen)
    rec = {"shape": name, "K": k, "N": n, "M": m, "rank": r}
    copies = flush_copies(n * k * 2)
    dense = [torch.randn(n, k, device="cuda", dtype=dtype, generator=gen) for _ in range(copies)]
    rec["ms_bf16"] = graph_time_ms([lambda w=w: x @ w.t() for w in dense], reps=20)
    del dense
    f8 = [fp8_weights(k, n, gen) for _ in range(flush_copies(n * k))]
    xq, xs, _ = quantize_rows(x, "fp8")
    xs2 = xs[:, None].contiguous()

    def fp8_layer(w):
        q, s, _ = quantize_rows(x, "fp8")
        return torch._scaled_mm(q, w[0].t(), scale_a=s[:, None], scale_b=w[1], out_dtype=dtype)

    try:
        rec["ms_fp8_mm"] = graph_time_ms([lambda w=w: torch._scaled_mm(xq, w[0].t(), scale_a=xs2, scale_b=w[1],
                                                                        out_dtype=dtype) for w in f8], reps=20)
        rec["ms_fp8"] = graph_time_ms([lambda w=w: fp8_layer(w) for w in f8], reps=20)
    except RuntimeError as e:  # a shape torch's FP8 GEMM does not take: the row says so
        rec["ms_fp8_mm"] = rec["ms_fp8"] = None
        rec["fp8_error"] = str(e)[:200]
    del f8
    if cutlass:
        cw = [cutlass_w4a8_weights(k, n, gen) for _ in range(flush_copies(n * k // 2))]
        rec["ms_cutlass_w4a8_mm"] = graph_time_ms([lambda w=w: cutlass_w4a8_mm(xq, xs, w) for w in cw], reps=20)
        rec["ms_cutlass_w4a8"] = graph_time_ms([lambda w=w: cutlass_w4a8_mm(*quantize_rows(x, "fp8")[:2], w)
                                                for w in cw], reps=20)
        del cw
    layers = [make_layer(k, n, r, dtype, gen) for _ in range(flush_copies(layer_bytes(k, n, r)))]
    layers = [(ct.repack(L[0], GROUP), *L[1:]) for L in layers]
    device = ct.Device.of(x.device)
    for col, aq in [("w4a16", "none")] + [(f"w4a8_{aq}", aq) for aq in aqs if aq in CHECKED_ON_GPU]:
        rec[f"kernel_{col}"] = ct.plan(ct.LayerShape(n, k, GROUP, r, (), dtype, act_quant=aq), m, device).kernel
        rec[f"ms_{col}"] = graph_time_ms(
            [lambda L=L, aq=aq: ct.linear(x, L[0], L[1], GROUP, L[2], L[3], act_quant=aq) for L in layers], reps=20)
    rec["ms_quantize_rows"] = graph_time_ms([lambda: quantize_rows(x, "fp8")], reps=20)
    del layers
    dense = [torch.randn(n, k, device="cuda", dtype=dtype, generator=gen) for _ in range(copies)]
    rec["ms_bf16_repeat"] = graph_time_ms([lambda w=w: x @ w.t() for w in dense], reps=20)
    for col in ["w4a16"] + [f"w4a8_{aq}" for aq in aqs if aq in CHECKED_ON_GPU]:
        rec[f"{col}_vs_fp8"] = rec["ms_fp8"] / rec[f"ms_{col}"] if rec["ms_fp8"] else None
        rec[f"{col}_vs_bf16"] = rec["ms_bf16"] / rec[f"ms_{col}"]
    return rec


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--tag", default="h100", help="file name tag of the output (w4a8_TAG.json)")
    ap.add_argument("--ms", type=int, nargs="+", default=MS)
    ap.add_argument("--ranks", type=int, nargs="+", default=[0, 64])
    ap.add_argument("--time-limit", type=float, default=0, help="stop the table after this many seconds (0: none)")
    ap.add_argument("--check-only", action="store_true", help="the correctness pass, then stop")
    ap.add_argument("--no-check", action="store_true", help="skip the correctness pass")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    gen = torch.Generator(device="cuda").manual_seed(0)
    dev = torch.cuda.get_device_properties(0)
    device = ct.Device.of(torch.device("cuda"))
    tables = ct.tables_for(device.name, device.capability)
    meta = {"device": dev.name, "sms": dev.multi_processor_count, "torch": torch.__version__,
            "triton": triton.__version__, "python": platform.python_version(), "launch_table": tables.path,
            "w4a8_rows": {k: v for k, v in json.load(open(tables.path))["sources"].items() if k.startswith("w4a8")},
            "command": " ".join(sys.argv)}
    t0 = time.time()
    meta["unusable"] = {aq: why for aq in ("fp8", "int8") if (why := usable(aq))}
    aqs = [aq for aq in ("fp8", "int8") if aq not in meta["unusable"]]
    if why := cutlass_w4a8_unusable(gen):
        meta["unusable"]["cutlass_w4a8"] = why
    if not args.no_check:
        meta["max_rel_err"] = correctness(gen, aqs)
        print(f"correctness: max ||out-ref||/||ref|| = {meta['max_rel_err']:.2e} ({time.time() - t0:.0f} s)",
              flush=True)
    if args.check_only:
        return
    os.makedirs(args.out, exist_ok=True)
    recs = []
    for (name, k, n), m, r in itertools.product(SHAPES, args.ms, args.ranks):
        if args.time_limit and time.time() - t0 > args.time_limit:
            meta["stopped_early"] = f"before {name} M={m} r={r}"
            break
        rec = bench_case(name, k, n, m, r, gen, aqs, "cutlass_w4a8" not in meta["unusable"])
        recs.append(rec)
        us = {c: f"{rec[f'ms_{c}'] * 1e3:7.1f}" if rec.get(f"ms_{c}") else "    n/a" for c in
              ("bf16", "bf16_repeat", "fp8", "fp8_mm", "w4a16", "w4a8_fp8", "w4a8_int8", "cutlass_w4a8")}
        print(f"{name:8s} M={m:5d} r={r:3d} bf16 {us['bf16']} ({us['bf16_repeat']}) fp8 {us['fp8']} "
              f"(mm {us['fp8_mm']}) "
              f"w4a16 {us['w4a16']} w4a8 fp8 {us['w4a8_fp8']} [{rec.get('kernel_w4a8_fp8')}] int8 {us['w4a8_int8']} "
              f"cutlass w4a8 {us['cutlass_w4a8']}",
              flush=True)
        save_records(args.out, f"w4a8_{args.tag}", meta, recs)
    print(f"wrote {save_records(args.out, f'w4a8_{args.tag}', meta, recs, t0)} in {meta['seconds']:.0f} s")


if __name__ == "__main__":
    main()
