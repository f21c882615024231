"""The rank-chunked low-rank epilogues (TWINQUANT_RANK_CHUNK=1) against the current ones. (GPU, sm_90)

    python3 benchmarks/kernels/bench_rank_chunk.py --out DIR [--tag h100] [--ms 2 4 8 16 32 64 128 256]

With a low-rank branch, the mma decode kernel (up to 16 tokens per program) and MODE 10 load all
of t and U at once in their epilogue, and the registers that takes are allocated for the whole
kernel: compiled for sm_90 (Triton 3.6), rank 64 raises (1, 8, 8) from 64 to 85 registers and
MODE 10 (64, 64, 64, 4, 4, 4) from 128 to 175, so fewer programs fit on an SM than at rank 0.
`rank_chunked()` makes both take 16 ranks at a time (`../results/rank_chunk_registers_sm90.json`).
A third variant also hands both kernels t in 8 plain K-slices (their epilogues add them) instead
of one slice reduced with atomics, which needs a zeroed workspace:
one more launch (torch.zeros) ahead of the down projection, on the path PDL does not overlap
(the residual kernel may start once the down projection has, and that waits for the zeroing).

First a correctness pass with every variant: odd cases (M not a multiple of the token tile, merged
q/k/v slots, ranks that are not powers of two, rank 256, fp16, int8 factors, bias, split-K), each
against the float32 reference with the output NaN-poisoned; a mismatch stops the run. Then, for
the four Llama-3-8B layer shapes, each M and ranks 64/128/256, the layer as the plugin runs it
(`tq_linear`, CUDA graphs over enough weight copies to overflow L2, as bench_kernels.py) in each
variant, next to rank 0 and BF16, in one run. Writes rank_chunk_TAG.json after every case.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from bench_kernels import GROUP, SHAPES, check, flush_copies, graph_time_ms, layer_bytes, make_layer  # noqa: E402

from csrc_triton import twinquant_gemm as tg  # noqa: E402

SMOKE = [  # (M, K, N, rank, slot bounds, dtype, int8, bias): through the dispatch, so the kernels it picks
    (2, 4096, 6144, 64, (4096, 5120), torch.bfloat16, False, False),  # mma decode, merged q/k/v
    (5, 4096, 4096, 24, (), torch.bfloat16, False, True),  # rank 24: BLOCK_R 32, two chunks, half the second masked
    (16, 14336, 4096, 256, (), torch.bfloat16, False, False),  # mma decode, sixteen chunks
    (11, 4096, 28672, 100, (14336,), torch.float16, True, True),  # merged gate/up, int8 factors, fp16
    (40, 4096, 6144, 64, (4096, 5120), torch.bfloat16, False, True),  # MODE 10, split-K
    (77, 14336, 4096, 128, (), torch.float16, False, False),
    (130, 4096, 4096, 256, (), torch.bfloat16, True, False),  # MODE 10, int8 factors
    (200, 4096, 28672, 48, (14336,), torch.bfloat16, False, True),
    (256, 14336, 4096, 64, (), torch.bfloat16, False, False),
]


@contextlib.contextmanager
def t_in_slices(slices: int | None):
    """With `slices`, the down projection writes that many plain K-slices wherever the dispatch asks
    for one atomically reduced slice (the mma decode kernel, MODE 10), so no zeroed workspace."""
    real = tg.lowrank_down
    if slices:
        def patched(x, down, num_splits=None, reduce=False, **kw):
            if reduce:
                return real(x, down, slices, reduce=False, **kw)
            return real(x, down, num_splits, reduce=reduce, **kw)
        tg.lowrank_down = patched
    try:
        yield
    finally:
        tg.lowrank_down = real


VARIANTS = {"": (False, None), "_chunked": (True, None), "_chunked_slices8": (True, 8)}  # suffix: (rank chunk, t slices)


@contextlib.contextmanager
def rank_chunk(on: bool):
    """TWINQUANT_RANK_CHUNK for the launches made inside (read at each launch, so at capture time)."""
    saved = os.environ.get("TWINQUANT_RANK_CHUNK")
    os.environ["TWINQUANT_RANK_CHUNK"] = "1" if on else "0"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["TWINQUANT_RANK_CHUNK"]
        else:
            os.environ["TWINQUANT_RANK_CHUNK"] = saved


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--tag", default="h100")
    ap.add_argument("--ms", type=int, nargs="+", default=[2, 4, 8, 16, 32, 64, 128, 256])
    ap.add_argument("--ranks", type=int, nargs="+", default=[64, 128, 256])
    args = ap.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    path = os.path.join(args.out, f"rank_chunk_{args.tag}.json")
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "triton": __import__("triton").__version__, "command": " ".join(sys.argv), "smoke": [], "cases": []}
    t0 = time.time()
    for variant, (on, slices) in VARIANTS.items():
        with rank_chunk(on), t_in_slices(slices):
            for m, k, n, r, bounds, dtype, int8, bias in SMOKE:
                err = check(m, k, n, r, dtype, gen, None, bounds=bounds, int8=int8, bias=bias)
                res["smoke"].append({"variant": variant or "current", "M": m, "K": k, "N": n, "rank": r,
                                     "bounds": list(bounds), "dtype": str(dtype), "int8": int8, "bias": bias,
                                     "rel_err": err})
                print(f"check {variant or 'current'} M={m} K={k} N={n} r={r}: {err:.2e}", flush=True)
    for (name, k, n), m in itertools.product(SHAPES, args.ms):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
        rec = {"name": name, "M": m, "K": k, "N": n}
        for r in [0, *args.ranks]:
            layers = [make_layer(k, n, r, torch.bfloat16, gen) for _ in range(flush_copies(layer_bytes(k, n, r)))]
            fns = [lambda L=L: tg.tq_linear(x, L[0], L[1], GROUP, L[2], L[3]) for L in layers]
            for variant, (on, slices) in VARIANTS.items():
                if variant and not r:
                    continue
                with rank_chunk(on), t_in_slices(slices):
                    rec[f"ms_r{r}{variant}"] = graph_time_ms(fns)
            del layers, fns
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen)
              for _ in range(flush_copies(n * k * 2, 16))]
        rec["ms_bf16"] = graph_time_ms([lambda w=w: torch.matmul(x, w.t()) for w in ws])
        del ws
        for r in args.ranks:
            for variant in VARIANTS:
                if f"ms_r{r}{variant}" in rec:
                    rec[f"overhead_r{r}{variant}"] = rec[f"ms_r{r}{variant}"] / rec["ms_r0"] - 1
        res["cases"].append(rec)
        print(json.dumps({k_: round(v, 4) if isinstance(v, float) else v for k_, v in rec.items()}), flush=True)
        res["seconds"] = round(time.time() - t0, 1)
        with open(path, "w") as f:
            json.dump(res, f, indent=1)
    print(f"wrote {path} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
