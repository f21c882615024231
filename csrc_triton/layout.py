"""The operand layout every CUDA kernel of vllm-twinquant reads, and host-side operand checks.

The codes arrive as the checkpoint stores them (compressed-tensors order: column 8l + j in
nibble j of word l) and are reordered once at load, losslessly (`repack`): within every chunk
of C = min(64, G) input columns, nibble j of word l holds column j * C/8 + l. Then the j-th
nibbles of consecutive words meet consecutive activations, so the kernels read x in vector
loads and never shuffle registers. Scales [N, K/G] and the factors D [slots * R, K], U [N, R]
are read as stored (int8 factors with an fp32 scale per row).

Merged layers (q/k/v, gate/up) keep one factor pair per sub-layer ("slot"): output rows of
slot s use t[:, s*R:(s+1)*R]. Every output tile lies inside one slot (its width divides the
slot boundaries, `max_block_n_for`), so a tile finds its slot from two boundaries.
"""

from __future__ import annotations

import math

import torch


# -- code layout ------------------------------------------------------------------------------
def chunk_words(group_size: int) -> int:
    """Words per chunk of the repacked layout: a chunk is min(64, G) columns, so it never
    straddles a scale group (G in 32..128 divides K, so chunks tile every row exactly)."""
    return min(64, group_size) // 8


def repack(qweight: torch.Tensor, group_size: int) -> torch.Tensor:
    """Checkpoint codes (compressed-tensors order: column 8l + j in nibble j of word l) to the
    layout every kernel here reads (column c*C + j*C/8 + l of chunk c in nibble j of word l).
    Lossless and invertible (`unrepack`); same shape and dtype."""
    n, kw = qweight.shape
    cw = chunk_words(group_size)
    if (kw * 8) % (8 * cw):
        raise ValueError(f"in_features {kw * 8} is not a multiple of the {8 * cw}-column chunk")
    shifts = 4 * torch.arange(8, device=qweight.device, dtype=torch.int32)
    codes = (qweight[:, :, None] >> shifts) & 0xF  # [N, K/8, 8]: natural column order
    codes = codes.reshape(n, kw // cw, 8, cw).transpose(2, 3)  # [N, chunk, l, j]
    return _pack_nibbles(codes.reshape(n, kw, 8), shifts)


def unrepack(qweight: torch.Tensor, group_size: int) -> torch.Tensor:
    n, kw = qweight.shape
    cw = chunk_words(group_size)
    shifts = 4 * torch.arange(8, device=qweight.device, dtype=torch.int32)
    codes = ((qweight[:, :, None] >> shifts) & 0xF).reshape(n, kw // cw, cw, 8).transpose(2, 3)
    return _pack_nibbles(codes.reshape(n, kw, 8), shifts)


def _pack_nibbles(codes: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    # int64 sum avoids int32 overflow of the top nibble; the wrap to int32 keeps the bits
    words = (codes.to(torch.int64) << shifts.to(torch.int64)).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()


def max_block_n_for(boundaries: tuple[int, ...]) -> int:
    """Largest power-of-two tile width (16..256) dividing every slot boundary, else 0."""
    g = 0
    for b in boundaries:
        g = math.gcd(g, b)
    bn = 256
    while bn > 16 and g % bn:
        bn //= 2
    return bn if g % bn == 0 else 0


def next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def check_factor(f: torch.Tensor, scale: torch.Tensor | None, rows: int, name: str) -> None:
    """int8 factors come with an fp32 scale per row; float factors come without."""
    if (f.dtype == torch.int8) != (scale is not None):
        raise ValueError(f"low-rank {name} factor is {f.dtype}: int8 factors need a {name}_scale, float ones take none")
    if scale is not None and (scale.dtype != torch.float32 or scale.shape != (rows,) or not scale.is_contiguous()):
        raise ValueError(f"{name}_scale must be a contiguous float32 [{rows}], got {scale.dtype} {list(scale.shape)}")

