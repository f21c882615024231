"""The TwinQuant linear layer on CUDA (or in Triton's interpreter): run the plan.

    y = x @ deq(R)^T + (x @ D^T) @ U^T + bias

`linear` is what the plugin calls (through the custom op `twinquant::linear`): the plan of
`dispatch.py` picks the kernel for x's token count, the low-rank down projection runs first (when
the layer has a rank), then the residual kernel adds the up projection and the bias in its
epilogue. `gemm` is the same without the large-M path; both take a forced `config` (a kernel's
config dataclass) for tests and sweeps.
"""

from __future__ import annotations

import torch

from csrc_triton.dispatch import KernelPlan, _finish, cached_plan, kernels, tables_for
from csrc_triton.kernels.base import NO_BOUNDARY, Device, Launch, LayerShape
from csrc_triton.kernels.dequant import DequantConfig
from csrc_triton.kernels.fp8_cublas import Fp8CublasConfig
from csrc_triton.kernels.gemv import GemvConfig
from csrc_triton.kernels.lowrank_down import lowrank_down
from csrc_triton.kernels.tile import TileConfig
from csrc_triton.kernels.w4a8 import W4a8Config
from csrc_triton.layout import check_factor

CONFIG_KERNELS = {GemvConfig: "gemv", TileConfig: "tile", DequantConfig: "dequant_cublas", W4a8Config: "w4a8",
                  Fp8CublasConfig: "fp8_cublas"}


def config_kernel(config) -> str:
    """The name of the kernel a config dataclass belongs to."""
    if type(config) in CONFIG_KERNELS:
        return CONFIG_KERNELS[type(config)]
    from csrc_triton.kernels.mma_decode import MmaConfig
    from csrc_triton.kernels.w4a8_rs import W4a8RsConfig
    from csrc_triton.kernels.w4a8_ws import W4a8WsConfig
    from csrc_triton.kernels.wgmma_rs import RsConfig

    names = {MmaConfig: "mma_decode", RsConfig: "wgmma_rs", W4a8RsConfig: "w4a8_rs", W4a8WsConfig: "w4a8_ws"}
    if type(config) not in names:
        raise TypeError(f"config {config!r}: expected a kernel's config dataclass "
                        f"({', '.join(t.__name__ for t in [*CONFIG_KERNELS, *names])})")
    return names[type(config)]


def linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    down: torch.Tensor | None = None,
    up: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    slot_bounds: tuple[int, ...] = (),
    large_m_threshold: int | None = None,
    down_scale: torch.Tensor | None = None,
    up_scale: torch.Tensor | None = None,
    config=None,
    out: torch.Tensor | None = None,
    fused_only: bool = False,
    act_quant: str = "none",
    act_clip: float = 1.0,
) -> torch.Tensor:
    """The layer for x [M, K] (fp16/bf16, row-major). qweight int32 [N, K/8] in the `repack`
    layout, scales [N, K/G] as stored; down [slots*R, K] and up [N, R] in x's dtype, or int8 with
    fp32 row scales down_scale [slots*R], up_scale [N] (None for rank 0). slot_bounds: first output
    row of slots 1 and 2 of a merged layer. large_m_threshold: in place of the table's (0: always
    the dequantize + cuBLAS path); fused_only: never that path; config: a forced launch config;
    act_quant: "fp8"/"int8" for a W4A8 layer (`kernels/w4a8.py`, `w4a8_rs.py`), "int4" for W4A4's codes
    (at scale act_clip * max|x| / 7 per token) on the same kernels."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError("x must be a row-major 2-D tensor")
    m, k = x.shape
    n = qweight.shape[0]
    if qweight.shape[1] * 8 != k or k % group_size:
        raise ValueError(f"codes {list(qweight.shape)} and group size {group_size} do not fit K = {k}")
    if len(slot_bounds) > 2:
        raise ValueError("at most three slots per merged layer")
    has_lr = down is not None and down.shape[0] > 0
    shape = LayerShape(n, k, group_size, up.shape[1] if has_lr else 0, tuple(slot_bounds), x.dtype,
                       down_scale is not None, act_quant)
    device = Device.of(x.device)
    if config is not None:
        p = _finish(config_kernel(config), config, m, shape, device, tables_for(device.name, device.capability))
    else:
        p = cached_plan(shape, m, device, large_m_threshold, fused_only)
    return run(p, x, qweight, scales, group_size, down if has_lr else None, up if has_lr else None, bias,
               tuple(slot_bounds), down_scale, up_scale, out, act_quant, act_clip)


def gemm(x, qweight, scales, group_size, down=None, up=None, bias=None, slot_bounds=(), config=None, out=None,
         down_scale=None, up_scale=None, act_quant="none", act_clip=1.0) -> torch.Tensor:
    """`linear` without the large-M path: one of the fused kernels at every M."""
    return linear(x, qweight, scales, group_size, down, up, bias, slot_bounds, down_scale=down_scale,
                  up_scale=up_scale, config=config, out=out, fused_only=True, act_quant=act_quant, act_clip=act_clip)


def run(p: KernelPlan, x, qweight, scales, group_size, down, up, bias, slot_bounds, down_scale, up_scale,
        out=None, act_quant: str = "none", act_clip: float = 1.0) -> torch.Tensor:
    m, n = x.shape[0], qweight.shape[0]
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if up is not None:
        check_factor(up, up_scale, n, "up")
    b1, b2 = (*slot_bounds, NO_BOUNDARY, NO_BOUNDARY)[:2]

    def make_t():
        if up is None:
            return None, 0
        ws = lowrank_down(x, down, p.lowrank.splits, reduce=p.lowrank.reduce, down_scale=down_scale,
                          trigger=p.pdl_trigger, block_r=p.lowrank.block_r)
        return ws, ws.shape[0]

    shape = LayerShape(n, x.shape[1], group_size, slot_bounds=slot_bounds)
    t_in = up is not None and p.lowrank is not None and p.lowrank.in_kernel
    a = Launch(x, qweight, scales, down, up, down_scale if up is not None else None,
               up_scale if up is not None else None, bias, out, group_size, b1, b2, shape.max_block_n,
               p.pdl_trigger > 0, make_t, act_quant, act_clip, p.lowrank.splits if t_in else 0,
               p.lowrank.block_r if t_in else 64)
    kernels()[p.kernel].launch(a, p.config)
    return out
