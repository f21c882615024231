"""TwinQuant checkpoint format, version 1: the one place that defines it.

`docs/format.md` is the prose spec; this module is its executable twin. The offline
quantizer writes through it and the vLLM plugin reads through it, so a tensor name,
dtype, shape or check lives here and nowhere else. Importing it never imports vLLM.

A quantized linear layer ``prefix`` (out_features N, in_features K) computes

    y = x @ deq(R)^T + (x @ D^T) @ U^T + bias

with the tensors

    {prefix}.weight_packed  int32  [N, K/8]   4-bit residual codes, compressed-tensors
                                              "pack-quantized" layout (8 codes per int32
                                              along K, code = q + 8, first code in the
                                              lowest nibble)
    {prefix}.weight_scale   scale_dtype [N, K/G]   symmetric group scales, deq(R)[n, k] =
                                              q[n, k] * weight_scale[n, k // G]
    {prefix}.lowrank_down   lowrank_dtype [r, K]   D (absent when r == 0)
    {prefix}.lowrank_up     lowrank_dtype [N, r]   U (absent when r == 0)
    {prefix}.lowrank_down_scale  float32 [r]  } only for lowrank_dtype "int8": D = codes * scale
    {prefix}.lowrank_up_scale    float32 [N]  } per row (symmetric, |code| <= 127)
    {prefix}.bias           (unchanged from the source model, if it has one)
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from typing import Any

import torch

QUANT_METHOD = "twinquant"
FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)

WEIGHT_PACKED = "weight_packed"
WEIGHT_SCALE = "weight_scale"
LOWRANK_DOWN = "lowrank_down"
LOWRANK_UP = "lowrank_up"
LOWRANK_DOWN_SCALE = "lowrank_down_scale"
LOWRANK_UP_SCALE = "lowrank_up_scale"
LOWRANK_TENSORS = (LOWRANK_DOWN, LOWRANK_UP, LOWRANK_DOWN_SCALE, LOWRANK_UP_SCALE)
QUANTIZED_SUFFIXES = (WEIGHT_PACKED, WEIGHT_SCALE, *LOWRANK_TENSORS)

LM_HEAD = "lm_head"  # quantized like a linear layer when modules_to_not_convert leaves it out (stored untied)

PACK_FACTOR = 8  # 4-bit codes per int32
SUPPORTED_WEIGHT_BITS = (4,)
SUPPORTED_ACTIVATION_BITS = (16, 8, 4)
ACTIVATION_TYPES = ("int", "float")  # "float" with 8 bits: FP8 e4m3
FP8_E4M3_MAX = 448.0
SUPPORTED_GROUP_SIZES = (32, 64, 128)
FLOAT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
LOWRANK_DTYPES = ("bfloat16", "float16", "int8")
INT8_MAX = 127
SAFETENSORS_DTYPES = {"I32": torch.int32, "I8": torch.int8, "F16": torch.float16, "BF16": torch.bfloat16,
                      "F32": torch.float32, "F64": torch.float64, "I64": torch.int64, "U8": torch.uint8,
                      "BOOL": torch.bool}

# The HF module names of the sub-layers vLLM fuses into one linear layer. A layer that a model
# keeps fused on disk (Phi-3's qkv_proj and gate_up_proj) is stored split into these parts, by
# output rows, each part with its own residual and scales, its rows of U and a copy of the shared
# D; vLLM's loader maps the part names back into the fused layer.
DEFAULT_PACKED_MODULES = {
    "qkv_proj": ["q_proj", "k_proj", "v_proj"],
    "gate_up_proj": ["gate_proj", "up_proj"],
}


class TwinQuantFormatError(ValueError):
    """A TwinQuant checkpoint or quantization_config does not follow the format."""


def _dtype(name: str, option: str) -> torch.dtype:
    if name not in FLOAT_DTYPES:
        raise TwinQuantFormatError(
            f"quantization_config.{option} = {name!r}: expected one of {sorted(FLOAT_DTYPES)}"
        )
    return FLOAT_DTYPES[name]


@dataclass
class TwinQuantSpec:
    """The ``quantization_config`` block of a TwinQuant checkpoint's config.json."""

    group_size: int = 128
    rank: int = 0
    weight_bits: int = 4
    symmetric: bool = True
    rank_overrides: dict[str, int] = field(default_factory=dict)
    lowrank_dtype: str = "bfloat16"
    scale_dtype: str = "float16"
    activation_bits: int = 16
    activation_type: str = "int"
    activation_clip_ratio: float = 1.0
    online_hadamard: list[str] = field(default_factory=list)
    activation_subspace_channels: int = 0
    activation_subspace_bits: int = 8
    activation_subspace_modules: list[str] = field(default_factory=list)
    modules_to_not_convert: list[str] = field(default_factory=lambda: ["lm_head"])
    recipe: str = "svd-gptq"
    format_version: int = FORMAT_VERSION
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.format_version not in SUPPORTED_FORMAT_VERSIONS:
            raise TwinQuantFormatError(
                f"quantization_config.format_version = {self.format_version!r}: this "
                f"vllm-twinquant reads versions {list(SUPPORTED_FORMAT_VERSIONS)}"
            )
        if self.weight_bits not in SUPPORTED_WEIGHT_BITS:
            raise TwinQuantFormatError(
                f"quantization_config.weight_bits = {self.weight_bits!r}: expected one of "
                f"{list(SUPPORTED_WEIGHT_BITS)}"
            )
        if self.group_size not in SUPPORTED_GROUP_SIZES:
            raise TwinQuantFormatError(
                f"quantization_config.group_size = {self.group_size!r}: expected one of "
                f"{list(SUPPORTED_GROUP_SIZES)}"
            )
        if self.symmetric is not True:
            raise TwinQuantFormatError(
                "quantization_config.symmetric = false: format v1 stores symmetric residuals "
                "only (no zero points)"
            )
        if self.activation_bits not in SUPPORTED_ACTIVATION_BITS:
            raise TwinQuantFormatError(
                f"quantization_config.activation_bits = {self.activation_bits!r}: expected one of "
                f"{list(SUPPORTED_ACTIVATION_BITS)} (16: W4A16; 8 and 4: the residual's input quantized per token)"
            )
        if self.activation_type not in ACTIVATION_TYPES:
            raise TwinQuantFormatError(
                f"quantization_config.activation_type = {self.activation_type!r}: expected one of "
                f"{list(ACTIVATION_TYPES)}"
            )
        if self.activation_type == "float" and self.activation_bits != 8:
            raise TwinQuantFormatError(
                f"quantization_config.activation_type = 'float' needs activation_bits 8 (FP8 e4m3), "
                f"got {self.activation_bits}"
            )
        if not isinstance(self.activation_clip_ratio, (int, float)) or not 0 < self.activation_clip_ratio <= 1:
            raise TwinQuantFormatError(
                f"quantization_config.activation_clip_ratio = {self.activation_clip_ratio!r}: "
                "expected a number in (0, 1]"
            )
        if self.activation_clip_ratio != 1 and self.activation_bits != 4:
            raise TwinQuantFormatError(
                f"quantization_config.activation_clip_ratio = {self.activation_clip_ratio!r} needs activation_bits 4 "
                "(it sets the per-token 4-bit activation scale)"
            )
        if not isinstance(self.online_hadamard, list) or not all(
            isinstance(m, str) and m for m in self.online_hadamard
        ):
            raise TwinQuantFormatError(
                f"quantization_config.online_hadamard = {self.online_hadamard!r}: expected a list of module "
                "names, e.g. [\"o_proj\", \"down_proj\"]"
            )
        self._check_subspace()
        for name, r in [("rank", self.rank), *self.rank_overrides.items()]:
            if not isinstance(r, int) or r < 0:
                raise TwinQuantFormatError(f"quantization_config rank for {name!r} = {r!r}: expected an integer >= 0")
        if self.lowrank_dtype not in LOWRANK_DTYPES:
            raise TwinQuantFormatError(
                f"quantization_config.lowrank_dtype = {self.lowrank_dtype!r}: expected one of {list(LOWRANK_DTYPES)}"
            )
        self.lowrank_torch_dtype = torch.int8 if self.lowrank_dtype == "int8" else FLOAT_DTYPES[self.lowrank_dtype]
        self.scale_torch_dtype = _dtype(self.scale_dtype, "scale_dtype")

    def _check_subspace(self) -> None:
        c, mods = self.activation_subspace_channels, self.activation_subspace_modules
        if not isinstance(c, int) or c < 0:
            raise TwinQuantFormatError(
                f"quantization_config.activation_subspace_channels = {c!r}: expected an integer >= 0"
            )
        if self.activation_subspace_bits not in (8, 16):
            raise TwinQuantFormatError(
                f"quantization_config.activation_subspace_bits = {self.activation_subspace_bits!r}: expected 8 or 16"
            )
        if not isinstance(mods, list) or not all(isinstance(m, str) and m for m in mods):
            raise TwinQuantFormatError(
                f"quantization_config.activation_subspace_modules = {mods!r}: expected a list of module names"
            )
        if c and (self.activation_bits != 4 or not mods):
            raise TwinQuantFormatError(
                f"quantization_config.activation_subspace_channels = {c} needs activation_bits 4 and a non-empty "
                "activation_subspace_modules (the layers whose last inputs are kept at activation_subspace_bits)"
            )
        both = sorted(set(mods) & set(self.online_hadamard))
        if c and both:
            raise TwinQuantFormatError(
                f"quantization_config: {both} are in both online_hadamard and activation_subspace_modules; the "
                "subspace is defined in the basis the stored weights already act on, so a layer has one or the other"
            )

    # -- (de)serialisation ---------------------------------------------------------------
    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> TwinQuantSpec:
        method = cfg.get("quant_method")
        if method != QUANT_METHOD:
            raise TwinQuantFormatError(
                f"quantization_config.quant_method = {method!r}: expected {QUANT_METHOD!r} "
                "(make a TwinQuant checkpoint with `twinquant-quantize`)"
            )
        if "format_version" not in cfg:
            raise TwinQuantFormatError("quantization_config.format_version is missing")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(cfg) - known - {"quant_method"})
        if unknown:
            raise TwinQuantFormatError(f"quantization_config has unknown keys {unknown}")
        kwargs = {k: v for k, v in cfg.items() if k in known}
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"quant_method": QUANT_METHOD}
        for name in self.__dataclass_fields__:
            out[name] = getattr(self, name)
        return out

    # -- queries ---------------------------------------------------------------------------
    def is_skipped(self, module_name: str) -> bool:
        """True for modules kept in the source precision (matched as a name component)."""
        parts = module_name.split(".")
        for skip in self.modules_to_not_convert:
            sp = skip.split(".")
            for i in range(len(parts) - len(sp) + 1):
                if parts[i : i + len(sp)] == sp:
                    return True
        return False

    @staticmethod
    def _ends_with_any(module_name: str, names: list[str]) -> bool:
        """True when the module name ends with one of `names` on whole name components."""
        parts = module_name.split(".")
        return any(parts[-len(m.split(".")):] == m.split(".") for m in names)

    def has_online_hadamard(self, module_name: str) -> bool:
        """True when the layer's input is rotated online (its stored weights act on H x)."""
        return self._ends_with_any(module_name, self.online_hadamard)

    def subspace_channels_for(self, module_name: str) -> int:
        """How many of the layer's last input columns its residual product takes at
        activation_subspace_bits instead of activation_bits (ResQ's high-variance subspace)."""
        hit = self._ends_with_any(module_name, self.activation_subspace_modules)
        return self.activation_subspace_channels if hit else 0

    def rank_for(self, module_name: str) -> int:
        return int(self.rank_overrides.get(module_name, self.rank))

    def effective_bits(self, out_features: int, in_features: int, rank: int) -> float:
        """Stored bits per weight of one layer: codes + scales + both low-rank factors."""
        n, k = out_features, in_features
        sc_bits = torch.finfo(self.scale_torch_dtype).bits
        total = n * k * self.weight_bits + n * (k // self.group_size) * sc_bits
        if self.lowrank_dtype == "int8":
            total += rank * (n + k) * 8 + (rank + n) * 32 if rank else 0
        else:
            total += rank * (n + k) * torch.finfo(self.lowrank_torch_dtype).bits
        return total / (n * k)


def tensor_specs(
    prefix: str, out_features: int, in_features: int, rank: int, spec: TwinQuantSpec
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of every tensor a quantized linear layer stores."""
    check_layer_shape(prefix, out_features, in_features, spec.group_size)
    n, k = out_features, in_features
    out = {
        f"{prefix}.{WEIGHT_PACKED}": ((n, k // PACK_FACTOR), torch.int32),
        f"{prefix}.{WEIGHT_SCALE}": ((n, k // spec.group_size), spec.scale_torch_dtype),
    }
    if rank > 0:
        out[f"{prefix}.{LOWRANK_DOWN}"] = ((rank, k), spec.lowrank_torch_dtype)
        out[f"{prefix}.{LOWRANK_UP}"] = ((n, rank), spec.lowrank_torch_dtype)
        if spec.lowrank_dtype == "int8":
            out[f"{prefix}.{LOWRANK_DOWN_SCALE}"] = ((rank,), torch.float32)
            out[f"{prefix}.{LOWRANK_UP_SCALE}"] = ((n,), torch.float32)
    return out


def check_layer_shape(prefix: str, out_features: int, in_features: int, group_size: int) -> None:
    if in_features % group_size != 0:
        raise TwinQuantFormatError(
            f"{prefix}: group_size {group_size} does not divide in_features {in_features}"
        )
    if in_features % PACK_FACTOR != 0:
        raise TwinQuantFormatError(f"{prefix}: in_features {in_features} is not a multiple of {PACK_FACTOR}")


# -- the residual's codes ------------------------------------------------------------------
def residual_quant_args(group_size: int):
    """The residual's quantization in compressed-tensors' terms (int4, symmetric, per group)."""
    from compressed_tensors.quantization import QuantizationArgs

    g = int(group_size)
    return QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=g)


def pack_codes(q: torch.Tensor) -> torch.Tensor:
    """int8 codes in [-8, 7], [N, K] -> int32 [N, K/8] (compressed-tensors pack-quantized)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    if q.dtype != torch.int8 or q.min() < -8 or q.max() > 7:
        raise TwinQuantFormatError("pack_codes expects int8 codes in [-8, 7]")
    return pack_to_int32(q, num_bits=4, packed_dim=1)


def unpack_codes(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """int32 [N, K/8] -> int8 codes in [-8, 7], [N, K]."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    return unpack_from_int32(packed, 4, torch.Size([packed.shape[0], in_features]), packed_dim=1)


def dequantize_residual(
    packed: torch.Tensor, scale: torch.Tensor, group_size: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """deq(R)[n, k] = code[n, k] * scale[n, k // G]."""
    k = packed.shape[1] * PACK_FACTOR
    q = unpack_codes(packed, k).to(dtype)
    return (q.view(q.shape[0], -1, group_size) * scale.to(dtype)[:, :, None]).view(q.shape[0], k)


def reference_linear(x, packed, scale, group_size, down=None, up=None, bias=None, dtype=torch.float64):
    """(down and up as values: dequantize int8 factors first, `dequantize_lowrank`.)"""
    """The layer's meaning, in high precision: the reference every kernel is tested against."""
    w = dequantize_residual(packed, scale, group_size, dtype)
    xd = x.to(dtype)
    y = xd @ w.T
    if down is not None and down.shape[0] > 0:
        y = y + (xd @ down.to(dtype).T) @ up.to(dtype).T
    if bias is not None:
        y = y + bias.to(dtype)
    return y


# -- the low-rank factors ------------------------------------------------------------------
def int8_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: (codes, float32 scales) with scale = max|row| / 127."""
    t = t.float()
    s = (t.abs().amax(1) / INT8_MAX).clamp_min(1e-30)
    return torch.round(t / s[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8), s


def round_lowrank(up: torch.Tensor, down: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors (U [N, r], D [r, K]) as a checkpoint of this low-rank dtype stores them.
    bf16/fp16: cast. int8: the product U D is first rebalanced so that every column of U has
    unit RMS (U -> U c^-1, D -> c D, exact in real arithmetic): a row of U then mixes
    components of equal size under its one scale, and D's per-row scales absorb the spread of
    the singular values. Returned in float32, every row on its int8 grid (`lowrank_tensors`
    stores it exactly)."""
    if dtype != torch.int8:
        return up.to(dtype), down.to(dtype)
    up, down = up.float(), down.float()
    c = up.pow(2).mean(0).sqrt()
    c = torch.where(c > 0, c, torch.ones_like(c))
    return dequantize_lowrank(*int8_rows(up / c)), dequantize_lowrank(*int8_rows(down * c[:, None]))


def lowrank_tensors(prefix: str, up: torch.Tensor, down: torch.Tensor, spec: TwinQuantSpec) -> dict[str, torch.Tensor]:
    """The stored tensors of a layer's factors, already rounded by `round_lowrank`."""
    if spec.lowrank_dtype != "int8":
        return {f"{prefix}.{LOWRANK_DOWN}": down.to(spec.lowrank_torch_dtype).contiguous(),
                f"{prefix}.{LOWRANK_UP}": up.to(spec.lowrank_torch_dtype).contiguous()}
    out = {}
    for name, scale_name, t in ((LOWRANK_DOWN, LOWRANK_DOWN_SCALE, down), (LOWRANK_UP, LOWRANK_UP_SCALE, up)):
        q, s = int8_rows(t)
        if not torch.allclose(dequantize_lowrank(q, s), t.float(), rtol=1e-5,
                              atol=1e-6 * float(t.abs().max().clamp_min(1e-30))):
            raise TwinQuantFormatError(f"{prefix}.{name}: factor is not on its int8 grid (round it with round_lowrank)")
        out[f"{prefix}.{name}"] = q.contiguous()
        out[f"{prefix}.{scale_name}"] = s.contiguous()
    return out


def dequantize_lowrank(
    factor: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """A stored factor in `dtype`: codes * scale per row for int8, a cast otherwise."""
    if scale is None:
        return factor.to(dtype)
    return (factor.float() * scale.float()[:, None]).to(dtype)


# -- W4A4: online input rotation and per-token activation quantization --------------------
def hadamard_block_size(in_features: int) -> int:
    """Block of the online Hadamard transform: the largest power of two dividing in_features."""
    return in_features & -in_features


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Normalised Sylvester Hadamard matrix of order n (a power of two): symmetric, H @ H = I."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard order {n} is not a power of two")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / n**0.5).to(dtype=dtype, device=device)


def apply_online_hadamard(x: torch.Tensor, block: int | None = None, h: torch.Tensor | None = None) -> torch.Tensor:
    """x @ blockdiag(H_b, ..., H_b) over the last dimension, b = `block` or, by default,
    hadamard_block_size(K) (the block is always that of the layer's full in_features: a
    tensor-parallel shard of the input must hold whole blocks). Orthogonal and symmetric, so a
    layer y = x W^T is served exactly as (x H) (W H)^T."""
    k = x.shape[-1]
    b = block or hadamard_block_size(k)
    if k % b:
        raise ValueError(f"online Hadamard block {b} does not divide {k} input columns")
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    h = hadamard_matrix(b, work, x.device) if h is None else h.to(work)  # h: this H_b, made once by a caller
    return (x.to(work).reshape(*x.shape[:-1], k // b, b) @ h).reshape(x.shape).to(x.dtype)


def _divide(a: torch.Tensor, b: float) -> torch.Tensor:
    """a / b correctly rounded on every device: torch on CUDA divides by a Python number as a product with
    its rounded reciprocal (one ulp off for some a), so the divisor is a tensor of a's shape."""
    return a / torch.full_like(a, b)


def per_token_codes(x: torch.Tensor, bits: int, kind: str = "int",
                    clip_ratio: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token codes and scales (float32) of the residual product's input, x ~ codes * scale:
    kind "int": codes = clamp(round_half_even(x / s), -qmax, qmax), s = clip_ratio * max|x_token| / qmax,
    qmax = 2^(bits-1) - 1; kind "float" (bits 8): codes = e4m3(x / s) (round to nearest even),
    s = max|x_token| / 448. An all-zero token gets s = 1e-12 (codes 0)."""
    xf = x.float()
    amax = xf.abs().amax(-1, keepdim=True)
    if kind == "float":
        if bits != 8:
            raise ValueError(f"float activation codes are FP8 e4m3 (8 bits), not {bits}")
        s = _divide(amax, FP8_E4M3_MAX).clamp_min(1e-12)
        return (xf / s).to(torch.float8_e4m3fn).float(), s
    if kind != "int":
        raise ValueError(f"activation code kind {kind!r}: expected one of {list(ACTIVATION_TYPES)}")
    qmax = 2 ** (bits - 1) - 1
    s = _divide(amax * clip_ratio, qmax).clamp_min(1e-12)
    return torch.round(xf / s).clamp(-qmax, qmax), s


def quantize_activations(x: torch.Tensor, bits: int = 4, clip_ratio: float = 1.0,
                         subspace: int = 0, subspace_bits: int = 8, kind: str = "int", shards: int = 1) -> torch.Tensor:
    """Symmetric per-token fake quantization, codes * s of `per_token_codes` in x's dtype: for
    kind "int" clamp(round(x / s)) * s with s = clip_ratio * max|x_token| / (2^(b-1) - 1)
    (clip_ratio < 1 saturates the largest entries to make the step finer for the rest, as
    QuaRot's activation clipping); kind "float" (FP8 e4m3, bits 8, no clip) e4m3(x / s) * s.

    subspace > 0 (format: activation_subspace_channels): the last `subspace` columns are a
    separate per-token group at `subspace_bits` (8: symmetric, unclipped; 16: kept as they are)
    and the first K - subspace columns are quantized as above with their own scale (ResQ: the
    quantizer puts the high-variance principal directions of the layer's input there).

    shards > 1: the columns in that many equal parts, each quantized per token with its own scale: a
    row-parallel layer (o_proj, down_proj) under tensor parallelism, whose ranks each hold one part."""
    if shards > 1:
        if subspace or x.shape[-1] % shards:
            raise ValueError(f"{x.shape[-1]} input columns in {shards} tensor-parallel parts"
                             + (" with an activation subspace (it needs the whole input)" if subspace else ""))
        return torch.cat([quantize_activations(part, bits, clip_ratio, 0, subspace_bits, kind)
                          for part in x.chunk(shards, -1)], -1)
    if subspace:
        k = x.shape[-1]
        if not 0 < subspace < k:
            raise ValueError(f"activation subspace of {subspace} channels for a {k}-wide input")
        lo = quantize_activations(x[..., : k - subspace], bits, clip_ratio)
        hi = x[..., k - subspace:]
        if subspace_bits < 16:
            hi = quantize_activations(hi, subspace_bits, 1.0)
        return torch.cat([lo, hi], -1)
    q, s = per_token_codes(x, bits, kind, clip_ratio)
    return (q * s).to(x.dtype)


def effective_weights(tensors: dict[str, torch.Tensor], group_size: int,
                      online_hadamard: list[str] | tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """`{layer}.weight` -> U @ D + deq(R) (float32) for every quantized layer in a checkpoint's
    tensors: the dense weight a TwinQuant layer applies, for references outside vLLM. Layers
    named in `online_hadamard` get the rotation folded back, (U D + deq(R)) H, so the result acts
    on the unrotated input (activation quantization is not represented)."""
    spec = TwinQuantSpec(online_hadamard=list(online_hadamard))
    out = {}
    for key in tensors:
        if not key.endswith("." + WEIGHT_PACKED):
            continue
        layer = key[: -len(WEIGHT_PACKED) - 1]
        w = dequantize_residual(tensors[key], tensors[f"{layer}.{WEIGHT_SCALE}"], group_size)
        if f"{layer}.{LOWRANK_DOWN}" in tensors:
            up = dequantize_lowrank(tensors[f"{layer}.{LOWRANK_UP}"], tensors.get(f"{layer}.{LOWRANK_UP_SCALE}"))
            w = w + up @ dequantize_lowrank(
                tensors[f"{layer}.{LOWRANK_DOWN}"], tensors.get(f"{layer}.{LOWRANK_DOWN_SCALE}")
            )
        if spec.has_online_hadamard(layer):
            w = apply_online_hadamard(w)  # (W H) H = W, row by row
        out[f"{layer}.weight"] = w
    return out


# -- checkpoint files ----------------------------------------------------------------------
def read_safetensors_header(path: str) -> dict[str, Any]:
    """Parse one safetensors header, checking that the file holds every byte it promises."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise TwinQuantFormatError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            raise TwinQuantFormatError(f"{path}: truncated safetensors file (header of {n} bytes, file of {size})")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise TwinQuantFormatError(f"{path}: unreadable safetensors header ({e})") from None
    header.pop("__metadata__", None)
    end = max((t["data_offsets"][1] for t in header.values()), default=0)
    if 8 + n + end > size:
        raise TwinQuantFormatError(
            f"{path}: truncated safetensors file: its tensors need {8 + n + end} bytes, the file has {size}"
        )
    return header


def _read_config(model_dir: str) -> dict[str, Any]:
    cfg_path = os.path.join(model_dir, "config.json")
    try:
        with open(cfg_path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise TwinQuantFormatError(f"{cfg_path}: not found") from None


def load_spec(model_dir: str) -> TwinQuantSpec:
    return _spec_of(_read_config(model_dir), model_dir)


def _spec_of(cfg: dict[str, Any], model_dir: str) -> TwinQuantSpec:
    qc = cfg.get("quantization_config")
    if qc is None:
        raise TwinQuantFormatError(
            f"{os.path.join(model_dir, 'config.json')}: no quantization_config; this is not a TwinQuant checkpoint "
            "(make one with `twinquant-quantize`)"
        )
    return TwinQuantSpec.from_dict(qc)


def declare_activations(model_dir: str, bits: int, kind: str = "int", **fields) -> None:
    """Re-declare a checkpoint's residual-product input (`activation_bits` / `activation_type`, and any other
    activation field of TwinQuantSpec in `fields`, e.g. activation_clip_ratio) by editing its config.json alone:
    the codes and factors serve every 8- and 16-bit declaration (a 4-bit one whose `online_hadamard` layers
    were not quantized rotated computes another function: fit for kernel checks, not for serving). The recipe
    name records the change. Raises TwinQuantFormatError for a declaration the format does not have."""
    cfg_path = os.path.join(model_dir, "config.json")
    load_spec(model_dir)  # a TwinQuant checkpoint to begin with
    unknown = sorted(set(fields) - {f for f in TwinQuantSpec.__dataclass_fields__ if "activation" in f or
                                    f == "online_hadamard"})
    if unknown:
        raise TwinQuantFormatError(f"declare_activations: {unknown} are not activation fields of the format")
    with open(cfg_path) as f:
        cfg = json.load(f)
    q = cfg["quantization_config"]
    new = {"activation_bits": bits, "activation_type": kind, **fields}
    TwinQuantSpec.from_dict({**q, **new})
    if any(q.get(k, getattr(TwinQuantSpec, k, None)) != v for k, v in new.items()):
        q.update(new, recipe=f"{q.get('recipe')}+declared-a{bits}-{kind}")
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2)


def checkpoint_tensors_of_file(path: str) -> dict[str, tuple[str, tuple[int, ...], torch.dtype]]:
    """name -> (file, shape, dtype) of one safetensors file."""
    return {name: (path, tuple(meta["shape"]), SAFETENSORS_DTYPES.get(meta["dtype"], meta["dtype"]))
            for name, meta in read_safetensors_header(path).items()}


def checkpoint_tensors(model_dir: str) -> dict[str, tuple[str, tuple[int, ...], torch.dtype]]:
    """name -> (file, shape, dtype) over every *.safetensors file of a checkpoint directory."""
    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if not files:
        raise TwinQuantFormatError(f"{model_dir}: no *.safetensors files")
    out = {}
    for fn in files:
        out.update(checkpoint_tensors_of_file(os.path.join(model_dir, fn)))
    return out


def validate_checkpoint(model_dir: str, check_values: bool = True) -> TwinQuantSpec:
    """Check a checkpoint directory against format v1; raise TwinQuantFormatError naming
    the file, tensor and what was expected. Returns the parsed spec."""
    cfg = _read_config(model_dir)
    spec = _spec_of(cfg, model_dir)
    tensors = checkpoint_tensors(model_dir)
    prefixes = sorted({n[: -len(WEIGHT_PACKED) - 1] for n in tensors if n.endswith("." + WEIGHT_PACKED)})
    if not prefixes:
        raise TwinQuantFormatError(f"{model_dir}: no tensor named *.{WEIGHT_PACKED}: no quantized layer")
    for name in tensors:  # a stray low-rank factor or scale without its codes
        for suf in QUANTIZED_SUFFIXES[1:]:
            if name.endswith("." + suf) and name[: -len(suf) - 1] not in prefixes:
                raise TwinQuantFormatError(
                    f"{tensors[name][0]}: tensor {name} has no {name[: -len(suf) - 1]}.{WEIGHT_PACKED}"
                )
    for prefix in prefixes:  # first the layout-wide rules, so their errors name the real cause
        path, pshape, _ = tensors[f"{prefix}.{WEIGHT_PACKED}"]
        if spec.is_skipped(prefix):
            raise TwinQuantFormatError(
                f"{path}: tensor {prefix}.{WEIGHT_PACKED} is quantized, but quantization_config.modules_to_not_convert "
                f"{spec.modules_to_not_convert} keeps {prefix} in the source precision"
            )
        if len(pshape) != 2:
            raise TwinQuantFormatError(
                f"{path}: tensor {prefix}.{WEIGHT_PACKED} has shape {list(pshape)}, expected [N, K/8]"
            )
        if (pshape[1] * PACK_FACTOR) % spec.group_size:
            raise TwinQuantFormatError(
                f"{path}: quantization_config.group_size {spec.group_size} does not divide in_features "
                f"{pshape[1] * PACK_FACTOR} of {prefix}"
            )
    if not spec.is_skipped(LM_HEAD):
        if LM_HEAD not in prefixes:
            raise TwinQuantFormatError(
                f"{model_dir}: quantization_config.modules_to_not_convert {spec.modules_to_not_convert} leaves "
                f"{LM_HEAD} out, so it is served quantized, but the checkpoint has no tensor {LM_HEAD}.{WEIGHT_PACKED}"
            )
        if cfg.get("tie_word_embeddings", False):
            raise TwinQuantFormatError(
                f"{os.path.join(model_dir, 'config.json')}: tie_word_embeddings is true, but {LM_HEAD} is quantized: "
                "a quantized lm_head is stored untied from the embeddings (tie_word_embeddings: false)"
            )
    for prefix in prefixes:
        pshape = tensors[f"{prefix}.{WEIGHT_PACKED}"][1]
        n, k = pshape[0], pshape[1] * PACK_FACTOR
        rank = spec.rank_for(prefix)
        sub = spec.subspace_channels_for(prefix)
        if sub and not sub < k:
            raise TwinQuantFormatError(
                f"{tensors[f'{prefix}.{WEIGHT_PACKED}'][0]}: quantization_config.activation_subspace_channels {sub} "
                f"is not below in_features {k} of {prefix}"
            )
        expected = tensor_specs(prefix, n, k, rank, spec)
        for name, (shape, dtype) in expected.items():
            if name not in tensors:
                raise TwinQuantFormatError(
                    f"{model_dir}: missing tensor {name} (expected {dtype} {list(shape)}, rank {rank})"
                )
            f, got_shape, got_dtype = tensors[name]
            if got_shape != shape or got_dtype != dtype:
                raise TwinQuantFormatError(
                    f"{f}: tensor {name} is {got_dtype} {list(got_shape)}, expected {dtype} {list(shape)}"
                )
        for suf in LOWRANK_TENSORS:
            name = f"{prefix}.{suf}"
            if name in tensors and name not in expected:
                why = f"the config gives {prefix} rank 0" if rank == 0 else f"lowrank_dtype is {spec.lowrank_dtype!r}"
                raise TwinQuantFormatError(f"{tensors[name][0]}: tensor {name} present but {why}")
    if check_values:
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for name, (f, _, _) in tensors.items():
            if name.endswith("." + WEIGHT_SCALE) or any(name.endswith("." + t) for t in LOWRANK_TENSORS):
                by_file.setdefault(f, []).append(name)
        for f, names in by_file.items():
            with safe_open(f, "pt") as sf:
                for name in names:
                    check_finite(sf.get_tensor(name), name, f)
    return spec


def check_finite(t: torch.Tensor, name: str, where: str = "") -> None:
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise TwinQuantFormatError(f"{where + ': ' if where else ''}tensor {name} has {bad} NaN/inf values")
