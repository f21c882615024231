"""What every CUDA kernel of the plan shares: the layer it serves (`LayerShape`), the device
(`Device`), one call's operands (`Launch`), and the interface (`Kernel`): `can_implement` with a
reason, `choose` a launch configuration from the device's table, `launch`; and the scratch of t = x D^T
made inside a residual kernel's own launch (`t_scratch`, `t_pieces`: gemv.py, mma_decode.py)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton

from csrc_triton.layout import max_block_n_for
from vllm_twinquant import envs

NO_BOUNDARY = 1 << 30  # a slot boundary past every row: that slot does not exist
# The most bytes of transient weights a large-M kernel (dequant_cublas, fp8_cublas) makes at once: a wider layer is
# made and multiplied in row ranges (a 128k-vocabulary lm_head is 1 GB in bf16 at K = 4096)
TRANSIENT_BYTES = 256 << 20


def row_ranges(k: int, slot_edges: tuple[int, ...], bytes_per_weight: int) -> list[tuple[int, int]]:
    """The output-row ranges a large-M kernel makes its transient weights for, one at a time, for a layer of
    input width k whose slots start at slot_edges (then N): the whole layer where it takes at most
    TRANSIENT_BYTES, else ranges of a multiple of 128 rows inside one slot each, of at most that many bytes."""
    n = slot_edges[-1]
    if n * k * bytes_per_weight <= TRANSIENT_BYTES:
        return [(0, n)]
    rows = max(128, TRANSIENT_BYTES // (k * bytes_per_weight) // 128 * 128)
    return [(lo, min(lo + rows, hi)) for a, hi in zip(slot_edges, slot_edges[1:]) for lo in range(a, hi, rows)]


# t made inside a residual launch (`Launch.t_splits`): the scratch holds t for up to T_SCRATCH_TOKENS tokens x
# T_ROWS rows of D (each kernel takes up to its own T_TOKENS of them)
T_SCRATCH_TOKENS = 16
T_ROWS = 1024
_T_SCRATCH: dict = {}


def t_scratch(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The scratch of t made inside a residual launch on a device: t fp32 [T_SCRATCH_TOKENS * T_ROWS] and the
    counters int32 [4] (tickets, pieces done, residual programs done), all zero between calls (the launch leaves
    them so). Shared by the layers of a device, which vLLM runs one after another on one stream; allocated at
    layer load (vllm_twinquant.kernels), not inside a CUDA-graph capture."""
    key = (device.type, device.index)
    if key not in _T_SCRATCH:
        _T_SCRATCH[key] = (torch.zeros(T_SCRATCH_TOKENS * T_ROWS, dtype=torch.float32, device=device),
                           torch.zeros(4, dtype=torch.int32, device=device))
    return _T_SCRATCH[key]


def t_pieces(k: int, rt: int, splits: int, block_r: int) -> tuple[int, int]:
    """(pieces of t, columns per K-slice) for t made inside a residual launch: `splits` K-slices (whole
    64-column steps) of every block of block_r rows of D."""
    k_per = triton.cdiv(triton.cdiv(k, splits), 64) * 64
    return triton.cdiv(k, k_per) * triton.cdiv(rt, block_r), k_per


@dataclass(frozen=True)
class TSource:
    """Where a decode kernel's launch reads t = x D^T (`Launch.t_source`): the down projection's workspace ws
    (num_splits K-slices, strides ws_strides), or, `in_launch`, the zeroed `t_scratch` that its first t_progs
    programs fill (pieces of k_per columns of D's rt rows; sync: the counters). Unused pointers are x."""

    in_launch: bool
    ws: torch.Tensor | None
    num_splits: int
    ws_strides: tuple[int, int]
    sync: torch.Tensor
    down: torch.Tensor
    down_scale: torch.Tensor
    rt: int = 0
    t_progs: int = 0
    k_per: int = 0
    stride_dr: int = 0


@dataclass(frozen=True)
class LayerShape:
    """A TwinQuant linear layer as the kernels see it (this tensor-parallel rank's part)."""

    n: int  # output rows
    k: int  # input columns
    group_size: int
    rank: int = 0
    slot_bounds: tuple[int, ...] = ()  # first output row of slots 1 and 2 of a merged layer
    dtype: torch.dtype = torch.bfloat16  # activations
    int8_factors: bool = False
    act_quant: str = "none"  # the residual product's input: "none" (W4A16), "fp8"/"int8" (W4A8), "int4" (W4A4)

    @property
    def max_block_n(self) -> int:
        """Widest power-of-two output tile that lies inside one slot (0: none from 16 up)."""
        return max_block_n_for((self.n, *self.slot_bounds)) if self.slot_bounds else 256


@dataclass(frozen=True)
class Device:
    """What the plan needs to know about the device a layer runs on."""

    name: str  # torch.cuda.get_device_name(), or "cpu"
    capability: tuple[int, int] | None  # None: not CUDA
    smem_optin: int  # bytes of shared memory a program may opt into
    triton: str  # triton.__version__
    interpreted: bool  # TRITON_INTERPRET=1
    index: int | None = None
    torch_version: str = torch.__version__  # the torch and CUDA runtime its kernels run with
    cuda_runtime: str | None = torch.version.cuda

    @property
    def cuda(self) -> bool:
        return self.capability is not None and not self.interpreted

    @staticmethod
    def of(device: torch.device) -> Device:
        return _device(device.type, device.index if device.index is not None else 0)

    @staticmethod
    def named(name: str, capability: tuple[int, int] = (9, 0), triton_version: str = "3.6.0",
              torch_version: str = "2.11.0", cuda_runtime: str = "13.0") -> Device:
        """A device described rather than present (python -m vllm_twinquant.explain); by default with
        the software the tables were measured with."""
        return Device(name, capability, 227 << 10, triton_version, False, 0, torch_version, cuda_runtime)


@functools.cache
def _device(kind: str, index: int) -> Device:
    interpreted = envs.triton_interpreted()
    if kind != "cuda" or not torch.cuda.is_available():
        return Device("cpu", None, 48 << 10, triton.__version__, interpreted, None)
    props = torch.cuda.get_device_properties(index)
    return Device(torch.cuda.get_device_name(index), torch.cuda.get_device_capability(index),
                  getattr(props, "shared_memory_per_block_optin", 48 << 10), triton.__version__, interpreted, index)


@dataclass
class Launch:
    """One call of a residual kernel. `make_t` launches the low-rank down projection and returns
    (t's workspace, its number of K-slices); a kernel calls it right before its own launch, after
    any buffer it allocates, so that with PDL the two launches are adjacent."""

    x: torch.Tensor
    qweight: torch.Tensor
    scales: torch.Tensor
    down: torch.Tensor | None
    up: torch.Tensor | None
    down_scale: torch.Tensor | None
    up_scale: torch.Tensor | None
    bias: torch.Tensor | None
    out: torch.Tensor
    group_size: int
    slot_b1: int
    slot_b2: int
    max_block_n: int  # widest output tile inside one slot (LayerShape.max_block_n)
    pdl: bool
    make_t: Callable[[], tuple[torch.Tensor | None, int]]
    act_quant: str = "none"  # LayerShape.act_quant
    act_clip: float = 1.0  # int4 codes: the per-token scale is act_clip * max|x| / 7 (format.per_token_codes)
    t_splits: int = 0  # > 0: the kernel makes t itself in this many K-slices (gemv.py, mma_decode.py), not make_t
    t_block_r: int = 64  # rows of D per piece of t made that way

    @property
    def m(self) -> int:
        return self.x.shape[0]

    @property
    def n(self) -> int:
        return self.qweight.shape[0]

    @property
    def k(self) -> int:
        return self.x.shape[1]

    @property
    def has_lr(self) -> bool:
        return self.up is not None

    @property
    def rank(self) -> int:
        return self.up.shape[1] if self.up is not None else 0

    @property
    def has_us(self) -> bool:
        return self.up_scale is not None

    @property
    def slot_edges(self) -> tuple[int, ...]:
        """First output row of every slot, then N."""
        return (0, *[b for b in (self.slot_b1, self.slot_b2) if b < self.n], self.n)

    def row_ranges(self, bytes_per_weight: int) -> list[tuple[int, int]]:
        return row_ranges(self.k, self.slot_edges, bytes_per_weight)

    def t_source(self, kernel: str, t_tokens: int) -> TSource:
        """How t reaches a decode kernel's launch (gemv, mma_decode), taken right before it: made in the launch
        where `t_splits` says so (up to t_tokens tokens and T_ROWS rows of D), else by `make_t`."""
        x = self.x
        if not (self.has_lr and self.t_splits > 0):
            ws, num_splits = self.make_t()
            return TSource(False, ws, num_splits, (ws.stride(0), ws.stride(1)) if ws is not None else (0, 0), x, x, x)
        rt = self.down.shape[0]
        if self.m > t_tokens or rt > T_ROWS or self.t_block_r not in (16, 32, 64):
            raise ValueError(f"{kernel} with t made in the launch: {self.m} tokens (at most {t_tokens}), {rt} rows "
                             f"of D (at most {T_ROWS}), {self.t_block_r} rows per piece (16, 32 or 64)")
        t, sync = t_scratch(x.device)
        t_progs, k_per = t_pieces(self.k, rt, self.t_splits, self.t_block_r)
        return TSource(True, t, 1, (0, rt), sync, self.down, self.down_scale if self.down_scale is not None else x,
                       rt, t_progs, k_per, self.down.stride(0))

    def operands(self, ws: torch.Tensor | None) -> tuple:
        """The residual kernels' first pointer arguments: x, codes, scales, U, U's scales, t, bias
        (an unused one gets x, never read)."""
        x = self.x
        return (x, self.qweight, self.scales, self.up if self.has_lr else x, self.up_scale if self.has_us else x,
                ws if ws is not None else x, self.bias if self.bias is not None else x)

    def strides(self, ws: torch.Tensor | None) -> tuple:
        return (self.x.stride(0), self.qweight.stride(0), self.scales.stride(0),
                self.up.stride(0) if self.has_lr else 0, ws.stride(0) if ws is not None else 0,
                ws.stride(1) if ws is not None else 0)


class Kernel:
    """A residual kernel of the plan. `name` is what TWINQUANT_DISABLED_KERNELS and the plan
    print call it."""

    name = ""
    t_tokens = 0  # up to how many tokens the kernel can make t = x D^T in its own launch (`Launch.t_splits`)

    def can_implement(self, shape: LayerShape, device: Device) -> tuple[bool, str | None]:
        """(True, None), or (False, the reason). The default: any layer on any device, unless disabled;
        kernels with conditions check the switch first, then their own."""
        why = self.disabled()
        return why is None, why

    def choose(self, m: int, shape: LayerShape, tables):
        """The launch configuration for m tokens from the device's tables, or None where the
        table gives these tokens and this layer shape to another kernel."""
        raise NotImplementedError

    def launch(self, a: Launch, config) -> None:
        raise NotImplementedError

    def disabled(self) -> str | None:
        return "disabled by TWINQUANT_DISABLED_KERNELS" if envs.disabled(self.name) else None


class Unavailable(Kernel):
    """A kernel whose module could not be imported (no Gluon in this Triton, say)."""

    def __init__(self, name: str, why: str):
        self.name, self.why = name, why

    def can_implement(self, shape, device):
        return False, self.why
