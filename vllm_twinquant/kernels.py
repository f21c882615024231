"""How a TwinQuant linear layer is executed: the layer kernels, in the style of vLLM's
mixed-precision linear kernels (`can_implement` with a reason, a priority list, one log line per
layer kind saying which kernel runs it).

Priority (`KERNELS`), first that can implement the layer:
* `triton` (CUDA, fp16/bf16; W4A16, and W4A8 on GPUs with FP8 (sm_89+) or INT8 (sm_80+) tensor
  cores): the fused dual-component kernels of `csrc_triton`, behind one
  custom op (`twinquant::linear`) so that torch.compile and CUDA graphs see a single opaque call;
  inside it, `csrc_triton.dispatch` picks the CUDA kernel per token count (logged once per layer shape).
* `cpu_int4pack` (vLLM's CPU build, bf16): PyTorch's 4-bit CPU GEMM for the residual.
* `cpu_wna16` (vLLM's CPU build, fp16/bf16): vLLM's own 4-bit CPU GEMM for the residual.
* `torch` (any device; the reference, and the path for float32, W4A4, and W4A8 where the
  `triton` kernels cannot run it): dequantize and
  matmul in torch.
TWINQUANT_DISABLED_KERNELS (vllm_twinquant/envs.py) removes kernels from the list, at this
level and in the CUDA plan.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from vllm_twinquant import envs
from vllm_twinquant import format as fmt

log = logging.getLogger("vllm.twinquant")


@dataclass(frozen=True)
class TwinQuantLayerConfig:
    in_features: int  # this rank's input columns
    slot_sizes: tuple[int, ...]  # this rank's output rows per sub-layer (q/k/v, gate/up)
    rank: int  # low-rank width of every slot (0: residual only)
    group_size: int
    act_dtype: torch.dtype
    activation_bits: int = 16  # 8, 4: the residual's input is quantized per token (format.per_token_codes)
    activation_type: str = "int"  # "float": FP8 e4m3 codes (activation_bits 8)
    activation_clip: float = 1.0  # 4 bits: the per-token scale is activation_clip * max|x| / 7
    online_hadamard: int = 0  # block size of the Hadamard rotation applied to the input first (0: none)
    activation_subspace: int = 0  # W4A4: the last this-many input columns are quantized apart (ResQ)
    activation_subspace_bits: int = 8  # ... at this width (16: not quantized)
    int8_lowrank: bool = False  # factors int8 with fp32 row scales (lowrank_down_scale, lowrank_up_scale)
    name: str = ""  # the layer's module name, for the log

    @property
    def out_features(self) -> int:
        return sum(self.slot_sizes)

    @property
    def act_quant(self) -> str:
        """The CUDA kernels' name for the residual input's precision: "none", "fp8", "int8", or "int4"
        (W4A4's codes, on the INT8 kernels; other precisions have no CUDA kernel)."""
        if self.activation_bits == 16:
            return "none"
        return {(8, "float"): "fp8", (8, "int"): "int8"}.get((self.activation_bits, self.activation_type),
                                                             f"int{self.activation_bits}")

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
    name = ""  # what TWINQUANT_DISABLED_KERNELS and the log call it

    def __init__(self, c: TwinQuantLayerConfig) -> None:
        ok, why = self.can_implement(c)
        assert ok, why
        self.config = c

    @classmethod
    @abstractmethod
    def can_implement(cls, c: TwinQuantLayerConfig) -> tuple[bool, str | None]:
        raise NotImplementedError

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Once, at load: every tensor that `apply` reads and does not take from the checkpoint is made now, on
        the layer's device (a tensor made during a forward is a host-to-device copy in the compiled graph, which a
        CUDA-graph capture refuses). Kernels that override this call it first."""
        if self.config.online_hadamard:  # W4A4 before o_proj/down_proj
            layer.register_buffer("online_hadamard", _hadamard(self.config.online_hadamard, layer.weight_packed.device),
                                  persistent=False)

    @abstractmethod
    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError


class TorchTwinQuantKernel(TwinQuantKernel):
    """Reference execution in torch; runs wherever torch does (vLLM's CPU backend). The path for
    W4A4 and for W4A8 off the GPU: the online Hadamard rotation and the per-token quantization of
    the residual's input are simulated in the activation dtype (codes * scale, then a matmul);
    the low-rank branch reads the unquantized (rotated) input, as in SVDQuant."""

    name = "torch"

    @classmethod
    def can_implement(cls, c):
        return True, None  # (a shard that splits Hadamard blocks is refused in create_weights)

    def apply(self, layer, x, bias):
        c = self.config
        if c.online_hadamard:  # H from process_weights_after_loading; made here for a layer not loaded by vLLM
            x = fmt.apply_online_hadamard(x, c.online_hadamard, getattr(layer, "online_hadamard", None))
        xr = x
        if c.activation_bits < 16:
            xr = fmt.quantize_activations(x, c.activation_bits, c.activation_clip,
                                          c.activation_subspace, c.activation_subspace_bits, c.activation_type)
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


class CpuWna16TwinQuantKernel(TwinQuantKernel):
    """vLLM CPU build's 4-bit weight-only GEMM (`cpu_gemm_wna16`, the kernel of its CPUWNA16
    linear method: AVX-512/AMX, 16-bit activations) for the residual, reading the codes once per
    call instead of dequantizing the layer; the low-rank term in torch as two small matmuls
    (x D^T, then one product with U laid out block-diagonally over the merged layer's slots)."""

    name = "cpu_wna16"

    @classmethod
    def can_implement(cls, c):
        if torch.cuda.is_available():
            return False, "a CUDA device is present"
        try:
            from vllm.platforms import current_platform

            if not current_platform.is_cpu():
                return False, "vLLM's platform is not the CPU"
            import vllm._custom_ops  # noqa: F401  (loads the build's operators)

            op = torch.ops._C.cpu_gemm_wna16  # noqa: F841
        except (ImportError, AttributeError, RuntimeError):
            return False, "this vLLM build has no cpu_gemm_wna16 kernel"
        if c.act_dtype not in (torch.float16, torch.bfloat16):
            return (
                False,
                f"activations in {c.act_dtype}; the kernel takes float16/bfloat16 (serve with --dtype float16)",
            )
        if c.activation_bits != 16 or c.online_hadamard or c.activation_subspace:
            return False, "W4A8 and W4A4 checkpoints are served by the torch path"
        if c.in_features % 32 or c.out_features % 32 or c.group_size % 2:
            return False, f"layer {c.in_features} -> {c.out_features}: the kernel needs multiples of 32"
        return True, None

    def process_weights_after_loading(self, layer):
        from vllm.model_executor.kernels.linear.mixed_precision.cpu import _get_isa_hint
        from vllm.model_executor.layers.quantization.utils.quant_utils import pack_quantized_values_into_int32
        from vllm.scalar_type import scalar_types

        super().process_weights_after_loading(layer)
        c = self.config
        k = c.in_features
        biased = fmt.unpack_codes(layer.weight_packed.data, k).to(torch.int32) + 8  # uint4b8: code + 8
        # the kernel's layout: packed along the output, blocks of 16 output channels contiguous
        w = pack_quantized_values_into_int32(biased.t().contiguous(), scalar_types.uint4b8, 1)
        w = w.view(k, -1, 2).permute(1, 0, 2).reshape(-1, k * 2).contiguous()
        layer.weight_packed = torch.nn.Parameter(w, requires_grad=False)
        layer.weight_scale = torch.nn.Parameter(layer.weight_scale.data.t().contiguous().to(c.act_dtype),
                                                requires_grad=False)
        layer.twinquant_isa = _get_isa_hint(c.act_dtype)
        self._lowrank(layer)

    def _lowrank(self, layer) -> None:
        """The factors in the activation dtype, U block-diagonal over the slots: [N, slots * rank]."""
        if self.config.rank:
            down, up_bd = _dense_factors(layer, self.config)
            layer.lowrank_down = torch.nn.Parameter(down, requires_grad=False)
            layer.lowrank_up = torch.nn.Parameter(up_bd, requires_grad=False)

    def apply(self, layer, x, bias):
        c = self.config
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        y = torch.ops._C.cpu_gemm_wna16  # resolved here: the op exists only in vLLM's CPU build
        out = torch.empty(x2.shape[0], c.out_features, dtype=x.dtype)
        y(x2, layer.weight_packed, out, layer.weight_scale, None, bias, fmt.PACK_FACTOR, layer.twinquant_isa)
        if c.rank:
            out.addmm_(x2 @ layer.lowrank_down.t(), layer.lowrank_up.t())
        return out.reshape(*shape[:-1], c.out_features)


class CpuInt4PackTwinQuantKernel(CpuWna16TwinQuantKernel):
    """PyTorch's own 4-bit CPU GEMM (`aten._weight_int4pack_mm_for_cpu`, bf16 activations) for the
    residual, torch for the low-rank term (as CpuWna16TwinQuantKernel)."""

    name = "cpu_int4pack"

    @classmethod
    def can_implement(cls, c):
        if torch.cuda.is_available():
            return False, "a CUDA device is present"
        if c.act_dtype != torch.bfloat16:
            return False, f"activations in {c.act_dtype}; PyTorch's int4 CPU GEMM is fast in bfloat16 only"
        if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
            return False, "this PyTorch has no _weight_int4pack_mm_for_cpu"
        if c.activation_bits != 16 or c.online_hadamard or c.activation_subspace:
            return False, "W4A8 and W4A4 checkpoints are served by the torch path"
        if c.in_features % 32 or c.out_features % 32:
            return False, f"layer {c.in_features} -> {c.out_features}: the kernel needs multiples of 32"
        return True, None

    def process_weights_after_loading(self, layer):
        TwinQuantKernel.process_weights_after_loading(self, layer)  # the base's, not CpuWna16's packing
        c = self.config
        k = c.in_features
        biased = fmt.unpack_codes(layer.weight_packed.data, k).to(torch.int32) + 8  # (q + 8) * s - 8 s
        w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(biased.contiguous(), 1)
        layer.weight_packed = torch.nn.Parameter(w, requires_grad=False)
        s = layer.weight_scale.data.t().to(torch.bfloat16)
        layer.weight_scale = torch.nn.Parameter(torch.stack([s, torch.zeros_like(s)], -1).contiguous(),
                                                requires_grad=False)
        self._lowrank(layer)

    def apply(self, layer, x, bias):
        c = self.config
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, layer.weight_packed, c.group_size, layer.weight_scale)
        if c.rank:
            out.addmm_(x2 @ layer.lowrank_down.t(), layer.lowrank_up.t())
        if bias is not None:
            out += bias
        return out.reshape(*shape[:-1], c.out_features)


class TritonTwinQuantKernel(TwinQuantKernel):
    """The fused dual-component kernels of csrc_triton; csrc_triton.dispatch picks one per call."""

    name = "triton"

    @classmethod
    def can_implement(cls, c):
        if not torch.cuda.is_available():
            return False, "needs CUDA"
        if c.act_dtype not in (torch.float16, torch.bfloat16):
            return False, f"activations in {c.act_dtype}; the kernels take fp16/bf16"
        if c.act_quant not in ("none", "fp8", "int8", "int4"):
            return False, f"activations {c.activation_bits}-bit {c.activation_type}: no CUDA kernel"
        if c.activation_subspace and (c.in_features - c.activation_subspace) % c.group_size:
            return False, (f"an activation subspace of {c.activation_subspace} of {c.in_features} input columns does "
                           f"not start at a group boundary (group {c.group_size})")
        if c.act_quant != "none":  # W4A8: the plan's own kernel decides (device, precision, switches)
            from csrc_triton import Device
            from csrc_triton.dispatch import kernels

            ok, why = kernels()["w4a8"].can_implement(_layer_shape(_residual_config(c)),
                                                      Device.of(torch.device("cuda")))
            if not ok:
                return False, why
        if len(c.slot_sizes) > 3:
            return False, "more than three sub-layers in one merged layer"
        if c.rank and len(c.slot_sizes) > 1:
            from csrc_triton.layout import max_block_n_for

            if max_block_n_for((c.out_features, *c.slot_bounds)) < 16 or any(s % 16 for s in c.slot_sizes):
                return False, f"sub-layer sizes {c.slot_sizes} are not multiples of 16"
        return True, None

    def shape(self):
        """The residual kernel's layer (a subspace layer's first K - S columns, rank 0)."""
        return _layer_shape(_residual_config(self.config))

    def process_weights_after_loading(self, layer):
        import csrc_triton
        from csrc_triton.gluon_common import scratch
        from csrc_triton.kernels.base import t_scratch

        super().process_weights_after_loading(layer)
        if self.config.activation_subspace:
            _split_subspace(layer, self.config)
        # once, losslessly: the column order the kernels read (csrc_triton.layout.repack)
        layer.weight_packed.data = csrc_triton.repack(layer.weight_packed.data, self.config.group_size)
        device = csrc_triton.Device.of(layer.weight_packed.device)
        shape = self.shape()
        # the split-K scratch of the Gluon kernels, allocated now rather than during a CUDA-graph
        # capture (shared by the layers of a device; all zero between calls)
        tokens = csrc_triton.scratch_tokens(shape, device)
        if tokens:
            scratch(layer.weight_packed.device, shape.n, tokens)
        if shape.rank:  # and that of t made inside a decode kernel's launch (csrc_triton/kernels/base.py)
            t_scratch(layer.weight_packed.device)
        _log_once(("triton", self.config.name.rsplit(".", 1)[-1], shape),
                  lambda: csrc_triton.summary(self.config.name.rsplit(".", 1)[-1] or "layer", shape, device))

    def apply(self, layer, x, bias):
        c = self.config
        shape = x.shape
        if c.online_hadamard:
            x = fmt.apply_online_hadamard(x, c.online_hadamard, layer.online_hadamard)
        x2 = x.reshape(-1, shape[-1]).contiguous()
        if c.activation_subspace:
            return self._apply_subspace(layer, x2, bias).reshape(*shape[:-1], c.out_features)
        down = layer.lowrank_down if c.rank else None
        up = layer.lowrank_up if c.rank else None
        ds, us = _factor_scales(layer, c)
        y = torch.ops.twinquant.linear(
            x2, layer.weight_packed, layer.weight_scale, down, up, bias, c.group_size, list(c.slot_bounds), ds, us,
            c.act_quant, c.activation_clip,
        )
        return y.reshape(*shape[:-1], c.out_features)

    def _apply_subspace(self, layer, x2, bias):
        """A ResQ layer: the first K - S columns' 4-bit codes on the INT8 kernel (their own per-token scale),
        then one GEMM adds [x D^T, q8(x_S)] @ [U, deq(R_S)]^T: the low-rank term on the unquantized input and
        the last S columns at activation_subspace_bits against their residual columns (`_split_subspace`)."""
        c = self.config
        k_main = c.in_features - c.activation_subspace
        y = torch.ops.twinquant.linear(
            x2[:, :k_main].contiguous(), layer.weight_packed, layer.weight_scale, None, None, bias, c.group_size,
            list(c.slot_bounds), None, None, c.act_quant, c.activation_clip,
        )
        xs = x2[:, k_main:]
        if c.activation_subspace_bits < 16:
            xs = fmt.quantize_activations(xs, c.activation_subspace_bits, 1.0)
        t = torch.cat([x2 @ layer.lowrank_down.t(), xs], 1) if c.rank else xs
        return y.addmm_(t, layer.subspace_up.t())


def _residual_config(c: TwinQuantLayerConfig) -> TwinQuantLayerConfig:
    """What the residual kernel runs of a layer: itself, or for an activation subspace of S columns the first
    K - S input columns at rank 0 (the rest is one GEMM in `_apply_subspace`)."""
    if not c.activation_subspace:
        return c
    return dataclasses.replace(c, in_features=c.in_features - c.activation_subspace, rank=0, activation_subspace=0,
                               int8_lowrank=False)


def _split_subspace(layer: torch.nn.Module, c: TwinQuantLayerConfig) -> None:
    """A subspace layer's parameters for `_apply_subspace`, once at load: the codes and scales of the first
    K - S columns (weight_packed, weight_scale, still in checkpoint order), the down factor in the activation
    dtype, and subspace_up [N, slots * rank + S] = [U laid out block-diagonally over the slots, deq(R_S)]."""
    k_main = c.in_features - c.activation_subspace  # a multiple of the group size (can_implement)
    ups = [fmt.dequantize_residual(layer.weight_packed.data[:, k_main // fmt.PACK_FACTOR :],
                                   layer.weight_scale.data[:, k_main // c.group_size :], c.group_size, c.act_dtype)]
    if c.rank:
        down, up_bd = _dense_factors(layer, c)
        ups.insert(0, up_bd)
        layer.lowrank_down = torch.nn.Parameter(down, requires_grad=False)
    layer.subspace_up = torch.nn.Parameter(torch.cat(ups, 1).contiguous(), requires_grad=False)
    layer.weight_packed = torch.nn.Parameter(layer.weight_packed.data[:, : k_main // fmt.PACK_FACTOR].contiguous(),
                                             requires_grad=False)
    layer.weight_scale = torch.nn.Parameter(layer.weight_scale.data[:, : k_main // c.group_size].contiguous(),
                                            requires_grad=False)


def _dense_factors(layer: torch.nn.Module, c: TwinQuantLayerConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's factors in the activation dtype for torch matmuls: D [slots * rank, K], and U laid out
    block-diagonally over the slots, [N, slots * rank], so that one product (x D^T) U_bd^T gives every slot's term."""
    ds, us = _factor_scales(layer, c)
    down = fmt.dequantize_lowrank(layer.lowrank_down.data, ds, c.act_dtype).contiguous()
    up = fmt.dequantize_lowrank(layer.lowrank_up.data, us, c.act_dtype)
    bounds = (0, *c.slot_bounds, c.out_features)
    up_bd = torch.zeros(c.out_features, len(c.slot_sizes) * c.rank, dtype=c.act_dtype, device=up.device)
    for s in range(len(bounds) - 1):
        up_bd[bounds[s] : bounds[s + 1], s * c.rank : (s + 1) * c.rank] = up[bounds[s] : bounds[s + 1]]
    return down, up_bd


@functools.cache
def _hadamard(block: int, device: torch.device) -> torch.Tensor:
    """H_block in float32 on `device`, one per block size and device, shared by every layer that uses it
    (Llama-3-8B's o_proj alone would otherwise hold a 64 MB copy per block)."""
    return fmt.hadamard_matrix(block, torch.float32, device)


def _layer_shape(c: TwinQuantLayerConfig):
    """The layer as csrc_triton's plan sees it."""
    from csrc_triton import LayerShape

    return LayerShape(c.out_features, c.in_features, c.group_size, c.rank, c.slot_bounds, c.act_dtype,
                      c.int8_lowrank, c.act_quant)


KERNELS: list[type[TwinQuantKernel]] = [TritonTwinQuantKernel, CpuInt4PackTwinQuantKernel, CpuWna16TwinQuantKernel,
                                        TorchTwinQuantKernel]
_LOGGED: set = set()


def _log_once(key, message) -> None:
    if key not in _LOGGED:
        _LOGGED.add(key)
        log.info(message())


def choose_kernel(c: TwinQuantLayerConfig) -> type[TwinQuantKernel]:
    """The first kernel of KERNELS that is not disabled and can implement the layer."""
    reasons = []
    for k in KERNELS:
        if envs.disabled(k.name):
            reasons.append(f"{k.name}: disabled by TWINQUANT_DISABLED_KERNELS")
            continue
        ok, why = k.can_implement(c)
        if ok:
            kind = c.name.rsplit(".", 1)[-1]
            _log_once((k.name, kind, c.in_features, c.out_features), lambda k=k, kind=kind: (
                f"twinquant: {kind or 'layer'} {c.in_features}->{c.out_features} r{c.rank}: {k.name}"
                + (f" (not: {'; '.join(reasons)})" if reasons else "")))
            return k
        reasons.append(f"{k.name}: {why}")
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
        act_quant: str = "none",
        act_clip: float = 1.0,
    ) -> torch.Tensor:
        from csrc_triton import linear as tq_linear

        return tq_linear(x, qweight, scales, group_size, down, up, bias, tuple(slot_bounds),
                         down_scale=down_scale, up_scale=up_scale, act_quant=act_quant, act_clip=act_clip)

    @linear.register_fake
    def _(x, qweight, scales, down, up, bias, group_size, slot_bounds, down_scale=None, up_scale=None,
          act_quant="none", act_clip=1.0):
        return x.new_empty((x.shape[0], qweight.shape[0]))


_register_custom_op()
