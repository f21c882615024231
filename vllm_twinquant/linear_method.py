"""vLLM glue for one TwinQuant linear layer: parameters, their tensor-parallel loading,
post-load checks, and the call into the chosen kernel.

Sharding (column-parallel = output rows split over ranks, row-parallel = input columns):

    tensor          column-parallel            row-parallel
    weight_packed   rows split                 packed columns split
    weight_scale    rows split                 group columns split
    lowrank_down    replicated (one per slot)  columns split
    lowrank_up      rows split                 replicated
    lowrank_down_scale (int8 factors) replicated (one per slot), as lowrank_down's rows
    lowrank_up_scale   (int8 factors) rows split  replicated, as lowrank_up's rows

Row-parallel ranks each produce x_p R_p^T + (x_p D_p^T) U^T; the layer's all-reduce sums
them into x R^T + (x D^T) U^T because the up projection is linear. With quantized activations
(W4A8, W4A4) each rank quantizes its own columns x_p per token, one scale per token and rank
(`format.quantize_activations(shards=...)`), as vLLM's dynamic FP8 does: no collective for a
token's maximum, and the logits depend slightly on the tensor-parallel size.

A quantized lm_head (vLLM's ParallelLMHead, vocabulary-parallel) is column-parallel over the
vocabulary: every tensor with a row per vocabulary entry (weight_packed, weight_scale,
lowrank_up, lowrank_up_scale) takes this rank's rows of the checkpoint's vocabulary and leaves
the padding rows zero (logits 0, cut off by the logits processor); lowrank_down and its scales
are whole on every rank. `_VocabRowsLoader` is that rule.
"""

from __future__ import annotations

import torch
from vllm.model_executor.layers.linear import LinearMethodBase, register_weight_loader_v2_supported_method
from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
from vllm.model_executor.parameter import (
    BasevLLMParameter,
    ChannelQuantScaleParameter,
    GroupQuantScaleParameter,
    PackedvLLMParameter,
)

from vllm_twinquant import format as fmt
from vllm_twinquant.kernels import TwinQuantLayerConfig, choose_kernel

VOCAB_ROW_TENSORS = (fmt.WEIGHT_PACKED, fmt.WEIGHT_SCALE, fmt.LOWRANK_UP, fmt.LOWRANK_UP_SCALE)


class _VocabRowsLoader:
    """The weight loader of a quantized lm_head's tensors (the module docstring's rule)."""

    def __init__(self, layer: VocabParallelEmbedding, prefix: str):
        self.layer, self.prefix = layer, prefix

    def __call__(self, param: torch.nn.Parameter, loaded: torch.Tensor) -> None:
        layer = self.layer
        name = next(n for n, p in layer.named_parameters(recurse=False) if p is param)
        if name in VOCAB_ROW_TENSORS:
            if loaded.shape[0] != layer.org_vocab_size:
                raise ValueError(f"{self.prefix}.{name}: checkpoint tensor has {loaded.shape[0]} rows, expected one "
                                 f"per vocabulary entry ({layer.org_vocab_size})")
            first = layer.shard_indices.org_vocab_start_index
            loaded = loaded.narrow(0, first, layer.shard_indices.org_vocab_end_index - first)
        elif loaded.shape[0] > param.shape[0]:
            raise ValueError(f"{self.prefix}.{name}: checkpoint tensor has {loaded.shape[0]} rows, expected at most "
                             f"{param.shape[0]} (the rank quantization_config gives this layer)")
        if tuple(loaded.shape[1:]) != tuple(param.shape[1:]):
            raise ValueError(f"{self.prefix}.{name}: checkpoint tensor is {list(loaded.shape)}, expected "
                             f"[rows, {', '.join(map(str, param.shape[1:]))}]")
        param.data.zero_()
        param.data[: loaded.shape[0]].copy_(loaded)


class _LowRankParameter(BasevLLMParameter):
    """A low-rank factor whose stored width `rank` may be padded beyond a sub-layer's
    own rank (merged layers pad every slot to the widest); padding stays zero."""

    def __init__(self, rank: int, prefix: str, **kwargs):
        self.rank = rank
        self.prefix = prefix
        super().__init__(**kwargs)

    def _check_rank(self, r: int, name: str) -> None:
        if r > self.rank:
            raise ValueError(
                f"{self.prefix}.{name}: checkpoint rank {r} exceeds the rank {self.rank} that "
                "quantization_config gives this layer"
            )


class _SlotRowsParameter(_LowRankParameter):
    """Rows stacked by slot: sub-layer s of a merged layer owns rows [s * rank, s * rank + r_s);
    replicated over tensor-parallel ranks (a subclass narrows columns where it has them)."""

    tensor_name = ""  # the format's tensor name, for messages

    def _put(self, w: torch.Tensor, slot: int) -> None:
        self._check_rank(w.shape[0], self.tensor_name)
        if w.dim() > 1 and w.shape[1] != self.data.shape[1]:
            raise ValueError(
                f"{self.prefix}.{self.tensor_name}: checkpoint tensor has {w.shape[1]} columns, "
                f"expected {self.data.shape[1]}"
            )
        self.data[slot * self.rank : slot * self.rank + w.shape[0]].copy_(w)

    def load_column_parallel_weight(self, loaded_weight):
        self._put(loaded_weight, 0)

    def load_merged_column_weight(self, loaded_weight, **kwargs):
        self._put(loaded_weight, int(kwargs["shard_id"]))

    def load_qkv_weight(self, loaded_weight, **kwargs):
        self._put(loaded_weight, self._shard_id_as_int(kwargs["shard_id"]))

    def load_row_parallel_weight(self, loaded_weight):
        self._put(loaded_weight, 0)


class LowRankDownParameter(_SlotRowsParameter):
    """lowrank_down, stored [slots * rank, in_features]; row-parallel layers split its columns."""

    tensor_name = fmt.LOWRANK_DOWN

    def load_row_parallel_weight(self, loaded_weight):
        k = self.data.shape[1]
        self._put(loaded_weight.narrow(1, self.tp_rank * k, k), 0)


class LowRankDownScaleParameter(_SlotRowsParameter):
    """lowrank_down_scale of int8 factors, stored [slots * rank]: one per row of lowrank_down,
    replicated on every rank (padding rows keep scale 0)."""

    tensor_name = fmt.LOWRANK_DOWN_SCALE


class LowRankUpParameter(_LowRankParameter):
    """lowrank_up, stored [out_features, rank]."""

    def _put(self, w: torch.Tensor, offset: int, size: int) -> None:
        self._check_rank(w.shape[1], fmt.LOWRANK_UP)
        self.data[offset : offset + size, : w.shape[1]].copy_(w)

    def load_column_parallel_weight(self, loaded_weight):
        n = self.data.shape[0]
        self._put(loaded_weight.narrow(0, self.tp_rank * n, n), 0, n)

    def load_merged_column_weight(self, loaded_weight, **kwargs):
        off, size = kwargs["shard_offset"], kwargs["shard_size"]
        self._put(loaded_weight.narrow(0, self.tp_rank * size, size), off, size)

    def load_qkv_weight(self, loaded_weight, **kwargs):
        off, size = kwargs["shard_offset"], kwargs["shard_size"]
        idx = self.tp_rank if kwargs["shard_id"] == "q" else self.tp_rank // kwargs["num_heads"]
        self._put(loaded_weight.narrow(0, idx * size, size), off, size)

    def load_row_parallel_weight(self, loaded_weight):
        if loaded_weight.shape[0] != self.data.shape[0]:
            raise ValueError(
                f"{self.prefix}.{fmt.LOWRANK_UP}: checkpoint tensor has {loaded_weight.shape[0]} rows, "
                f"expected {self.data.shape[0]}"
            )
        self._put(loaded_weight, 0, self.data.shape[0])


@register_weight_loader_v2_supported_method
class TwinQuantLinearMethod(LinearMethodBase):
    """Linear method for TwinQuant checkpoints (format in vllm_twinquant/format.py)."""

    def __init__(self, spec: fmt.TwinQuantSpec, prefix: str, ranks: list[int], activation_subspace: int = 0):
        self.spec = spec
        self.prefix = prefix
        self.ranks = ranks  # one per sub-layer, as the checkpoint stores them
        self.activation_subspace = activation_subspace  # shared by the sub-layers (one input)

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ):
        spec, g = self.spec, self.spec.group_size
        k = input_size_per_partition
        if k % g or k % fmt.PACK_FACTOR:
            raise ValueError(
                f"{self.prefix}: group_size {g} does not divide this rank's {k} input columns "
                f"(in_features {input_size}); use a tensor-parallel size that keeps whole groups"
            )
        if len(self.ranks) != len(output_partition_sizes):
            raise ValueError(
                f"{self.prefix}: {len(output_partition_sizes)} fused sub-layers but ranks {self.ranks}"
            )
        n = sum(output_partition_sizes)
        rank = max(self.ranks)
        head = isinstance(layer, VocabParallelEmbedding)
        wl = _VocabRowsLoader(layer, self.prefix) if head else extra_weight_attrs["weight_loader"]
        layer.register_parameter(
            fmt.WEIGHT_PACKED,
            PackedvLLMParameter(
                data=torch.empty(n, k // fmt.PACK_FACTOR, dtype=torch.int32),
                input_dim=1, output_dim=0, packed_dim=1, packed_factor=fmt.PACK_FACTOR, weight_loader=wl,
            ),
        )
        layer.register_parameter(
            fmt.WEIGHT_SCALE,
            GroupQuantScaleParameter(
                data=torch.empty(n, k // g, dtype=spec.scale_torch_dtype), input_dim=1, output_dim=0, weight_loader=wl
            ),
        )
        if rank:
            slots = len(output_partition_sizes)
            layer.register_parameter(
                fmt.LOWRANK_DOWN,
                LowRankDownParameter(
                    rank=rank, prefix=self.prefix,
                    data=torch.zeros(slots * rank, k, dtype=spec.lowrank_torch_dtype), weight_loader=wl,
                ),
            )
            layer.register_parameter(
                fmt.LOWRANK_UP,
                LowRankUpParameter(
                    rank=rank, prefix=self.prefix,
                    data=torch.zeros(n, rank, dtype=spec.lowrank_torch_dtype), weight_loader=wl,
                ),
            )
            if spec.lowrank_dtype == "int8":
                layer.register_parameter(
                    fmt.LOWRANK_DOWN_SCALE,
                    LowRankDownScaleParameter(
                        rank=rank, prefix=self.prefix, data=torch.zeros(slots * rank, dtype=torch.float32),
                        weight_loader=wl,
                    ),
                )
                layer.register_parameter(
                    fmt.LOWRANK_UP_SCALE,
                    ChannelQuantScaleParameter(
                        data=torch.zeros(n, dtype=torch.float32), output_dim=0, weight_loader=wl
                    ),
                )
        hadamard = fmt.hadamard_block_size(input_size) if spec.has_online_hadamard(self.prefix) else 0
        if hadamard and k % hadamard:
            raise ValueError(
                f"{self.prefix}: the online Hadamard block {hadamard} does not divide "
                f"this rank's {k} input columns; use a smaller tensor-parallel size"
            )
        subspace = self.activation_subspace
        if subspace and (k != input_size or not 0 < subspace < k):
            raise ValueError(
                f"{self.prefix}: activation_subspace_channels = {subspace} needs the layer's whole input "
                f"({input_size} columns, {k} on this rank) and fewer channels than that"
            )
        layer.twinquant_config = TwinQuantLayerConfig(
            in_features=k, slot_sizes=tuple(output_partition_sizes), rank=rank, group_size=g, act_dtype=params_dtype,
            activation_bits=spec.activation_bits, activation_type=spec.activation_type,
            activation_clip=float(spec.activation_clip_ratio),
            online_hadamard=hadamard, activation_subspace=subspace,
            activation_subspace_bits=spec.activation_subspace_bits,
            int8_lowrank=bool(rank) and spec.lowrank_dtype == "int8", name=self.prefix,
        )

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        c: TwinQuantLayerConfig = layer.twinquant_config
        names = [fmt.WEIGHT_PACKED, fmt.WEIGHT_SCALE] + ([fmt.LOWRANK_DOWN, fmt.LOWRANK_UP] if c.rank else [])
        names += [fmt.LOWRANK_DOWN_SCALE, fmt.LOWRANK_UP_SCALE] if c.int8_lowrank else []
        for name in names:
            data = getattr(layer, name).data
            if name != fmt.WEIGHT_PACKED:
                fmt.check_finite(data, f"{self.prefix}.{name}")
            # float factors are served in the activation dtype; int8 ones stay int8 (the kernels scale them)
            if name in (fmt.LOWRANK_DOWN, fmt.LOWRANK_UP) and not c.int8_lowrank and data.dtype != c.act_dtype:
                if c.act_dtype == torch.float16 and float(data.abs().max()) > torch.finfo(torch.float16).max:
                    raise ValueError(f"{self.prefix}.{name}: values exceed the float16 range; serve in bfloat16")
                data = data.to(c.act_dtype)
            # plain Parameters from here on: torch.compile does not trace the loader classes
            setattr(layer, name, torch.nn.Parameter(data.contiguous(), requires_grad=False))
        kernel_cls = choose_kernel(c)
        layer.twinquant_kernel = kernel_cls(c)
        layer.twinquant_kernel.process_weights_after_loading(layer)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return layer.twinquant_kernel.apply(layer, x, bias)

    def tie_weights(self, layer: torch.nn.Module, embed_tokens: torch.nn.Module):
        raise ValueError(f"{self.prefix}: the checkpoint quantizes lm_head, but its config.json ties lm_head to the "
                         "embeddings (tie_word_embeddings: true); a quantized lm_head is stored untied")
