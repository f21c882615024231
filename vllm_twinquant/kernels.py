"""How a TwinQuant linear layer is executed: a small `can_implement` interface in the
style of vLLM's mixed-precision linear kernels, and the two implementations.

* `TritonTwinQuantKernel` (CUDA, fp16/bf16): the fused dual-component kernel of
  `csrc_triton`, behind one custom op so that torch.compile and CUDA graphs see a
  single opaque call.
* `TorchTwinQuantKernel` (any device, the CPU path): dequantize and matmul in torch.

`VLLM_TWINQUANT_KERNEL=torch|triton` forces one.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from vllm_twinquant import format as fmt


@dataclass(frozen=True)
class TwinQuantLayerConfig:
    in_features: int  # this rank's input columns
    slot_sizes: tuple[int, ...]  # this rank's output rows per sub-layer (q/k/v, gate/up)
    rank: int  # low-rank width of every slot (0: residual only)
    group_size: int
    act_dtype: torch.dtype
    activation_bits: int = 16  # 4: the residual's input is quantized per token (W4A4, simulated)
    activation_clip: float = 1.0  # the per-token scale is activation_clip * max|x| / 7
    online_hadamard: int = 0  # block size of the Hadamard rotation applied to the input first (0: none)
    activation_subspace: int = 0  # W4A4: the last this-many input columns are quantized apart (ResQ)
    activation_subspace_bits: int = 8  # ... at this width (16: not quantized)
    int8_lowrank: bool = False  # factors int8 with fp32 row scales (lowrank_down_scale, lowrank_up_scale)

    @property
    def out_features(self) -> int:
        return sum(self.slot_sizes)

    @property
    def slot_bounds(self) -> tuple[int, ...]:
        """First output row of every slot after the first."""
        out, acc = [], 0
        for s in self.slot_sizes[:-1]:
            acc += s
            out.append(acc)
        return tuple(out)


def _factor_scales(layer: torch.nn.Module, c: TwinQuantLayerConfig):
    """(down_scale, up_scale) of int8 factors; (None, None) for float ones."""
    if not c.int8_lowrank:
        return None, None
    return getattr(layer, fmt.LOWRANK_DOWN_SCALE), getattr(layer, fmt.LOWRANK_UP_SCALE)


class TwinQuantKernel(ABC):
    def __init__(self, c: TwinQuantLayerConfig) -> None:
        ok, why = self.can_implement(c)
        assert ok, why
        self.config = c

    @classmethod
    @abstractmethod
    def can_implement(cls, c: TwinQuantLayerConfig) -> tuple[bool, str | None]:
        raise NotImplementedError

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:  # noqa: B027
        pass

    @abstractmethod
    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError


class TorchTwinQuantKernel(TwinQuantKernel):
    """Reference execution in torch; runs wherever torch does (vLLM's CPU backend). The only
    path for W4A4 checkpoints: the online Hadamard rotation and the per-token 4-bit quantization
    of the residual's input are simulated in the activation dtype (no int4 GEMM yet); the
    low-rank branch reads the unquantized (rotated) input, as in SVDQuant."""

    @classmethod
    def can_implement(cls, c):
        return True, None  # (a shard that splits Hadamard blocks is refused in create_weights)

    def apply(self, layer, x, bias):
        c = self.config
        if c.online_hadamard:
            x = fmt.apply_online_hadamard(x, c.online_hadamard)
        xr = x
        if c.activation_bits < 16:
            xr = fmt.quantize_activations(x, c.activation_bits, c.activation_clip,
                                          c.activation_subspace, c.activation_subspace_bits)
        w = fmt.dequantize_residual(layer.weight_packed, layer.weight_scale, c.group_size, x.dtype)
        y = torch.nn.functional.linear(xr, w, bias)
        if c.rank:
            ds, us = _factor_scales(layer, c)
            t = x @ fmt.dequantize_lowrank(layer.lowrank_down, ds, x.dtype).t()
            up = fmt.dequantize_lowrank(layer.lowrank_up, us, x.dtype)
            bounds = (0, *c.slot_bounds, c.out_features)
            for s in range(len(bounds) - 1):
                a, b = bounds[s], bounds[s + 1]
                y[..., a:b] += t[..., s * c.rank : (s + 1) * c.rank] @ up[a:b].t()
        return y


class TritonTwinQuantKernel(TwinQuantKernel):
    """The fused dual-component Triton kernel (csrc_triton/twinquant_gemm.py)."""

    @classmethod
    def can_implement(cls, c):
        if not torch.cuda.is_available():
            return False, "needs CUDA"
        if c.act_dtype not in (torch.float16, torch.bfloat16):
            return False, f"activations in {c.act_dtype}; the kernel takes fp16/bf16"
        if c.activation_bits != 16 or c.online_hadamard or c.activation_subspace:
            return False, "W4A4 (activation_bits 4, online Hadamard) has no Triton kernel yet"
        if len(c.slot_sizes) > 3:
            return False, "more than three sub-layers in one merged layer"
        if c.rank and len(c.slot_sizes) > 1:
            from csrc_triton.twinquant_gemm import max_block_n_for

            if max_block_n_for((c.out_features, *c.slot_bounds)) < 16 or any(s % 16 for s in c.slot_sizes):
                return False, f"sub-layer sizes {c.slot_sizes} are not multiples of 16"
        return True, None

    def process_weights_after_loading(self, layer):
        # once, losslessly: the column order the kernels read (csrc_triton.twinquant_gemm.repack)
        from csrc_triton.twinquant_gemm import repack

        layer.weight_packed.data = repack(layer.weight_packed.data, self.config.group_size)
        # the split-K scratch of the tensor-core decode kernel and of MODE 10, allocated now
        # rather than during CUDA-graph capture (shared by the layers of a device; all zero
        # between calls)
        from csrc_triton.twinquant_gemm import split_scratch_tokens

        n, k = layer.weight_packed.shape[0], layer.weight_packed.shape[1] * 8
        device = layer.weight_packed.device
        tokens = split_scratch_tokens(device, self.config.act_dtype, self.config.group_size, k)
        if tokens:
            from csrc_triton.twinquant_mma import scratch

            scratch(device, n, tokens)

    def apply(self, layer, x, bias):
        c = self.config
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        down = layer.lowrank_down if c.rank else None
        up = layer.lowrank_up if c.rank else None
        ds, us = _factor_scales(layer, c)
        y = torch.ops.twinquant.linear(
            x2, layer.weight_packed, layer.weight_scale, down, up, bias, c.group_size, list(c.slot_bounds), ds, us
        )
        return y.reshape(*shape[:-1], c.out_features)


_KERNELS: list[type[TwinQuantKernel]] = [TritonTwinQuantKernel, TorchTwinQuantKernel]


def choose_kernel(c: TwinQuantLayerConfig) -> type[TwinQuantKernel]:
    forced = os.environ.get("VLLM_TWINQUANT_KERNEL")
    reasons = []
    for k in _KERNELS:
        if forced and not k.__name__.lower().startswith(forced.lower()):
            continue
        ok, why = k.can_implement(c)
        if ok:
            return k
        reasons.append(f"{k.__name__}: {why}")
    raise ValueError(f"no TwinQuant kernel can run {c}: " + "; ".join(reasons))


def _register_custom_op() -> None:
    if hasattr(torch.ops, "twinquant") and hasattr(torch.ops.twinquant, "linear"):
        return

    @torch.library.custom_op("twinquant::linear", mutates_args=())
    def linear(
        x: torch.Tensor,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        down: torch.Tensor | None,
        up: torch.Tensor | None,
        bias: torch.Tensor | None,
        group_size: int,
        slot_bounds: list[int],
        down_scale: torch.Tensor | None = None,
        up_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        from csrc_triton.twinquant_gemm import tq_linear

        return tq_linear(x, qweight, scales, group_size, down, up, bias, tuple(slot_bounds),
                         down_scale=down_scale, up_scale=up_scale)

    @linear.register_fake
    def _(x, qweight, scales, down, up, bias, group_size, slot_bounds, down_scale=None, up_scale=None):
        return x.new_empty((x.shape[0], qweight.shape[0]))


_register_custom_op()
