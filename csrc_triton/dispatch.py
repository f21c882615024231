"""Which kernel runs a TwinQuant layer for M tokens, with which launch configuration: `plan()`.

    plan(LayerShape(n=28672, k=4096, group_size=128, rank=64), m=16, device=Device.of(x.device))
    -> KernelPlan(kernel="mma_decode", config=MmaConfig(mt=2, warps=8, split_k=4, max_tokens=64), ...)

The rule, in full:
0. A W4A8 layer (`LayerShape.act_quant` fp8/int8; int4, W4A4's codes, as int8): the first kernel of
   W4A8_PRIORITY that can run it and whose table rows name a config for (M, N, K): `fp8_cublas` (FP8, rows
   `w4a8_fp8_cublas`), `w4a8_ws` and `w4a8_rs` (integer codes on Hopper, rows `w4a8_ws_int8`, `w4a8_rs_int8`),
   the Triton `w4a8` (rows `w4a8_<act>`); below the tables' first such M (the small token counts where the
   W4A16 kernels measured faster, at most benchmarks/kernels/tune.py's W4A16_KEPT_MAX_M), the rule below for
   the same layer as W4A16, on x unquantized (logits at those token counts differ from the W4A8 product's
   by the activation rounding; README, "Limits").
1. Above the large-M threshold (the device table's `large_m`, by layer size; at least the last
   token count wgmma_rs takes where it can run): `dequant_cublas`.
2. Else the first kernel of PRIORITY that can run the layer on the device (`can_implement`) and
   whose table row for (M, N, K) names a config that fits the layer's slots (`choose`):
   wgmma_rs (Hopper, 17-256 tokens), mma_decode (sm_80+, 2-128), gemv (1-4), tile (any M).
3. The low-rank down projection t = x @ D^T runs first (`lowrank_down`); with PDL (sm_90) the
   residual kernel is launched while it runs and waits for t in its epilogue, except where the
   table's `pdl_off` rows measured PDL slower. Where the table's `gemv_t_splits` (`mma_decode_t_splits`) row
   says `in_kernel`, the gemv (mma_decode) kernel makes t in its own launch instead, up to its T_TOKENS
   tokens (`kernels/gemv.py`, `kernels/mma_decode.py`).

The tables are data (`csrc_triton/configs/<device name>.json`, written by
benchmarks/kernels/tune.py); a device without its own table uses the nearest one (same compute
capability, else the H100's), and says so in the log. TWINQUANT_DISABLED_KERNELS removes
kernels (and `pdl`) from the plan. `python -m vllm_twinquant.explain` prints the plan of a layer
for every M.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import logging
import os
from dataclasses import dataclass, fields

from csrc_triton.kernels.base import Device, Kernel, LayerShape, Unavailable
from vllm_twinquant import envs

log = logging.getLogger("vllm.twinquant")

PRIORITY = ("wgmma_rs", "mma_decode", "gemv", "tile")
W4A8_PRIORITY = ("fp8_cublas", "w4a8_ws", "w4a8_rs", "w4a8")
KERNEL_MODULES = {"wgmma_rs": "wgmma_rs", "mma_decode": "mma_decode", "gemv": "gemv", "tile": "tile",
                  "dequant_cublas": "dequant", "w4a8": "w4a8", "w4a8_rs": "w4a8_rs", "w4a8_ws": "w4a8_ws",
                  "fp8_cublas": "fp8_cublas"}
FALLBACK_TABLE = "NVIDIA H100 80GB HBM3"


class NoKernel(ValueError):
    """No kernel of the plan can run a layer for some token count; the message gives each reason."""


@functools.cache
def kernels() -> dict[str, Kernel]:
    """name -> kernel; one that cannot be imported (no Gluon in this Triton) stands in as Unavailable."""
    out: dict[str, Kernel] = {}
    for name, module in KERNEL_MODULES.items():
        try:
            out[name] = importlib.import_module(f"csrc_triton.kernels.{module}").KERNEL
        except Exception as e:  # noqa: BLE001 -- the reason is what can_implement reports
            out[name] = Unavailable(name, f"cannot import csrc_triton.kernels.{module}: {type(e).__name__}: {e}")
    return out


# -- the tables ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    max_m: int | None  # None: any M
    max_n: int | None  # None: any N
    min_k: int
    config: object | None  # None: these tokens and shapes go to the next kernel


class RuleTable:
    """Rules matched first to last: M <= max_m, N <= max_n (None: any), K >= min_k."""

    def __init__(self, rules: list[Rule]):
        self.rules = rules

    def lookup(self, m: int, n: int, k: int):
        for r in self.rules:
            if (r.max_m is None or m <= r.max_m) and (r.max_n is None or n <= r.max_n) and k >= r.min_k:
                return r.config
        return None


@dataclass(frozen=True)
class TileRule:
    max_m: int | None
    min_n: int
    min_k: int
    block_m: int
    block_n: int
    block_k: int
    warps: int
    stages: int
    mode: int
    max_split_k: int


class TileTable:
    """The tile kernel's config: the first rule with M <= max_m, N >= min_n, K >= min_k; BLOCK_K
    capped at the group, BLOCK_N at the slot bounds, MODE 4 only with whole 128-column groups, and
    split-K doubled while the grid has fewer than `min_programs` programs."""

    def __init__(self, rules: list[TileRule], min_programs: int):
        self.rules, self.min_programs = rules, min_programs

    def pick(self, m: int, n: int, k: int, max_block_n: int = 256, group_size: int = 128):
        from csrc_triton.kernels.tile import TileConfig

        r = next(r for r in self.rules if (r.max_m is None or m <= r.max_m) and n >= r.min_n and k >= r.min_k)
        mode = 7 if r.mode == 4 and group_size % 128 else r.mode  # MODE 4 steps over whole 128-column groups
        bn = min(r.block_n, max_block_n)
        bk = min(r.block_k, group_size)
        tiles = -(-m // r.block_m) * -(-n // bn)
        split = 1
        while tiles * split < self.min_programs and split < r.max_split_k and k // (2 * split * bk) >= 4:
            split *= 2
        return TileConfig(r.block_m, bn, bk, r.warps, r.stages, split, mode)


@dataclass(frozen=True)
class TSplits:
    """A `gemv_t_splits` or `mma_decode_t_splits` row: for layers of K up to max_k (None: any), the decode
    kernel's t in `splits` K-slices of block_r rows of D per program (None: up to 64); made by `lowrank_down`
    (gemv: with PDL), or with `in_kernel` by the residual launch's own first programs (kernels/gemv.py,
    kernels/mma_decode.py; block_r then 64 if None)."""

    max_k: int | None
    splits: int
    block_r: int | None = None
    in_kernel: bool = False


@dataclass(frozen=True)
class Tables:
    device: str
    path: str
    gemv: RuleTable
    mma_decode: RuleTable
    wgmma_rs: RuleTable
    w4a8: dict[str, RuleTable]  # act_quant ("fp8", "int8") -> the Triton W4A8 kernel's rows
    w4a8_fp8_cublas: RuleTable  # where W4A8-FP8 layers run cuBLAS's block-scaled GEMM instead
    w4a8_rs: RuleTable  # where W4A8-INT8 layers run the Gluon kernel (Hopper) instead
    w4a8_ws: RuleTable  # where they run the warp-specialized Gluon kernel (Hopper; none: no rows in the table)
    tile: TileTable
    large_m: list[tuple[int | None, int]]  # (layers with fewer weights than this, or any: threshold M)
    pdl_off: list[dict]
    gemv_t: list[TSplits]  # how the one-token kernel gets t, by K
    mma_t: list[TSplits]  # where the tensor-core decode kernel makes t itself, by K (none: lowrank_down)

    def gemv_t_for(self, k: int) -> TSplits:
        return next(row for row in self.gemv_t if row.max_k is None or k <= row.max_k)

    def mma_t_for(self, k: int) -> TSplits | None:
        return next((row for row in self.mma_t if row.max_k is None or k <= row.max_k), None)

    def large_m_threshold(self, n: int, k: int) -> int:
        return next(thr for size, thr in self.large_m if size is None or n * k < size)


def _rules(rows: list[dict], config_type) -> RuleTable:
    names = {f.name for f in fields(config_type)}
    out = []
    for row in rows:
        cfg = row["config"]
        if cfg is not None:
            unknown = set(cfg) - names
            if unknown:
                raise ValueError(f"launch table: {config_type.__name__} has no fields {sorted(unknown)}")
            cfg = config_type(**cfg)
        out.append(Rule(row["max_m"], row["max_n"], row["min_k"], cfg))
    return RuleTable(out)


def _t_splits(row: dict) -> TSplits:
    return TSplits(row["max_k"], row["splits"], row.get("block_r"), row.get("in_kernel", False))


def load_tables(path: str) -> Tables:
    from csrc_triton.kernels.fp8_cublas import Fp8CublasConfig
    from csrc_triton.kernels.gemv import GemvConfig
    from csrc_triton.kernels.mma_decode import MmaConfig
    from csrc_triton.kernels.w4a8 import W4a8Config
    from csrc_triton.kernels.w4a8_rs import W4a8RsConfig
    from csrc_triton.kernels.w4a8_ws import W4a8WsConfig
    from csrc_triton.kernels.wgmma_rs import RsConfig

    with open(path) as f:
        d = json.load(f)
    return Tables(
        device=d["device"], path=path,
        gemv=_rules(d["gemv"], GemvConfig), mma_decode=_rules(d["mma_decode"], MmaConfig),
        wgmma_rs=_rules(d["wgmma_rs"], RsConfig),
        w4a8={aq: _rules(d[f"w4a8_{aq}"], W4a8Config) for aq in ("fp8", "int8")},
        w4a8_fp8_cublas=_rules(d["w4a8_fp8_cublas"], Fp8CublasConfig), w4a8_rs=_rules(d["w4a8_rs_int8"], W4a8RsConfig),
        w4a8_ws=_rules(d.get("w4a8_ws_int8", []), W4a8WsConfig),
        tile=TileTable([TileRule(**r) for r in d["tile"]["rules"]], d["tile"]["min_programs"]),
        large_m=[(r["max_weights"], r["threshold_m"]) for r in d["large_m"]], pdl_off=d["pdl_off"],
        gemv_t=[_t_splits(r) for r in d["gemv_t_splits"]],
        mma_t=[_t_splits(r) for r in d.get("mma_decode_t_splits", [])],
    )


def table_file(device_name: str) -> str:
    return os.path.join(envs.config_dir(), device_name.replace(" ", "_") + ".json")


@functools.cache
def tables_for(device_name: str, capability: tuple[int, int] | None) -> Tables:
    """The device's own table, else the nearest: a table of the same compute capability, else the
    H100's (logged once per device)."""
    own = table_file(device_name)
    if os.path.exists(own):
        return load_tables(own)
    candidates = sorted(f for f in os.listdir(envs.config_dir()) if f.endswith(".json"))
    chosen = table_file(FALLBACK_TABLE)
    for fn in candidates:
        with open(os.path.join(envs.config_dir(), fn)) as f:
            if capability is not None and tuple(json.load(f).get("capability", ())) == tuple(capability):
                chosen = os.path.join(envs.config_dir(), fn)
                break
    if capability is not None:
        log.warning("twinquant: no launch table for %s; using %s (nearest)", device_name, os.path.basename(chosen))
    return load_tables(chosen)


# -- the plan ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LowrankPlan:
    """How t = x @ D^T is made: `splits` K-slices (None: as many as fill the GPU, up to 32), and
    with `reduce` all added into one zeroed slice (fp32 atomics) so the residual kernel reads t once;
    `block_r` rows of D per program (None: up to 64)."""

    splits: int | None
    reduce: bool
    block_r: int | None = None
    in_kernel: bool = False  # made by the residual launch itself (gemv.py, mma_decode.py), no lowrank_down


@dataclass(frozen=True)
class KernelPlan:
    kernel: str  # a name of kernels()
    config: object  # that kernel's config dataclass
    lowrank: LowrankPlan | None  # None: rank 0
    pdl_trigger: int  # 0: no PDL; 1: the residual kernel may start once the down projection's programs have


def pdl_usable(device: Device) -> bool:
    """Programmatic dependent launch: sm_90+, compiled kernels, not disabled (`pdl`)."""
    return device.cuda and device.capability >= (9, 0) and not envs.disabled("pdl")


def pdl_trigger(tables: Tables, m: int, n: int, k: int, r: int) -> int:
    """1 where PDL pays (the down projection lets the residual kernel start once its programs have all
    started), 0 on the table's `pdl_off` rows."""
    for row in tables.pdl_off:
        if (row["min_m"] <= m <= row["max_m"] and n >= row["min_n"] and (row["max_n"] is None or n <= row["max_n"])
                and k >= row["min_k"] and r >= row["min_rank"]):
            return 0
    return 1


def large_m_threshold(shape: LayerShape, device: Device, tables: Tables) -> int:
    from csrc_triton.kernels.wgmma_rs import MAX_TOKENS

    thr = tables.large_m_threshold(shape.n, shape.k)
    if kernels()["wgmma_rs"].can_implement(shape, device)[0]:
        thr = max(thr, MAX_TOKENS)  # wgmma_rs measured faster than the dense copy up to its last M
    return thr


def _finish(name: str, config, m: int, shape: LayerShape, device: Device, tables: Tables) -> KernelPlan:
    if not shape.rank or name in ("dequant_cublas", "fp8_cublas"):  # (they make t themselves)
        return KernelPlan(name, config, None, 0)
    if name in ("w4a8", "w4a8_rs", "w4a8_ws"):  # launched after quantize_rows, without PDL
        return KernelPlan(name, config, LowrankPlan(None, m > 16), 0)
    if name in ("gemv", "mma_decode"):  # t made by the residual launch itself, where the table's row says so
        from csrc_triton.kernels.base import T_ROWS

        row = tables.gemv_t_for(shape.k) if name == "gemv" else tables.mma_t_for(shape.k)
        if (row is not None and row.in_kernel and m <= kernels()[name].t_tokens
                and shape.rank * (len(shape.slot_bounds) + 1) <= T_ROWS):
            return KernelPlan(name, config, LowrankPlan(row.splits, False, row.block_r or 64, True), 0)
    trigger = pdl_trigger(tables, m, shape.n, shape.k, shape.rank) if pdl_usable(device) else 0
    # The gemv kernel takes t in the table's K-slices with PDL (fewer partial slices in its epilogue, and
    # the longer down projection runs under its loop); the tensor-core kernels from 17 tokens on and
    # mma_decode (one finishing program per column tile) read one reduced slice.
    row = tables.gemv_t_for(shape.k) if trigger and name == "gemv" else TSplits(None, None)
    reduce = name == "mma_decode" or (name in ("tile", "wgmma_rs") and m > 16)
    return KernelPlan(name, config, LowrankPlan(row.splits, reduce, row.block_r), trigger)


def plan(shape: LayerShape, m: int, device: Device, tables: Tables | None = None,
         large_m: int | None = None, fused_only: bool = False) -> KernelPlan:
    """The kernel, its config and the low-rank launch for m tokens (rule in the module docstring).
    large_m: a threshold in place of the table's (0: always dequant_cublas); fused_only: never it."""
    tables = tables or tables_for(device.name, device.capability)
    ks = kernels()
    if shape.act_quant != "none":
        ok, why = ks["w4a8"].can_implement(shape, device)
        if not ok:  # the general W4A8 kernel: where it cannot run, no W4A8 kernel can
            raise NoKernel(f"no kernel runs {shape} for M={m} on {device.name}: w4a8: {why}")
        for name in W4A8_PRIORITY:
            if ks[name].can_implement(shape, device)[0]:
                cfg = ks[name].choose(m, shape, tables)
                if cfg is not None:
                    return _finish(name, cfg, m, shape, device, tables)
        shape = dataclasses.replace(shape, act_quant="none")
    thr = large_m_threshold(shape, device, tables) if large_m is None else large_m
    reasons = []
    if m > thr and not fused_only:
        ok, why = ks["dequant_cublas"].can_implement(shape, device)
        if ok:
            return _finish("dequant_cublas", ks["dequant_cublas"].choose(m, shape, tables), m, shape, device, tables)
        reasons.append(f"dequant_cublas: {why}")
    for name in PRIORITY:
        ok, why = ks[name].can_implement(shape, device)
        if not ok:
            reasons.append(f"{name}: {why}")
            continue
        cfg = ks[name].choose(m, shape, tables)
        if cfg is not None:
            return _finish(name, cfg, m, shape, device, tables)
        reasons.append(f"{name}: not in its table for M={m}")
    raise NoKernel(f"no kernel runs {shape} for M={m} on {device.name}: " + "; ".join(reasons))


@functools.lru_cache(maxsize=4096)
def cached_plan(shape: LayerShape, m: int, device: Device, large_m: int | None, fused_only: bool) -> KernelPlan:
    """`plan` memoised for the calls of a running model (same shapes, few token counts)."""
    return plan(shape, m, device, None, large_m, fused_only)


def scratch_tokens(shape: LayerShape, device: Device) -> int:
    """Tokens the split-K scratch (`gluon_common.scratch`) must hold for the kernels the plan may
    pick for this layer (0: none of them splits through it)."""
    ks = kernels()
    if ks["wgmma_rs"].can_implement(shape, device)[0]:
        from csrc_triton.kernels.wgmma_rs import MAX_TOKENS

        return MAX_TOKENS
    if ks["mma_decode"].can_implement(shape, device)[0]:
        from csrc_triton.kernels.mma_decode import MAX_TOKENS

        return MAX_TOKENS
    return 0


SUMMARY_MS = tuple(range(1, 1025)) + (1536, 2048, 3072, 4096, 6144, 8192, 16384, 32768, 65536)


def ranges(shape: LayerShape, device: Device, tables: Tables | None = None, with_config: bool = False,
           ms: tuple[int, ...] = SUMMARY_MS) -> list[tuple[int, int, str]]:
    """(first M, last M, kernel [config]) of the plan for M from 1 to max(ms), consecutive equal
    plans merged; sampled at `ms`, with each change between two samples found by bisection."""
    def label(m: int) -> str:
        p = plan(shape, m, device, tables)
        return f"{p.kernel} {_config_text(p.config)}{_t_text(p)}" if with_config else p.kernel

    out: list[list] = []
    prev = None
    for m in ms:
        lab = label(m)
        if out and out[-1][2] == lab:
            out[-1][1] = m
        else:
            first = m
            if out and prev is not None and m - prev > 1:  # the change lies in (prev, m]
                lo, hi = prev, m
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    lo, hi = (mid, hi) if label(mid) == out[-1][2] else (lo, mid)
                out[-1][1], first = lo, hi
            out.append([first, m, lab])
        prev = m
    return [tuple(r) for r in out]


def _config_text(cfg) -> str:
    return "(" + ", ".join(f"{f.name}={getattr(cfg, f.name)}" for f in fields(cfg)) + ")"


def _t_text(p: KernelPlan) -> str:
    """How the plan makes t = x D^T (none where the kernel makes it itself, or rank 0)."""
    if p.lowrank is None:
        return ""
    if p.lowrank.in_kernel:
        return f", t made in the launch ({p.lowrank.splits} K-slices x {p.lowrank.block_r} rows of D)"
    return ", t by lowrank_down" + (" with PDL" if p.pdl_trigger else "")


def summary(name: str, shape: LayerShape, device: Device) -> str:
    """One line naming the kernel of every token count: `twinquant: qkv_proj 4096->6144 r64:
    gemv <=1, mma_decode <=16, wgmma_rs <=256, dequant_cublas >256`."""
    rs = ranges(shape, device)
    parts = [f"{label} <={hi}" for lo, hi, label in rs[:-1]] + [f"{rs[-1][2]} >{rs[-2][1]}" if len(rs) > 1
                                                               else f"{rs[-1][2]} (every M)"]
    return f"twinquant: {name} {shape.k}->{shape.n} r{shape.rank} g{shape.group_size}: " + ", ".join(parts)
