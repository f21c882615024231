"""A TwinQuant checkpoint as a transformers model, outside vLLM: the reference that served
logprobs are tested against, the student that end-to-end tuning trains, and what the end-to-end
check of a finished checkpoint runs.

`load_checkpoint_model(ckpt, make_layer)` builds the checkpoint's architecture in float32 with its
unquantized tensors (embeddings, norms, lm_head, biases) as stored and every quantized linear
replaced by `make_layer(name, layer)`; `served_model(ckpt)` uses `decompose.ServedLinear`, i.e.
exactly what the plugin's torch path computes (online Hadamard and activation quantization
included). Linears fused on disk (Phi-3) are stored split; they come back as a `PartsLinear`
concatenating the parts' outputs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from offline_quantizer.checkpoint import read_tensors
from offline_quantizer.decompose import Decomposed, ServedLinear
from offline_quantizer.families import WRITERS, family_for
from vllm_twinquant import format as fmt


@dataclass
class StoredLayer:
    """One quantized layer's tensors, factors dequantized to float32."""

    codes: torch.Tensor  # int8 [N, K]
    scales: torch.Tensor
    up: torch.Tensor | None
    down: torch.Tensor | None
    bias: torch.Tensor | None
    hadamard: bool
    subspace: int


class PartsLinear(torch.nn.Module):
    """A linear fused on disk, served as its stored parts: outputs concatenated in order."""

    def __init__(self, parts: list[torch.nn.Module]):
        super().__init__()
        self.parts = torch.nn.ModuleList(parts)

    def forward(self, x):
        return torch.cat([p(x) for p in self.parts], dim=-1)


def stored_layers(tensors: dict, spec: fmt.TwinQuantSpec) -> dict[str, StoredLayer]:
    out = {}
    for key, packed in tensors.items():
        if not key.endswith("." + fmt.WEIGHT_PACKED):
            continue
        name = key[: -len(fmt.WEIGHT_PACKED) - 1]
        k = packed.shape[1] * fmt.PACK_FACTOR
        down = tensors.get(f"{name}.{fmt.LOWRANK_DOWN}")
        up = tensors.get(f"{name}.{fmt.LOWRANK_UP}")
        if down is not None:
            down = fmt.dequantize_lowrank(down, tensors.get(f"{name}.{fmt.LOWRANK_DOWN_SCALE}"))
            up = fmt.dequantize_lowrank(up, tensors.get(f"{name}.{fmt.LOWRANK_UP_SCALE}"))
        out[name] = StoredLayer(fmt.unpack_codes(packed, k), tensors[f"{name}.{fmt.WEIGHT_SCALE}"], up, down,
                                tensors.get(f"{name}.bias"), spec.has_online_hadamard(name),
                                spec.subspace_channels_for(name))
    return out


def checkpoint_config(ckpt: str):
    """The transformers config of a checkpoint's architecture (quantization_config left out)."""
    from transformers import AutoConfig

    with open(os.path.join(ckpt, "config.json")) as f:
        cfg = json.load(f)
    cfg.pop("quantization_config", None)
    model_type = cfg.pop("model_type")
    return AutoConfig.for_model(model_type, **{k: v for k, v in cfg.items() if not k.startswith("_")})


def load_checkpoint_model(ckpt: str, make_layer: Callable[[str, StoredLayer], torch.nn.Module],
                          tensors: dict | None = None):
    """(model, {module name: its quantized parts' names}) for a TwinQuant checkpoint folder."""
    from transformers import AutoModelForCausalLM

    spec = fmt.load_spec(ckpt)
    tensors = read_tensors(ckpt) if tensors is None else tensors
    cfg = checkpoint_config(ckpt)
    fam = family_for(cfg)
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    layers = stored_layers(tensors, spec)
    modules: dict[str, list[str]] = {}
    for name in layers:
        modules.setdefault(_owner(name, fam), []).append(name)
    for owner, parts in modules.items():  # parts in their output-row order
        order = [p.rsplit(".", 1)[-1] for f, ps in fam.stored_split.items() if owner.endswith(f) for p in ps]
        if order:
            parts.sort(key=lambda p: order.index(p.rsplit(".", 1)[-1]))
    state = {k: v.float() for k, v in tensors.items()
             if k.rsplit(".", 1)[0] not in layers and not k.rsplit(".", 1)[-1].startswith(("weight_", "lowrank_"))}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"{ckpt}: tensors {unexpected[:4]} do not belong to its {type(model).__name__} architecture")
    for owner, parts in modules.items():
        parent, _, attr = owner.rpartition(".")
        built = [make_layer(p, layers[p]) for p in parts]
        setattr(model.get_submodule(parent), attr, built[0] if len(parts) == 1 and parts[0] == owner else
                PartsLinear(built))
    left = [m for m in missing if m.rsplit(".", 1)[0] not in modules
            and not (m == "lm_head.weight" and cfg.tie_word_embeddings)]
    if left:
        raise ValueError(f"{ckpt}: no tensor for {left[:4]}")
    if cfg.tie_word_embeddings:
        model.tie_weights()
    return model, modules


def _owner(name: str, fam) -> str:
    """The module a stored layer belongs to: itself, or the fused linear it is a part of."""
    for fused, parts in fam.stored_split.items():
        for part in parts:
            if name.endswith("." + part):
                return name[: -len(part)] + fused
    return name


def served_model(ckpt: str, tensor_parallel_size: int = 1):
    """The checkpoint as the plugin's torch path serves it, in float32, on `tensor_parallel_size` ranks: the
    row-parallel layers (families.WRITERS) then quantize each rank's input columns per token on their own."""
    spec = fmt.load_spec(ckpt)

    def make(name: str, s: StoredLayer) -> torch.nn.Module:
        d = Decomposed(s.codes, s.scales.float(), s.down, s.up)
        shards = tensor_parallel_size if name.endswith(WRITERS) else 1
        return ServedLinear(d, s.bias, s.hadamard, spec.activation_bits, spec.activation_clip_ratio, s.subspace,
                            spec.activation_subspace_bits, spec.activation_type, shards)

    return load_checkpoint_model(ckpt, make)[0]
