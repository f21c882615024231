"""The dense model being quantized, read one tensor at a time.

`Source` opens a Hugging Face checkpoint folder (safetensors, one file or sharded) or wraps an
already loaded `PreTrainedModel`. Nothing is loaded up front: `tensor(name)` reads one tensor
(memory-mapped), `load_block(i)` builds decoder block i in float32 on a device, and `skeleton()`
is the model with its parameters on the meta device (buffers such as rotary frequencies real),
into which the quantizer loads the few modules it runs outside the blocks. So the quantizer holds
about one block at a time, whatever the model's size.
"""

from __future__ import annotations

import copy
import json
import os

import torch

from offline_quantizer.families import Family, check_block, family_for
from vllm_twinquant import format as fmt

LAYERS = "model.layers"
EMBED = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
HEAD = "lm_head.weight"


class SourceError(ValueError):
    """A source model that cannot be read as asked; the message names the folder and tensor."""


class Source:
    def __init__(self, model, tokenizer=None):
        from transformers import AutoConfig, PreTrainedModel

        self._state = None
        self._files: dict[str, str] = {}
        if isinstance(model, PreTrainedModel):
            self.path = getattr(model.config, "_name_or_path", "") or "<in-memory model>"
            self.config = model.config
            self._state = {k: v.detach() for k, v in model.state_dict().items()}
        elif isinstance(model, (str, os.PathLike)):
            self.path = os.fspath(model)
            if not os.path.isfile(os.path.join(self.path, "config.json")):
                raise SourceError(f"{self.path}: no config.json (expected a Hugging Face checkpoint folder)")
            self.config = AutoConfig.from_pretrained(self.path)
            self._files = self._index()
        else:
            raise SourceError(f"model {type(model).__name__}: expected a checkpoint folder or a PreTrainedModel")
        if getattr(self.config, "quantization_config", None):
            raise SourceError(f"{self.path}: already quantized ({self.config.quantization_config}); start from a "
                              "dense checkpoint")
        self.family: Family = family_for(self.config)
        self.tokenizer = tokenizer
        self.num_layers = int(self.config.num_hidden_layers)
        self.tied = bool(getattr(self.config, "tie_word_embeddings", False))

    def _index(self) -> dict[str, str]:
        names = os.listdir(self.path)
        if not any(n.endswith(".safetensors") for n in names):
            other = sorted(n for n in names if n.endswith((".bin", ".pt", ".gguf")))
            raise SourceError(f"{self.path}: no *.safetensors weights{f' (found {other})' if other else ''}; "
                              "convert the model with model.save_pretrained(folder) (safetensors is the default)")
        self._dtypes = {}
        out = {}
        for name, (path, _, dtype) in fmt.checkpoint_tensors(self.path).items():
            out[name] = path
            self._dtypes[name] = dtype
        return out

    def fingerprint(self) -> dict:
        """What identifies this source for resuming a run: its folder, files and sizes."""
        if self._state is not None:
            return {"path": self.path, "tensors": len(self._state)}
        files = sorted(set(self._files.values()))
        return {"path": os.path.abspath(self.path),
                "files": {os.path.basename(f): os.path.getsize(f) for f in files}}

    def has(self, name: str) -> bool:
        return name in (self._state if self._state is not None else self._files)

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor as stored (on the CPU)."""
        if name == HEAD and not self.has(HEAD) and self.tied:
            name = EMBED
        if self._state is not None:
            if name not in self._state:
                raise SourceError(f"{self.path}: the model has no tensor {name}")
            return self._state[name]
        if name not in self._files:
            raise SourceError(f"{self.path}: no tensor {name} in its safetensors files (is this a "
                              f"{type(self.config).__name__} checkpoint of the usual layout?)")
        from safetensors import safe_open

        # opened per read: a handle kept open keeps every page it touched mapped (and counted as
        # resident), which would grow with the model instead of staying one block
        with safe_open(self._files[name], "pt") as f:
            return f.get_tensor(name).clone()

    def tokenizer_or_load(self):
        if self.tokenizer is None:
            from transformers import AutoTokenizer

            if not os.path.isdir(self.path):
                raise SourceError("calibration text needs a tokenizer: pass tokenizer= with an in-memory model")
            self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        return self.tokenizer

    def skeleton(self):
        """The model with meta parameters and real buffers."""
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        cfg = copy.deepcopy(self.config)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(cfg)
        model.eval()
        inner = getattr(model, "model", None)
        if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "embed_tokens"):
            raise SourceError(f"{type(model).__name__}: expected model.layers and model.embed_tokens")
        return model

    def load_module(self, module: torch.nn.Module, prefix: str, device, dtype=torch.float32) -> torch.nn.Module:
        """Give every parameter of `module` (named `prefix` in the checkpoint) its stored value."""
        for name, p in list(module.named_parameters()):
            full = f"{prefix}.{name}" if prefix else name
            t = self.tensor(full)
            if tuple(t.shape) != tuple(p.shape):
                raise SourceError(
                    f"{self.path}: tensor {full} has shape {list(t.shape)}, the config says {list(p.shape)}"
                )
            owner, _, attr = name.rpartition(".")
            mod = module.get_submodule(owner) if owner else module
            mod._parameters[attr] = torch.nn.Parameter(t.to(device=device, dtype=dtype), requires_grad=False)
        for _, mod in module.named_modules():
            for attr, b in list(mod._buffers.items()):
                if b is not None and not b.is_meta:
                    mod._buffers[attr] = b.to(device)
        return module

    def load_block(self, skeleton, i: int, device) -> torch.nn.Module:
        """Decoder block i in float32 on `device` (a copy: the skeleton keeps its meta block)."""
        block = copy.deepcopy(skeleton.model.layers[i])
        check_block(self.family, block, f"{LAYERS}.{i}")
        return self.load_module(block, f"{LAYERS}.{i}", device)

    def block_dtypes(self, i: int) -> dict[str, torch.dtype]:
        """Stored dtype of each of block i's tensors (block-relative names)."""
        pre = f"{LAYERS}.{i}."
        if self._state is not None:
            return {k[len(pre):]: v.dtype for k, v in self._state.items() if k.startswith(pre)}
        return {k[len(pre):]: self._dtypes[k] for k in self._files if k.startswith(pre)}

    def dtype(self, name: str) -> torch.dtype:
        if name == HEAD and not self.has(HEAD) and self.tied:
            name = EMBED
        if self._state is not None:
            return self._state[name].dtype
        return self._dtypes[name]


def copy_tokenizer_files(src_dir: str, dst_dir: str) -> None:
    """Tokenizer, generation config, chat template, ...: every small non-weight file but config.json."""
    import shutil

    skip = ("config.json", "model.safetensors.index.json", "README.md")
    for fn in os.listdir(src_dir):
        src = os.path.join(src_dir, fn)
        if os.path.isfile(src) and not fn.endswith((".safetensors", ".bin", ".pt", ".gguf", ".pth")) and fn not in skip:
            shutil.copy2(src, os.path.join(dst_dir, fn))


def source_config_dict(source: Source) -> dict:
    if os.path.isdir(source.path):
        with open(os.path.join(source.path, "config.json")) as f:
            return json.load(f)
    return source.config.to_dict()
