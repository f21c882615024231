"""Launch tables for a device: sweep the kernels' configurations on the GPU, then write the table
the plan reads (csrc_triton/configs/<device name>.json).

    python benchmarks/kernels/tune.py sweep --out DIR [--ms 1 2 4 8 16 32 64 128 256]   # on the GPU
    python benchmarks/kernels/tune.py table --sweep DIR/sweep_<device>.json \\
        --base csrc_triton/configs/NVIDIA_H100_80GB_HBM3.json --write csrc_triton/configs/<device>.json

The sweep times, for Llama-3-8B's four layer shapes (the table's shape classes: down N <= 4096,
K >= 8192; o N <= 4096; q/k/v N <= 8192; gate/up wider) and each M, every candidate config of
every kernel that can run there (each first checked against a float32 reference on the timed
shape, rank 64: the cost that decides is the layer's with its low-rank term). `table` then gives
each (M, shape class) to the fastest measured (kernel, config): the rows of the kernels before it
in the plan's priority say null there, its own row names the config, and a token count between
two swept ones takes the choice of the next swept M above it. The tile kernel's rules, the large-M
thresholds, the PDL rows and the decode kernels' t slices are taken from --base (they come from their own,
longer sweeps). The `sources` of the written table say so.

The W4A8 kernels' rows (`w4a8_fp8`, `w4a8_int8`, `w4a8_fp8_cublas`, `w4a8_ws_int8`, `w4a8_rs_int8`: layers with
8-bit activations) come from their own sweeps, into the same table:

    python benchmarks/kernels/tune.py sweep-w4a8 --act-quant fp8|int8|int4 --out DIR      # on the GPU
    python benchmarks/kernels/tune.py table-w4a8 --sweep DIR/sweep_w4a8_<act>_<device>.json --write TABLE

For every shape class and M it times the layer as the plan runs it as W4A16 (x unquantized) and
every W4A8 candidate (--act-quant fp8 or int8, rank 64, each first checked against a float32
reference of the W4A8 numerics). Small token counts, up to the first where a W4A8 kernel beat the
W4A16 plan (at most W4A16_KEPT_MAX_M), get null rows: the plan runs the layer as W4A16 there. Above,
the Triton kernel's row names its fastest config and the rows of the kernels the plan tries first
(cuBLAS FP8, the Gluon INT8 kernels) name them where they were the fastest W4A8 kernel. M above the
last swept one takes its choice.
`--act-quant int4` (W4A4's 4-bit codes, clipped at INT4_CLIP, which run on int8's kernels and rows) is
the per-layer GPU check of those codes: every int8 candidate against the float32 reference of the W4A4
numerics, timed too, no rows written.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

CLASSES = [  # (name, max_n, min_k, representative (N, K))
    ("down", 4096, 8192, (4096, 14336)),
    ("o", 4096, 0, (4096, 4096)),
    ("qkv", 8192, 0, (6144, 4096)),
    ("gate_up", None, 0, (28672, 4096)),
]
PRIORITY = ("wgmma_rs", "mma_decode", "gemv", "tile")
TABLE_KERNELS = ("wgmma_rs", "mma_decode", "gemv")  # the kernels whose rows the sweep writes


def candidates(kernel: str, m: int) -> list:
    from csrc_triton.kernels.gemv import GemvConfig
    from csrc_triton.kernels.mma_decode import MmaConfig
    from csrc_triton.kernels.tile import TileConfig
    from csrc_triton.kernels.wgmma_rs import RsConfig

    if kernel == "gemv" and m <= 4:
        rows = (1,) if m == 1 else (2,)
        return [GemvConfig(bm, bn, bw, w, u, pf) for bm in rows for bn, bw, w in ((4, 256, 2), (8, 256, 2), (8, 128, 1))
                for u in (1, 2) for pf in (0, 1)]
    if kernel == "mma_decode" and 2 <= m <= 128:
        tok = max(8, min(64, 1 << (m - 1).bit_length()))
        return [MmaConfig(mt, w, s, tok) for mt in (1, 2) for w in (4, 8) for s in (2, 4, 8, 16)]
    if kernel == "wgmma_rs" and 16 < m <= 256:
        toks = sorted({t for t in (32, 64, 128, 256) if t >= min(m, 256) // 2})
        return [RsConfig(t, bn, w, 4, s) for t in toks for bn, w in ((64, 4), (128, 4), (128, 8)) for s in (1, 2, 4)]
    if kernel == "tile":
        return [TileConfig(bm, bn, bk, w, st, 1, 7) for bm, bn, bk, w, st in
                ((64, 64, 128, 8, 3), (64, 128, 128, 4, 3), (128, 128, 64, 8, 4))]
    return []


def sweep(out: str, ms: list[int]) -> str:
    import torch
    from common import GROUP, flush_copies, fresh_case, graph_time_ms, layer_bytes, make_layer

    import csrc_triton as ct

    device = ct.Device.of(torch.device("cuda"))
    dtype, rank = torch.bfloat16, 64
    gen = torch.Generator(device="cuda").manual_seed(0)
    recs, t0 = [], time.time()
    for (cls, _, _, (n, k)), m in itertools.product(CLASSES, ms):
        shape = ct.LayerShape(n, k, GROUP, rank, (), dtype)
        layers = [make_layer(k, n, rank, dtype, gen) for _ in range(flush_copies(layer_bytes(k, n, rank)))]
        layers = [(ct.repack(L[0], GROUP), *L[1:]) for L in layers]
        x = torch.randn(m, k, device="cuda", dtype=dtype, generator=gen)
        for kernel in PRIORITY:
            if not ct.dispatch.kernels()[kernel].can_implement(shape, device)[0]:
                continue
            for cfg in candidates(kernel, m):
                try:
                    xc, qw, sc, down, up, _, _, ref = fresh_case(m, k, n, rank, dtype, gen)
                    y = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
                    ct.gemm(xc, qw, sc, GROUP, down, up, out=y, config=cfg)
                    err = ((y.float() - ref).norm() / ref.norm()).item()
                    if not err <= 1e-2:
                        print(f"  MISMATCH {kernel} {cfg} M={m} {cls}: {err:.2e}", flush=True)
                        continue
                    ms_ = graph_time_ms([lambda L=L, x=x, cfg=cfg: ct.gemm(x, L[0], L[1], GROUP, L[2], L[3], config=cfg)
                                         for L in layers], reps=20)
                except (ValueError, RuntimeError) as e:  # out of shared memory, a config that cannot launch here
                    print(f"  {kernel} {cfg}: {type(e).__name__}: {str(e)[:100]}", flush=True)
                    continue
                recs.append({"class": cls, "N": n, "K": k, "M": m, "kernel": kernel, "config": vars(cfg), "ms": ms_,
                             "rel_err": err})
        best = min((r for r in recs if r["class"] == cls and r["M"] == m), key=lambda r: r["ms"])
        print(f"{cls:8s} M={m:4d}: best {best['kernel']} {best['config']} {best['ms'] * 1e3:.1f} us", flush=True)
    path = os.path.join(out, f"sweep_{device.name.replace(' ', '_')}.json")
    os.makedirs(out, exist_ok=True)
    with open(path, "w") as f:
        json.dump({"device": device.name, "capability": list(device.capability), "ms": ms, "rank": rank,
                   "seconds": round(time.time() - t0, 1), "command": " ".join(sys.argv), "records": recs}, f, indent=1)
    return path


W4A8_MS = [1, 16, 32, 64, 128, 256, 512, 1024, 4096]
INT4_CLIP = 0.8  # the activation clip of the W4A4 preset (twinquant-w4a4-resq)
# up to here a W4A8 layer may run as W4A16 (x unquantized): at the swept token counts before the first where a
# W4A8 kernel measured faster than the W4A16 plan
W4A16_KEPT_MAX_M = 128


def w4a8_candidates(m: int, act_quant: str, overlap: bool = True) -> list:
    from csrc_triton.kernels.fp8_cublas import Fp8CublasConfig
    from csrc_triton.kernels.w4a8 import table_key
    from csrc_triton.kernels.w4a8_rs import W4a8RsConfig as Rs
    from csrc_triton.kernels.w4a8_ws import W4a8WsConfig as Ws

    act_quant = table_key(act_quant)  # W4A4's codes run int8's kernels
    cublas = [Fp8CublasConfig()] if act_quant == "fp8" and m >= 128 else []
    gluon = []
    if act_quant == "int8" and m >= 64:
        gluon = [Rs(64, 4, 4), Rs(64, 4, 4, False), Rs(64, 8, 4), Rs(64, 4, 4, True, "bias")] + (
            [Rs(128, 4, 4), Rs(128, 4, 4, False), Rs(128, 8, 4, False), Rs(128, 4, 4, False, "bias"),
             Rs(128, 8, 4, False, "bias")] if m >= 128 else [])
        gluon += [Ws(64, 6), Ws(64, 6, warpgroups=1)] + (
            [Ws(128, 4), Ws(128, 6), Ws(128, 6, band=32), Ws(128, 6, persistent=True), Ws(128, 4, warpgroups=1),
             Ws(64, 6, persistent=True, warpgroups=1)] if m >= 128 else [])
        if overlap:  # a group's promotion beside the next group's wgmma in the same warpgroup
            gluon += [Ws(64, 6, overlap=True), Ws(64, 6, warpgroups=1, overlap=True)] + (
                [Ws(64, 6, persistent=True, overlap=True), Ws(64, 6, persistent=True, warpgroups=1, overlap=True)]
                if m >= 128 else [])
    triton_ = _triton_candidates(m)
    if act_quant == "int8" and m <= 64:  # the group sums converted without I2F, beside each (w4a8.CONVERTS),
        triton_ += [dataclasses.replace(c, convert="bias") for c in triton_]  # where the Gluon kernel trails
    return cublas + gluon + triton_


def _triton_candidates(m: int) -> list:
    from csrc_triton.kernels.w4a8 import W4a8Config as C

    if m <= 16:
        return [C(16, 64, 4, 4, s) for s in (1, 4)]
    if m <= 64:
        return [C(64, 64, 4, 4, s) for s in (2, 4)] + [C(64, 128, 4, 4, 1)]
    if m <= 256:
        return [C(64, 128, 4, 4, 1), C(128, 64, 4, 4, 1), C(128, 64, 4, 4, 2), C(64, 128, 4, 4, 1, dense=True),
                C(128, 128, 8, 4, 1, dense=True)]
    return [C(128, 64, 4, 4, 1), C(256, 64, 8, 3, 1), C(128, 128, 8, 4, 1, dense=True),
            C(128, 256, 8, 3, 1, dense=True), C(128, 256, 8, 3, 1, 64, dense=True)]


def sweep_w4a8(out: str, ms: list[int], act_quant: str = "fp8", only: list[str] | None = None,
               ws_overlap: bool = True) -> str:
    """Time every W4A8 candidate (of the kernels `only` names, if given; never a kernel TWINQUANT_DISABLED_KERNELS
    names) against the W4A16 plan; returns the path of the sweep's JSON."""
    import torch
    from common import GROUP, flush_copies, graph_time_ms, layer_bytes, make_layer, reference

    import csrc_triton as ct
    from csrc_triton.kernels import w4a8
    from vllm_twinquant import envs

    device = ct.Device.of(torch.device("cuda"))
    dtype, rank = torch.bfloat16, 64
    clip = INT4_CLIP if act_quant == "int4" else 1.0
    w4a8.check_here(act_quant)  # this sweep is that check
    gen = torch.Generator(device="cuda").manual_seed(0)
    recs, t0 = [], time.time()
    os.makedirs(out, exist_ok=True)
    for (cls, _, _, (n, k)), m in itertools.product(CLASSES, ms):
        layers = [make_layer(k, n, rank, dtype, gen) for _ in range(flush_copies(layer_bytes(k, n, rank)))]
        layers = [(ct.repack(L[0], GROUP), *L[1:]) for L in layers]
        x = torch.randn(m, k, device="cuda", dtype=dtype, generator=gen)
        w16 = graph_time_ms([lambda L=L, x=x: ct.linear(x, L[0], L[1], GROUP, L[2], L[3]) for L in layers], reps=20)
        recs.append({"class": cls, "N": n, "K": k, "M": m, "kernel": "w4a16_plan", "config": None, "ms": w16})
        for cfg in w4a8_candidates(m, act_quant, ws_overlap):
            kernel = ct.layer.config_kernel(cfg)
            if envs.disabled(kernel) or (only and kernel not in only):
                continue
            try:
                qw, sc, down, up = make_layer(k, n, rank, dtype, gen)
                xc = torch.randn(m, k, device="cuda", dtype=dtype, generator=gen)
                ref = reference(xc, qw, sc, down, up, GROUP, act_quant=act_quant, act_clip=clip)
                y = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
                ct.gemm(xc, ct.repack(qw, GROUP), sc, GROUP, down, up, out=y, config=cfg, act_quant=act_quant,
                        act_clip=clip)
                err = ((y.float() - ref).norm() / ref.norm()).item()
                if not err <= 1e-2:
                    print(f"  MISMATCH {kernel} {cfg} M={m} {cls}: {err:.2e}", flush=True)
                    continue
                ms_ = graph_time_ms([lambda L=L, x=x, cfg=cfg: ct.gemm(x, L[0], L[1], GROUP, L[2], L[3], config=cfg,
                                                                       act_quant=act_quant, act_clip=clip)
                                     for L in layers], reps=20)
            except Exception as e:  # noqa: BLE001 -- a config that cannot compile or launch here is skipped
                print(f"  {kernel} {cfg}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                continue
            recs.append({"class": cls, "N": n, "K": k, "M": m, "kernel": kernel, "config": vars(cfg), "ms": ms_,
                         "rel_err": err})
        best = min((r for r in recs if r["class"] == cls and r["M"] == m and r["kernel"] != "w4a16_plan"),
                   key=lambda r: r["ms"], default=None)
        with open(os.path.join(out, f"sweep_w4a8_{act_quant}.partial.json"), "w") as f:
            json.dump({"records": recs}, f)
        print(f"{cls:8s} M={m:4d}: W4A16 plan {w16 * 1e3:.1f} us, best W4A8 {best['kernel'] if best else None} "
              f"{best['config'] if best else None} {best['ms'] * 1e3 if best else float('nan'):.1f} us", flush=True)
    path = os.path.join(out, f"sweep_w4a8_{act_quant}_{device.name.replace(' ', '_')}.json")
    os.makedirs(out, exist_ok=True)
    with open(path, "w") as f:
        json.dump({"device": device.name, "capability": list(device.capability), "ms": ms, "rank": rank,
                   "act_quant": act_quant, "act_clip": clip, "seconds": round(time.time() - t0, 1),
                   "command": " ".join(sys.argv),
                   "records": recs}, f, indent=1)
    return path


# W4A8 kernels that run before the Triton one in the plan (dispatch.W4A8_PRIORITY) -> (their table key, the
# activations they run)
W4A8_FIRST = {"fp8_cublas": ("w4a8_fp8_cublas", "fp8"), "w4a8_ws": ("w4a8_ws_int8", "int8"),
              "w4a8_rs": ("w4a8_rs_int8", "int8")}


def build_w4a8_rows(sweep_data: dict) -> dict[str, list[dict]]:
    """The table's W4A8 rows a sweep implies (module docstring). Per shape class, every row is null (the plan
    runs the layer as W4A16) at the swept token counts up to W4A16_KEPT_MAX_M before the first where the fastest
    W4A8 candidate beat the W4A16 plan. From there `w4a8_<act>` names the fastest Triton W4A8 config, and
    `w4a8_fp8_cublas` ({} or null), `w4a8_ws_int8` and `w4a8_rs_int8` (a config or null) name their kernel where
    it was the fastest W4A8 candidate. A kernel of the swept activations that the sweep did not time (disabled,
    or left out by --only) gets no rows, so an earlier sweep's rows of it cannot outlive this one."""
    if sweep_data["act_quant"] not in ("fp8", "int8"):
        raise ValueError(f"a sweep of {sweep_data['act_quant']} activation codes is a check: they run the int8 rows")
    ms = sorted(sweep_data["ms"])
    rows: dict[str, list[dict]] = {f"w4a8_{sweep_data['act_quant']}": []}
    timed = {r["kernel"] for r in sweep_data["records"]}
    first = {kernel: key for kernel, (key, act) in W4A8_FIRST.items() if act == sweep_data["act_quant"]}
    rows.update({key: [] for key in first.values()})
    w16_kept = {cls: True for cls, _, _, _ in CLASSES}  # still in the token counts that keep W4A16
    for i, m in enumerate(ms):
        for cls, max_n, min_k, _ in CLASSES:
            recs = [r for r in sweep_data["records"] if r["class"] == cls and r["M"] == m]
            w16 = next(r["ms"] for r in recs if r["kernel"] == "w4a16_plan")
            best = min((r for r in recs if r["kernel"] == "w4a8"), key=lambda r: r["ms"], default=None)
            fastest = min((r for r in recs if r["kernel"] != "w4a16_plan"), key=lambda r: r["ms"], default=None)
            w16_kept[cls] = w16_kept[cls] and m <= W4A16_KEPT_MAX_M and (fastest is None or fastest["ms"] >= w16)
            key = {"max_m": m if i < len(ms) - 1 else None, "max_n": max_n, "min_k": min_k}
            cfg = None if best is None or w16_kept[cls] else best["config"]
            rows[f"w4a8_{sweep_data['act_quant']}"].append({**key, "config": cfg})
            for kernel, table_key in first.items():
                if kernel in timed:
                    use = not w16_kept[cls] and fastest is not None and fastest["kernel"] == kernel
                    rows[table_key].append({**key, "config": (fastest["config"] or {}) if use else None})
    return rows


def build_table(sweep_data: dict, base: dict) -> dict:
    """The device table the sweep implies (module docstring), on top of `base`'s other tables."""
    ms = sorted(sweep_data["ms"])
    best = {}  # (class, M) -> fastest record
    for r in sweep_data["records"]:
        key = (r["class"], r["M"])
        if key not in best or r["ms"] < best[key]["ms"]:
            best[key] = r
    rows = {k: [] for k in TABLE_KERNELS}
    for m in ms:
        for cls, max_n, min_k, _ in CLASSES:
            win = best.get((cls, m))
            for kernel in TABLE_KERNELS:
                cfg = win["config"] if win is not None and win["kernel"] == kernel else None
                rows[kernel].append({"max_m": m, "max_n": max_n, "min_k": min_k, "config": cfg})
    table = dict(base)
    table.update(device=sweep_data["device"], capability=sweep_data["capability"], **rows)
    table["sources"] = dict(base.get("sources", {}))
    for kernel in TABLE_KERNELS:
        table["sources"][kernel] = (f"benchmarks/kernels/tune.py sweep on this device ({sweep_data['command']}; "
                                    f"M {ms}, rank {sweep_data['rank']})")
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sweep", help="time every candidate config on this GPU")
    s.add_argument("--out", default=os.environ.get("OUT", "."))
    s.add_argument("--ms", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256])
    t = sub.add_parser("table", help="write the launch table a sweep implies")
    t.add_argument("--sweep", required=True)
    t.add_argument("--base", required=True, help="table whose tile, large_m, pdl_off and t-slice rows are kept")
    t.add_argument("--write", required=True)
    s8 = sub.add_parser("sweep-w4a8", help="time the W4A8 kernel's candidate configs on this GPU")
    s8.add_argument("--out", default=os.environ.get("OUT", "."))
    s8.add_argument("--ms", type=int, nargs="+", default=W4A8_MS)
    s8.add_argument("--act-quant", choices=["fp8", "int8", "int4"], default="fp8")
    s8.add_argument("--only", nargs="+", help="time only these kernels' candidates (e.g. w4a8_ws)")
    s8.add_argument("--no-ws-overlap", action="store_true", help="leave out w4a8_ws's overlap configs")
    t8 = sub.add_parser("table-w4a8", help="write the w4a8 rows a W4A8 sweep implies into a table")
    t8.add_argument("--sweep", required=True)
    t8.add_argument("--write", required=True, help="the device's table, updated in place")
    args = ap.parse_args()
    if args.cmd == "sweep":
        print(sweep(args.out, args.ms))
        return
    if args.cmd == "sweep-w4a8":
        print(sweep_w4a8(args.out, args.ms, args.act_quant, args.only, not args.no_ws_overlap))
        return
    if args.cmd == "table-w4a8":
        with open(args.sweep) as f, open(args.write) as g:
            data, table = json.load(f), json.load(g)
        for key, rows in build_w4a8_rows(data).items():
            table[key] = rows
            table.setdefault("sources", {})[key] = (f"benchmarks/kernels/tune.py sweep-w4a8 on this device "
                                                    f"({data['command']}; M {data['ms']}, rank {data['rank']})")
        with open(args.write, "w") as f:
            json.dump(table, f, indent=1)
            f.write("\n")
        return
    with open(args.sweep) as f, open(args.base) as g:
        table = build_table(json.load(f), json.load(g))
    with open(args.write, "w") as f:
        json.dump(table, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
