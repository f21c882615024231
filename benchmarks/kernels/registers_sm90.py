"""Registers, stack and shared memory of every launch the plan makes of the Gluon kernels,
compiled for sm_90 on any machine (no GPU: Triton's own ptxas and cuobjdump).

    python3 benchmarks/kernels/registers_sm90.py --out benchmarks/results [--ranks 0 64 128]
    python3 benchmarks/kernels/registers_sm90.py --loop down_proj 64 [--rank R]

For Llama-3-8B's four layer shapes and every M from 2 to 256, the plan's launch on an H100
(`csrc_triton.dispatch`), compiled once per distinct form (`csrc_triton/compile.py`); written to
registers_sm90.json: cuobjdump's REG / STACK / LOCAL, the shared memory a launch asks for, the
programs one H100 SM holds (the fewest of the register, shared-memory and warp limits) and the
waves the grid makes on its 132 SMs. `--loop` prints the SASS instructions of one planned
launch's main loop (its longest backward branch) by kind: what a program issues per iteration.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import triton  # noqa: E402

from csrc_triton import Device, LayerShape, plan  # noqa: E402
from csrc_triton.compile import compile_sm90  # noqa: E402
from csrc_triton.kernels import mma_decode, wgmma_rs  # noqa: E402

H100 = Device.named("NVIDIA H100 80GB HBM3")
SMS = 132
LAYERS = {"qkv_proj": (6144, 4096, (4096, 5120)), "o_proj": (4096, 4096, ()),
          "gate_up_proj": (28672, 4096, (14336,)), "down_proj": (4096, 14336, ())}
PTRS = {"x_ptr": "*bf16", "qw_ptr": "*i32", "sc_ptr": "*fp16", "up_ptr": "*bf16", "us_ptr": "*fp32",
        "ws_ptr": "*fp32", "bias_ptr": "*bf16", "y_ptr": "*bf16", "part_ptr": "*fp32", "ticket_ptr": "*i32"}


def launch(layer: str, m: int, rank: int):
    """(kernel, launch key, constexprs, warps, programs in the grid) of the plan's launch, or None
    when the plan does not pick a Gluon kernel there."""
    n, k, slots = LAYERS[layer]
    p = plan(LayerShape(n, k, 128, rank, slots), m, H100)
    if p.kernel == "mma_decode":
        lp = mma_decode.launch_params(m, n, k, 128, p.config, LayerShape(n, k, 128, slot_bounds=slots).max_block_n,
                                      H100.smem_optin)
        consts = mma_decode.constexprs(lp, 128, rank, False, False, torch.bfloat16, False)
        return ("mma_decode", lp, consts, lp.warps, lp.tiles * lp.split * triton.cdiv(m, lp.tok))
    if p.kernel == "wgmma_rs":
        lp = wgmma_rs.launch_params(m, n, k, 128, p.config, LayerShape(n, k, 128, slot_bounds=slots).max_block_n)
        consts = wgmma_rs.constexprs(lp, 128, rank, False, False, torch.bfloat16, False)
        return ("wgmma_rs", lp, consts, lp.warps, lp.tiles * lp.split)
    return None


def compile_(kernel: str, consts: dict, warps: int, **kw):
    module, fn, aligned = {"mma_decode": ("csrc_triton.kernels.mma_decode", "_tq_decode_mma_kernel", ("N", "K")),
                           "wgmma_rs": ("csrc_triton.kernels.wgmma_rs", "_tq_gemm_wgmma_rs_kernel",
                                        ("N", "K", "k_per_split"))}[kernel]
    return compile_sm90(module, fn, PTRS, consts, warps, gluon=True, aligned_extra=aligned, **kw)


def fitting_programs(regs: int, smem: int, warps: int) -> int:
    """Programs one H100 SM holds: registers (65,536, per warp in steps of 256), shared memory
    (228 KB, 1 KB reserved per program), 64 warps, 32 programs."""
    by_regs = 65536 // (warps * 32 * (-(-regs // 8) * 8))
    return min(by_regs, (228 << 10) // (smem + (1 << 10)), 64 // warps, 32)


# SASS opcode -> kind, for the main-loop histogram (first match on the opcode's leading name)
KINDS = [
    ("LOP3", "LOP3 (nibbles; addresses)"),
    ("SHF", "shifts"),
    ("PRMT", "PRMT (byte permutes)"),
    ("HFMA2", "HFMA2 (code - 8)"),
    ("HMUL2", "HMUL2 (x scale)"),
    ("HADD2", "HADD2"),
    ("HGMMA", "HGMMA (wgmma)"),
    ("HMMA", "HMMA (mma.sync)"),
    ("LDGSTS", "cp.async"),
    ("LDGDEPBAR", "cp.async commit"),
    ("DEPBAR", "cp.async / wgmma waits"),
    ("WARPGROUP", "warpgroup arrive / wait"),
    ("LDSM", "ldmatrix"),
    ("LDS", "shared loads"),
    ("STS", "shared stores"),
    ("LDG", "global loads"),
    ("BAR", "CTA barriers"),
    ("U", "uniform datapath (descriptors, stage indices)"),
    ("I", "integer arithmetic"),
    ("LEA", "integer arithmetic"),
    ("SEL", "integer arithmetic"),
    ("VI", "integer arithmetic"),
    ("PLOP3", "predicate logic"),
    ("ISETP", "integer arithmetic"),
    ("MOV", "moves"),
    ("F2FP", "conversions"),
    ("BRA", "branch"),
]


def loop_histogram(sass: str) -> tuple[int, collections.Counter]:
    """(instructions, kinds) of the longest loop (backward branch) of a kernel's SASS."""
    ins = [(int(m.group(1), 16), m.group(2).strip()) for m in
           re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    loops = []
    for addr, text in ins:
        target = re.search(r"\bBRA\b\s+(?:\S+\s+)?0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < addr:
            loops.append((int(target.group(1), 16), addr))
    if not loops:
        raise SystemExit("no loop in this kernel's SASS")
    lo, hi = max(loops, key=lambda span: span[1] - span[0])
    body = [re.sub(r"^@!?U?P\w+\s+", "", text).split()[0] for addr, text in ins if lo <= addr <= hi]
    kinds = collections.Counter(next((kind for head, kind in KINDS if op.startswith(head)), "other: " + op)
                                for op in body)
    return len(body), kinds


def records(ranks) -> list[dict]:
    out, done = [], {}
    for layer in LAYERS:
        for m in range(2, 257):
            for rank in ranks:
                got = launch(layer, m, rank)
                if got is None:
                    continue
                kernel, lp, consts, warps, programs = got
                key = (kernel, json.dumps(consts, sort_keys=True), warps)
                if key not in done:
                    _, res = compile_(kernel, consts, warps, want_resources=True)
                    done[key] = res
                res = done[key]
                fit = fitting_programs(res["REG"], res["SMEM"], warps)
                out.append({"layer": layer, "M": m, "rank": rank, "kernel": kernel, "launch": vars(lp), **res,
                            "programs": programs, "programs_per_sm": fit, "waves": round(programs / (SMS * fit), 3)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="folder for registers_sm90.json")
    ap.add_argument("--ranks", type=int, nargs="+", default=[0, 64, 128])
    ap.add_argument("--loop", nargs=2, metavar=("LAYER", "M"), help="SASS histogram of the planned launch's main loop")
    ap.add_argument("--rank", type=int, default=0, help="rank for --loop")
    args = ap.parse_args()
    if args.loop:
        got = launch(args.loop[0], int(args.loop[1]), args.rank)
        if got is None:
            raise SystemExit("the plan picks no Gluon kernel there")
        kernel, lp, consts, warps, _ = got
        _, res = compile_(kernel, consts, warps, want_sass=True)
        total, kinds = loop_histogram(res["SASS"])
        print(f"{kernel} {vars(lp)}: {total} instructions per main-loop iteration")
        for kind, count in kinds.most_common():
            print(f"  {count:5d}  {kind}")
        return
    t0 = time.time()
    recs = records(args.ranks)
    import triton as _t

    result = {"meta": {"device": H100.name, "triton": _t.__version__, "command": " ".join(sys.argv),
                       "seconds": round(time.time() - t0, 1)}, "records": recs}
    os.makedirs(args.out or ".", exist_ok=True)
    with open(os.path.join(args.out or ".", "registers_sm90.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"{len(recs)} planned launches in {result['meta']['seconds']} s")


if __name__ == "__main__":
    main()
