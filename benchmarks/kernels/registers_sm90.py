"""Registers, stack and shared memory of the Gluon kernels' dispatch launches, compiled for sm_90
on any machine (no GPU: Triton's own ptxas and cuobjdump), with the low-rank epilogue all at once
(the measured kernels) and rank-chunked (TWINQUANT_RANK_CHUNK=1), at several ranks.

    python3 benchmarks/kernels/registers_sm90.py --out DIR [--ranks 0 64 128 256]
    python3 benchmarks/kernels/registers_sm90.py --table benchmarks/results/rank_chunk_registers_sm90.json
    python3 benchmarks/kernels/registers_sm90.py --loop rs 64 1 4 4 [--rank R]   # MODE 10 (TOK, MT, warps, stages)

Writes rank_chunk_registers_sm90.json: per launch and setting, cuobjdump's REG / STACK / LOCAL,
the shared memory a launch asks for, and how many programs fit on one SM by registers alone
(65,536 per SM, allocated per warp in steps of 256, i.e. 8 per thread). Uses the CI's compile
helpers (tests/compile_sm90.py, tests/test_kernels.py); the launches are the ones
`test_rank_chunked_epilogues_keep_the_rank0_registers` checks. `--table` prints, for the
dispatch's launch on each Llama-3-8B layer shape, the programs of the grid and the waves they
make on an H100 (132 SMs; per SM the fewest of the register, shared-memory and warp limits) at
rank 0 and at rank 64 both ways, next to the rank-64 cost measured in kernels_h100.json.
`--loop` prints the SASS instructions of one MODE 10 or mma-kernel launch's main loop (its
longest backward branch), by kind: what a program issues per iteration.
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
sys.path.insert(0, os.path.join(ROOT, "tests"))

import triton  # noqa: E402
from test_kernels import _chunked_epilogue_launches, compile_launch  # noqa: E402

from csrc_triton import twinquant_gemm as tg  # noqa: E402
from csrc_triton import twinquant_mma as tm  # noqa: E402

SHAPES = [("qkv", 4096, 6144), ("o", 4096, 4096), ("gate_up", 4096, 28672), ("down", 14336, 4096)]
SMS = 132  # H100 SXM


def programs_per_sm(regs: int, warps: int) -> int:
    return 65536 // (warps * 32 * (-(-regs // 8) * 8))


def fitting_programs(rec: dict) -> int:
    """Programs of a launch that one H100 SM holds at once: registers, shared memory (228 KB, 1 KB
    reserved per program), 64 warps, 32 programs."""
    by_smem = (228 << 10) // (rec["shared_bytes"] + (1 << 10))
    return min(rec["programs_per_sm_by_registers"], by_smem, 64 // rec["warps"], 32)


def dispatch_launch(m: int, n: int, k: int):
    """(launch key as in _chunked_epilogue_launches, config, programs in the grid) of what the
    dispatch runs for M tokens on an sm_90 device (group 128)."""
    if m <= 16:
        cfg = tg.pick_mma_config(m, n, k)
        mt, warps, split, *tok = cfg
        tok_, bk, split, ks = tm.plan(m, k, 128, split, *tok)
        key = ("mma", mt, warps, tok_, bk, ks, split > 1, tm.token_offset_runtime(m, tok_))
        return key, "mma decode " + str(cfg), triton.cdiv(n, 16 * mt * warps) * split * triton.cdiv(m, tok_)
    cfg = tg.pick_rs_config(m, n, k)
    tok, bn, _, warps, stages, split, _ = cfg
    groups = k // 128
    k_per_split = triton.cdiv(groups, max(1, min(split, groups))) * 128
    split = triton.cdiv(k, k_per_split)
    key = ("rs", tok, bn // (16 * warps), warps, stages, split > 1)
    return key, "MODE 10 " + str(cfg[:6]), triton.cdiv(m, tok) * triton.cdiv(n, bn) * split


def table(path: str, kernels_json: str, ms=(4, 16, 64, 128, 256)) -> str:
    recs = json.load(open(path))["records"]
    res = {(r["kernel"], tuple(r["launch"]), r["rank_chunk"], r["rank"]): r for r in recs}
    timed = json.load(open(kernels_json))["records"]
    us = {(r["K"], r["N"], r["M"], r["rank"]): 1000 * r["ms"] for r in timed if r["group_size"] == 128}
    lines = ["| layer, tokens | dispatch launch | programs | rank 0: registers, programs per SM, waves | "
             "rank 64, epilogue all at once | rank 64, rank-chunked | rank 64 over rank 0 (v13, H100) |",
             "|---|---|---|---|---|---|---|"]
    for name, k, n in SHAPES:
        for m in ms:
            key, label, programs = dispatch_launch(m, n, k)
            kernel = "mma decode" if key[0] == "mma" else "MODE 10"
            cells = []
            for chunk, r in ((False, 0), (False, 64), (True, 64)):
                rec = res[(kernel, key[1:], chunk, r)]
                fit = fitting_programs(rec)
                stack = f" (+{rec['STACK']} B stack)" if rec["STACK"] else ""
                cells.append(f"{rec['REG']}{stack}, {fit}, {programs / (SMS * fit):.2f}")
            a, b = us[(k, n, m, 0)], us[(k, n, m, 64)]
            lines.append(f"| {name}, {m} | {label} | {programs} | {' | '.join(cells)} | "
                         f"{a:.1f} → {b:.1f} µs (+{100 * (b / a - 1):.0f}%) |")
    return "\n".join(lines)


# SASS opcode -> kind, for the main-loop histogram (first match on the opcode's leading name)
KINDS = [("LOP3", "LOP3 (nibbles; addresses)"), ("SHF", "shifts"), ("PRMT", "PRMT (byte permutes)"),
         ("HFMA2", "HFMA2 (code - 8)"), ("HMUL2", "HMUL2 (x scale)"), ("HADD2", "HADD2"),
         ("HGMMA", "HGMMA (wgmma)"), ("HMMA", "HMMA (mma.sync)"), ("LDGSTS", "cp.async"),
         ("LDGDEPBAR", "cp.async commit"), ("DEPBAR", "cp.async / wgmma waits"), ("WARPGROUP", "warpgroup arrive / wait"),
         ("LDSM", "ldmatrix"), ("LDS", "shared loads"), ("STS", "shared stores"), ("LDG", "global loads"),
         ("BAR", "CTA barriers"), ("U", "uniform datapath (descriptors, stage indices)"),
         ("I", "integer arithmetic"), ("LEA", "integer arithmetic"), ("SEL", "integer arithmetic"),
         ("VI", "integer arithmetic"), ("PLOP3", "predicate logic"), ("ISETP", "integer arithmetic"),
         ("MOV", "moves"), ("F2FP", "conversions"), ("BRA", "branch")]


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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--ranks", type=int, nargs="+", default=[0, 64, 128, 256])
    ap.add_argument("--table", default=None, metavar="JSON", help="print the waves table of a written JSON, then stop")
    ap.add_argument("--kernels", default=os.path.join(ROOT, "benchmarks", "results", "kernels_h100.json"))
    ap.add_argument("--loop", nargs="+", default=None, metavar="X",
                    help="rs TOK MT WARPS STAGES | mma MT WARPS TOK BK KS: print that launch's main-loop histogram")
    ap.add_argument("--rank", type=int, default=0, help="with --loop")
    ap.add_argument("--rank-chunk", action="store_true", help="with --loop")
    args = ap.parse_args()
    if args.loop:
        kind, *nums = args.loop
        nums = [int(v) for v in nums]
        launch = ("rs", *nums, False) if kind == "rs" else ("mma", *nums, False, nums[2] >= 32)  # one program along K
        res = compile_launch(launch, args.rank, want_sass=True, rank_chunk=args.rank_chunk)[1]
        total, kinds = loop_histogram(res["SASS"])
        print(f"{' '.join(args.loop)}, rank {args.rank}, Triton {triton.__version__}: {total} instructions per "
              f"loop iteration per warp, {res['REG']} registers")
        for kind_, n in kinds.most_common():
            print(f"  {n:5d}  {kind_}")
        return
    if args.table:
        print(table(args.table, args.kernels))
        return
    t0 = time.time()
    recs = []
    for launch in _chunked_epilogue_launches():
        warps = launch[2] if launch[0] == "mma" else launch[3]
        for chunk in (False, True):
            for r in args.ranks:
                if r == 0 and chunk:
                    continue  # no epilogue to chunk
                res = compile_launch(launch, r, want_resources=True, rank_chunk=chunk)[1]
                rec = {"kernel": "mma decode" if launch[0] == "mma" else "MODE 10", "launch": list(launch[1:]),
                       "rank_chunk": chunk, "rank": r, "warps": warps, "REG": res["REG"], "STACK": res["STACK"],
                       "LOCAL": res["LOCAL"], "shared_bytes": res["SMEM"],
                       "programs_per_sm_by_registers": programs_per_sm(res["REG"], warps)}
                recs.append(rec)
                print(json.dumps(rec), flush=True)
    meta = {"triton": triton.__version__, "target": "cuda sm_90 (compiled without a GPU)",
            "launch_fields": {"mma decode": "MT, warps, tokens per program, K step, K per program, split, tiled",
                              "MODE 10": "tokens per program, MT, warps, stages, split"},
            "command": "python3 benchmarks/kernels/registers_sm90.py --out DIR --ranks " + " ".join(map(str, args.ranks)),
            "seconds": round(time.time() - t0, 1)}
    path = os.path.join(args.out, "rank_chunk_registers_sm90.json")
    with open(path, "w") as f:
        json.dump({"meta": meta, "records": recs}, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
